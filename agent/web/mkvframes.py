"""A streaming Matroska reader that yields the JPEG frames of an MJPEG video track.

Browsers do not play MJPEG-in-Matroska, so the app replays a clip as a
``multipart/x-mixed-replace`` stream of its JPEG frames. This reader turns the decrypted clip
(any object with ``read(n)``) into ``(timestamp, jpeg)`` frames without holding more than one
frame in memory and without seeking, so nothing is buffered or written in plaintext.

It reads standard Matroska as written by this project's camera muxer, ffmpeg or mkvmerge:
Segment and Cluster may have unknown sizes (live muxers write them so) and are read as
transparent containers; Info and Tracks are parsed for the timestamp scale and the MJPEG track;
SimpleBlock and BlockGroup/Block carry frames; everything else is skipped. Laced blocks, which
no muxer uses for video, are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol

from agent.errors import VaultError

EBML_HEADER: Final = 0x1A45DFA3
SEGMENT: Final = 0x18538067
INFO: Final = 0x1549A966
TIMESTAMP_SCALE: Final = 0x2AD7B1
TRACKS: Final = 0x1654AE6B
TRACK_ENTRY: Final = 0xAE
TRACK_NUMBER: Final = 0xD7
TRACK_TYPE: Final = 0x83
CODEC_ID: Final = 0x86
DEFAULT_DURATION: Final = 0x23E383
CLUSTER: Final = 0x1F43B675
CLUSTER_TIMESTAMP: Final = 0xE7
SIMPLE_BLOCK: Final = 0xA3
BLOCK_GROUP: Final = 0xA0
BLOCK: Final = 0xA1

MJPEG_CODEC: Final = "V_MJPEG"
# Containers whose children are read in line; their size (possibly "unknown") is not needed.
_TRANSPARENT: Final = frozenset({SEGMENT, CLUSTER, BLOCK_GROUP})
_MAX_HEADER_ELEMENT: Final = 1 << 20  # Info / Tracks / EBML header are small
_MAX_FRAME: Final = 32 << 20
_SKIP_CHUNK: Final = 64 << 10


class Readable(Protocol):
    """A byte source read front to back."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; b"" at the end."""
        ...


@dataclass(frozen=True)
class Frame:
    """One video frame: its presentation time in seconds from the clip's start, and the JPEG."""

    time: float
    jpeg: bytes


class MatroskaError(VaultError):
    """The clip is not Matroska this reader can replay (or it is damaged)."""


@dataclass
class _Track:
    number: int | None = None
    kind: int | None = None
    codec: str | None = None
    default_duration_ns: int | None = None


class _Source:
    """Byte reader with exact reads and a position, over any ``read(n)`` object."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._buf = b""
        self.pos = 0

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self._raw.read(max(n - len(self._buf), _SKIP_CHUNK))
            if not chunk:
                return
            self._buf += chunk

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buf

    def peek_byte(self) -> int:
        self._fill(1)
        if not self._buf:
            raise MatroskaError(f"the clip ends in the middle of an element at byte {self.pos}")
        return self._buf[0]

    def take(self, n: int) -> bytes:
        self._fill(n)
        if len(self._buf) < n:
            raise MatroskaError(f"the clip ends in the middle of an element at byte {self.pos}")
        data, self._buf = self._buf[:n], self._buf[n:]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _SKIP_CHUNK)
            self.take(step)
            n -= step


def _vint_length(first: int, pos: int) -> int:
    if first == 0:
        raise MatroskaError(f"invalid EBML variable-size integer at byte {pos}")
    return 9 - first.bit_length()


def read_vint(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode an EBML size-style vint (marker bit removed) at ``offset``: (value, length).

    An all-ones value (unknown size) is returned as -1.
    """
    if offset >= len(data):
        raise MatroskaError("truncated EBML integer")
    length = _vint_length(data[offset], offset)
    if offset + length > len(data):
        raise MatroskaError("truncated EBML integer")
    value = data[offset] & (0xFF >> length)
    for byte in data[offset + 1 : offset + length]:
        value = (value << 8) | byte
    if value == (1 << (7 * length)) - 1:
        return -1, length
    return value, length


def _element_header(src: _Source) -> tuple[int, int]:
    """Read an element id (marker kept) and size (-1 when unknown)."""
    start = src.pos
    first = src.peek_byte()
    id_len = _vint_length(first, start)
    if id_len > 4:
        raise MatroskaError(f"invalid element id at byte {start}")
    element_id = int.from_bytes(src.take(id_len), "big")
    size_len = _vint_length(src.peek_byte(), src.pos)
    size, _ = read_vint(src.take(size_len))
    return element_id, size


