"""The frame-exact cut (contract §5.1) on real clips in a real vault, through real PyAV/FFmpeg,
checked with Debian's ffprobe and OpenCV."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from agent.camera.media import CONTENT_TYPE, ClipMuxer, EncodedPacket, H264Encoder, StreamFormat
from agent.errors import VaultError
from agent.release.cut import WindowCutter, plan_cut
from agent.vault import ClipInfo, Vault
from tests.camera.test_camera_pipeline import scan_for_plaintext

T0 = datetime(2026, 12, 6, 13, 36, 20, tzinfo=UTC)
FPS = 10.0
W, H = 320, 240
BITS = 8


def numbered(n: int) -> np.ndarray:
    """A frame whose number survives lossy coding: 8 black/white bars plus moving content."""
    img = np.full((H, W, 3), 90, np.uint8)
    for bit in range(BITS):
        value = 255 if (n >> bit) & 1 else 0
        img[0:40, bit * 40:(bit + 1) * 40] = value
    x = (n * 9) % (W - 50)
    cv2.rectangle(img, (x, 80), (x + 50, 200), (30, 200, 240), -1)
    return img


def number_of(image: np.ndarray) -> int:
    """The frame number drawn by :func:`numbered` (BGR image)."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    n = 0
    for bit in range(BITS):
        if gray[5:35, bit * 40 + 5:(bit + 1) * 40 - 5].mean() > 128:
            n |= 1 << bit
    return n


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    with Vault(state, os.urandom(32)) as v:
        yield v


def record_h264(vault: Vault, start: datetime, frames: int, first_n: int = 0) -> ClipInfo:
    """An H.264 clip with B-frames as a camera's own stream brings them (keyframe every 2 s)."""
    encoder = H264Encoder(FPS, tune=None, hardware=False)
    clip = vault.create_clip(start, CONTENT_TYPE)
    muxer: ClipMuxer | None = None
    t0 = 0.0
    packets = [
        out
        for i in range(frames)
        for out in encoder.encode(
            numbered(first_n + i), i / FPS, start + timedelta(seconds=i / FPS)
        )
    ]
    packets += encoder.flush()
    for ts, _wall, packet in packets:
        if muxer is None:
            muxer = ClipMuxer(clip, packet.fmt, fps=FPS)
            t0 = ts
        muxer.add(packet, ts - t0)
    assert muxer is not None
    muxer.close()
    return clip.finish(start + timedelta(seconds=(frames - 1) / FPS), muxer.frames,
                       duration=muxer.duration, codec="h264")


def record_mjpeg(vault: Vault, start: datetime, frames: int) -> ClipInfo:
    """An MJPEG clip (the camera's own JPEGs, stored as they come)."""
    jpegs = [cv2.imencode(".jpg", numbered(i))[1].tobytes() for i in range(frames)]
    fmt = StreamFormat.from_sample(jpegs[0], "mjpeg")
    clip = vault.create_clip(start, CONTENT_TYPE)
    muxer = ClipMuxer(clip, fmt, fps=FPS)
    for i, jpeg in enumerate(jpegs):
        muxer.add(EncodedPacket(jpeg, True, fmt), i / FPS)
    muxer.close()
    return clip.finish(start + timedelta(seconds=(frames - 1) / FPS), muxer.frames,
                       duration=muxer.duration, codec="mjpeg")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def cut_bytes(vault: Vault, clip_id: str, start: datetime, end: datetime) -> bytes:
    cut = WindowCutter(vault).cut(clip_id, start, end)
    assert cut is not None
    try:
        parts = []
        while chunk := cut.stream.read(10_000):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        cut.close()


