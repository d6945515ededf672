"""Sources and the capture thread: HTTP MJPEG passthrough, failure and recovery, file pacing
and looping on an injected clock, the bounded hand-off."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.camera.avsource import StreamSource
from agent.camera.capture import Backoff, Capture, FrameQueue
from agent.camera.frame import Frame, SystemClock
from agent.camera.sources import (
    FileSource,
    OpenCVSource,
    SyntheticSource,
    redact,
    source_from_config,
)
from agent.camera.synthetic import Scene
from agent.config import CameraConfig
from agent.errors import CameraError
from tests.camera.camera_helpers import FakeClock, MJPEGServer, encode_jpeg
from tests.camera.legacy_mkv import MatroskaMuxer


def tagged_jpegs(count: int, w: int = 160, h: int = 120) -> list[bytes]:
    """Distinct valid JPEGs (a COM segment names each one)."""
    base = encode_jpeg(np.full((h, w, 3), 90, np.uint8))
    out = []
    for n in range(count):
        comment = f"frame {n}".encode()
        out.append(base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
                   + base[2:])
    return out


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until ``condition`` holds (a liveness guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def mjpeg_server() -> Iterator[MJPEGServer]:
    server = MJPEGServer(tagged_jpegs(30)).start()
    yield server
    server.close()


def test_http_mjpeg_stream_is_passed_through_byte_for_byte(mjpeg_server: MJPEGServer) -> None:
    clock = FakeClock()
    src = OpenCVSource(mjpeg_server.url, kind="url", clock=clock, width=160, height=120, fps=10)
    src.open()
    try:
        assert src.stats()["passthrough"] is True
        frames = [src.read() for _ in range(40)]
    finally:
        src.close()
    served = set(mjpeg_server.frames)
    assert all(f.jpeg in served and f.image is None for f in frames)
    assert all((f.width, f.height) == (160, 120) for f in frames)
    # In stream order, without repeats: frame k+1 follows frame k.
    order = [mjpeg_server.frames.index(f.jpeg or b"") for f in frames]
    assert all((b - a) % 30 == 1 for a, b in itertools.pairwise(order))
    assert [f.seq for f in frames] == list(range(1, 41))


def test_a_camera_that_dies_stalls_and_comes_back_is_reopened(mjpeg_server: MJPEGServer) -> None:
    clock = SystemClock()
    src = OpenCVSource(
        mjpeg_server.url, kind="url", clock=clock, width=160, height=120, fps=10,
        open_timeout=1.0, read_timeout=1.0,
    )
    queue = FrameQueue(1000)
    capture = Capture(src, queue, clock=clock, backoff=Backoff(0.05, 0.2), stall_after=0.5)
    stop = threading.Event()
    thread = capture.start(stop)
    try:
        wait_for(lambda: capture.frames >= 10, "first frames")
        assert capture.stats()["state"] == "streaming"

        mjpeg_server.mode = "down"  # the stream ends and reconnects get 503
        wait_for(lambda: capture.failures >= 3, "failed reopen attempts")
        assert thread.is_alive()
        assert capture.stats()["state"] in ("backoff", "opening")

        mjpeg_server.mode = "stream"
        before = capture.frames
        wait_for(lambda: capture.frames >= before + 10, "frames after the camera came back")
        assert capture.opens >= 2

        mjpeg_server.mode = "stall"  # connected, but no more frames: the read times out
        failures = capture.failures
        wait_for(lambda: capture.failures > failures, "the stall to be noticed")
        mjpeg_server.mode = "stream"
        before = capture.frames
        wait_for(lambda: capture.frames >= before + 10, "frames after the stall")
        stats = capture.stats()
        assert stats["state"] == "streaming"
        assert stats["last_error"] and stats["opens"] >= 3
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert capture.stats()["state"] == "stopped"
    assert queue.closed
    served = set(mjpeg_server.frames)
    assert all(f.jpeg in served for f in queue.drain())


def make_file(tmp_path: Path, jpegs: list[bytes], fps: float = 10.0) -> Path:
    muxer = MatroskaMuxer(160, 120, fps=fps)
    data = muxer.start() + b"".join(
        muxer.add(j, round(i * 1000 / fps)) for i, j in enumerate(jpegs)
    )
    path = tmp_path / "camera.mkv"
    path.write_bytes(data)
    return path


def test_file_is_paced_at_its_frame_rate_on_the_injected_clock(tmp_path: Path) -> None:
    jpegs = tagged_jpegs(12)
    clock = FakeClock(start=500.0)
    src = FileSource(make_file(tmp_path, jpegs, fps=12.5), clock=clock, loop=False,
                     realtime=True, fallback_fps=5.0)
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    src.close()
    assert src.fps == 12.5
    assert [f.jpeg for f in frames] == jpegs  # passthrough of the file's own JPEGs
    assert [f.ts for f in frames] == pytest.approx([500.0 + i * 0.08 for i in range(12)])
    assert [(f.wall - frames[0].wall).total_seconds() for f in frames] == pytest.approx(
        [i * 0.08 for i in range(12)]
    )
    # Each frame waited until it was due: 11 waits of one frame interval.
    assert clock.sleeps == pytest.approx([0.08] * 11)


def test_file_loops_with_a_continuous_timeline(tmp_path: Path) -> None:
    jpegs = tagged_jpegs(5)
    clock = FakeClock()
    src = FileSource(make_file(tmp_path, jpegs), clock=clock, loop=True, realtime=True,
                     fallback_fps=5.0)
    src.open()
    frames = [src.read() for _ in range(13)]
    src.close()
    assert all(f is not None for f in frames)
    got = [f for f in frames if f is not None]
    assert [f.jpeg for f in got] == (jpegs * 3)[:13]
    assert [f.seq for f in got] == list(range(1, 14))
    assert [f.ts - got[0].ts for f in got] == pytest.approx([i * 0.1 for i in range(13)])
    assert src.loops == 2


def test_unpaced_file_keeps_timeline_timestamps_without_waiting(tmp_path: Path) -> None:
    clock = FakeClock()
    src = FileSource(make_file(tmp_path, tagged_jpegs(6)), clock=clock, loop=False,
                     realtime=False, fallback_fps=5.0)
    src.open()
    frames = [src.read() for _ in range(6)]
    assert src.read() is None
    src.close()
    assert clock.sleeps == []
    assert [f.ts for f in frames if f] == pytest.approx([1000.0 + i * 0.1 for i in range(6)])


def test_a_paced_source_that_fell_far_behind_re_anchors_instead_of_bursting() -> None:
    clock = FakeClock()
    src = SyntheticSource(Scene(64, 48, noise=0), clock=clock, fps=10.0, realtime=True)
    src.open()
    first = [src.read() for _ in range(3)]
    clock.advance(5.0)  # the process was suspended
    resumed_at = clock.t
    late = src.read()
    after = [src.read() for _ in range(2)]
    assert [f.ts for f in first] == pytest.approx([1000.0, 1000.1, 1000.2])
    assert late.ts == pytest.approx(resumed_at)
    assert [f.ts - late.ts for f in after] == pytest.approx([0.1, 0.2])
    assert (late.width, late.height) == (64, 48) and late.image is not None


def test_missing_file_and_device_raise_camera_errors(tmp_path: Path) -> None:
    src = FileSource(tmp_path / "nope.mkv", clock=FakeClock(), loop=True, realtime=True,
                     fallback_fps=10.0)
    with pytest.raises(CameraError, match="does not exist"):
        src.open()
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    with pytest.raises(CameraError, match="cannot open"):
        FileSource(empty, clock=FakeClock(), loop=True, realtime=True, fallback_fps=10.0).open()


def test_a_source_that_never_opens_is_retried_with_growing_backoff(tmp_path: Path) -> None:
    src = FileSource(tmp_path / "nope.mkv", clock=SystemClock(), loop=True, realtime=True,
                     fallback_fps=10.0)
    queue = FrameQueue(4)
    backoff = Backoff(0.01, 0.04)
    capture = Capture(src, queue, clock=SystemClock(), backoff=backoff)
    stop = threading.Event()
    thread = capture.start(stop)
    wait_for(lambda: capture.failures >= 4, "retries")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert "does not exist" in (capture.last_error or "")
    assert backoff.next() == 0.04  # grew to the cap and stayed there


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    b = Backoff(0.5, 30.0)
    assert [b.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_frame_queue_drops_the_oldest_and_counts() -> None:
    q = FrameQueue(3)
    clock = FakeClock()
    src = SyntheticSource(Scene(32, 24, noise=0), clock=clock, fps=10.0, realtime=False)
    src.open()
    for _ in range(10):
        q.put(src.read())
    assert len(q) == 3 and q.dropped == 7 and q.put_count == 10
    assert [f.seq for f in q.drain()] == [8, 9, 10]
    assert q.get(timeout=0.01) is None
    q.close()
    assert q.get() is None


def test_a_slow_consumer_never_blocks_capture_or_grows_memory() -> None:
    clock = FakeClock()
    src = SyntheticSource(Scene(32, 24, noise=0), clock=clock, fps=10.0, realtime=False)
    queue = FrameQueue(4)
    capture = Capture(src, queue, clock=clock, backoff=Backoff(0.1, 1.0))
    stop = threading.Event()
    thread = capture.start(stop)
    wait_for(lambda: capture.frames >= 300, "capture to run ahead of the absent consumer")
    stop.set()
    thread.join(5)
    assert len(queue) <= 4
    assert queue.dropped == capture.frames - len(queue)
    assert capture.stats()["dropped"] == queue.dropped


def test_source_from_config() -> None:
    clock = FakeClock()
    assert isinstance(source_from_config(CameraConfig(source="synthetic"), clock),
                      SyntheticSource)
    v4l2 = source_from_config(CameraConfig(source="0"), clock)
    assert isinstance(v4l2, OpenCVSource) and v4l2.kind == "v4l2"
    url = source_from_config(CameraConfig(source="rtsp://admin:secret@10.0.0.2/live"), clock)
    assert isinstance(url, StreamSource) and url.kind == "url"  # PyAV: stored as it comes
    assert "secret" not in url.description and url.description == "rtsp://***@10.0.0.2/live"
    f = source_from_config(CameraConfig(source="file:/tmp/x.avi", loop=False), clock)
    assert isinstance(f, FileSource) and f.path == Path("/tmp/x.avi") and not f.loop
    with pytest.raises(CameraError, match="picamera2") as err:
        source_from_config(CameraConfig(source="picamera2"), clock)
    assert err.value.hint and "python3-picamera2" in err.value.hint


def test_redact_keeps_urls_without_credentials() -> None:
    assert redact("http://cam.local:8080/video") == "http://cam.local:8080/video"
    assert redact("http://u@cam:81/v") == "http://***@cam:81/v"


def test_frames_need_content() -> None:
    with pytest.raises(ValueError, match="an image, JPEG bytes or a packet"):
        Frame(1, 0.0, FakeClock().now(), 10, 10)
