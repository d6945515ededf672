"""Fixtures of the camera tests (helpers live in ``camera_helpers``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog
from agent.vault import Vault


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def audit(tmp_path: Path, device_key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    with AuditLog(state / "audit.jsonl", device_key) as log:
        yield log


@pytest.fixture
def vault(tmp_path: Path, audit: AuditLog) -> Iterator[Vault]:
    """A real vault (real encryption) in ``tmp_path/state``."""
    with Vault(tmp_path / "state", os.urandom(32), audit=audit) as v:
        yield v