def decoded_numbers(data: bytes) -> list[int]:
    with av.open(io.BytesIO(data), mode="r") as container:
        return [number_of(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]


def packets_of(data: bytes) -> list[tuple[int, bool, bytes]]:
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        return [(int(p.pts or 0), bool(p.is_keyframe), bytes(p))
                for p in container.demux(stream) if p.size]


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of",
         "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    return dict(json.loads(out.stdout))


def cv2_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_mjpeg_cut_on_frames_holds_exactly_the_windows_frames(
    vault: Vault, tmp_path: Path
) -> None:
    clip = record_mjpeg(vault, T0, 50)  # frames at 0.0 .. 4.9 s
    data = cut_bytes(vault, clip.id, at(1.05), at(2.3))
    wanted = list(range(11, 24))  # 1.1 .. 2.3 s, both ends inclusive
    assert decoded_numbers(data) == wanted
    with vault.open_clip(clip.id) as reader:
        stored = {pts: payload for pts, _, payload in packets_of(reader.read())}
    # Intra-only: every released packet is a stored JPEG, untouched.
    assert [payload for _, _, payload in packets_of(data)] == [stored[n * 100] for n in wanted]
    path = tmp_path / "cut.mkv"
    path.write_bytes(data)
    doc = ffprobe(path)
    (stream,) = doc["streams"]
    assert stream["tags"]["NUMBER_OF_FRAMES"] == str(len(wanted))
    assert int(stream["nb_read_frames"]) == len(wanted)
    assert float(doc["format"]["duration"]) == pytest.approx(1.3, abs=0.01)
    assert cv2_count(path) == len(wanted)


def test_h264_smart_cut_reencodes_the_lead_and_copies_the_rest_byte_for_byte(
    vault: Vault, tmp_path: Path
) -> None:
    clip = record_h264(vault, T0, 100)  # 10 s, keyframes every 2 s
    start, end = at(1.25), at(6.55)
    wanted = list(range(13, 66))
    cutter = WindowCutter(vault)
    plan = cutter.plan(clip.id, start, end)
    assert plan is not None and plan.frames == len(wanted)
    assert plan.first == at(1.3) and plan.last == at(6.5)
    assert plan.lead and plan.copied > 30  # a re-encoded lead, then whole groups copied
    data = cut_bytes(vault, clip.id, start, end)
    # Every decodable frame of the file is inside the window, each exactly once, in order.
    assert decoded_numbers(data) == wanted
    with vault.open_clip(clip.id) as reader:
        stored = packets_of(reader.read())
    released = packets_of(data)
    lead = len(plan.lead)
    # After the re-encoded lead, the released payloads are the stored ones, in order.
    stored_by_pts = {pts: payload for pts, _, payload in stored}
    copied = released[lead:lead + plan.copied]
    assert copied[0][1]  # the copied run starts at a keyframe
    assert [payload for _, _, payload in copied] == [
        stored_by_pts[pts + plan.origin] for pts, _, _ in copied
    ]
    assert all(stored_by_pts.get(pts + plan.origin) != payload
               for pts, _, payload in released[:lead])
    path = tmp_path / "cut.mkv"
    path.write_bytes(data)
    doc = ffprobe(path)
    (stream,) = doc["streams"]
    assert stream["codec_name"] == "h264"
    assert stream["tags"]["NUMBER_OF_FRAMES"] == str(len(wanted))
    assert int(stream["nb_read_frames"]) == len(wanted)
    assert float(doc["format"]["duration"]) == pytest.approx(5.3, abs=0.01)
    assert cv2_count(path) == len(wanted)


def test_h264_cut_at_both_ends_reencodes_a_tail_that_would_need_later_frames(
    vault: Vault,
) -> None:
    clip = record_h264(vault, T0, 100)
    with vault.open_clip(clip.id) as reader:
        order = [pts for pts, _, _ in packets_of(reader.read())]
    # Windows ending on a B-frame decoded after the P-frame it refers to, shown after the end.
    ends = [order[i + 1] for i in range(30, 90) if order[i] > order[i + 1]][:3]
    assert ends
    for end_ms in ends:
        end = at(end_ms / 1000 + 0.05)
        plan = WindowCutter(vault).plan(clip.id, at(0.35), end)
        assert plan is not None and plan.tail  # re-encoded: their reference is outside
        wanted = list(range(4, end_ms // 100 + 1))
        assert decoded_numbers(cut_bytes(vault, clip.id, at(0.35), end)) == wanted
        assert plan.frames == len(wanted)


def test_a_window_inside_one_group_is_all_reencoded(vault: Vault) -> None:
    clip = record_h264(vault, T0, 40)
    plan = WindowCutter(vault).plan(clip.id, at(0.45), at(1.25))
    assert plan is not None and plan.copied == 0 and plan.frames == 8
    assert decoded_numbers(cut_bytes(vault, clip.id, at(0.45), at(1.25))) == list(range(5, 13))


def test_a_cut_is_deterministic(vault: Vault) -> None:
    clip = record_h264(vault, T0, 60)
    a = cut_bytes(vault, clip.id, at(0.75), at(4.45))
    b = cut_bytes(vault, clip.id, at(0.75), at(4.45))
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    assert a == b


def test_a_window_spanning_two_clips_gives_two_files_and_none_gives_nothing(
    vault: Vault,
) -> None:
    one = record_h264(vault, T0, 30)  # 0.0 .. 2.9 s
    two = record_h264(vault, at(5), 30, first_n=50)  # 5.0 .. 7.9 s
    cutter = WindowCutter(vault)
    plans = cutter.preview(at(2.05), at(5.95))
    assert [p.clip_id for p in plans] == [one.id, two.id]
    assert decoded_numbers(cut_bytes(vault, one.id, at(2.05), at(5.95))) == list(range(21, 30))
    assert decoded_numbers(cut_bytes(vault, two.id, at(2.05), at(5.95))) == list(range(50, 60))
    assert cutter.preview(at(3.05), at(4.95)) == []  # footage on both sides, none inside
    assert cutter.cut(one.id, at(3.05), at(4.95)) is None
    assert cutter.preview(at(100), at(200)) == []


def test_a_frame_exactly_on_either_end_is_inside(vault: Vault) -> None:
    clip = record_mjpeg(vault, T0, 30)
    plan = WindowCutter(vault).plan(clip.id, at(1.0), at(2.0))
    assert plan is not None and (plan.first, plan.last, plan.frames) == (at(1.0), at(2.0), 11)


def test_the_cut_is_streamed_and_no_plaintext_reaches_the_disk(
    vault: Vault, tmp_path: Path
) -> None:
    clip = record_h264(vault, T0, 60)
    cut = WindowCutter(vault).cut(clip.id, at(0.55), at(5.05))
    assert cut is not None
    data = b""
    while chunk := cut.stream.read(4096):
        data += chunk
        # While the cut is being made, nothing of it (nor of the stored clip) is on disk.
        assert scan_for_plaintext(tmp_path / "state", known=[data[:48]]) == []
    cut.close()
    assert data[:4] == b"\x1a\x45\xdf\xa3"  # EBML magic: a whole Matroska file was read
    assert (cut.frames, cut.start, cut.end) == (45, at(0.6), at(5.0))
    assert cut.source_sha256 == clip.sha256


def test_the_plan_counts_stored_bytes_of_the_window(vault: Vault) -> None:
    clip = record_mjpeg(vault, T0, 30)
    with vault.open_clip(clip.id) as reader:
        sizes = [len(p) for _, _, p in packets_of(reader.read())]
    with vault.open_clip(clip.id) as reader:
        plan = plan_cut(reader, clip_id=clip.id, clip_start=clip.start,
                        window_start=at(1.0), window_end=at(1.4))
    assert plan is not None and plan.stored_bytes == sum(sizes[10:15])


def record_encoded(
    vault: Vault, codec: str, demuxer: str, frames: int, *, closed: bool = True
) -> ClipInfo:
    """A clip stored by stream copy from a camera sending ``codec`` (keyframe every 2 s)."""
    ctx = av.CodecContext.create(codec, "w")
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "yuv420p"
    ctx.time_base = Fraction(1, 1000)
    ctx.framerate = Fraction(10)
    ctx.gop_size = 20
    if codec == "libx265":
        ctx.options = {"x265-params": "log-level=error:keyint=20:min-keyint=20:scenecut=0"}
    else:
        # A camera's MPEG-4: B-frames, the VOL header in the codec configuration and again in
        # every keyframe (what FFmpeg's dump_extra does).
        ctx.max_b_frames = 2
        ctx.flags |= av.codec.context.Flags.global_header
        if closed:
            ctx.flags |= av.codec.context.Flags.closed_gop
            ctx.options = {"sc_threshold": "1000000000"}
    packets = []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(numbered(i), format="bgr24").reformat(format="yuv420p")
        frame.pts = i * 100
        packets += ctx.encode(frame)
    packets += ctx.encode(None)
    extra = ctx.extradata or b"" if codec == "mpeg4" else b""
    payloads = [extra + bytes(p) if p.is_keyframe else bytes(p) for p in packets]
    fmt = StreamFormat.from_sample(payloads[0], demuxer)
    clip = vault.create_clip(T0, CONTENT_TYPE)
    muxer = ClipMuxer(clip, fmt, fps=FPS)
    lead = max((p.pts or 0) - (p.dts or 0) for p in packets)
    for p, payload in zip(packets, payloads, strict=True):
        delay = ((p.pts or 0) - (p.dts or 0)) / 1000
        muxer.add(EncodedPacket(payload, bool(p.is_keyframe), fmt, delay),
                  ((p.dts or 0) + lead) / 1000)
    muxer.close()
    return clip.finish(T0 + timedelta(seconds=(frames - 1) / FPS), muxer.frames,
                       duration=muxer.duration, codec=fmt.codec)


@pytest.mark.parametrize(("codec", "demuxer"), [("libx265", "hevc"), ("mpeg4", "m4v")])
def test_h265_and_mpeg4_are_smart_cut_too(vault: Vault, codec: str, demuxer: str) -> None:
    clip = record_encoded(vault, codec, demuxer, 80)
    plan = WindowCutter(vault).plan(clip.id, at(1.25), at(5.55))
    assert plan is not None and plan.lead and plan.copied
    data = cut_bytes(vault, clip.id, at(1.25), at(5.55))
    assert decoded_numbers(data) == list(range(13, 56))
    assert data == cut_bytes(vault, clip.id, at(1.25), at(5.55))


def test_an_open_gop_keyframe_is_not_a_cut_point(vault: Vault) -> None:
    # B-frames after each I-frame refer to the group before: copying from there would need a
    # frame before the window, so the window is re-encoded instead, still frame-exact.
    clip = record_encoded(vault, "mpeg4", "m4v", 60, closed=False)
    plan = WindowCutter(vault).plan(clip.id, at(1.25), at(4.55))
    assert plan is not None and plan.copied == 0
    assert decoded_numbers(cut_bytes(vault, clip.id, at(1.25), at(4.55))) == list(range(13, 46))


def test_an_abandoned_cut_releases_everything(vault: Vault) -> None:
    clip = record_h264(vault, T0, 60)
    for _ in range(3):
        cut = WindowCutter(vault).cut(clip.id, at(0.55), at(5.05))
        assert cut is not None
        assert cut.stream.read(100)[:4] == b"\x1a\x45\xdf\xa3"
        cut.close()  # mid-lead: decoder and encoder dropped, the vault reader closed
        cut.close()
    assert decoded_numbers(cut_bytes(vault, clip.id, at(0.55), at(5.05))) == list(range(6, 51))


CUT_IN_ANOTHER_PROCESS = """
import hashlib, sys
from datetime import datetime
from agent.release.cut import WindowCutter
from agent.vault import Vault
state, key, clip, start, end = sys.argv[1:]
with Vault(state, bytes.fromhex(key)) as vault:
    cut = WindowCutter(vault).cut(clip, datetime.fromisoformat(start), datetime.fromisoformat(end))
    digest = hashlib.sha256()
    while chunk := cut.stream.read(65536):
        digest.update(chunk)
    cut.close()
print(digest.hexdigest())
"""


def test_a_cut_is_the_same_in_another_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = os.urandom(32)
    with Vault(state, key) as vault:
        clip = record_h264(vault, T0, 60)
        here = hashlib.sha256(cut_bytes(vault, clip.id, at(0.75), at(4.45))).hexdigest()
    out = subprocess.run(
        [sys.executable, "-c", CUT_IN_ANOTHER_PROCESS, str(state), key.hex(), clip.id,
         at(0.75).isoformat(), at(4.45).isoformat()],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert out.stdout.strip() == here


def test_a_stored_clip_that_is_not_video_fails_as_a_vault_error(vault: Vault) -> None:
    writer = vault.create_clip(T0, CONTENT_TYPE)
    writer.write(b"not a Matroska file at all" * 100)
    clip = writer.finish(at(1), 10)
    with pytest.raises(VaultError, match="cannot be cut"):
        WindowCutter(vault).cut(clip.id, at(0), at(1))
