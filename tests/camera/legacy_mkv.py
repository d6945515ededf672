"""Test-only: the hand-written streaming Matroska muxer of releases before PyAV (MJPEG).

Kept to make clips and camera files exactly as the old agent wrote them, so tests prove that
vaults recorded by earlier releases stay readable. Its original description follows.

A streaming Matroska muxer for MJPEG: bytes out, never a seek.

Clips go straight into the encrypted vault, which is an append-only stream, so the container
must be writable front to back with nothing patched afterwards. Matroska allows exactly that:
the Segment and each Cluster are written with the reserved "unknown size" (all ones), and a
demuxer ends a Cluster when the next top-level element appears. The layout is::

    EBML header (DocType "matroska")
    Segment (unknown size)
      Info: TimestampScale 1 ms, MuxingApp, WritingApp, DateUTC
      Tracks: one video track, CodecID V_MJPEG, PixelWidth/PixelHeight
      Cluster (unknown size): Timestamp, SimpleBlock, SimpleBlock, ...
      Cluster ...

Every MJPEG frame is a keyframe. A new Cluster starts every ``cluster_ms`` (and always before
a block's 16-bit relative timecode would overflow). There are no Cues and no Duration: those
would need a seek or a second pass; players and ``ffprobe`` find the frames without them.

Pure: :class:`MatroskaMuxer` turns (JPEG bytes, millisecond timestamps) into container bytes.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime

# Element ids (written as-is: an id already carries its own length marker bits).
EBML = 0x1A45DFA3
EBML_VERSION = 0x4286
EBML_READ_VERSION = 0x42F7
EBML_MAX_ID_LENGTH = 0x42F2
EBML_MAX_SIZE_LENGTH = 0x42F3
DOC_TYPE = 0x4282
DOC_TYPE_VERSION = 0x4287
DOC_TYPE_READ_VERSION = 0x4285
SEGMENT = 0x18538067
INFO = 0x1549A966
TIMESTAMP_SCALE = 0x2AD7B1
MUXING_APP = 0x4D80
WRITING_APP = 0x5741
DATE_UTC = 0x4461
TRACKS = 0x1654AE6B
TRACK_ENTRY = 0xAE
TRACK_NUMBER = 0xD7
TRACK_UID = 0x73C5
TRACK_TYPE = 0x83
FLAG_LACING = 0x9C
CODEC_ID = 0x86
DEFAULT_DURATION = 0x23E383
VIDEO = 0xE0
PIXEL_WIDTH = 0xB0
PIXEL_HEIGHT = 0xBA
CLUSTER = 0x1F43B675
TIMESTAMP = 0xE7
SIMPLE_BLOCK = 0xA3

UNKNOWN_SIZE = b"\x01\xff\xff\xff\xff\xff\xff\xff"
"""The 8-byte "unknown size" marker (0x01FFFFFFFFFFFFFF)."""

CONTENT_TYPE = "video/x-matroska"
CODEC_MJPEG = "V_MJPEG"
TRACK_VIDEO = 1
_TRACK = 1
_KEYFRAME = 0x80
_MAX_RELATIVE_MS = 32767
_MATROSKA_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)
_SIMPLE_BLOCK_ID = bytes.fromhex("a3")


def encode_id(element_id: int) -> bytes:
    """An element id's bytes (1-4 bytes, big-endian, markers included)."""
    length = (element_id.bit_length() + 7) // 8
    return element_id.to_bytes(max(length, 1), "big")


def encode_size(size: int) -> bytes:
    """An EBML variable-length size in the fewest bytes (all-ones values are reserved)."""
    if size < 0:
        raise ValueError("element sizes are non-negative")
    for length in range(1, 9):
        if size < (1 << (7 * length)) - 1:
            return (size | (1 << (7 * length))).to_bytes(length, "big")
    raise ValueError(f"element size {size} does not fit an EBML size")


def element(element_id: int, payload: bytes) -> bytes:
    """A complete element: id, size, payload."""
    return encode_id(element_id) + encode_size(len(payload)) + payload


