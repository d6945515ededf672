"""The streaming Matroska muxer: structure, and OpenCV / ffprobe reading it back."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.camera.camera_helpers import encode_jpeg, parse_mkv
from tests.camera.legacy_mkv import UNKNOWN_SIZE, MatroskaMuxer, encode_size


def numbered(i: int, w: int = 160, h: int = 120) -> np.ndarray:
    img = np.full((h, w, 3), 40, np.uint8)
    # A bar whose position encodes the frame number, readable after JPEG compression.
    x = 4 + (i * 3) % (w - 12)
    img[:, x : x + 8] = 255
    return img


def bar_position(img: np.ndarray) -> int:
    column_means = img.mean(axis=(0, 2))
    return int(np.argmax(column_means > 150))


def mux(frames: list[bytes], times: list[int], **kw: object) -> bytes:
    m = MatroskaMuxer(160, 120, **kw)  # type: ignore[arg-type]
    out = [m.start()]
    out += [m.add(f, t) for f, t in zip(frames, times, strict=True)]
    return b"".join(out)


def test_sizes_are_minimal_and_reserve_all_ones() -> None:
    assert encode_size(0) == b"\x80"
    assert encode_size(126) == b"\xfe"
    assert encode_size(127) == b"\x40\x7f"  # 0xFF would mean "unknown"
    assert encode_size(16382) == b"\x7f\xfe"
    assert bytes.fromhex("01ffffffffffffff") == UNKNOWN_SIZE


def test_layout_streams_without_sizes_or_seeks() -> None:
    jpegs = [encode_jpeg(numbered(i)) for i in range(30)]
    start = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)
    data = mux(jpegs, [i * 100 for i in range(30)], fps=10, date=start, cluster_ms=1000)
    assert data.startswith(bytes.fromhex("1a45dfa3"))
    mkv = parse_mkv(data)
    assert mkv.doc_type == "matroska"
    assert mkv.codec == "V_MJPEG"
    assert (mkv.width, mkv.height) == (160, 120)
    assert mkv.timestamp_scale == 1_000_000
    # Segment and every Cluster carry the unknown size: nothing needs patching afterwards.
    assert mkv.unknown_size_elements == [0x18538067] + [0x1F43B675] * 3
    assert [t for t, _ in mkv.blocks] == [i * 100 for i in range(30)]
    assert [b for _, b in mkv.blocks] == jpegs  # the JPEG bytes go in untouched
    epoch_2001 = datetime(2001, 1, 1, tzinfo=UTC)
    assert mkv.date_utc_ns == int((start - epoch_2001).total_seconds()) * 1_000_000_000


def test_long_gaps_open_a_new_cluster_before_the_16_bit_timecode_overflows() -> None:
    jpegs = [encode_jpeg(numbered(i)) for i in range(3)]
    data = mux(jpegs, [0, 32000, 70000], cluster_ms=32767)
    mkv = parse_mkv(data)
    assert [t for t, _ in mkv.blocks] == [0, 32000, 70000]
    assert len(mkv.clusters) == 2


def test_timestamps_going_backwards_are_clamped() -> None:
    jpegs = [encode_jpeg(numbered(i)) for i in range(3)]
    mkv = parse_mkv(mux(jpegs, [0, 200, 150]))
    assert [t for t, _ in mkv.blocks] == [0, 200, 200]


def test_misuse_is_refused() -> None:
    m = MatroskaMuxer(160, 120)
    with pytest.raises(ValueError, match="start"):
        m.add(b"\xff\xd8\xff\xd9", 0)
    m.start()
    with pytest.raises(ValueError, match="already"):
        m.start()
    with pytest.raises(ValueError, match="size"):
        MatroskaMuxer(0, 120)


def test_opencv_reads_every_frame_back(tmp_path: Path) -> None:
    n = 60
    jpegs = [encode_jpeg(numbered(i)) for i in range(n)]
    path = tmp_path / "clip.mkv"
    path.write_bytes(mux(jpegs, [i * 100 for i in range(n)], fps=10, cluster_ms=2000))
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    positions = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        assert img.shape == (120, 160, 3)
        positions.append(bar_position(img))
    cap.release()
    assert positions == [bar_position(numbered(i)) for i in range(n)]


@pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe is not installed")
def test_ffprobe_reports_the_stream(tmp_path: Path) -> None:
    n = 25
    jpegs = [encode_jpeg(numbered(i)) for i in range(n)]
    path = tmp_path / "clip.mkv"
    path.write_bytes(mux(jpegs, [i * 40 for i in range(n)], fps=25))
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    )
    info = json.loads(out.stdout)
    (stream,) = info["streams"]
    assert stream["codec_name"] == "mjpeg"
    assert (stream["width"], stream["height"]) == (160, 120)
    assert int(stream["nb_read_frames"]) == n
    assert stream["avg_frame_rate"] == "25/1"
    assert "matroska" in info["format"]["format_name"]
