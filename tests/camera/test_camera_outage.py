"""Camera faults: a stall is declared after ``camera.stall_timeout`` (injected clock), shown in
status, and the open clip is closed at an outage so a new one opens when frames return."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from agent.camera.frame import Frame
from agent.camera.media import EncodedPacket, H264Encoder
from agent.camera.pipeline import CameraWorker, FrameEncoder, FrameProcessor
from agent.camera.recorder import Recorder, RecordingParams
from agent.camera.sources import SyntheticSource
from agent.camera.synthetic import demo_scene
from agent.config import parse
from tests.camera.camera_helpers import T0, FakeClock, MemorySink


def worker(tmp_path: Path, clock: FakeClock, sink: MemorySink) -> CameraWorker:
    cfg = parse({
        "device_id": "front-door", "state_dir": str(tmp_path / "state"),
        "camera": {"source": "synthetic", "fps": 10, "stall_timeout": "2s"},
        "motion": {"enabled": False},
        "recording": {"pre_roll": "0s", "post_roll": "5s", "max_clip": "1m", "merge_gap": "0s"},
    })
    source = SyntheticSource(demo_scene(128, 96, 10), clock=clock, fps=10)
    processor = FrameProcessor.from_config(cfg, sink, fps=10)
    return CameraWorker(source, processor, clock=clock,
                        stall_timeout=cfg.camera.stall_timeout.total_seconds())


def feed(w: CameraWorker, clock: FakeClock, seq: int) -> None:
    """One frame as the capture thread would hand it over, at the clock's time."""
    image = np.full((96, 128, 3), (seq * 5) % 255, np.uint8)
    frame = Frame(seq, clock.monotonic(), T0 + timedelta(seconds=clock.monotonic() - 1000),
                  128, 96, image=image)
    w.capture.state = "streaming"
    w.capture._last_frame = clock.monotonic()
    w.processor.recorder.push(frame, True)
    clock.advance(0.1)


def test_a_stall_is_declared_after_stall_timeout_and_closes_the_clip(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = MemorySink()
    w = worker(tmp_path, clock, sink)
    for seq in range(1, 21):
        feed(w, clock, seq)
    assert w.processor.recorder.recording
    clock.advance(1.5)  # silent, but not for long enough
    assert w.stats()["capture"]["state"] == "streaming"
    assert not w.check_outage() and w.processor.recorder.recording
    clock.advance(0.6)  # 2.1 s without a frame
    assert w.stats()["capture"]["state"] == "stalled"
    assert w.check_outage()
    (first,) = sink.clips
    assert first.end is not None and first.frames == 20 and not first.aborted
    assert w.stats()["processing"]["outages"] == 1
    # Frames return: a new clip, not a hole inside the old one.
    for seq in range(21, 31):
        feed(w, clock, seq)
    w.processor.close()
    assert len(sink.clips) == 2 and sink.clips[1].frames == 10
    assert sink.clips[1].start > first.end


def test_a_failed_camera_closes_the_clip_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = MemorySink()
    w = worker(tmp_path, clock, sink)
    for seq in range(1, 6):
        feed(w, clock, seq)
    w.capture.state = "backoff"  # the source raised: capture is waiting to reopen
    assert w.check_outage()
    assert sink.clips[0].end is not None and not w.processor.recorder.recording
    assert not w.check_outage()  # nothing open: nothing to do


def _h264_packets(n: int, width: int = 128, height: int = 96) -> list[tuple[float, EncodedPacket]]:
    encoder = H264Encoder(10.0, hardware=False)
    out = []
    for i in range(n):
        image = np.full((height, width, 3), (i * 9) % 255, np.uint8)
        out += [(ts, p) for ts, _, p in encoder.encode(image, i / 10, T0)]
    return out + [(ts, p) for ts, _, p in encoder.flush()]


def _copy_frames(
    packets: list[tuple[float, EncodedPacket]], start_seq: int, t0: float
) -> list[Frame]:
    frames = []
    for i, (ts, packet) in enumerate(packets):
        frames.append(Frame(start_seq + i, t0 + ts, T0 + timedelta(seconds=t0 + ts),
                            packet.fmt.width, packet.fmt.height, packet=packet))
    return frames


def test_a_stream_that_never_sends_a_keyframe_stores_nothing_and_stays_bounded() -> None:
    sink = MemorySink()
    rec = Recorder(sink, RecordingParams(pre_roll=2.0, post_roll=1.0, max_clip=60.0,
                                         merge_gap=0.0), FrameEncoder([], 85), fps=10.0)
    deltas = [(ts, p) for ts, p in _h264_packets(60) if not p.keyframe]
    for frame in _copy_frames(deltas, 1, 0.0):
        rec.push(frame, True)
        assert len(rec.preroll) == 0
    rec.close()
    assert sink.clips == [] and rec.failures == 0


def test_a_resolution_change_on_reconnect_starts_a_new_clip_at_its_keyframe() -> None:
    sink = MemorySink()
    rec = Recorder(sink, RecordingParams(pre_roll=0.0, post_roll=5.0, max_clip=60.0,
                                         merge_gap=0.0), FrameEncoder([], 85), fps=10.0)
    small = _copy_frames(_h264_packets(30), 1, 0.0)
    # The camera came back at 640x480 and, mid-GOP, sends two delta frames first.
    big = _h264_packets(30, 640, 480)
    big = [(ts, p) for ts, p in big[5:7]] + big
    large = _copy_frames(big, 100, 3.5)
    for frame in small + large:
        rec.push(frame, True)
    rec.close()
    first, second = sink.clips
    assert (first.frames, second.frames) == (30, 30)  # the stray deltas were not stored
    assert first.codec == second.codec == "h264"
