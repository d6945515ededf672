"""The daemon: shared stop event, status.json, shutdown order, failures, signals; and
``doorbell-agent run`` end to end, stopped by SIGTERM in the middle of a clip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.audit import verify_file
from agent.camera.synthetic import scenarios
from agent.daemon import Daemon, RetentionWorker, signals_set_stop, write_status
from agent.keys import load_device_key, load_storage_key
from agent.provision import initialise
from agent.timeutil import utcnow
from agent.vault import Vault
from tests.camera.camera_helpers import T0, encode_jpeg, parse_mkv
from tests.camera.legacy_mkv import MatroskaMuxer
from tests.camera.test_camera_pipeline import scan_for_plaintext
from tests.mosquitto import Mosquitto


class FakeWorker:
    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail
        self.closed = 0
        self.saw_stop = False

    def run(self, stop: threading.Event) -> None:
        self.log.append(f"run {self.name}")
        if self.fail:
            raise RuntimeError("boom")
        stop.wait()
        self.saw_stop = True

    def stats(self) -> dict[str, Any]:
        return {"hello": self.name}

    def close(self) -> None:
        self.closed += 1
        self.log.append(f"close {self.name}")


class NoStats:
    def run(self, stop: threading.Event) -> None:
        stop.wait()

    def close(self) -> None:
        return None


def run_in_thread(daemon: Daemon) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()))
    thread.start()
    return thread, result


def test_workers_share_one_stop_event_and_close_in_reverse(tmp_path: Path) -> None:
    log: list[str] = []
    a, b = FakeWorker("a", log), FakeWorker("b", log)
    stop = threading.Event()
    status = tmp_path / "status.json"
    daemon = Daemon([a, b, NoStats()], stop, status_path=status, info={"device_id": "d"},
                    status_interval=0.05)
    thread, result = run_in_thread(daemon)
    deadline = time.monotonic() + 10
    while not (status.exists() and json.loads(status.read_text())["state"] == "running"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    doc = json.loads(status.read_text())
    assert doc["device_id"] == "d" and doc["pid"] == os.getpid()
    assert doc["workers"]["a"] == {"state": "running", "error": None, "stats": {"hello": "a"}}
    assert doc["workers"]["NoStats"]["stats"] is None
    assert oct(status.stat().st_mode & 0o777) == "0o600"
    daemon.request_stop("test")
    thread.join(10)
    assert result == [0]
    assert a.saw_stop and b.saw_stop
    assert log[-2:] == ["close b", "close a"]
    final = json.loads(status.read_text())
    assert final["state"] == "stopped"
    assert final["workers"]["a"]["state"] == "finished"
    assert daemon.stop_reason == "test"


def test_a_failing_worker_stops_the_others_and_fails_the_run(tmp_path: Path) -> None:
    log: list[str] = []
    good, bad = FakeWorker("good", log), FakeWorker("bad", log, fail=True)
    daemon = Daemon([good, bad], threading.Event(), status_path=tmp_path / "status.json",
                    status_interval=0.05)
    assert daemon.run() == 1
    assert good.saw_stop and good.closed == 1 and bad.closed == 1
    assert not daemon.healthy()
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["workers"]["bad"]["state"] == "failed"
    assert "RuntimeError: boom" in doc["workers"]["bad"]["error"]
    assert daemon.stop_reason == "worker bad failed"


def test_sigterm_sets_the_stop_event_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    daemon = Daemon([], stop)
    with signals_set_stop(daemon):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert daemon.stop_reason == "signal SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_status_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_status(path, {"a": 1})
    write_status(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_retention_worker_shreds_old_clips(tmp_path: Path) -> None:
    with Vault(tmp_path, os.urandom(32), retention=timedelta(days=1)) as vault:
        writer = vault.create_clip(T0, "video/x-matroska")
        writer.write(b"x" * 100)
        writer.finish(T0 + timedelta(seconds=5), 1)
        worker = RetentionWorker(vault, now=lambda: T0 + timedelta(days=2))
        stop = threading.Event()
        stop.set()
        worker.run(stop)
        assert worker.stats()["deleted"] == 1 and worker.runs == 1
        assert vault.list_clips() == []


# --------------------------------------------------------------------------- end to end


def visitor_file(path: Path, fps: float) -> None:
    """The 'subject enters' scene as an MJPEG Matroska file (the camera for the daemon)."""
    sc = next(s for s in scenarios() if s.name == "subject enters")
    muxer = MatroskaMuxer(sc.scene.width, sc.scene.height, fps=fps)
    parts = [muxer.start()]
    for n in range(sc.frames):
        parts.append(muxer.add(encode_jpeg(sc.scene.render(n)), round(n * 1000 / fps)))
    path.write_bytes(b"".join(parts))


@pytest.mark.timeout(120)
def test_run_records_and_sigterm_finishes_the_open_clip(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    state = tmp_path / "state"
    initialise(state, "front-door", now=utcnow())
    camera = tmp_path / "camera" / "visitor.mkv"
    camera.parent.mkdir()
    visitor_file(camera, fps=20.0)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    cfg = {
        "device_id": "front-door",
        "state_dir": str(state),
        "camera": {"source": f"file:{camera}", "loop": True, "realtime": True},
        "recording": {"pre_roll": "1s", "post_roll": "10s", "privacy_masks": []},
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "approval": {"channels": ["cli"]},
        "app": {"enabled": False},
    }
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from agent.cli import entry; entry()",
         "--config", str(cfg_path), "run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Vault(state, load_storage_key(state)) as vault:
            deadline = time.monotonic() + 60
            while not any(c.state == "writing" for c in vault.list_clips()):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no clip was started"
                time.sleep(0.05)
            time.sleep(0.3)  # a few more frames into the open clip
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr
            clips = vault.list_clips()
            assert clips and all(c.state == "final" for c in clips), clips
            last = clips[-1]
            with vault.open_clip(last.id, verify_sha256=True) as reader:
                blocks = parse_mkv(reader.read()).blocks
            assert len(blocks) == last.frames > 0
            assert vault.read_thumbnail(last.id) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    status = json.loads((state / "status.json").read_text())
    assert status["state"] == "stopped" and status["device_id"] == "front-door"
    cam = status["workers"]["camera"]["stats"]
    assert cam["capture"]["source"] == f"file:{camera}"
    assert cam["recorder"]["clips"] >= 1 and cam["recorder"]["current"] is None

    lines = (state / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events[:2] == ["device_initialized", "agent_started"] and events[-1] == "agent_stopped"
    # Clips are camera activity: the request log (and so the public head) never sees them.
    assert "clip_recorded" not in events
    activity = [json.loads(line)["event"] for line in
                (state / "activity.jsonl").read_text().splitlines()]
    assert "clip_recorded" in activity
    for name in ("audit.jsonl", "activity.jsonl"):
        assert verify_file(state / name, load_device_key(state).public_key()).ok
    assert scan_for_plaintext(state, private_tmp, known=[]) == []
