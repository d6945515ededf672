"""The requester's key directory made by ``doorbell-request keygen`` and read by ``send``.

Files (private ones 0600, created exclusively so nothing is ever overwritten):

- ``signing-key.jwk`` — the Ed25519 signing key as a private OKP JWK (with its ``kid``), 0600
- ``signing-key.pem`` — the same key as PKCS#8 PEM, for other tools, 0600
- ``public-key.jwk`` — the public JWK to hand to the homeowner (``requesters add --key``)
- ``age-identity.txt`` — the age X25519 identity in ``age-keygen`` format, 0600
  (``age -d -i age-identity.txt`` decrypts released footage)
- ``age-recipient.txt`` — its ``age1...`` recipient
- ``requester.json`` — ``{"id", "kid", "recipient"}``, so ``send`` knows who it is

Written later by ``send`` and ``receive``:

- ``devices/D.jwk`` — each device's public key, pinned on first use (or from ``--device-key``);
  a delivery signed by any other key is refused
- ``requests/J.json`` — ``{"device", "topic_prefix", "exp", "request"}`` of each request sent
  (``request`` is the signed JWS), so that ``receive J`` can resume its persistent session and
  put the request into the evidence
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pyrage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import KeyFileError, RequestError, StateError
from agent.keys import (
    b64url,
    b64url_decode,
    check_secret,
    kid_for,
    parse_public_key,
    public_jwk,
    write_secret,
)
from agent.requests.verify import JTI_RE, REQUESTER_ID_RE
from agent.timeutil import rfc3339

SIGNING_JWK: Final = "signing-key.jwk"
SIGNING_PEM: Final = "signing-key.pem"
PUBLIC_JWK: Final = "public-key.jwk"
AGE_IDENTITY: Final = "age-identity.txt"
AGE_RECIPIENT: Final = "age-recipient.txt"
REQUESTER_JSON: Final = "requester.json"
DEVICES_DIR: Final = "devices"
REQUESTS_DIR: Final = "requests"
ALL_FILES: Final = (
    SIGNING_JWK, SIGNING_PEM, PUBLIC_JWK, AGE_IDENTITY, AGE_RECIPIENT, REQUESTER_JSON
)


@dataclass(frozen=True)
class RequesterKeys:
    """A requester's identity: id, signing key (and kid), age recipient and identity file."""

    requester_id: str
    directory: Path
    signing_key: Ed25519PrivateKey
    kid: str
    recipient: str

    @property
    def identity_path(self) -> Path:
        """The age identity file (for ``age -d -i``)."""
        return self.directory / AGE_IDENTITY

    def public_jwk(self) -> dict[str, str]:
        """The public signing key as a JWK carrying its ``kid``."""
        return {**public_jwk(self.signing_key.public_key()), "kid": self.kid}

    def age_identity(self) -> pyrage.x25519.Identity:
        """The age identity that decrypts footage released to :attr:`recipient`."""
        return read_age_identity(self.identity_path)


