"""First-time set-up of the state directory: keys, the local-app password and TLS certificate."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.audit import INITIALIZED_EVENT, AuditLog
from agent.errors import StateError
from agent.keys import create_device_keys, kid_for, public_jwk, write_secret
from agent.paths import TLS_CERT, TLS_KEY, StatePaths


@dataclass(frozen=True)
class InitResult:
    """What ``init`` tells the owner once: the app password is never shown again."""

    state_dir: Path
    kid: str
    app_password: str
    tls_fingerprint: str


def make_state_dir(state_dir: Path) -> None:
    """Create the state directory with mode 0700 (tightening an existing empty one)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)


def initialise(state_dir: Path, device_id: str, *, now: datetime) -> InitResult:
    """Create keys, app password and certificate in ``state_dir``; refuse to overwrite keys."""
    make_state_dir(state_dir)
    # An existing log belongs to another key: a second chain in one file would never verify.
    paths = StatePaths(state_dir)
    for path in (paths.app_password, paths.tls_key, paths.audit_log):
        if path.exists():
            raise StateError(
                f"{path} already exists; refusing to overwrite",
                hint="the device is already initialised; "
                "move the state directory away to start over",
            )
    key = create_device_keys(state_dir)
    client_id_suffix(state_dir)
    password = new_app_password()
    write_secret(paths.app_password, hash_password(password).encode("ascii"))
    fingerprint = make_tls_certificate(paths.tls_dir, device_id, now=now)
    kid = kid_for(key.public_key())
    # Entry 1 ties the log to its key, so a new device's log verifies and every later one can
    # be traced to the key that signed it (contract §7).
    with AuditLog(paths.audit_log, key, now=lambda: now) as audit:
        audit.append(INITIALIZED_EVENT, kid=kid, public_jwk=public_jwk(key.public_key()))
    return InitResult(state_dir, kid, password, fingerprint)


def client_id_suffix(state_dir: Path, *, create: bool = True) -> str | None:
    """The state directory's client-id suffix: 20 random hex digits (80 bits), made once.

    ``init`` makes it; a state directory made before it existed gets one on first use, kept from
    then on (O_EXCL: two processes racing to make it end up with the same one). With ``create``
    False a missing suffix is None (for read-only commands such as ``status``).
    """
    path = StatePaths(state_dir).client_id_suffix
    if not create and not path.exists():
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        text = path.read_text(encoding="ascii").strip()
        if len(text) == 20 and all(c in "0123456789abcdef" for c in text):
            return text
        raise StateError(
            f"{path} is not a client-id suffix (20 hex digits)",
            hint="delete it; the agent then makes a new one",
        ) from None
    suffix = secrets.token_hex(10)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(suffix + "\n")
        f.flush()
        os.fsync(f.fileno())
    return suffix


def device_client_id(state_dir: Path, device_id: str) -> str:
    """The device's default MQTT client id, ``doorbell-agent-D-SUFFIX``: no other broker user
    can guess it and take over the device's session."""
    return f"doorbell-agent-{device_id}-{client_id_suffix(state_dir)}"


def configured_client_id(state_dir: Path, device_id: str, configured: str | None) -> str | None:
    """The client id ``run`` uses (``mqtt.client_id`` or the default), without making a suffix:
    None when the default's suffix does not exist yet."""
    if configured is not None:
        return configured
    suffix = client_id_suffix(state_dir, create=False)
    return None if suffix is None else f"doorbell-agent-{device_id}-{suffix}"


def new_app_password() -> str:
    """A random password of 4 groups of 5 lowercase letters/digits (about 100 bits)."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(5)) for _ in range(4))


def hash_password(password: str) -> str:
    """An argon2id hash (memory-hard) of the app password."""
    return PasswordHasher().hash(password)


def make_tls_certificate(tls_dir: Path, device_id: str, *, now: datetime) -> str:
    """A self-signed P-256 certificate for the local app; returns its SHA-256 fingerprint."""
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName(host),
        x509.DNSName(f"{host}.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"doorbell-agent {device_id}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(tls_dir / TLS_KEY, key_pem)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tls_dir / TLS_CERT).write_bytes(cert_pem)
    return certificate_fingerprint(tls_dir / TLS_CERT)


def certificate_fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint of a PEM certificate as colon-separated upper-case hex."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