def uint_element(element_id: int, value: int) -> bytes:
    """An unsigned-integer element in the fewest bytes."""
    if value < 0:
        raise ValueError("unsigned element with a negative value")
    return element(element_id, value.to_bytes(max((value.bit_length() + 7) // 8, 1), "big"))


def string_element(element_id: int, value: str) -> bytes:
    """An ASCII/UTF-8 string element."""
    return element(element_id, value.encode("utf-8"))


def ebml_header() -> bytes:
    """The EBML header declaring a Matroska document (DocType version 4, readable as 2)."""
    return element(
        EBML,
        uint_element(EBML_VERSION, 1)
        + uint_element(EBML_READ_VERSION, 1)
        + uint_element(EBML_MAX_ID_LENGTH, 4)
        + uint_element(EBML_MAX_SIZE_LENGTH, 8)
        + string_element(DOC_TYPE, "matroska")
        + uint_element(DOC_TYPE_VERSION, 4)
        + uint_element(DOC_TYPE_READ_VERSION, 2),
    )


class MatroskaMuxer:
    """Muxes MJPEG frames into a Matroska byte stream, front to back.

    Call :meth:`start` once, then :meth:`add` for every frame with its timestamp in ms from the
    clip start; concatenate what they return. Timestamps that go backwards are clamped to the
    previous one (a container must not go back in time; a camera clock glitch must not break a
    clip).
    """

    def __init__(
        self,
        width: int,
        height: int,
        *,
        fps: float | None = None,
        date: datetime | None = None,
        app: str = "doorbell-agent",
        cluster_ms: int = 5000,
    ) -> None:
        if not (0 < width < 65536 and 0 < height < 65536):
            raise ValueError(f"bad frame size {width}x{height}")
        if not 0 < cluster_ms <= _MAX_RELATIVE_MS:
            raise ValueError(f"cluster_ms must be 1..{_MAX_RELATIVE_MS}")
        self.width = width
        self.height = height
        self.fps = fps
        self.date = date
        self.app = app
        self.cluster_ms = cluster_ms
        self.frames = 0
        self._started = False
        self._cluster_ts: int | None = None
        self._last_ts = 0

    def start(self) -> bytes:
        """EBML header, Segment start, Info and Tracks."""
        if self._started:
            raise ValueError("the Matroska header was already written")
        self._started = True
        info = uint_element(TIMESTAMP_SCALE, 1_000_000) + string_element(MUXING_APP, self.app)
        info += string_element(WRITING_APP, self.app)
        if self.date is not None:
            delta = self.date.astimezone(UTC) - _MATROSKA_EPOCH
            ns = (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
            info += element(DATE_UTC, struct.pack(">q", ns))
        video = uint_element(PIXEL_WIDTH, self.width) + uint_element(PIXEL_HEIGHT, self.height)
        track = (
            uint_element(TRACK_NUMBER, _TRACK)
            + uint_element(TRACK_UID, _TRACK)
            + uint_element(TRACK_TYPE, TRACK_VIDEO)
            + uint_element(FLAG_LACING, 0)
            + string_element(CODEC_ID, CODEC_MJPEG)
        )
        if self.fps:
            track += uint_element(DEFAULT_DURATION, round(1e9 / self.fps))
        track += element(VIDEO, video)
        return (
            ebml_header()
            + encode_id(SEGMENT)
            + UNKNOWN_SIZE
            + element(INFO, info)
            + element(TRACKS, element(TRACK_ENTRY, track))
        )

    def add(self, jpeg: bytes | memoryview, ts_ms: int) -> bytes:
        """One frame as a SimpleBlock, preceded by a new Cluster header when one is due."""
        if not self._started:
            raise ValueError("call start() before adding frames")
        ts = max(int(ts_ms), self._last_ts)
        self._last_ts = ts
        out = b""
        if self._cluster_ts is None or ts - self._cluster_ts >= self.cluster_ms:
            self._cluster_ts = ts
            out = encode_id(CLUSTER) + UNKNOWN_SIZE + uint_element(TIMESTAMP, ts)
        head = bytes((0x80 | _TRACK,)) + struct.pack(">hB", ts - self._cluster_ts, _KEYFRAME)
        self.frames += 1
        # One join: a frame is copied once, not once per concatenation.
        return b"".join(
            (out, _SIMPLE_BLOCK_ID, encode_size(len(head) + len(jpeg)), head, jpeg)
        )