def read_age_identity(path: Path) -> pyrage.x25519.Identity:
    """An age X25519 identity from an ``age-keygen``-style file (comments allowed)."""
    check_secret(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read age identity {path}: {exc}") from None
    for line in lines:
        if line.startswith("AGE-SECRET-KEY-1"):
            try:
                return pyrage.x25519.Identity.from_str(line.strip())
            except (pyrage.IdentityError, ValueError) as exc:
                raise KeyFileError(f"{path} holds a malformed age identity: {exc}") from None
    raise KeyFileError(f"{path} holds no AGE-SECRET-KEY-1... line")


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keys(directory: Path, requester_id: str, *, now: datetime) -> RequesterKeys:
    """Create a new signing key and age identity in ``directory``; never overwrites a file.

    Raises RequestError for a malformed id and StateError when any of the files exists.
    """
    if not REQUESTER_ID_RE.fullmatch(requester_id):
        raise RequestError(
            f"requester id {requester_id!r} is invalid",
            hint="use 1-64 characters of a-z, 0-9 and -",
        )
    existing = [name for name in ALL_FILES if (directory / name).exists()]
    if existing:
        raise StateError(
            f"{directory / existing[0]} already exists; refusing to overwrite keys",
            hint="choose another -o directory, or move the old keys away first",
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    private_raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    private_jwk = {**public_jwk(key.public_key()), "d": b64url(private_raw), "kid": kid}
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    keys = RequesterKeys(requester_id, directory, key, kid, recipient)
    age_text = f"# created: {rfc3339(now)}\n# public key: {recipient}\n{identity}\n"
    files: list[tuple[str, bytes, bool]] = [
        (SIGNING_JWK, _json_bytes(private_jwk), True),
        (SIGNING_PEM, pem, True),
        (AGE_IDENTITY, age_text.encode("ascii"), True),
        (PUBLIC_JWK, _json_bytes(keys.public_jwk()), False),
        (AGE_RECIPIENT, f"{recipient}\n".encode("ascii"), False),
        (REQUESTER_JSON, _json_bytes({"id": requester_id, "kid": kid, "recipient": recipient}),
         False),
    ]
    written: list[Path] = []
    try:
        for name, data, secret in files:
            path = directory / name
            (write_secret if secret else _write_public)(path, data)
            written.append(path)
    except FileExistsError as exc:
        for path in written:
            path.unlink()
        raise StateError(
            f"{exc.filename} appeared while writing keys; refusing to overwrite",
            hint="another keygen is writing to the same directory",
        ) from None
    return keys


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("ascii")


def load_keys(directory: Path) -> RequesterKeys:
    """The requester identity in ``directory`` (made by :func:`generate_keys`).

    Refuses a signing key readable by group or others, as ssh does.
    """
    hint = "make keys with `doorbell-request keygen --id R -o DIR` and pass --key DIR"
    meta_path, jwk_path = directory / REQUESTER_JSON, directory / SIGNING_JWK
    if not meta_path.is_file() or not jwk_path.is_file():
        raise KeyFileError(f"{directory} holds no requester keys", hint=hint)
    check_secret(jwk_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        jwk = json.loads(jwk_path.read_text(encoding="utf-8"))
        requester_id, recipient = meta["id"], meta["recipient"]
        key = Ed25519PrivateKey.from_private_bytes(b64url_decode(jwk["d"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(
            f"the requester keys in {directory} are unreadable: {exc}", hint=hint
        ) from None
    if not isinstance(requester_id, str) or not isinstance(recipient, str):
        raise KeyFileError(f"{meta_path} is malformed", hint=hint)
    if jwk.get("x") != public_jwk(key.public_key())["x"]:
        raise KeyFileError(f"{jwk_path}: the private and public halves do not match")
    return RequesterKeys(requester_id, directory, key, kid_for(key.public_key()), recipient)


_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _device_pin_path(directory: Path, device_id: str) -> Path:
    if not _DEVICE_ID_RE.fullmatch(device_id):
        raise KeyFileError(f"device id {device_id!r} is invalid")
    return directory / DEVICES_DIR / f"{device_id}.jwk"


def pinned_device_key(directory: Path, device_id: str) -> Ed25519PublicKey | None:
    """The key pinned for ``device_id`` in the key directory, or None before first use."""
    path = _device_pin_path(directory, device_id)
    if not path.is_file():
        return None
    try:
        return parse_public_key(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the pinned key {path}: {exc}") from None


def pin_device_key(directory: Path, device_id: str, key: Ed25519PublicKey) -> Ed25519PublicKey:
    """Pin ``key`` for ``device_id`` on first use; afterwards refuse any other key.

    Returns the pinned key. A device that really was re-keyed (a new SD card, a new ``init``)
    is trusted again only when the requester removes the old pin on purpose.
    """
    path = _device_pin_path(directory, device_id)
    pinned = pinned_device_key(directory, device_id)
    if pinned is None:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            _write_public(path, _json_bytes({**public_jwk(key), "kid": kid_for(key)}))
        except FileExistsError:
            return pin_device_key(directory, device_id, key)
        return key
    if public_jwk(pinned) != public_jwk(key):
        raise KeyFileError(
            f"device {device_id} presents key {kid_for(key)}, but {kid_for(pinned)} is pinned "
            f"for it in {path}; refusing a delivery signed by another key",
            hint="if the owner really re-initialised the device, confirm its new key with them "
            f"and remove {path}",
        )
    return pinned


@dataclass(frozen=True)
class SentRequest:
    """What ``receive J`` needs to resume a request sent earlier from this key directory."""

    jti: str
    device_id: str
    topic_prefix: str
    exp: int
    token: str


def record_request(directory: Path, sent: SentRequest) -> None:
    """Remember a sent request (``requests/J.json``) for ``receive J``."""
    folder = directory / REQUESTS_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    data = {
        "device": sent.device_id,
        "topic_prefix": sent.topic_prefix,
        "exp": sent.exp,
        "request": sent.token,
    }
    _write_public(folder / f"{sent.jti}.json", _json_bytes(data))


def load_request(directory: Path, jti: str) -> SentRequest | None:
    """The request ``jti`` recorded by :func:`record_request`, or None when unknown here."""
    if not JTI_RE.fullmatch(jti):
        raise KeyFileError(f"{jti!r} is not a request id")
    path = directory / REQUESTS_DIR / f"{jti}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sent = SentRequest(
            jti,
            str(data["device"]),
            str(data["topic_prefix"]),
            int(data["exp"]),
            str(data["request"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path} is unreadable: {exc}") from None
    if not _DEVICE_ID_RE.fullmatch(sent.device_id):
        raise KeyFileError(f"{path} names an invalid device id")
    return sent
