"""The requester's key directory made by ``doorbell-request keygen`` and read by ``send``.

Files (private ones 0600, created exclusively so nothing is ever overwritten):

- ``signing-key.jwk`` — the Ed25519 signing key as a private OKP JWK (with its ``kid``), 0600
- ``signing-key.pem`` — the same key as PKCS#8 PEM, for other tools, 0600
- ``public-key.jwk`` — the public JWK to hand to the homeowner (``requesters add --key``)
- ``age-identity.txt`` — the age X25519 identity in ``age-keygen`` format, 0600
  (``age -d -i age-identity.txt`` decrypts released footage)
- ``age-recipient.txt`` — its ``age1...`` recipient
- ``requester.json`` — ``{"id", "kid", "recipient"}``, so ``send`` knows who it is
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pyrage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import KeyFileError, RequestError, StateError
from agent.keys import b64url, b64url_decode, check_secret, kid_for, public_jwk, write_secret
from agent.requests.verify import REQUESTER_ID_RE
from agent.timeutil import rfc3339

SIGNING_JWK: Final = "signing-key.jwk"
SIGNING_PEM: Final = "signing-key.pem"
PUBLIC_JWK: Final = "public-key.jwk"
AGE_IDENTITY: Final = "age-identity.txt"
AGE_RECIPIENT: Final = "age-recipient.txt"
REQUESTER_JSON: Final = "requester.json"
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
