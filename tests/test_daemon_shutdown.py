"""A part that does not stop in time: the agent still shuts down, and its log says where the
part is stuck (a Python traceback of that thread), so a hang on a device can be diagnosed."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.camera.frame import Frame, SystemClock
from agent.camera.pipeline import CameraWorker, FrameProcessor
from agent.config import parse
from agent.daemon import Daemon
from agent.diagnostics import stack_of
from tests.camera.camera_helpers import MemorySink


def stuck_in_a_driver_call(release: threading.Event) -> None:
    """Stands in for a C call that ignores the stop event (a hung driver)."""
    release.wait(30.0)


class StuckWorker:
    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = 0
        self.returned = False

    def run(self, stop: threading.Event) -> None:
        stuck_in_a_driver_call(self.release)
        self.returned = True

    def close(self) -> None:
        self.closed += 1


def test_stack_of_names_the_function_a_thread_waits_in() -> None:
    release = threading.Event()
    thread = threading.Thread(target=stuck_in_a_driver_call, args=(release,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while "release.wait" not in stack_of(thread) and time.monotonic() < deadline:
            time.sleep(0.01)
        stack = stack_of(thread)
        assert "in stuck_in_a_driver_call" in stack and "release.wait(30.0)" in stack
    finally:
        release.set()
        thread.join(5)
    assert "no Python frame" in stack_of(thread)


def test_a_worker_that_ignores_stop_is_logged_with_its_stack_and_shutdown_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = StuckWorker()
    stop = threading.Event()
    stop.set()
    caplog.set_level(logging.ERROR, logger="agent.daemon")
    try:
        assert Daemon([worker], stop, join_timeout=0.3).run() == 0
        # The daemon returned and closed the worker while its thread was still stuck.
        assert not worker.returned
        assert worker.closed == 1
    finally:
        worker.release.set()
    (record,) = [r for r in caplog.records if "did not stop" in r.getMessage()]
    text = record.getMessage()
    assert text.startswith("worker stuck did not stop within 0 s; it is at:")
    assert "in stuck_in_a_driver_call" in text


class HungCamera:
    """A camera whose driver hangs in ``read`` once opened, as a wedged USB device does."""

    description = "hung camera"

    def __init__(self) -> None:
        self.release = threading.Event()

    def open(self) -> None:
        pass

    def read(self) -> Frame | None:
        stuck_in_a_driver_call(self.release)
        return None

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"kind": "hung", "passthrough": False}


def test_a_hung_camera_thread_is_logged_with_its_stack_and_the_worker_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = parse({"device_id": "front-door", "state_dir": str(tmp_path / "state"),
                 "camera": {"source": "synthetic", "fps": 10}})
    source = HungCamera()
    stop = threading.Event()
    worker = CameraWorker(source, FrameProcessor.from_config(cfg, MemorySink(), fps=10),
                          clock=SystemClock(stop), join_timeout=0.3)
    caplog.set_level(logging.ERROR, logger="agent.camera.pipeline")
    runner = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    runner.start()
    try:
        time.sleep(0.2)
        stop.set()
        runner.join(10)
        assert not runner.is_alive()
    finally:
        source.release.set()
    (record,) = [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert "the camera thread did not stop within 0 s; it is at:" in record.getMessage()
    assert "in stuck_in_a_driver_call" in record.getMessage()


def test_guard_exit_ends_a_process_whose_exit_hangs_with_every_threads_traceback() -> None:
    # A non-daemon thread that never ends keeps the interpreter from exiting, as a thread stuck
    # in a C call can: the guard must end the process (exit 1) and say where the thread is.
    code = textwrap.dedent("""
        import threading
        from agent.diagnostics import guard_exit

        def stuck_in_a_driver_call():
            threading.Event().wait()

        threading.Thread(target=stuck_in_a_driver_call, name="camera-capture").start()
        guard_exit(0.5)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "Timeout (0:00:00.500000)!" in done.stderr
    assert "in stuck_in_a_driver_call" in done.stderr


def test_guard_exit_leaves_a_clean_exit_alone() -> None:
    code = "from agent.diagnostics import guard_exit\nguard_exit(0.5)\nprint('bye')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "bye\n", "")
