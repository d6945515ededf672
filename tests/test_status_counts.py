"""`doorbell-agent status` shows one pending count: the request store's. The requests worker's
counter of requests admitted since start is named for what it counts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.cli import main
from agent.timeutil import rfc3339, utcnow
from tests.test_mqtt_service import (  # noqa: F401 - the harness fixture
    TOPIC_REQUESTS,
    AgentHarness,
    harness,
    listen,
    next_response,
    request,
)


def test_status_has_one_pending_figure(
    harness: AgentHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    alice = harness.enroll("alice")
    worker = harness.start()
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    claims, _ = next_response(inbox, harness.public)
    assert claims["status"] == "pending"
    with harness.store() as store:  # decided since: nothing is pending any more
        assert store.set_status(jti, ["pending"], "denied", channel="cli") is not None
    stats = worker.stats()
    assert stats["admitted"] == 1 and "pending" not in stats
    snapshot = {"state": "running", "pid": os.getpid(), "updated": rfc3339(utcnow()),
                "workers": {"requests": {"state": "running", "error": None, "stats": stats}}}
    (harness.state / "status.json").write_text(json.dumps(snapshot))
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: {harness.cfg.device_id}\nstate_dir: {harness.state}\n")
    capsys.readouterr()
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "requests pending: 0" in out
    assert "pending=" not in out and "admitted=1" in out


def test_status_text_has_one_storage_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: porch\nstate_dir: {tmp_path / 'state'}\n")
    assert main(["--config", str(cfg), "init"]) == 0
    retention = {"runs": 3, "deleted": 0, "stored_bytes": 0, "storage": "ok",
                 "free_bytes": 79365754880, "reserve_bytes": 1 << 30, "last_error": None}
    snapshot = {"state": "running", "pid": os.getpid(), "updated": rfc3339(utcnow()),
                "workers": {"retention": {"state": "running", "error": None, "stats": retention}}}
    (tmp_path / "state" / "status.json").write_text(json.dumps(snapshot))
    capsys.readouterr()
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "  retention: running (deleted=0, runs=3)" in out
    assert "79365754880" not in out and "stored_bytes" not in out and "None" not in out
    assert out.count("storage: 0 clips, 0 B of 8.0 GiB") == 1
