"""The camera goes away and comes back; the agent stays up, says so, and records again.

- **file source renamed away and back** (``doorbell-agent run`` subprocess): capture backs off
  with the reason (``video file ... does not exist``) in ``status.json`` and in
  ``doorbell-agent status``; once the file is back, clips starting after its return are recorded.
- **HTTP MJPEG camera that dies and returns** (a real ``multipart/x-mixed-replace`` server on
  127.0.0.1, stopped with its connections cut, then started again on the same port): the same.
- **a source that raises** (the daemon in-process, one camera worker whose source throws from
  ``open``, ``read`` and ``stats`` like a buggy driver): capture counts the failures and reopens,
  status is still written, clips are recorded after the last fault, the daemon stops cleanly.

Each ends with ``audit verify`` and ``clips verify`` passing.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stdout
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from agent import config
from agent.audit import verify_file
from agent.camera.frame import Frame
from agent.camera.pipeline import CameraWorker, FrameProcessor
from agent.camera.sources import FileSource
from agent.cli import main as agent_main
from agent.daemon import Worker
from agent.keys import load_device_key, load_storage_key
from agent.provision import initialise
from agent.timeutil import parse_rfc3339, utcnow
from agent.vault import Vault
from agent.wiring import DaemonContext, run_daemon
from tests.mosquitto import Mosquitto, free_port
from tests.reliability.harness import AgentProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BACKOFF = {"camera": {"reopen_backoff_max": "2s"}}


def capture_stats(agent: AgentProcess) -> dict[str, Any]:
    """The running agent's capture stats from ``status.json`` ({} until written)."""
    status = agent.status() or {}
    if agent.proc is None or status.get("pid") != agent.proc.pid:
        return {}
    stats = status.get("workers", {}).get("camera", {}).get("stats") or {}
    capture = stats.get("capture")
    return capture if isinstance(capture, dict) else {}


def clips_started_after(agent: AgentProcess, moment: datetime) -> list[dict[str, Any]]:
    """``clip_recorded`` entries whose footage starts after ``moment`` (pre-roll allowed for)."""
    return [
        e
        for e in agent.audit_events("clip_recorded")
        if parse_rfc3339(e["start"]) > moment - timedelta(seconds=2)
    ]


def check_outage_and_return(
    agent: AgentProcess, reason: str, cut: Any, restore: Any
) -> None:
    """Record, cut the camera, see the outage in status, restore, see clips resume."""
    agent.start()
    agent.wait_audit("clip_recorded", timeout=90)
    cut()

    def down() -> dict[str, Any] | None:
        capture = capture_stats(agent)
        error = capture.get("last_error") or ""
        return capture if capture.get("state") != "streaming" and reason in error else None

    capture = wait_until(down, f"status.json to show the camera down ({reason})", agent=agent)
    assert capture["failures"] >= 1
    text = agent.cli_subprocess("status")
    assert text.code == 0, text.err
    camera = next(line for line in text.out.splitlines() if line.startswith("camera:"))
    assert "streaming" not in camera.split("(")[0] and reason in camera
    assert agent.running

    back = utcnow()
    restore()
    wait_until(lambda: clips_started_after(agent, back), "a clip after the camera came back",
               agent=agent, timeout=90)
    wait_until(lambda: capture_stats(agent).get("state") == "streaming",
               "status.json to show the camera streaming again", agent=agent)
    assert agent.stop() == 0, agent.log_tail()
    agent.verify_audit()
    agent.verify_clips()
    assert "Traceback" not in agent.log_text()


def test_file_camera_renamed_away_and_back(
    tmp_path: Path, mosquitto: Mosquitto, motion_video: Path
) -> None:
    video = tmp_path / "doorstep.avi"
    video.write_bytes(motion_video.read_bytes())
    away = tmp_path / "doorstep.avi.away"
    with AgentProcess(tmp_path / "agent", mosquitto, camera=video, config=BACKOFF) as agent:
        check_outage_and_return(
            agent, "does not exist", lambda: video.rename(away), lambda: away.rename(video)
        )


class MJPEGServer:
    """An MJPEG-over-HTTP camera on 127.0.0.1: the frames of a video, paced at its rate.

    :meth:`stop` closes the listening socket and cuts every open stream (a camera losing power);
    :meth:`start` serves again on the same port.
    """

    def __init__(self, video: Path, fps: float = 10.0) -> None:
        cap = cv2.VideoCapture(str(video))
        self.frames: list[bytes] = []
        while True:
            ok, image = cap.read()
            if not ok:
                break
            ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 70])
            self.frames.append(jpeg.tobytes())
        cap.release()
        assert self.frames, f"no frames in {video}"
        self.interval = 1.0 / fps
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._alive = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                n = 0
                try:
                    while camera._alive.is_set():
                        jpeg = camera.frames[n % len(camera.frames)]
                        n += 1
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                            % len(jpeg) + jpeg + b"\r\n"
                        )
                        time.sleep(camera.interval)
                except OSError:
                    return  # the agent hung up

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler

    def start(self) -> None:
        """Listen and serve (again) on :attr:`port`."""
        self._alive.set()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="mjpeg-camera", daemon=True).start()

    def stop(self) -> None:
        """Stop listening and end every stream. Idempotent."""
        self._alive.clear()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


