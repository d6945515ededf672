"""Helpers for the camera tests: a fake clock, an in-memory clip sink, a Matroska reader,
frame makers and a threaded MJPEG HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import cv2
import numpy as np

from agent.camera.frame import Frame, Image
from agent.errors import VaultError

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when told to (``sleep`` advances it and is recorded)."""

    def __init__(self, start: float = 1000.0, wall: datetime = T0) -> None:
        self.t0 = start
        self.t = start
        self.wall0 = wall
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall0 + timedelta(seconds=self.t - self.t0)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(seconds, 0.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def encode_jpeg(image: Image, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def image_frame(image: Image, n: int, fps: float = 10.0, *, t0: float = 1000.0) -> Frame:
    """Frame ``n`` of a stream at ``fps``, carrying a decoded image."""
    return Frame(
        n, t0 + n / fps, T0 + timedelta(seconds=n / fps), int(image.shape[1]),
        int(image.shape[0]), image=image,
    )


def jpeg_frame(image: Image, n: int, fps: float = 10.0, *, t0: float = 1000.0) -> Frame:
    """Frame ``n`` of a stream at ``fps``, carrying only JPEG bytes (an MJPEG camera)."""
    return Frame(
        n, t0 + n / fps, T0 + timedelta(seconds=n / fps), int(image.shape[1]),
        int(image.shape[0]), jpeg=encode_jpeg(image),
    )


@dataclass
class MemoryClip:
    """A ClipWriter keeping everything in memory."""

    id: str
    start: datetime
    content_type: str
    sink: MemorySink
    data: bytearray = field(default_factory=bytearray)
    thumbnail: bytes | None = None
    end: datetime | None = None
    frames: int | None = None
    aborted: bool = False

    def write(self, data: bytes) -> None:
        assert self.end is None and not self.aborted
        if self.sink.fail_writes:
            raise VaultError("disk full (test)")
        self.data += data

    def set_thumbnail(self, jpeg: bytes) -> None:
        self.thumbnail = jpeg

    def finish(
        self,
        end: datetime,
        frames: int,
        *,
        duration: float | None = None,
        codec: str | None = None,
    ) -> object:
        assert self.end is None and not self.aborted
        self.end = end
        self.frames = frames
        self.duration = duration
        self.codec = codec
        return self

    def abort(self) -> None:
        self.aborted = True


@dataclass
class MemorySink:
    """A ClipSink keeping clips in memory; ``fail_*`` simulate a broken vault."""

    clips: list[MemoryClip] = field(default_factory=list)
    fail_create: bool = False
    fail_writes: bool = False

    def create_clip(self, start: datetime, content_type: str) -> MemoryClip:
        if self.fail_create:
            raise VaultError("vault unavailable (test)")
        clip = MemoryClip(f"clip-{len(self.clips)}", start, content_type, self)
        self.clips.append(clip)
        return clip

    @property
    def finished(self) -> list[MemoryClip]:
        return [c for c in self.clips if c.end is not None]


# --------------------------------------------------------------------------- Matroska reader

@dataclass
class Mkv:
    """What a Matroska stream holds, read independently of the muxer."""

    doc_type: str = ""
    codec: str = ""
    width: int = 0
    height: int = 0
    timestamp_scale: int = 0
    date_utc_ns: int | None = None
    unknown_size_elements: list[int] = field(default_factory=list)
    clusters: list[int] = field(default_factory=list)
    blocks: list[tuple[int, bytes]] = field(default_factory=list)
    """(absolute timestamp in ms, frame bytes)."""


_MASTER = {0x1A45DFA3, 0x18538067, 0x1654AE6B, 0xAE, 0xE0, 0x1549A966, 0x1F43B675}


def _vint(data: bytes, i: int, *, keep_marker: bool) -> tuple[int | None, int]:
    first = data[i]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    assert length <= 8, f"bad vint at {i}"
    raw = int.from_bytes(data[i : i + length], "big")
    if keep_marker:
        return raw, i + length
    value = raw & ((1 << (7 * length)) - 1)
    if value == (1 << (7 * length)) - 1:
        return None, i + length  # unknown size
    return value, i + length


def parse_mkv(data: bytes | bytearray) -> Mkv:
    """Walk every element; unknown-size masters are entered and run to the next sibling."""
    data = bytes(data)
    out = Mkv()
    i = 0
    cluster_ts = 0
    while i < len(data):
        eid, i = _vint(data, i, keep_marker=True)
        assert eid is not None
        size, i = _vint(data, i, keep_marker=False)
        if size is None:
            out.unknown_size_elements.append(eid)
        if eid in _MASTER:
            if eid == 0x1F43B675:
                out.clusters.append(i)
            continue  # children follow inline
        assert size is not None, f"non-master element {eid:#x} with unknown size"
        payload = data[i : i + size]
        i += size
        if eid == 0x4282:
            out.doc_type = payload.decode()
        elif eid == 0x86:
            out.codec = payload.decode()
        elif eid == 0xB0:
            out.width = int.from_bytes(payload, "big")
        elif eid == 0xBA:
            out.height = int.from_bytes(payload, "big")
        elif eid == 0x2AD7B1:
            out.timestamp_scale = int.from_bytes(payload, "big")
        elif eid == 0x4461:
            out.date_utc_ns = int.from_bytes(payload, "big", signed=True)
        elif eid == 0xE7:
            cluster_ts = int.from_bytes(payload, "big")
        elif eid == 0xA3:
            track, j = _vint(payload, 0, keep_marker=False)
            assert track == 1
            rel = int.from_bytes(payload[j : j + 2], "big", signed=True)
            assert out.codec != "V_MJPEG" or payload[j + 2] & 0x80, "MJPEG: all keyframes"
            out.blocks.append((cluster_ts + rel, bytes(payload[j + 3 :])))
    assert i == len(data), "trailing bytes"
    return out


def decode_jpeg(jpeg: bytes) -> Image:
    img: Image | None = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable JPEG"
    return img


# --------------------------------------------------------------------------- MJPEG server

class MJPEGServer:
    """``multipart/x-mixed-replace`` on 127.0.0.1: an IP camera's MJPEG stream.

    ``mode``: ``"stream"`` serves frames (``per_connection`` of them, then closes the
    connection; None: forever), ``"down"`` answers 503 (and ends open streams), ``"stall"``
    sends nothing more on open streams and only headers on new ones.
    """

    def __init__(self, frames: list[bytes], *, interval: float = 0.01) -> None:
        self.frames = frames
        self.interval = interval
        self.mode = "stream"
        self.per_connection: int | None = None
        self.connections = 0
        self.sent = 0
        self._stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.connections += 1
                if outer.mode == "down":
                    self.send_error(503, "camera rebooting")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                if outer.mode == "stall":
                    while outer.mode == "stall" and not outer._stop.wait(0.05):
                        pass
                    return
                n = 0
                try:
                    while not outer._stop.is_set() and outer.mode != "down":
                        if outer.mode == "stall":
                            # Hold the connection open without sending: a hung camera.
                            outer._stop.wait(0.05)
                            continue
                        if outer.per_connection is not None and n >= outer.per_connection:
                            return
                        f = outer.frames[outer.sent % len(outer.frames)]
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                            % len(f) + f + b"\r\n"
                        )
                        self.wfile.flush()
                        outer.sent += 1
                        n += 1
                        time.sleep(outer.interval)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, format: str, *args: Any) -> None:
                return

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/video.mjpg"

    def start(self) -> MJPEGServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
