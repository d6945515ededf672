"""Building a signed request (CONTRACT §3) on the requester's side."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from datetime import datetime, timedelta
from typing import Any, Final

import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws

from agent.errors import RequestError
from agent.keys import okp_private, sign_jws
from agent.release.manifest import verify_device_jws
from agent.requests.verify import (
    JTI_RE,
    JWS_REGISTRY,
    LEGAL_BASES,
    MAX_CASE,
    MAX_LEGAL_REF,
    MAX_REASON,
    REQUEST_TYP,
    REQUESTER_ID_RE,
)
from agent.timeutil import rfc3339, to_epoch

SIGN_ALG: Final = "EdDSA"
RECEIPT_TYP: Final = "doorbell-receipt+jwt"
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_jti() -> str:
    """A fresh random jti (32 characters of base64url, 192 bits).

    Never one starting with ``-``: the owner types it after ``doorbell-agent approve``, where
    it would be read as an option.
    """
    while True:
        jti = secrets.token_urlsafe(24)
        if not jti.startswith("-"):
            return jti


def build_request(  # noqa: PLR0917 - the positional signature `send` is written against
    signing_key: Ed25519PrivateKey,
    kid: str,
    requester_id: str,
    device_id: str,
    window_start: datetime,
    window_end: datetime,
    reason: str,
    legal_basis: str,
    legal_ref: str | None,
    case: str | None,
    recipient: str,
    now: datetime,
    lifetime: timedelta,
    jti: str | None = None,
) -> str:
    """A compact JWS request (alg EdDSA, typ doorbell-request+jwt) ready to publish.

    ``iat`` is ``now``, ``exp`` is ``now + lifetime``; ``jti`` defaults to a fresh random one.
    Raises RequestError (with a hint) for values the device would reject as ``bad_claims``.
    """
    _check(requester_id, device_id, window_start, window_end, reason, legal_basis, legal_ref,
           case, recipient, lifetime, jti)
    claims: dict[str, Any] = {
        "iss": requester_id,
        "aud": device_id,
        "iat": to_epoch(now),
        "exp": to_epoch(now + lifetime),
        "jti": jti if jti is not None else new_jti(),
        "window": {"start": rfc3339(window_start), "end": rfc3339(window_end)},
        "reason": reason,
        "legal_basis": legal_basis,
        "recipient": recipient,
    }
    if legal_ref is not None:
        claims["legal_ref"] = legal_ref
    if case is not None:
        claims["case"] = case
    header = {"alg": SIGN_ALG, "kid": kid, "typ": REQUEST_TYP}
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    token = jws.serialize_compact(
        header, payload.encode("utf-8"), okp_private(signing_key), registry=JWS_REGISTRY
    )
    return str(token)


def _check(  # noqa: PLR0917 - mirrors build_request's arguments
    requester_id: str,
    device_id: str,
    window_start: datetime,
    window_end: datetime,
    reason: str,
    legal_basis: str,
    legal_ref: str | None,
    case: str | None,
    recipient: str,
    lifetime: timedelta,
    jti: str | None,
) -> None:
    if not REQUESTER_ID_RE.fullmatch(requester_id):
        raise RequestError(f"requester id {requester_id!r} is invalid",
                           hint="use 1-64 characters of a-z, 0-9 and -")
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise RequestError(f"device id {device_id!r} is invalid",
                           hint="use 1-64 characters of A-Z, a-z, 0-9, _ and -")
    if window_start.tzinfo is None or window_end.tzinfo is None:
        raise RequestError(
            "the window needs time zones", hint="write times like 2026-01-31T12:00:00Z"
        )
    if not window_start < window_end:
        raise RequestError("the window must start before it ends")
    if not 1 <= len(reason) <= MAX_REASON:
        raise RequestError(f"the reason must be 1-{MAX_REASON} characters")
    if legal_basis not in LEGAL_BASES:
        raise RequestError(f"legal basis {legal_basis!r} is invalid",
                           hint=f"use one of {', '.join(LEGAL_BASES)}")
    if legal_basis in ("warrant", "subpoena") and not legal_ref:
        raise RequestError(f"a {legal_basis} needs a legal reference",
                           hint="pass --legal-ref with the warrant or subpoena number")
    if legal_ref is not None and not 1 <= len(legal_ref) <= MAX_LEGAL_REF:
        raise RequestError(f"the legal reference must be 1-{MAX_LEGAL_REF} characters")
    if case is not None and len(case) > MAX_CASE:
        raise RequestError(f"the case must be at most {MAX_CASE} characters")
    try:
        pyrage.x25519.Recipient.from_str(recipient)
    except (pyrage.RecipientError, ValueError):
        raise RequestError(f"{recipient!r} is not an age X25519 recipient (age1...)") from None
    if lifetime <= timedelta(0):
        raise RequestError("the request lifetime must be positive")
    if jti is not None and not JTI_RE.fullmatch(jti):
        raise RequestError("jti must be 16-128 characters of A-Z, a-z, 0-9, _ and -")


def build_receipt(  # noqa: PLR0917 - every claim is required and named
    signing_key: Ed25519PrivateKey,
    requester_id: str,
    device_id: str,
    jti: str,
    manifest_token: bytes,
    audit_head: str | None,
    now: datetime,
) -> str:
    """A signed receipt (CONTRACT §5.2) for the delivery whose manifest JWS is ``manifest_token``.

    ``manifest`` is the hex SHA-256 of the manifest exactly as received; ``audit_head`` is the
    newest device-signed audit head this requester has seen (omitted when it has seen none), so
    the device learns that someone outside it witnessed its log up to there.
    """
    claims: dict[str, Any] = {
        "iss": requester_id,
        "aud": device_id,
        "iat": to_epoch(now),
        "req": jti,
        "manifest": hashlib.sha256(manifest_token).hexdigest(),
    }
    if audit_head is not None:
        claims["audit_head"] = audit_head
    return sign_jws(signing_key, RECEIPT_TYP, claims)


def verify_receipt(token: str | bytes, requester_key: Ed25519PublicKey) -> dict[str, Any]:
    """The claims of a receipt signed by ``requester_key``; raises ReceiveError."""
    return verify_device_jws(token, requester_key, RECEIPT_TYP, signer="requester")
