"""Compressed camera streams read with PyAV and stored as they come (stream copy).

:class:`StreamSource` demuxes ``rtsp://``, ``http(s)://`` (MPEG-TS, MJPEG multipart, ...),
``file:`` videos holding H.264/H.265/MPEG-4, and ``pipe:``/``rpicam:`` commands writing H.264
to their stdout (Raspberry Pi OS's ``rpicam-vid ... -o -``, hardware-encoded on a Pi 4). Each
packet becomes a :class:`~agent.camera.frame.Frame` carrying it unchanged
(:class:`~agent.camera.media.EncodedPacket`); an MJPEG packet is the frame's JPEG.

Motion detection within a CPU budget: reference frames are decoded (B-frames are skipped by
the decoder), and only every ``detect_every``-th decoded frame (at most ``DETECT_FPS`` a
second) is converted to a BGR image for the detector; frames without an image keep the last
motion result.

Frame times come from the stream's own timestamps, anchored to the clock at the first packet,
so a reconnect's or a frozen camera's backlog keeps its real spacing instead of landing as a
burst; a jump of more than ``_MAX_JUMP`` seconds (camera restart) re-anchors. Streams without
timestamps (raw H.264 from a pipe) are timed on arrival.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import av
import av.error
from av.container import InputContainer
from av.video.stream import VideoStream

from agent.camera.frame import Clock, Frame, Image, jpeg_size
from agent.camera.media import INTER_CODECS, EncodedPacket, StreamFormat
from agent.errors import CameraError

log = logging.getLogger(__name__)

_MAX_JUMP: Final = 5.0
DETECT_FPS: Final = 5.0
"""Most frames per second converted for motion detection (the CPU budget of a copied
stream: ``bench/storage.py``)."""
_MAX_CORRUPT_RUN: Final = 25
RPICAM_COMMAND: Final = "rpicam-vid"


def describe_open_error(exc: BaseException) -> str:
    """Why a stream did not open, in words an owner can act on (refused, timeout, bad data)."""
    text = str(exc)
    if isinstance(exc, av.error.ConnectionRefusedError) or "refused" in text.lower():
        return f"connection refused ({text})"
    if isinstance(exc, av.error.TimeoutError | TimeoutError) or "timed out" in text.lower():
        return f"timed out ({text})"
    if isinstance(exc, av.error.InvalidDataError):
        return f"bad data: not a video stream FFmpeg understands ({text})"
    if isinstance(exc, av.error.HTTPError | av.error.HTTPNotFoundError):
        return f"HTTP error ({text})"
    return text


class StreamSource:
    """A compressed stream through FFmpeg; see the module docstring."""

    def __init__(
        self,
        target: str,
        *,
        kind: str,
        clock: Clock,
        fps: float,
        loop: bool = False,
        realtime: bool = True,
        open_timeout: float = 10.0,
        detect_every: int | None = None,
        description: str | None = None,
        decode_all: bool = False,
    ) -> None:
        self.target = target
        self.kind = kind  # "url", "file" or "pipe"
        self.clock = clock
        self.fps = fps
        self.loop = loop
        self.realtime = realtime
        self.open_timeout = open_timeout
        self.decode_all = decode_all
        self.detect_every_setting = 1 if decode_all else detect_every
        self.description = description or target
        self.codec: str | None = None
        self.width = 0
        self.height = 0
        self.corrupt = 0
        self.loops = 0
        self.packets = 0
        self.decoded = 0
        self._corrupt_run = 0
        self._container: InputContainer | None = None
        self._stream: VideoStream | None = None
        self._fmt: StreamFormat | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._packets: Any = None
        self._seq = 0
        self._detect_every = 1
        self._anchor: tuple[float, float] | None = None  # (stream seconds, clock monotonic)
        self._wall0 = clock.now()
        self._mono0 = clock.monotonic()
        self._last_ts: float | None = None
        self._offset = 0.0

    # -- opening -------------------------------------------------------------------------

    def _options(self) -> dict[str, str]:
        us = str(int(self.open_timeout * 1_000_000))
        if self.target.startswith(("rtsp://", "rtsps://")):
            return {"rtsp_transport": "tcp", "timeout": us}
        if self.kind == "url":
            return {"rw_timeout": us, "timeout": us, "reconnect": "0"}
        return {}

    def open(self) -> None:
        """Connect or start the command; raises CameraError naming why it failed."""
        self.close()
        try:
            if self.kind == "pipe":
                argv = shlex.split(self.target)
                try:
                    self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                  stderr=subprocess.DEVNULL)
                except OSError as exc:
                    raise CameraError(f"{self.description}: cannot start {argv[0]}: {exc}") from exc
                assert self._proc.stdout is not None
                container = av.open(self._proc.stdout, mode="r", format="h264",
                                    options={"probesize": "65536"})
            else:
                path = self.target
                container = av.open(path, mode="r", options=self._options(),
                                    timeout=self.open_timeout if self.kind == "url" else None)
        except CameraError:
            self.close()
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self.close()
            raise CameraError(
                f"cannot open camera {self.description}: {describe_open_error(exc)}"
            ) from exc
        if not container.streams.video:
            container.close()
            self.close()
            raise CameraError(f"cannot open camera {self.description}: no video stream")
        stream = container.streams.video[0]
        self._container = container
        self._stream = stream
        ctx = stream.codec_context
        self.codec = ctx.name
        self.width, self.height = ctx.width, ctx.height
        self._fmt = None if self.codec == "mjpeg" else StreamFormat.from_stream(stream)
        # The decoder: reference frames only (B-frames are never needed for motion).
        if not self.decode_all:
            ctx.skip_frame = "NONREF"
        # Slice threads only: frame threads delay output and were seen to deadlock at close.
        ctx.thread_type = "SLICE"
        rate = float(stream.average_rate or stream.guessed_rate or self.fps)
        self._detect_every = self.detect_every_setting or max(
            1, round(rate / min(self.fps, DETECT_FPS))
        )
        self._packets = container.demux(stream)
        self._anchor = None
        log.info(
            "opened %s (%s %dx%d, %s)", self.description, self.codec, self.width, self.height,
            "stored as it comes" if self.codec in INTER_CODECS or self.codec == "mjpeg"
            else "decoded",
        )

    # -- reading -------------------------------------------------------------------------

    def _times(self, packet: av.Packet) -> tuple[float, float]:
        """(ts, pts_delay) of a packet on the clock's timeline."""
        now = self.clock.monotonic()
        tb = packet.time_base
        dts = packet.dts if packet.dts is not None else packet.pts
        if self.kind == "pipe" or dts is None or tb is None:
            return now, 0.0
        t = float(dts * tb)
        delay = float((packet.pts - dts) * tb) if packet.pts is not None else 0.0
        anchor = self._anchor
        if self.kind == "file":
            if anchor is None:
                anchor = self._anchor = (t, self._mono0 + self._offset)
            ts = anchor[1] + (t - anchor[0])
            if self.realtime:
                wait = ts - self.clock.monotonic()
                if wait > 0:
                    self.clock.sleep(wait)
            return ts, delay
        if anchor is None or abs((anchor[1] + (t - anchor[0])) - now) > _MAX_JUMP:
            if anchor is not None:
                log.info("%s: stream time jumped; re-anchored to the clock", self.description)
            anchor = self._anchor = (t, now)
        return anchor[1] + (t - anchor[0]), delay

    def _decode(self, packet: av.Packet) -> tuple[bool, Image | None]:
        """(decodable, image for motion or None) for an inter-coded packet."""
        stream = self._stream
        assert stream is not None
        try:
            frames = stream.codec_context.decode(packet)
        except av.error.FFmpegError:
            return False, None
        image = None
        for frame in frames:
            self.decoded += 1
            if self.decoded % self._detect_every == 0:
                image = frame.to_ndarray(format="bgr24")
        return True, image

    def read(self) -> Frame | None:
        """The next frame; None when a non-looping file ended. Raises CameraError when the
        stream ended, broke or sent only garbage."""
        if self._packets is None:
            raise CameraError(f"{self.description} is not open")
        while True:
            try:
                packet = next(self._packets, None)
            except av.error.FFmpegError as exc:
                raise CameraError(f"{self.description}: the stream broke: {exc}") from exc
            if packet is None or (packet.size == 0 and packet.dts is None):
                if self.kind == "file":
                    if not self.loop:
                        return None
                    self._reopen_file()
                    continue
                raise CameraError(f"{self.description}: the stream ended")
            if packet.size == 0:
                continue
            frame = self._frame(packet)
            if frame is not None:
                self._corrupt_run = 0
                return frame
            self.corrupt += 1
            self._corrupt_run += 1
            if self._corrupt_run >= _MAX_CORRUPT_RUN:
                raise CameraError(
                    f"{self.description}: {self._corrupt_run} corrupt frames in a row"
                )

    def _frame(self, packet: av.Packet) -> Frame | None:
        ts, delay = self._times(packet)
        if self._last_ts is not None and ts < self._last_ts - 1.0:
            ts = self._last_ts  # never back in time by more than reordering allows
        self._last_ts = ts
        wall = self._wall0 + timedelta(seconds=ts - self._mono0)
        data = bytes(packet)
        self.packets += 1
        if self.codec == "mjpeg":
            size = jpeg_size(data)
            if size is None:
                return None
            self._seq += 1
            return Frame(self._seq, ts, wall, size[0], size[1], jpeg=data)
        fmt = self._fmt
        assert fmt is not None
        ok, image = self._decode(packet)
        if not ok:
            return None
        self._seq += 1
        enc = EncodedPacket(data, packet.is_keyframe, fmt, max(0.0, delay))
        return Frame(self._seq, ts, wall, fmt.width or self.width, fmt.height or self.height,
                     image=image, packet=enc)

    def _reopen_file(self) -> None:
        # A new pass continues the timeline after the last frame.
        last = self._last_ts if self._last_ts is not None else self._mono0
        self.open()
        self._offset = last + 1 / self.fps - self._mono0
        self.loops += 1

    def close(self) -> None:
        """Release the stream and stop the command (idempotent)."""
        container, self._container = self._container, None
        self._packets = None
        self._stream = None
        if container is not None:
            try:
                container.close()
            except (av.error.FFmpegError, OSError) as exc:
                log.debug("closing %s: %s", self.description, exc)
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        """Codec, counters and whether packets are stored as they come."""
        return {
            "kind": self.kind,
            "codec": self.codec,
            "passthrough": self.codec in INTER_CODECS or self.codec == "mjpeg",
            "corrupt_frames": self.corrupt,
            "decoded_frames": self.decoded,
            "detect_every": self._detect_every,
            "loops": self.loops,
        }


def probe_codec(path: Path) -> str | None:
    """The video codec of a local file (None when FFmpeg cannot open it)."""
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                return None
            return container.streams.video[0].codec_context.name
    except (av.error.FFmpegError, OSError, ValueError):
        return None


def rpicam_command(args: str, *, width: int, height: int, fps: float) -> str:
    """``rpicam-vid`` writing inline-headed H.264 to stdout, forever, at the configured size."""
    base = (
        f"{RPICAM_COMMAND} -t 0 -n --codec h264 --inline --intra {max(1, round(fps * 2))} "
        f"--width {width} --height {height} --framerate {fps:g} -o -"
    )
    return f"{base} {args.strip()}".strip()
