"""``doorbell-agent requesters add|list|revoke``: who may ask this device for footage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.audit import AuditLog
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.errors import KeyFileError, RequestError, UsageError
from agent.keys import load_device_key, parse_public_key
from agent.paths import StatePaths
from agent.requests.store import RequestStore
from agent.requests.verify import REQUESTER_KINDS

KEY_HINT = (
    "give the requester's public key as a JWK (file or JSON string), a PEM file, or the raw "
    "32 bytes in base64url; `doorbell-request keygen` writes public-key.jwk"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``requesters`` command group."""
    p = sub.add_parser("requesters", help="enrol, list or revoke requesters")
    rsub = p.add_subparsers(dest="requesters_command", metavar="ACTION", required=True)

    add = rsub.add_parser(
        "add",
        help="enrol a requester and its Ed25519 public key; prints the key id (kid)",
        description="Enrol a requester. Only enrolled, non-revoked keys can make requests.",
    )
    add.add_argument("--id", required=True, metavar="R", help="requester id: 1-64 of a-z 0-9 -")
    add.add_argument("--name", required=True, metavar="NAME", help="display name shown to you")
    add.add_argument(
        "--kind", required=True, metavar="KIND", help=f"one of {', '.join(REQUESTER_KINDS)}"
    )
    add.add_argument(
        "--key",
        required=True,
        metavar="FILE|STRING",
        help="Ed25519 public key: JWK file or JSON string, PEM file, or raw base64url "
        "(write --key=VALUE when the value starts with -)",
    )
    add.add_argument("--contact", metavar="TEXT", help="how to reach the requester (optional)")
    add.set_defaults(func=add_handler)

    lst = rsub.add_parser("list", help="list enrolled requesters, revoked ones included")
    add_json_flag(lst)
    lst.set_defaults(func=list_handler)

    revoke = rsub.add_parser(
        "revoke",
        help="revoke a requester at once; its pending requests are rejected",
        description="Revoke a requester: its key can make no more requests and its pending "
        "requests are rejected (the running daemon tells the requester). A revoked key cannot "
        "be enrolled again.",
    )
    revoke.add_argument("requester", metavar="R", help="the requester id")
    revoke.set_defaults(func=revoke_handler)


def _audit(cfg: Config) -> AuditLog:
    return AuditLog(StatePaths(cfg.state_dir).audit_log, load_device_key(cfg.state_dir))


def _names_missing_file(value: str) -> bool:
    """Whether ``--key`` was meant as a file name that does not exist.

    A key given inline is a JWK (``{``), a PEM block (``-----BEGIN``) or base64url, which has
    no ``/`` or ``.``; anything else names a file.
    """
    text = value.strip()
    if text.startswith(("{", "-----BEGIN")):
        return False
    try:
        if Path(text).exists():
            return False
    except OSError:
        return False
    return "/" in text or "." in text or text.startswith("~")


def _refuse_private_key(value: str) -> None:
    """Refuse a requester's private key: the owner needs only the public half, and a private
    key that left the requester must be replaced."""
    text = value
    try:
        path = Path(value)
        if len(value) < 4096 and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    private = "PRIVATE KEY-----" in text
    if text.lstrip().startswith("{"):
        try:
            jwk = json.loads(text)
        except ValueError:
            jwk = None
        private = private or (isinstance(jwk, dict) and "d" in jwk)
    if private:
        raise UsageError(
            "--key: this is a private signing key; enrol only the requester's public key",
            hint="use public-key.jwk from the requester's key directory (never signing-key.*); "
            "a private key that left the requester is no longer secret: they should make a "
            "new one with doorbell-request keygen",
        )


def add_handler(args: argparse.Namespace) -> int:
    """Enrol a requester (audited) and print its kid."""
    cfg = load_config(args)
    require_initialised(cfg)
    _refuse_private_key(args.key)
    try:
        public_key = parse_public_key(args.key)
    except KeyFileError as exc:
        if _names_missing_file(args.key):
            raise UsageError(f"--key: the key file {args.key} does not exist",
                             hint=KEY_HINT) from None
        raise UsageError(f"--key: {exc.message}", hint=KEY_HINT) from None
    with _audit(cfg) as audit, RequestStore.open(cfg.state_dir) as store:
        try:
            requester = store.add_requester(
                args.id, args.name, args.kind, public_key, args.contact, audit=audit
            )
        except RequestError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
    print(f"added requester {requester.id} ({requester.kind})")
    print(f"kid: {requester.kid}")
    return 0


def list_handler(args: argparse.Namespace) -> int:
    """Print the enrolled requesters."""
    cfg = load_config(args)
    require_initialised(cfg)
    with RequestStore.open(cfg.state_dir) as store:
        requesters = store.list_requesters()
    if args.json:
        print_json([r.to_json() for r in requesters])
        return 0
    if not requesters:
        print("no requesters enrolled; add one with `doorbell-agent requesters add`")
        return 0
    print(f"{'ID':<20} {'KIND':<16} {'STATUS':<8} {'KID':<44} NAME")
    for r in requesters:
        status = "revoked" if r.revoked else "active"
        print(f"{r.id:<20} {r.kind:<16} {status:<8} {r.kid:<44} {r.name}")
    return 0


def revoke_handler(args: argparse.Namespace) -> int:
    """Revoke a requester (audited) and report the pending requests it cancelled."""
    cfg = load_config(args)
    require_initialised(cfg)
    with _audit(cfg) as audit, RequestStore.open(cfg.state_dir) as store:
        try:
            result = store.revoke_requester(args.requester, audit=audit)
        except RequestError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
    requester = result.requester
    if result.already_revoked:
        assert requester.revoked_at is not None
        print(f"requester {requester.id} was already revoked")
        return 0
    print(f"revoked requester {requester.id} (kid {requester.kid})")
    if result.cancelled:
        print(f"rejected {len(result.cancelled)} pending request(s):")
        for record in result.cancelled:
            print(f"  {record.jti}")
    print(
        f"hint: also remove {requester.id}'s account from the MQTT broker (e.g. "
        f"`mosquitto_passwd -D PASSWORD_FILE {requester.id}` and its ACL lines, then reload the "
        "broker): a revoked key can still publish until then, and each message is checked and "
        "counted"
    )
    return 0
