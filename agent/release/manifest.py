"""The delivery manifest (contract §5) and verification of device-signed JWS.

The device signs the manifest with its Ed25519 key (``typ`` ``doorbell-manifest+jwt``); the
requester verifies it against the device public key it trusts and then checks every clip's age
file and plaintext against the hashes listed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import JoseError

from agent.errors import ReceiveError
from agent.keys import kid_for, okp_public, sign_jws
from agent.timeutil import parse_rfc3339, rfc3339, to_epoch

MANIFEST_TYP = "doorbell-manifest+jwt"
RESPONSE_TYP = "doorbell-response+jwt"
# RFC 9864 renamed the Ed25519 algorithm; a verifier accepts both names.
VERIFY_ALGS = ("EdDSA", "Ed25519")

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")


@dataclass(frozen=True)
class ManifestClip:
    """One released file: ``bytes``/``chunks``/``sha256`` describe its age file.

    ``id`` is opaque and fresh for each delivery attempt; ``source`` is the salted commitment to
    the stored clip it was cut from (§5.1), a hex HMAC-SHA-256 only the owner's log can open.
    """

    id: str
    start: datetime
    end: datetime
    content_type: str
    chunks: int
    bytes: int
    sha256: str
    plaintext_sha256: str
    frames: int
    clock_synchronized: bool
    source: str

    def to_claim(self) -> dict[str, Any]:
        """The clip as it appears in the manifest's ``clips`` claim."""
        return {
            "id": self.id,
            "start": rfc3339(self.start),
            "end": rfc3339(self.end),
            "content_type": self.content_type,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "plaintext_sha256": self.plaintext_sha256,
            "frames": self.frames,
            "clock_synchronized": self.clock_synchronized,
            "source": {"commitment": self.source},
        }

    @classmethod
    def from_claim(cls, value: Any) -> ManifestClip:
        """Parse and check one ``clips`` entry; raises ReceiveError naming what is wrong."""
        if not isinstance(value, dict):
            raise ReceiveError("manifest clip entry is not an object")
        clip_id = value.get("id")
        if not isinstance(clip_id, str) or not NAME_RE.match(clip_id):
            raise ReceiveError(f"manifest clip id {clip_id!r} is not a safe name")
        where = f"manifest entry for clip {clip_id}"
        try:
            start = parse_rfc3339(value.get("start"))  # type: ignore[arg-type]
            end = parse_rfc3339(value.get("end"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ReceiveError(f"{where}: {exc}") from None
        content_type = value.get("content_type")
        if not isinstance(content_type, str) or not _CONTENT_TYPE_RE.match(content_type):
            raise ReceiveError(f"{where}: content_type {content_type!r} is not a media type")
        counts: dict[str, int] = {}
        for name in ("chunks", "bytes", "frames"):
            n = value.get(name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ReceiveError(f"{where}: {name} must be a non-negative integer")
            counts[name] = n
        hashes: dict[str, str] = {}
        for name in ("sha256", "plaintext_sha256"):
            h = value.get(name)
            if not isinstance(h, str) or not _HEX64_RE.match(h):
                raise ReceiveError(f"{where}: {name} must be 64 lowercase hex digits")
            hashes[name] = h
        synchronized = value.get("clock_synchronized")
        if not isinstance(synchronized, bool):
            raise ReceiveError(f"{where}: clock_synchronized must be true or false")
        source = value.get("source")
        commitment = source.get("commitment") if isinstance(source, dict) else None
        if (
            not isinstance(source, dict)
            or set(source) != {"commitment"}
            or not isinstance(commitment, str)
            or not _HEX64_RE.match(commitment)
        ):
            raise ReceiveError(f"{where}: source must be {{\"commitment\": 64 lowercase hex}}")
        return cls(
            id=clip_id,
            start=start,
            end=end,
            content_type=content_type,
            chunks=counts["chunks"],
            bytes=counts["bytes"],
            sha256=hashes["sha256"],
            plaintext_sha256=hashes["plaintext_sha256"],
            frames=counts["frames"],
            clock_synchronized=synchronized,
            source=commitment,
        )


@dataclass(frozen=True)
class Manifest:
    """A verified manifest: the files of delivery attempt ``attempt`` of the window asked for."""

    iss: str
    aud: str
    iat: int
    req: str
    window_start: datetime
    window_end: datetime
    attempt: int
    clips: tuple[ManifestClip, ...]


def manifest_claims(
    *,
    device_id: str,
    requester_id: str,
    jti: str,
    window: Mapping[str, str],
    attempt: int,
    clips: Sequence[ManifestClip],
    now: datetime,
) -> dict[str, Any]:
    """The manifest's claims for attempt ``attempt`` of a delivery of ``clips`` answering
    request ``jti``; ``window`` is the request's window exactly as the request carried it."""
    return {
        "iss": device_id,
        "aud": requester_id,
        "iat": to_epoch(now),
        "req": jti,
        "window": dict(window),
        "attempt": attempt,
        "clips": [clip.to_claim() for clip in clips],
    }


def sign_manifest(private_key: Ed25519PrivateKey, claims: Mapping[str, Any]) -> str:
    """The manifest as a compact JWS signed with the device key."""
    return sign_jws(private_key, MANIFEST_TYP, dict(claims))


def verify_device_jws(
    token: str | bytes, public_key: Ed25519PublicKey, typ: str, *, signer: str = "device"
) -> dict[str, Any]:
    """Verify a compact JWS of type ``typ`` signed by ``public_key`` and return its claims.

    Checks the algorithm (EdDSA/Ed25519 only), the explicit ``typ``, that ``kid`` is the
    thumbprint of ``public_key``, and the signature. ``signer`` names the key's owner in error
    messages (the device, or a requester for receipts). Raises ReceiveError.
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise ReceiveError(f"the {typ} is not ASCII compact JWS") from None
    try:
        obj = jws.deserialize_compact(token, okp_public(public_key), algorithms=list(VERIFY_ALGS))
    except JoseError as exc:
        raise ReceiveError(
            f"the {typ} signature does not verify with the {signer} key: "
            f"{exc.description or exc}"
        ) from None
    except ValueError as exc:
        raise ReceiveError(f"the {typ} is not a compact JWS: {exc}") from None
    header = obj.protected
    if header.get("typ") != typ:
        raise ReceiveError(f"expected a {typ}, got typ {header.get('typ')!r}")
    if header.get("kid") != kid_for(public_key):
        raise ReceiveError(f"the {typ} names kid {header.get('kid')!r}, not the {signer} key's")
    try:
        claims = json.loads(obj.payload)
    except (ValueError, UnicodeDecodeError):
        raise ReceiveError(f"the {typ} payload is not JSON") from None
    if not isinstance(claims, dict):
        raise ReceiveError(f"the {typ} payload is not a JSON object")
    return claims


def verify_manifest(
    token: str | bytes,
    public_key: Ed25519PublicKey,
    *,
    device_id: str,
    requester_id: str,
    jti: str,
    expected_window: tuple[datetime, datetime] | None = None,
) -> Manifest:
    """Verify a manifest for request ``jti`` from ``device_id`` to ``requester_id`` (and, when
    the caller knows it, the window it asked for)."""
    claims = verify_device_jws(token, public_key, MANIFEST_TYP)
    expected = {"iss": device_id, "aud": requester_id, "req": jti}
    for name, want in expected.items():
        if claims.get(name) != want:
            raise ReceiveError(f"manifest {name} is {claims.get(name)!r}, expected {want!r}")
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise ReceiveError("manifest iat is not an integer")
    attempt = claims.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ReceiveError("manifest attempt is not a positive integer")
    window = claims.get("window")
    if not isinstance(window, dict) or set(window) != {"start", "end"}:
        raise ReceiveError("manifest window is not {start, end}")
    try:
        window_start = parse_rfc3339(window["start"])
        window_end = parse_rfc3339(window["end"])
    except (ValueError, TypeError) as exc:
        raise ReceiveError(f"manifest window: {exc}") from None
    if expected_window is not None and (window_start, window_end) != expected_window:
        raise ReceiveError("manifest window is not the window of the request")
    raw_clips = claims.get("clips")
    if not isinstance(raw_clips, list):
        raise ReceiveError("manifest clips is not a list")
    clips = tuple(ManifestClip.from_claim(c) for c in raw_clips)
    ids = [c.id for c in clips]
    if len(set(ids)) != len(ids):
        raise ReceiveError("manifest lists a clip more than once")
    return Manifest(
        iss=device_id, aud=requester_id, iat=iat, req=jti, window_start=window_start,
        window_end=window_end, attempt=attempt, clips=clips,
    )
