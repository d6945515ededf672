"""The PyAV clip writer and reader: H.264/MJPEG into the encrypted vault, export with duration
and frame count, and vaults written by the release before PyAV."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.camera.frame import Frame
from agent.camera.media import (
    CONTENT_TYPE,
    ClipMuxer,
    EncodedPacket,
    H264Encoder,
    MediaError,
    StreamFormat,
    iter_images,
    iter_jpegs,
    probe,
    remux,
)
from agent.camera.pipeline import FrameEncoder
from agent.camera.recorder import Recorder, RecordingParams
from agent.vault import Vault
from tests.camera.test_camera_pipeline import scan_for_plaintext

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vault-r1"
LEGACY_KEY = bytes(range(32))
LEGACY_CLIP = "20261101T080000Z-3b08051e7c5f"
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def scene(n: int, w: int = 320, h: int = 240) -> np.ndarray:
    img = np.full((h, w, 3), 60, np.uint8)
    x = (n * 7) % (w - 40)
    cv2.rectangle(img, (x, 60), (x + 40, 140), (240, 240, 240), -1)
    return img


def ffprobe(path: Path) -> tuple[dict[str, Any], float]:
    """The only stream and the container's duration, as the stock tool sees them."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of",
         "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    doc = json.loads(out.stdout)
    (stream,) = doc["streams"]
    return stream, float(doc["format"]["duration"])


def cv2_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.fixture
def legacy_state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state, ignore=shutil.ignore_patterns("README.md"))
    (state / "vault").chmod(0o700)
    return state


def test_a_vault_written_before_pyav_stays_readable(legacy_state: Path, tmp_path: Path) -> None:
    with Vault(legacy_state, LEGACY_KEY) as vault:
        (info,) = vault.list_clips()
        assert info.id == LEGACY_CLIP and info.frames == 10
        assert (info.codec, info.duration) == (None, None)  # schema 1 did not keep them
        assert vault.verify().ok
        thumb = vault.read_thumbnail(info.id)
        assert thumb is not None and cv2.imdecode(np.frombuffer(thumb, np.uint8), 1) is not None
        with vault.open_clip(info.id, verify_sha256=True) as reader:
            facts = probe(reader)
        assert (facts.codec, facts.frames, facts.width, facts.height) == ("mjpeg", 10, 128, 96)
        with vault.open_clip(info.id) as reader:
            jpegs = list(iter_jpegs(reader))
        assert [round(t, 1) for t, _ in jpegs] == [i / 10 for i in range(10)]
        assert all(j.startswith(b"\xff\xd8") for _, j in jpegs)
        with vault.open_clip(info.id) as reader:
            images = list(iter_images(reader))
        assert len(images) == 10 and images[0][1].shape == (96, 128, 3)
        export = tmp_path / "old.mkv"
        with vault.open_clip(info.id, verify_sha256=True) as reader:
            remux(reader, export, frames=info.frames)
    assert cv2_count(export) == 10
    stream, duration = ffprobe(export)
    assert stream["codec_name"] == "mjpeg" and stream["tags"]["NUMBER_OF_FRAMES"] == "10"
    assert duration == pytest.approx(1.0, abs=0.11)


def test_the_index_migrates_and_new_clips_keep_codec_and_duration(legacy_state: Path) -> None:
    with Vault(legacy_state, LEGACY_KEY) as vault:
        rec = Recorder(
            vault,
            RecordingParams(pre_roll=0.0, post_roll=0.2, max_clip=60.0, merge_gap=0.0),
            FrameEncoder([], 85, codec="h264", fps=10.0),
            fps=10.0,
        )
        for n in range(30):
            rec.push(Frame(n + 1, n / 10, T0 + timedelta(seconds=n / 10), 320, 240,
                           image=scene(n)), n < 25)
        rec.close()
        old, new = vault.list_clips()
        assert old.id == LEGACY_CLIP and old.codec is None
        assert new.codec == "h264" and new.frames == 26
        assert new.duration == pytest.approx(2.6)
        assert new.to_json()["codec"] == "h264"


