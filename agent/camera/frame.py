"""Frames, clocks and the few JPEG facts the pipeline needs without decoding.

A :class:`Frame` carries a decoded BGR image, the camera's own JPEG bytes, the camera's own
compressed packet (H.264/H.265/MPEG-4, stored as it came), or several of them. Its
``ts`` is seconds on the source's monotonic timeline (what durations are measured on: pre-roll,
post-roll, clip length, MKV timecodes); ``wall`` is the matching UTC time (what clips are indexed
by). Both come from an injectable :class:`Clock`, so pacing and timing are testable without
sleeping.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from cv2.typing import MatLike

from agent.timeutil import utcnow

if TYPE_CHECKING:
    from agent.camera.media import EncodedPacket

Image = MatLike
"""A decoded image as OpenCV returns it (BGR, or single-channel grey)."""

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"

# Start-of-frame markers carrying the image size (baseline, extended, progressive, lossless,
# arithmetic variants); C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not SOFs.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD9)])


class Clock(Protocol):
    """Where time comes from: monotonic seconds, UTC wall time, and sleeping."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def now(self) -> datetime:
        """The current aware UTC time."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (may return early when the owner is stopping)."""
        ...


class SystemClock:
    """The real clock; ``sleep`` returns early once ``stop`` is set, so pacing never delays
    shutdown."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return utcnow()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the stop event is set."""
        if seconds <= 0:
            return
        if self._stop is None:
            time.sleep(seconds)
        else:
            self._stop.wait(seconds)


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One captured frame. At least one of ``image`` (BGR), ``jpeg`` and ``packet`` is set; a
    compressed source's frame has its packet and, when it was decoded for motion detection,
    its image."""

    seq: int
    """Sequence number since the source was created (continues across reopens)."""
    ts: float
    """Seconds on the source's monotonic timeline."""
    wall: datetime
    """UTC time the frame was captured (or is scheduled for, on a paced file)."""
    width: int
    height: int
    image: Image | None = None
    jpeg: bytes | None = None
    packet: EncodedPacket | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.jpeg is None and self.packet is None:
            raise ValueError("a frame needs an image, JPEG bytes or a packet")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"bad frame size {self.width}x{self.height}")


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None if it is not a JPEG.

    Reads marker headers only (a few hundred bytes), so it is cheap enough for every frame.
    """
    view = memoryview(data)
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = (view[i + 2] << 8) | view[i + 3]
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            height = (view[i + 5] << 8) | view[i + 6]
            width = (view[i + 7] << 8) | view[i + 8]
            if width == 0 or height == 0:
                return None
            return width, height
        if marker == 0xDA:  # start of scan: no SOF before the image data
            return None
        i += 2 + length
    return None
