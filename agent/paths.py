"""What the agent keeps in its state directory (``state_dir``), each file named once: pure.

The ``*_FILE``-style constants are the names inside the directory (labels in messages, files
beside another); :class:`StatePaths` gives the full paths for one state directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

AUDIT_FILE: Final = "audit.jsonl"
"""The request log (contract §7): requests, requesters, agent runs, checkpoints, gaps."""
ACTIVITY_FILE: Final = "activity.jsonl"
"""The camera and owner log (contract §7): clips, owner logins, button presses, storage notes."""
WITNESSED_FILE: Final = "audit-witnessed.jws"
"""Audit heads witnessed by requesters (from receipts), one JWS a line, kept outside the logs."""
BROKEN_FILE: Final = "audit-broken.json"
"""Present once a start-up check found the request log cut short or replaced: status says
``audit: broken`` from then on."""
DEVICE_KEY: Final = "device.key"
STORAGE_KEY: Final = "storage.key"
REQUESTS_DB: Final = "requests.db"
VAULT_DIR: Final = "vault"
VAULT_DB: Final = "vault.db"
STATUS_FILE: Final = "status.json"
LOCK_FILE: Final = "run.lock"
SOCKET_NAME: Final = "agent.sock"
APP_PASSWORD: Final = "app-password"  # noqa: S105 (a file name, not a password)
TLS_DIR: Final = "tls"
TLS_CERT: Final = "cert.pem"
TLS_KEY: Final = "key.pem"
CLIENT_ID_SUFFIX: Final = "mqtt-client-id-suffix"
"""The random part of the device's default MQTT client id (contract §2)."""


@dataclass(frozen=True)
class StatePaths:
    """The files of one state directory."""

    root: Path

    @property
    def audit_log(self) -> Path:
        """The request log, ``audit.jsonl``."""
        return self.root / AUDIT_FILE

    @property
    def activity_log(self) -> Path:
        """The camera and owner log, ``activity.jsonl``."""
        return self.root / ACTIVITY_FILE

    @property
    def witnessed_heads(self) -> Path:
        """Requester-witnessed audit heads."""
        return self.root / WITNESSED_FILE

    @property
    def audit_broken(self) -> Path:
        """The marker of a discontinuity found at start."""
        return self.root / BROKEN_FILE

    @property
    def device_key(self) -> Path:
        """The device's Ed25519 signing key (PEM)."""
        return self.root / DEVICE_KEY

    @property
    def storage_key(self) -> Path:
        """The vault's master key."""
        return self.root / STORAGE_KEY

    @property
    def requests_db(self) -> Path:
        """Requesters, replay cache and request records (SQLite)."""
        return self.root / REQUESTS_DB

    @property
    def vault_dir(self) -> Path:
        """The encrypted clips."""
        return self.root / VAULT_DIR

    @property
    def vault_db(self) -> Path:
        """The vault's index (SQLite)."""
        return self.root / VAULT_DB

    @property
    def status(self) -> Path:
        """The daemon's status snapshot, read by ``doorbell-agent status``."""
        return self.root / STATUS_FILE

    @property
    def run_lock(self) -> Path:
        """The single-instance lock of ``run``."""
        return self.root / LOCK_FILE

    @property
    def control_socket(self) -> Path:
        """The daemon's control socket (the CLI's decisions)."""
        return self.root / SOCKET_NAME

    @property
    def app_password(self) -> Path:
        """The argon2 hash of the local app's password."""
        return self.root / APP_PASSWORD

    @property
    def tls_dir(self) -> Path:
        """The local app's TLS certificate and key."""
        return self.root / TLS_DIR

    @property
    def tls_cert(self) -> Path:
        """The local app's TLS certificate."""
        return self.tls_dir / TLS_CERT

    @property
    def tls_key(self) -> Path:
        """The local app's TLS private key."""
        return self.tls_dir / TLS_KEY

    @property
    def client_id_suffix(self) -> Path:
        """The random suffix of the default MQTT client id."""
        return self.root / CLIENT_ID_SUFFIX