@pytest.fixture
def mjpeg_camera(motion_video: Path) -> Iterator[MJPEGServer]:
    """A started MJPEG camera serving the motion video; stopped at teardown."""
    camera = MJPEGServer(motion_video)
    camera.start()
    try:
        yield camera
    finally:
        camera.stop()


def test_http_mjpeg_camera_dies_and_returns(
    tmp_path: Path, mosquitto: Mosquitto, mjpeg_camera: MJPEGServer
) -> None:
    settings = {
        "camera": {"source": mjpeg_camera.url, "fps": 10, "reopen_backoff_max": "2s"},
        "motion": {"enabled": True},
    }
    with AgentProcess(tmp_path / "agent", mosquitto, config=settings) as agent:
        check_outage_and_return(
            agent, mjpeg_camera.url.split("/stream")[0], mjpeg_camera.stop, mjpeg_camera.start
        )


class BuggySource:
    """A real file source behind a driver that throws: from ``open`` on the opens listed,
    from ``read`` on the reads listed, and from ``stats`` always."""

    def __init__(self, inner: FileSource, bad_opens: set[int], bad_reads: set[int]) -> None:
        self.inner = inner
        self.description = f"buggy {inner.description}"
        self.bad_opens = bad_opens
        self.bad_reads = bad_reads
        self.opens = 0
        self.reads = 0
        self.raised = 0

    def open(self) -> None:
        self.opens += 1
        if self.opens in self.bad_opens:
            self.raised += 1
            raise RuntimeError(f"driver bug on open {self.opens}")
        self.inner.open()

    def read(self) -> Frame | None:
        self.reads += 1
        if self.reads in self.bad_reads:
            self.raised += 1
            raise ValueError(f"driver bug on read {self.reads}")
        return self.inner.read()

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, Any]:
        raise RuntimeError("driver stats are broken too")


def test_source_raising_is_absorbed_and_recording_resumes(
    tmp_path: Path, motion_video: Path
) -> None:
    state = tmp_path / "state"
    initialise(state, "front-door", now=utcnow())
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "device_id": "front-door",
        "state_dir": str(state),
        "camera": {"source": f"file:{motion_video}", "fps": 10, "loop": True},
        "motion": {"enabled": True},
        "recording": {"pre_roll": "1s", "post_roll": "1s", "max_clip": "5s", "merge_gap": "1s"},
        "app": {"enabled": False},
    }))
    cfg = config.load(cfg_path)
    # Faults while frames flow (reads 15, 40, 41 and 90 of the opens that follow) and two
    # failed reopens in a row; all in the first ~12 s, clean afterwards.
    sources: list[BuggySource] = []

    def camera_factory(ctx: DaemonContext) -> Worker:
        inner = FileSource(motion_video, clock=ctx.clock, loop=True, realtime=True,
                           fallback_fps=10)
        source = BuggySource(inner, bad_opens={3, 4}, bad_reads={15, 40, 41, 90})
        sources.append(source)
        processor = FrameProcessor.from_config(ctx.config, ctx.vault, fps=10)
        return CameraWorker(source, processor, clock=ctx.clock, backoff_max=0.5)

    stop = threading.Event()
    codes: list[int] = []
    daemon = threading.Thread(target=lambda: codes.append(run_daemon(
        cfg, factories=(camera_factory,), stop=stop, status_interval=0.3, handle_signals=False
    )))
    daemon.start()
    try:
        def status() -> dict[str, Any]:
            try:
                doc: dict[str, Any] = json.loads((state / "status.json").read_text())
            except (FileNotFoundError, ValueError):
                return {}
            return doc

        def faults_seen() -> dict[str, Any] | None:
            camera = status().get("workers", {}).get("camera", {})
            capture = (camera.get("stats") or {}).get("capture") or {}
            return capture if capture.get("failures", 0) >= 6 else None

        capture = wait_until(faults_seen, "status.json to count six camera faults", timeout=60)
        assert "driver bug" in capture["last_error"]
        assert status()["workers"]["camera"]["state"] == "running"
        assert sources[0].raised == 6
        calm = utcnow()

        def clips_after_faults() -> int:
            with Vault(state, load_storage_key(state)) as vault:
                return sum(c.state == "final" and c.start > calm for c in vault.list_clips())

        wait_until(lambda: clips_after_faults() >= 1, "a clip recorded after the faults",
                   timeout=60)
        out = io.StringIO()
        with redirect_stdout(out):
            assert agent_main(["--config", str(cfg_path), "status"]) == 0
        camera_line = next(x for x in out.getvalue().splitlines() if x.startswith("camera:"))
        assert camera_line.startswith("camera: streaming")
    finally:
        stop.set()
        daemon.join(60)
    assert codes == [0]
    with Vault(state, load_storage_key(state)) as vault:
        report = vault.verify()
    assert report.ok and report.checked >= 1, report
    assert verify_file(state / "audit.jsonl", load_device_key(state).public_key()).ok
