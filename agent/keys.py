"""Device and storage keys, requester public keys, JWK thumbprints and JWS signing.

Secrets live in the state directory with mode 0600 (the directory 0700); like ssh, every command
that reads a secret refuses when the file is readable by group or others.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
import warnings
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

from agent.errors import InsecurePermissionsError, KeyFileError, StateError
from agent.paths import StatePaths

STORAGE_KEY_BYTES = 32
SIGNING_ALG = "EdDSA"

# The contract fixes `EdDSA` as the name we sign with (every JOSE library verifies it today);
# joserfc flags it as superseded by RFC 9864, which is noise for us, not a finding.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises ValueError on bad input."""
    if not isinstance(text, str) or any(c not in _B64URL for c in text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as an OKP JWK with exactly the RFC 7638 members."""
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw_public_bytes(public_key))}


def kid_for(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of an Ed25519 public key."""
    return OKPKey.import_key(public_key).thumbprint()


def okp_private(private_key: Ed25519PrivateKey) -> OKPKey:
    """The private key as a joserfc key object, for signing."""
    return OKPKey.import_key(private_key)


def okp_public(public_key: Ed25519PublicKey) -> OKPKey:
    """The public key as a joserfc key object, for verifying."""
    return OKPKey.import_key(public_key)


def sign_jws(private_key: Ed25519PrivateKey, typ: str, claims: dict[str, Any]) -> str:
    """A compact JWS over ``claims`` with alg EdDSA, the given typ and kid = our thumbprint."""
    header = {"alg": SIGNING_ALG, "typ": typ, "kid": kid_for(private_key.public_key())}
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8")
    token = jws.serialize_compact(
        header, payload, okp_private(private_key), algorithms=[SIGNING_ALG]
    )
    return str(token)


def check_secret(path: Path) -> None:
    """Refuse a secret file (or the state directory) that group or others can read, as ssh does."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise StateError(
            f"{path} does not exist", hint="run `doorbell-agent init` to create the state directory"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        wanted = "700" if stat.S_ISDIR(mode) else "600"
        raise InsecurePermissionsError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            "refusing to use it",
            hint=f"chmod {wanted} {path}",
        )


def load_device_key(state_dir: Path) -> Ed25519PrivateKey:
    """The device's Ed25519 signing key, after checking its permissions."""
    path = StatePaths(state_dir).device_key
    check_secret(state_dir)
    check_secret(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_storage_key(state_dir: Path) -> bytes:
    """The 32-byte storage master key that wraps every clip key."""
    path = StatePaths(state_dir).storage_key
    check_secret(state_dir)
    check_secret(path)
    data = path.read_bytes()
    if len(data) != STORAGE_KEY_BYTES:
        raise KeyFileError(f"{path} holds {len(data)} bytes, not a {STORAGE_KEY_BYTES}-byte key")
    return data


def write_secret(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never overwriting), write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_device_keys(state_dir: Path) -> Ed25519PrivateKey:
    """Make the device signing key and the storage master key; refuse if either exists."""
    paths = StatePaths(state_dir)
    for path in (paths.device_key, paths.storage_key):
        if path.exists():
            raise StateError(
                f"{path} already exists; refusing to overwrite keys",
                hint="the device is already initialised; "
                "move the state directory away to start over",
            )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(paths.device_key, pem)
    write_secret(paths.storage_key, secrets.token_bytes(STORAGE_KEY_BYTES))
    return key


PATH_PREFIXES = ("/", "~", "./", "../", "file:")
"""How a file name starts, as opposed to key text (JWK ``{``, PEM ``-----``, base64url)."""


def parse_public_key(value: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a JWK (JSON file or string), a PEM file, or raw base64url.

    A string naming an existing file is read; otherwise it is parsed as the key itself. For the
    owner's command line only: the local app uses :func:`parse_public_key_text`, which never
    reads a file.
    """
    source = str(value)
    path = Path(value)
    try:
        is_file = len(source) < 4096 and path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        if source.strip().startswith(PATH_PREFIXES):
            raise KeyFileError(f"no key file {source.strip()}")
        return parse_public_key_text(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    return parse_public_key_text(text)


def parse_public_key_text(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from its text: a JWK, a PEM public key, or raw base64url.

    Never touches the file system: text that looks like a path is refused as such.
    """
    text = text.strip()
    if text.startswith(PATH_PREFIXES):
        raise KeyFileError(
            "that looks like a file name; give the key itself (paste it, or upload the key "
            "file): files on the device are never read"
        )
    if text.startswith("{"):
        return _from_jwk(text)
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError):
            try:
                key = serialization.load_pem_private_key(text.encode("ascii"), None).public_key()
            except (ValueError, TypeError) as exc:
                raise KeyFileError(f"not a PEM Ed25519 key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"the PEM key is a {type(key).__name__}, not Ed25519")
        return key
    try:
        raw = b64url_decode(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(
            "not an Ed25519 public key: expected a JWK, a PEM file or 32 bytes in base64url",
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def _from_jwk(text: str) -> Ed25519PublicKey:
    try:
        jwk = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"not a JSON JWK: {exc}") from None
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise KeyFileError('the JWK is not an Ed25519 key (needs "kty": "OKP", "crv": "Ed25519")')
    try:
        raw = b64url_decode(str(jwk.get("x", "")))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise KeyFileError('the JWK\'s "x" is not 32 bytes of base64url')
    return Ed25519PublicKey.from_public_bytes(raw)
