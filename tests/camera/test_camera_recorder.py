"""The clip state machine (pure) and the recorder against an in-memory sink."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest

from agent.camera.frame import Frame
from agent.camera.media import CONTENT_TYPE, iter_images
from agent.camera.pipeline import FrameEncoder
from agent.camera.recorder import (
    ClipPolicy,
    Decision,
    PreRoll,
    Recorder,
    RecordingParams,
    StoredFrame,
)
from agent.camera.recorder import RecState as S
from agent.config import RecordingConfig
from tests.camera.camera_helpers import T0, MemorySink, decode_jpeg, encode_jpeg, parse_mkv

FPS = 10.0


_BASE: dict[tuple[int, int], bytes] = {}


def jpeg_n(n: int, w: int = 64, h: int = 48) -> bytes:
    """A valid JPEG whose bytes are unique to frame ``n`` (a COM segment carries it)."""
    base = _BASE.get((w, h))
    if base is None:
        base = _BASE[(w, h)] = encode_jpeg(np.full((h, w, 3), 128, np.uint8))
    comment = f"frame {n}".encode()
    return base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]


def frame(n: int, w: int = 64, h: int = 48) -> Frame:
    return Frame(n, n / FPS, T0 + timedelta(seconds=n / FPS), w, h, jpeg=jpeg_n(n, w, h))


def record(
    motion: set[int], total: int, params: RecordingParams, sink: MemorySink | None = None
) -> tuple[MemorySink, Recorder]:
    sink = sink or MemorySink()
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    for n in range(total):
        rec.push(frame(n), n in motion)
    rec.close()
    return sink, rec


def frame_numbers(clip_data: bytes | bytearray) -> list[int]:
    index = {jpeg_n(n): n for n in range(400)}
    return [index[b] for _, b in parse_mkv(clip_data).blocks]


def state(p: ClipPolicy) -> S:
    return p.state


# --------------------------------------------------------------------------- ClipPolicy


def test_policy_walks_idle_recording_post_roll_idle() -> None:
    p = ClipPolicy(post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    assert p.step(0.0, False) == Decision()
    assert state(p) is S.IDLE
    assert p.step(0.1, True, preroll_start=-2.0) == Decision(start=True, preroll=True, write=True)
    assert p.clip_start == -2.0 and p.state is S.RECORDING
    assert p.step(0.2, False) == Decision(write=True)
    assert state(p) is S.POST_ROLL
    assert p.step(1.1, False) == Decision(write=True)  # exactly post_roll after: still kept
    assert p.step(1.2, False) == Decision(finish=True)
    assert state(p) is S.IDLE


def test_motion_during_post_roll_continues_the_clip() -> None:
    p = ClipPolicy(post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    p.step(0.0, True)
    p.step(0.9, False)
    assert p.step(1.0, True) == Decision(write=True)
    assert state(p) is S.RECORDING
    assert p.step(1.9, False) == Decision(write=True)
    assert p.step(2.1, False) == Decision(finish=True)


def test_merge_gap_longer_than_post_roll_extends_the_tail() -> None:
    p = ClipPolicy(post_roll=0.5, max_clip=60.0, merge_gap=2.0)
    p.step(0.0, True)
    assert p.step(1.9, False) == Decision(write=True)
    assert p.step(2.0, True) == Decision(write=True)  # same clip: the gap was short
    assert p.step(4.1, False) == Decision(finish=True)


def test_max_clip_splits_without_a_gap() -> None:
    p = ClipPolicy(post_roll=1.0, max_clip=5.0, merge_gap=0.0)
    p.step(0.0, True, preroll_start=-1.0)
    assert p.step(3.9, True) == Decision(write=True)
    assert p.step(4.0, True) == Decision(finish=True, start=True, write=True)
    assert p.clip_start == 4.0
    assert p.step(8.9, True) == Decision(write=True)
    assert p.step(9.0, True) == Decision(finish=True, start=True, write=True)


def test_policy_rejects_a_zero_max_clip() -> None:
    with pytest.raises(ValueError, match="max_clip"):
        ClipPolicy(1.0, 0.0, 0.0)


# --------------------------------------------------------------------------- Recorder


def test_one_event_makes_one_clip_with_pre_and_post_roll() -> None:
    params = RecordingParams(pre_roll=2.0, post_roll=3.0, max_clip=120.0, merge_gap=1.0)
    sink, rec = record(set(range(40, 80)), 150, params)
    (clip,) = sink.clips
    assert clip.content_type == CONTENT_TYPE == "video/x-matroska"
    assert frame_numbers(clip.data) == list(range(20, 110))  # 2 s before, 3 s after
    assert clip.start == T0 + timedelta(seconds=2.0)
    assert clip.end == T0 + timedelta(seconds=10.9)
    assert clip.frames == 90
    mkv = parse_mkv(bytes(clip.data))
    assert [t for t, _ in mkv.blocks] == [(n - 20) * 100 for n in range(20, 110)]
    assert clip.thumbnail is not None and clip.thumbnail.startswith(b"\xff\xd8")
    assert rec.clips == 1 and rec.failures == 0


def test_long_events_split_into_consecutive_clips_losing_nothing() -> None:
    params = RecordingParams(pre_roll=1.0, post_roll=1.0, max_clip=5.0, merge_gap=0.0)
    sink, _ = record(set(range(20, 200)), 230, params)
    numbers = [frame_numbers(c.data) for c in sink.finished]
    assert len(numbers) >= 4
    joined = [n for clip in numbers for n in clip]
    assert joined == list(range(10, 210))  # contiguous: no frame lost or doubled
    for clip in numbers[:-1]:
        assert (clip[-1] - clip[0] + 1) / FPS <= 5.0 + 1e-9
    assert all(c.thumbnail for c in sink.finished)


def test_gaps_merge_or_separate_by_merge_gap() -> None:
    motion = set(range(20, 30)) | set(range(55, 65))  # 2.5 s without motion in between
    merged = RecordingParams(pre_roll=1.0, post_roll=1.0, max_clip=60.0, merge_gap=3.0)
    sink, _ = record(motion, 100, merged)
    # One clip; the tail after the last motion is max(post_roll, merge_gap) = 3 s.
    assert [frame_numbers(c.data) for c in sink.clips] == [list(range(10, 95))]

    split = RecordingParams(pre_roll=1.0, post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    sink, _ = record(motion, 100, split)
    first, second = (frame_numbers(c.data) for c in sink.clips)
    assert first == list(range(10, 40))
    assert second == list(range(45, 75))  # its pre-roll never repeats the first clip's frames


def test_pre_roll_ring_is_bounded_in_time_and_count() -> None:
    ring = PreRoll(seconds=2.0, max_frames=5)
    encoder = FrameEncoder([], 85, codec="mjpeg")
    for n in range(50):
        (stored,) = encoder(frame(n))
        ring.push(stored)
        assert len(ring) <= 5
    assert [round(f.ts * FPS) for f in ring.drain(4.9)] == list(range(45, 50))
    assert len(ring) == 0
    disabled = PreRoll(seconds=0.0, max_frames=1)
    assert not disabled.enabled


def test_idle_frames_are_not_encoded_without_pre_roll() -> None:
    calls: list[int] = []
    encoder = FrameEncoder([], 85, codec="mjpeg")

    def encode(f: Frame) -> list[StoredFrame]:
        calls.append(f.seq)
        return encoder(f)

    params = RecordingParams(pre_roll=0.0, post_roll=0.5, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink()
    rec = Recorder(sink, params, encode, fps=FPS)
    for n in range(40):
        rec.push(frame(n), 10 <= n < 15)
    rec.close()
    assert calls == list(range(10, 20))
    assert frame_numbers(sink.clips[0].data) == list(range(10, 20))


def test_close_finishes_the_open_clip() -> None:
    params = RecordingParams(pre_roll=1.0, post_roll=10.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink()
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    for n in range(30):
        rec.push(frame(n), n >= 20)
    assert rec.recording
    assert sink.clips[0].end is None
    assert rec.stats()["current"]["frames"] == 20
    rec.close()
    rec.close()  # idempotent
    (clip,) = sink.clips
    assert clip.end == T0 + timedelta(seconds=2.9)
    assert frame_numbers(clip.data) == list(range(10, 30))
    assert rec.stats()["state"] == "idle"
    assert rec.stats()["current"] is None


def test_a_vault_that_fails_to_create_loses_only_that_event() -> None:
    params = RecordingParams(pre_roll=1.0, post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink(fail_create=True)
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    for n in range(40):
        rec.push(frame(n), 10 <= n < 20)
    assert rec.failures == 1  # not once per frame
    assert "vault unavailable" in (rec.last_error or "")
    assert not rec.recording
    sink.fail_create = False
    for n in range(40, 100):
        rec.push(frame(n), 50 <= n < 55 or 70 <= n < 75)
    rec.close()
    # Motion within RETRY_AFTER (5 s) of the failure at frame 10 waits; frame 70 records.
    (clip,) = sink.clips
    assert frame_numbers(clip.data) == list(range(60, 85))


def test_after_a_failure_motion_waits_before_retrying_then_keeps_the_pre_roll() -> None:
    params = RecordingParams(pre_roll=2.0, post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink(fail_create=True)
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    rec.push(frame(0), True)
    sink.fail_create = False
    for n in range(1, 100):
        rec.push(frame(n), True)
    rec.close()
    assert rec.failures == 1
    first = frame_numbers(sink.clips[0].data)
    assert first[0] == 30  # retried 5 s later, with 2 s of pre-roll


def test_a_write_failure_aborts_the_clip_and_the_next_motion_starts_a_new_one() -> None:
    params = RecordingParams(pre_roll=0.5, post_roll=1.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink()
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    for n in range(15):
        rec.push(frame(n), n >= 10)
    sink.fail_writes = True
    # The muxer hands the vault a cluster at most every second: the failure shows by then.
    failed_at = next(n for n in range(15, 27) if (rec.push(frame(n), True), not rec.recording)[1])
    assert sink.clips[0].aborted and failed_at <= 25
    sink.fail_writes = False
    rec.push(frame(failed_at + 1), False)  # no motion: stays idle
    assert len(sink.clips) == 1
    for n in range(failed_at + 2, 80):
        rec.push(frame(n), n >= 70)
    rec.close()
    assert [c.aborted for c in sink.clips] == [True, False]
    assert frame_numbers(sink.clips[1].data)[0] == 65  # with its 0.5 s of pre-roll


def test_a_resolution_change_mid_clip_starts_a_new_clip() -> None:
    params = RecordingParams(pre_roll=0.0, post_roll=5.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink()
    rec = Recorder(sink, params, FrameEncoder([], 85), fps=FPS)
    for n in range(10):
        rec.push(frame(n), True)
    for n in range(10, 20):
        rec.push(frame(n, 80, 60), True)
    rec.close()
    sizes = [(parse_mkv(bytes(c.data)).width, len(parse_mkv(bytes(c.data)).blocks))
             for c in sink.clips]
    assert sizes == [(64, 10), (80, 10)]


def test_privacy_masks_force_h264_and_reach_frames_and_thumbnail() -> None:
    mask = [(0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)]
    params = RecordingParams(pre_roll=0.0, post_roll=0.0, max_clip=60.0, merge_gap=0.0)
    sink = MemorySink()
    rec = Recorder(sink, params, FrameEncoder([mask], 90), fps=FPS)
    white = np.full((96, 128, 3), 255, np.uint8)
    f = Frame(1, 0.0, T0, 128, 96, jpeg=encode_jpeg(white))
    rec.push(f, True)
    rec.close()
    (clip,) = sink.clips
    # A camera JPEG cannot be stored as it came once a mask must be burned in: H.264.
    assert clip.codec == "h264" and clip.frames == 1
    ((_, img),) = list(iter_images(io.BytesIO(bytes(clip.data))))
    # The mask (x >= 64) is grown to whole 16-px blocks (x >= 48); the rest stays (within
    # H.264's rounding at the edge).
    assert img[:, 50:].max() <= 24 and img[:, :40].min() >= 230
    assert clip.thumbnail is not None
    thumb = decode_jpeg(clip.thumbnail)
    assert thumb[:, thumb.shape[1] // 2 :].max() <= 8


def test_params_from_config() -> None:
    p = RecordingParams.from_config(RecordingConfig())
    assert (p.pre_roll, p.post_roll, p.max_clip, p.merge_gap) == (5.0, 10.0, 120.0, 3.0)
