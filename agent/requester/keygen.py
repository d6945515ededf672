"""``doorbell-request keygen --id R -o DIR``: a signing key and an age identity for a requester."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.errors import RequestError, UsageError
from agent.requester.keyfiles import PUBLIC_JWK, generate_keys
from agent.timeutil import utcnow


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``keygen`` command."""
    p = sub.add_parser(
        "keygen",
        help="make an Ed25519 signing key and an age identity",
        description="Make an Ed25519 signing key (JWK and PEM) and an age identity in DIR, "
        "print the public JWK to enrol with the homeowner, its kid and the age recipient. "
        "Existing files are never overwritten.",
    )
    p.add_argument("--id", required=True, metavar="R", help="your requester id (1-64 of a-z 0-9 -)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="key directory")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Generate the keys and print what the homeowner needs."""
    try:
        keys = generate_keys(args.output, args.id, now=utcnow())
    except RequestError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    print(f"public JWK (give {keys.directory / PUBLIC_JWK} to the homeowner):")
    print(json.dumps(keys.public_jwk(), sort_keys=True))
    print(f"kid: {keys.kid}")
    print(f"age recipient: {keys.recipient}")
    return 0