def _children(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The child elements of a fully read master element."""
    offset = 0
    while offset < len(data):
        id_len = _vint_length(data[offset], offset)
        if id_len > 4 or offset + id_len > len(data):
            raise MatroskaError("damaged element inside a header element")
        element_id = int.from_bytes(data[offset : offset + id_len], "big")
        offset += id_len
        size, size_len = read_vint(data, offset)
        offset += size_len
        if size < 0 or offset + size > len(data):
            raise MatroskaError("damaged element size inside a header element")
        yield element_id, data[offset : offset + size]
        offset += size


def _uint(data: bytes) -> int:
    return int.from_bytes(data, "big") if data else 0


def _parse_tracks(data: bytes) -> list[_Track]:
    tracks: list[_Track] = []
    for element_id, body in _children(data):
        if element_id != TRACK_ENTRY:
            continue
        track = _Track()
        for child_id, value in _children(body):
            if child_id == TRACK_NUMBER:
                track.number = _uint(value)
            elif child_id == TRACK_TYPE:
                track.kind = _uint(value)
            elif child_id == CODEC_ID:
                track.codec = value.rstrip(b"\0").decode("ascii", "replace")
            elif child_id == DEFAULT_DURATION:
                track.default_duration_ns = _uint(value)
        tracks.append(track)
    return tracks


def iter_frames(raw: Readable, *, default_fps: float = 10.0) -> Iterator[Frame]:
    """Yield the frames of the first MJPEG video track of a Matroska stream, in file order.

    Frame times come from the cluster and block timestamps; a muxer that left them all zero
    gets times from the track's default duration (or ``default_fps``) instead, so playback is
    still paced. Raises :class:`MatroskaError` for a stream that is not Matroska, has no MJPEG
    track, or is damaged.
    """
    src = _Source(raw)
    if src.at_end():
        raise MatroskaError("the clip is empty")
    first_id, first_size = _element_header(src)
    if first_id != EBML_HEADER or first_size < 0 or first_size > _MAX_HEADER_ELEMENT:
        raise MatroskaError("the clip is not a Matroska file (no EBML header)")
    src.skip(first_size)
    scale_ns = 1_000_000
    video: _Track | None = None
    cluster_ts = 0
    index = 0
    while not src.at_end():
        element_id, size = _element_header(src)
        if element_id in _TRANSPARENT:
            continue
        if size < 0:
            raise MatroskaError(f"element {element_id:#x} has an unknown size")
        if element_id in (INFO, TRACKS):
            if size > _MAX_HEADER_ELEMENT:
                raise MatroskaError(f"header element {element_id:#x} is implausibly large")
            body = src.take(size)
            if element_id == INFO:
                for child_id, value in _children(body):
                    if child_id == TIMESTAMP_SCALE and _uint(value) > 0:
                        scale_ns = _uint(value)
            else:
                video = next(
                    (t for t in _parse_tracks(body) if t.codec == MJPEG_CODEC and t.kind != 2),
                    None,
                )
                if video is None or video.number is None:
                    raise MatroskaError("the clip has no MJPEG video track")
        elif element_id == CLUSTER_TIMESTAMP:
            cluster_ts = _uint(src.take(size))
        elif element_id in (SIMPLE_BLOCK, BLOCK):
            if size > _MAX_FRAME:
                raise MatroskaError(f"a block of {size} bytes is implausibly large")
            if video is None:
                raise MatroskaError("a block comes before the track list")
            timing = _Timing(cluster_ts, scale_ns, index, default_fps)
            frame = _block_frame(src.take(size), video, timing)
            if frame is not None:
                index += 1
                yield frame
        else:
            src.skip(size)


@dataclass(frozen=True)
class _Timing:
    cluster_ts: int
    scale_ns: int
    index: int
    default_fps: float


def _block_frame(block: bytes, video: _Track, timing: _Timing) -> Frame | None:
    track, offset = read_vint(block)
    if track != video.number:
        return None
    if len(block) < offset + 3:
        raise MatroskaError("a block header is truncated")
    relative = int.from_bytes(block[offset : offset + 2], "big", signed=True)
    flags = block[offset + 2]
    if flags & 0x06:
        raise MatroskaError("laced video blocks are not supported")
    time = (timing.cluster_ts + relative) * timing.scale_ns / 1e9
    if time == 0 and timing.index > 0:
        step = (video.default_duration_ns or 1e9 / timing.default_fps) / 1e9
        time = timing.index * step
    return Frame(time, block[offset + 3 :])
