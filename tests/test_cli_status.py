"""`doorbell-agent status`: identity, agent state from status.json, storage, audit head."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.cli.status import daemon_state
from agent.keys import kid_for, load_device_key, public_jwk
from agent.timeutil import rfc3339, utcnow


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"device_id: porch\nstate_dir: {tmp_path / 'state'}\n")
    assert main(["--config", str(path), "init"]) == 0
    return path


def _status(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["--config", str(cfg_path), "status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc, dict)
    return doc


def test_status_json_identity_and_empty_state(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _status(cfg_path, capsys)
    key = load_device_key(tmp_path / "state")
    assert doc["device_id"] == "porch"
    assert doc["kid"] == kid_for(key.public_key())
    assert doc["public_jwk"] == public_jwk(key.public_key())
    fingerprint = doc["app_tls_fingerprint"]
    assert isinstance(fingerprint, str) and fingerprint.count(":") == 31
    assert doc["agent"] == {
        "state": "not running (no status.json: the agent has not run yet)",
        "snapshot": None,
    }
    assert doc["storage"] == {
        "clips": 0, "stored_bytes": 0, "max_bytes": 8 * 1024**3, "retention": "7d",
        "held_bytes": 0, "max_held_bytes": 2 * 1024**3,
    }
    assert doc["requests"] == {"pending": 0, "unheld": []}
    # init wrote entry 1 (device_initialized); no start-up check has found a gap.
    assert doc["audit"]["seq"] == 1 and doc["audit"]["state"] == "ok"
    assert isinstance(doc["audit"]["hash"], str) and len(doc["audit"]["hash"]) == 64
    assert set(doc["clock"]) >= {"synchronised", "source", "detail", "note"}


def test_status_text(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--config", str(cfg_path), "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: porch (doorbell-agent ")
    assert "agent: not running" in out and "requests pending: 0" in out and "clock:" in out


def test_status_reads_a_fresh_snapshot(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = {
        "state": "running",
        "pid": os.getpid(),
        "updated": rfc3339(utcnow()),
        "workers": {"camera": {"state": "running", "error": None, "stats": {"dropped": 0}}},
    }
    (tmp_path / "state" / "status.json").write_text(json.dumps(snapshot))
    doc = _status(cfg_path, capsys)
    assert doc["agent"] == {"state": "running", "snapshot": snapshot}
    assert main(["--config", str(cfg_path), "status"]) == 0
    assert "  camera: running (dropped=0)" in capsys.readouterr().out


def test_daemon_state_rules() -> None:
    now = utcnow()
    alive = {"state": "running", "pid": os.getpid(), "updated": rfc3339(now)}
    assert daemon_state(alive, now) == "running"
    stale = dict(alive, updated=rfc3339(now - timedelta(minutes=5)))
    assert daemon_state(stale, now).startswith("not responding")
    assert daemon_state(dict(alive, pid=2**22 + 12345), now) == "not running"
    assert daemon_state(dict(alive, state="stopped"), now) == "not running"
    assert daemon_state(dict(alive, updated="yesterday"), now).startswith("unknown")
    assert daemon_state(None, now).startswith("not running")


def test_status_before_init_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(f"device_id: porch\nstate_dir: {tmp_path / 'nothing'}\n")
    assert main(["--config", str(path), "status"]) == 2
    err = capsys.readouterr().err
    assert "is not initialised" in err and "hint: run `doorbell-agent init` first" in err