def test_h264_clip_in_the_vault_is_playable_and_never_plaintext_on_disk(
    tmp_path: Path, vault: Vault
) -> None:
    encoder = H264Encoder(10.0)
    clip = vault.create_clip(T0, CONTENT_TYPE)
    muxer: ClipMuxer | None = None
    first = None
    t0 = 0.0
    packets = [
        out
        for n in range(45)
        for out in encoder.encode(scene(n), n / 10, T0 + timedelta(seconds=n / 10))
    ]
    # Tuned for a live camera (no lookahead, no B-frames): each frame's packet comes at once,
    # shown as decoded, so nothing waits in the encoder for a crash to lose.
    assert len(packets) == 45 and encoder.flush() == []
    assert [ts for ts, _, _ in packets] == [n / 10 for n in range(45)]
    assert all(packet.pts_delay == 0 for _, _, packet in packets)
    for ts, _wall, packet in packets:
        if muxer is None:
            muxer = ClipMuxer(clip, packet.fmt, fps=10.0)
            first = packet.data[:48]
            t0 = ts
        muxer.add(packet, ts - t0)
    assert muxer is not None and first is not None and encoder.name == "libx264"
    muxer.close()
    info = clip.finish(T0 + timedelta(seconds=4.4), muxer.frames, duration=muxer.duration,
                       codec="h264")
    assert info.frames == 45 and info.duration == pytest.approx(4.5)
    assert scan_for_plaintext(tmp_path / "state", known=[first]) == []
    with vault.open_clip(info.id, verify_sha256=True) as reader:
        facts = probe(reader)
    assert (facts.codec, facts.frames, facts.keyframe_first) == ("h264", 45, True)
    assert facts.duration == pytest.approx(4.5)
    export = tmp_path / "export.mkv"
    with vault.open_clip(info.id, verify_sha256=True) as reader:
        remux(reader, export, frames=info.frames)
    assert cv2_count(export) == 45
    stream, duration = ffprobe(export)
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 45
    assert stream["tags"]["NUMBER_OF_FRAMES"] == "45"
    assert duration == pytest.approx(4.5)


def test_keyframes_come_at_least_every_two_seconds() -> None:
    encoder = H264Encoder(10.0)
    packets = [p for n in range(100) for p in encoder.encode(scene(n), n / 10, T0)]
    packets += encoder.flush()
    assert len(packets) == 100
    keys = [round((ts + p.pts_delay) * 10) for ts, _, p in packets if p.keyframe]
    assert keys[0] == 0 and max(b - a for a, b in itertools.pairwise(keys)) <= 20


def test_a_forced_keyframe_and_a_new_size_restart_the_stream() -> None:
    encoder = H264Encoder(10.0)
    out = [p for n in range(30) for p in encoder.encode(scene(n), n / 10, T0, keyframe=n == 15)]
    out += encoder.flush()
    shown = {round((ts + p.pts_delay) * 10): p for ts, _, p in out}
    assert [n for n in sorted(shown) if shown[n].keyframe] == [0, 15]  # 15 restarts the GOP
    assert len({id(p.fmt) for p in shown.values()}) == 1
    bigger = encoder.encode(scene(31, 640, 480), 3.1, T0) + encoder.flush()
    assert bigger[0][2].keyframe and (bigger[0][2].fmt.width, bigger[0][2].fmt.height) == (640, 480)
    assert bigger[0][2].fmt is not shown[0].fmt


def test_a_packet_of_another_format_is_refused() -> None:
    a = StreamFormat.from_sample(cv2.imencode(".jpg", scene(0))[1].tobytes(), "mjpeg")
    b = StreamFormat.from_sample(cv2.imencode(".jpg", scene(0, 64, 48))[1].tobytes(), "mjpeg")
    muxer = ClipMuxer(io.BytesIO(), a)
    with pytest.raises(ValueError, match="another stream format"):
        muxer.add(EncodedPacket(b"x", True, b), 0.0)
    muxer.abort()


def test_not_a_video_is_a_media_error() -> None:
    with pytest.raises(MediaError):
        probe(io.BytesIO(b"\x00" * 1000))
    with pytest.raises(MediaError):
        StreamFormat.from_sample(b"\x00" * 100, "h264")
