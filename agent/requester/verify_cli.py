"""``doorbell-request verify DIR``: re-check an evidence directory offline (CONTRACT §8).

The device key comes from ``--device-key`` or from the key pinned in the requester's key
directory when the delivery arrived, never from ``device.jwk`` inside DIR alone: anyone able to
edit the directory could swap that file together with forged signatures.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agent.errors import KeyFileError, ReceiveError
from agent.keys import parse_public_key
from agent.requester.evidence import manifest_names, verify_evidence
from agent.requester.keyfiles import REQUESTER_JSON, load_keys, pinned_device_key, read_age_identity
from agent.requester.send import KEY_DIR_ENV


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``verify`` command."""
    p = sub.add_parser(
        "verify",
        help="re-check an evidence directory offline",
        description="Check every signature in evidence directory DIR against the pinned device "
        "key, every file's SHA-256 against the signed manifest and, with the age identity, "
        "that each age file decrypts to the video beside it. Exit status 0 only when "
        "everything holds, 1 naming each problem otherwise.",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="the evidence directory")
    p.add_argument(
        "--identity",
        type=Path,
        metavar="FILE",
        help="your age identity (e.g. KEYDIR/age-identity.txt): also decrypt and check each file",
    )
    p.add_argument(
        "--device-key",
        metavar="JWK",
        help="the device's public key (JWK/PEM file or text); default: the key pinned in --key",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="DIR",
        help=f"your key directory (default ${KEY_DIR_ENV} or .): pinned device keys, and your "
        "own public key for the receipt",
    )
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run ``verify``."""
    key_dir = args.key or Path(os.environ.get(KEY_DIR_ENV, "."))
    keys = load_keys(key_dir) if (key_dir / REQUESTER_JSON).is_file() else None
    names = manifest_names(args.directory)
    if names is None:
        raise ReceiveError(f"{args.directory} holds no readable manifest.jws")
    device_id = names[0]
    if args.device_key is not None:
        device_key = parse_public_key(args.device_key)
    else:
        pinned = pinned_device_key(key_dir, device_id) if keys is not None else None
        if pinned is None:
            raise KeyFileError(
                f"no key is pinned for device {device_id} in {key_dir}",
                hint="pass --key with the key directory that received it, or --device-key "
                "with the device's public key from its owner (device.jwk inside DIR is "
                "never trusted on its own)",
            )
        device_key = pinned
    identity = read_age_identity(args.identity) if args.identity is not None else None
    requester_key = (
        keys.signing_key.public_key() if keys is not None and keys.requester_id == names[1]
        else None
    )
    report = verify_evidence(
        args.directory, device_key=device_key, identity=identity, requester_key=requester_key
    )
    for problem in report.problems:
        print(f"FAIL {problem}")
    if not report.ok:
        print(f"evidence of request {report.request_id}: {len(report.problems)} problem(s)")
        return 1
    checked = f"{report.files} file(s), {report.responses} response(s)"
    if identity is not None:
        checked += f", {report.decrypted} decrypted"
    print(f"evidence of request {report.request_id} verified: {checked}, manifest and receipt")
    return 0
