"""Video codecs and containers through PyAV (FFmpeg's libraries): one clip writer, one reader.

What is stored is a Matroska file holding one video stream, in one of three forms:

- the camera's own compressed stream, packet for packet (``copy``: H.264, H.265, MPEG-4 from
  RTSP/HTTP/file/``rpicam-vid`` sources);
- H.264 made here from decoded frames (``h264``: V4L2 YUYV, picamera2, synthetic, and every
  frame once privacy masks are drawn): ``h264_v4l2m2m`` where the board has it, else libx264;
- the camera's own JPEGs (``mjpeg``: MJPEG USB cameras and streams, zero cost).

Writing (:class:`ClipMuxer`): the vault's clip writer is an append-only encrypted stream, so the
container is written in Matroska's live mode (unknown-size Segment and Clusters, no Cues, no
seek back): every byte handed to the vault is final, and no chunk is ever re-sealed. Duration
and frame count cannot be patched into such a file, so the vault index keeps them and
:func:`remux` writes them into a seekable copy (export).

Reading (:func:`open_clip_input`, :func:`iter_images`, :func:`iter_jpegs`, :func:`remux`,
:func:`probe`): FFmpeg demuxes straight from the vault's decrypting reader (anything with
``read(n)``, no seek), so plaintext is never written to disk. Clips written before this module
existed (MJPEG in the hand-written live Matroska muxer) are ordinary Matroska and read the same.

A :class:`StreamFormat` holds codec parameters in a template stream of its own (a private,
never-written container), so a clip can be opened from packets whose source has long been
closed or reconnected.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Final, Protocol

import av
import av.error
import av.logging
import cv2
import numpy as np
from av.container import InputContainer, OutputContainer
from av.video.frame import PictureType
from av.video.stream import VideoStream

# OpenCV's own image type, not frame.Image: frame.py refers to this module's packets.
from cv2.typing import MatLike

from agent.timeutil import utcnow

log = logging.getLogger(__name__)

# FFmpeg's own messages go through Python logging (loggers ``libav.<component>``, with the
# agent's timestamps and handlers) instead of bare lines on stderr. Only errors: its warnings
# are notes on normal streams (rate estimates, timestamps Matroska does not store), which the
# agent handles itself.
av.logging.set_level(av.logging.ERROR)

CONTENT_TYPE: Final = "video/x-matroska"
TIME_BASE: Final = Fraction(1, 1000)
"""Matroska's own resolution: stored timestamps are milliseconds from the clip's start."""
INTER_CODECS: Final = frozenset({"h264", "hevc", "mpeg4", "msmpeg4v3", "msmpeg4v2", "h263"})
"""Codecs whose frames depend on others: clips and pre-roll must start at a keyframe."""
COPY_CODECS: Final = frozenset({"h264", "hevc", "mpeg4", "msmpeg4v3", "msmpeg4v2", "mjpeg"})
"""Codecs a camera may send that are stored as they come (Matroska carries all of them)."""
HARDWARE_H264: Final = "h264_v4l2m2m"
SOFTWARE_H264: Final = "libx264"
DEFAULT_PRESET: Final = "veryfast"
"""libx264 preset: ``bench/storage.py`` measured it at about the CPU of the old JPEG
pipeline for a quarter to a sixteenth of the bytes (``ultrafast`` costs 3x the bytes)."""
DEFAULT_CRF: Final = 23
LIVE_TUNE: Final = "zerolatency"
"""libx264 tune for frames encoded as they come (see :class:`H264Encoder`)."""
KEYFRAME_SECONDS: Final = 2.0
"""Longest keyframe interval made here: cuts and pre-roll start at keyframes."""
_READ_BUFFER: Final = 64 * 1024


class MediaError(Exception):
    """A clip or stream that FFmpeg cannot read or write (message says why)."""


class Readable(Protocol):
    """A byte source read front to back (the vault's ``ClipReader`` fits)."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; b"" at the end."""
        ...


class Writable(Protocol):
    """An append-only byte sink (the vault's ``ClipWriter`` fits)."""

    def write(self, data: bytes, /) -> object:
        """Append ``data``."""
        ...


class _Discard:
    """A sink that keeps nothing (template containers are never written)."""

    def write(self, data: bytes) -> int:
        return len(data)


class _AppendOnly:
    """What FFmpeg writes into: forwards to the clip writer; no ``seek``, so FFmpeg treats
    the output as a live stream. After :meth:`detach` writes are dropped (an aborted clip's
    trailer must not reach a writer that failed)."""

    def __init__(self, sink: Writable) -> None:
        self.sink: Writable | None = sink
        self.bytes = 0

    def write(self, data: bytes) -> int:
        if self.sink is not None:
            self.sink.write(bytes(data))
            self.bytes += len(data)
        return len(data)

    def detach(self) -> None:
        self.sink = None


class StreamFormat:
    """The codec parameters of one stored video stream.

    Packets of one format can go into one clip; a change (resolution, codec, a reconnect that
    brought new parameter sets) is a new format and so a new clip. Identity is the test.
    """

    def __init__(self, template: VideoStream, codec: str, width: int, height: int) -> None:
        self.template = template
        self.codec = codec
        self.width = width
        self.height = height

    @property
    def inter(self) -> bool:
        """Whether frames depend on others (clips must start at a keyframe)."""
        return self.codec in INTER_CODECS

    @classmethod
    def from_stream(cls, stream: VideoStream) -> StreamFormat:
        """The format of a demuxed input stream, copied so it outlives the input."""
        holder = av.open(_Discard(), mode="w", format="matroska")
        template = _video(holder.add_stream_from_template(stream, opaque=True))
        name = stream.codec_context.name
        return cls(template, name, stream.codec_context.width, stream.codec_context.height)

    @classmethod
    def from_sample(cls, data: bytes, demuxer: str) -> StreamFormat:
        """The format of an elementary stream starting with ``data`` (``demuxer`` ``h264``: a
        keyframe with its SPS/PPS; ``mjpeg``: one JPEG).

        Clips' streams are made from a *decoder*-side template like this one: a template
        holding an encoder would make the muxer open a second encoder, whose own parameter
        sets would replace the stream's.
        """
        try:
            source = av.open(io.BytesIO(data), mode="r", format=demuxer,
                             options={"probesize": "32768", "analyzeduration": "0"})
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"not a {demuxer} frame: {exc}") from exc
        try:
            if not source.streams.video:
                raise MediaError(f"not a {demuxer} frame")
            return cls.from_stream(source.streams.video[0])
        finally:
            source.close()

    def __repr__(self) -> str:
        return f"StreamFormat({self.codec} {self.width}x{self.height})"


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One compressed frame as stored: its bytes, whether it is a keyframe, its format and
    how much later than its decode time it is presented (B-frames; 0 otherwise)."""

    data: bytes
    keyframe: bool
    fmt: StreamFormat
    pts_delay: float = 0.0


def _video(stream: object) -> VideoStream:
    if not isinstance(stream, VideoStream):
        raise MediaError(f"expected a video stream, got {type(stream).__name__}")
    return stream


_UNAVAILABLE: set[str] = set()
"""Encoders that failed to open in this process (a board without the device): not retried."""


def h264_encoder_names(hardware: bool = True) -> list[str]:
    """H.264 encoders to try, best first: the board's hardware encoder when this FFmpeg has
    it (and it has not failed to open before), then libx264."""
    names = [HARDWARE_H264] if hardware and HARDWARE_H264 in av.codecs_available else []
    return [name for name in names if name not in _UNAVAILABLE] + [SOFTWARE_H264]


class H264Encoder:
    """Encodes BGR frames to H.264 packets; keyframe at least every ``KEYFRAME_SECONDS``.

    libx264 is tuned for a live camera (``tune``, default ``zerolatency``): no lookahead and no
    B-frames, so each frame's packet comes out at once and a crash loses none held back. Their
    frame queues were the largest part of the daemon's memory at 720p (``bench/memory.py``:
    about 50 MiB of a 150 MiB budget); that costs about a third more bytes
    (``bench/storage.py``: 7.6 against 5.7 MB/min at 2-s keyframes). ``tune=None`` keeps them:
    packets then come out about a second after their frames, in decode order. Either way each packet
    carries its own frame's times (looked up by presentation time) and its decode time, and
    :meth:`flush` drains what is held back when a clip ends. A new frame size restarts the
    encoder (a new :class:`StreamFormat`).
    """

    def __init__(
        self,
        fps: float,
        *,
        preset: str = DEFAULT_PRESET,
        crf: int = DEFAULT_CRF,
        tune: str | None = LIVE_TUNE,
        hardware: bool = True,
    ) -> None:
        self.fps = fps
        self.preset = preset
        self.crf = crf
        self.tune = tune
        self.hardware = hardware
        self.name: str | None = None
        self.frames = 0
        self._ctx: av.VideoCodecContext | None = None
        self._fmt: StreamFormat | None = None
        self._t0 = 0.0
        self._last_pts = -1
        self._pending: dict[int, tuple[float, datetime]] = {}
        self._since_key = 0.0

    @property
    def fmt(self) -> StreamFormat | None:
        """The format of the packets made so far (None before the first frame)."""
        return self._fmt

    def _open(self, width: int, height: int, ts: float) -> av.VideoCodecContext:
        gop = max(1, int(self.fps * KEYFRAME_SECONDS))
        errors: list[str] = []
        for name in h264_encoder_names(self.hardware):
            if name == SOFTWARE_H264:
                options = {
                    "preset": self.preset,
                    "crf": str(self.crf),
                    "keyint_min": str(min(gop, max(1, int(self.fps)))),
                }
                if self.tune is not None:
                    options["tune"] = self.tune
            else:
                options = {}
            # No container: without a global header every keyframe carries its SPS/PPS, so
            # any clip (and the format template) can start at any keyframe.
            ctx = av.CodecContext.create(name, "w")
            assert isinstance(ctx, av.VideoCodecContext)
            ctx.width, ctx.height = width, height
            ctx.pix_fmt = "yuv420p"
            ctx.time_base = TIME_BASE
            ctx.framerate = Fraction(self.fps).limit_denominator(1000)
            ctx.gop_size = gop
            ctx.options = options
            try:
                # A board without the hardware encoder makes FFmpeg complain ("Could not find
                # a valid device"): an expected probe, said once below at info, not an error.
                with av.logging.Capture() as said:
                    ctx.open()
            except (av.error.FFmpegError, ValueError) as exc:
                detail = "; ".join(str(line[2]).strip() for line in said if line[2])
                errors.append(f"{name}: {exc}" + (f" ({detail})" if detail else ""))
                _UNAVAILABLE.add(name)
                continue
            if errors:
                log.info("H.264 encoder %s (not available: %s)", name, "; ".join(errors))
            self.name = name
            self._t0 = ts
            self._last_pts = -1
            self._pending.clear()
            self._fmt = None
            return ctx
        raise MediaError(f"no H.264 encoder opens: {'; '.join(errors)}")

    def encode(
        self, image: MatLike, ts: float, wall: datetime, *, keyframe: bool = False
    ) -> list[tuple[float, datetime, EncodedPacket]]:
        """Encode one BGR frame taken at ``ts``/``wall``; returns the packets ready now with
        their frames' times. ``keyframe`` forces an IDR frame (a clip starting after a gap)."""
        height, width = image.shape[:2]
        ctx = self._ctx
        if ctx is None or (width, height) != (ctx.width, ctx.height):
            ctx = self._ctx = self._open(width, height, ts)
            keyframe = True
        pts = max(round((ts - self._t0) * 1000), self._last_pts + 1)
        self._last_pts = pts
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(image, dtype=np.uint8), format="bgr24"
        )
        frame.pts = pts
        frame.time_base = TIME_BASE
        if keyframe:
            frame.pict_type = PictureType.I
        self._pending[pts] = (ts, wall)
        self.frames += 1
        return self._collect(ctx.encode(frame))

    def flush(self) -> list[tuple[float, datetime, EncodedPacket]]:
        """The packets still held by the encoder; the next frame starts a new stream."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return []
        return self._collect(ctx.encode(None))

    def _collect(self, packets: list[av.Packet]) -> list[tuple[float, datetime, EncodedPacket]]:
        out = []
        for packet in packets:
            if self._fmt is None:
                if not packet.is_keyframe:
                    continue  # an encoder starts with a keyframe; never store a stray one
                self._fmt = StreamFormat.from_sample(bytes(packet), "h264")
            fmt = self._fmt
            pts = packet.pts if packet.pts is not None else self._last_pts
            dts = packet.dts if packet.dts is not None else pts
            ts, wall = self._pending.pop(pts, (self._t0 + pts / 1000, utcnow()))
            # B-frames: a packet is decoded before it is shown. ``ts`` (what muxing orders by)
            # is the decode time; ``wall`` stays the frame's own (what clips are indexed by).
            delay = max(0, pts - dts) / 1000
            out.append((
                ts - delay, wall, EncodedPacket(bytes(packet), packet.is_keyframe, fmt, delay)
            ))
        # A hardware encoder may drop frames: never let the lookup table grow.
        if len(self._pending) > 64:
            for key in sorted(self._pending)[:-64]:
                del self._pending[key]
        return out


class ClipMuxer:
    """Writes one clip's Matroska into an append-only sink, in live mode (never a seek).

    ``add`` takes packets with their time in seconds from the clip's first packet's decode
    time; times that go backwards are clamped (a camera clock glitch must not break a clip).
    """

    def __init__(self, sink: Writable, fmt: StreamFormat, *, fps: float | None = None) -> None:
        self.fmt = fmt
        self.frames = 0
        self.first_pts: int | None = None
        self.end_pts = 0
        self._out = _AppendOnly(sink)
        # Live mode: nothing is ever patched. Clusters of at most a second reach the vault
        # at once (a crash or a full disk costs at most that, and is noticed that soon).
        self._container: OutputContainer = av.open(
            self._out,
            mode="w",
            format="matroska",
            options={"live": "1", "flush_packets": "1", "cluster_time_limit": "1000",
                     "avoid_negative_ts": "disabled"},
        )
        self._container.metadata["encoder"] = "doorbell-agent"
        self._stream = self._container.add_stream_from_template(fmt.template, opaque=True)
        self._stream.time_base = TIME_BASE
        if fps:
            # Written as the track's DefaultDuration: readers know each frame's duration.
            self._stream.codec_context.framerate = Fraction(fps).limit_denominator(1000)
        self._frame_ms = round(1000 / fps) if fps else 0
        self._lead: int | None = None
        self._last_dts = -(1 << 30)
        self._closed = False

    @property
    def bytes(self) -> int:
        """Container bytes handed to the sink so far (FFmpeg buffers up to 32 KiB)."""
        return self._out.bytes

    @property
    def duration(self) -> float:
        """Seconds from the first frame's presentation to the end of the last one."""
        if self.first_pts is None:
            return 0.0
        return max(0, self.end_pts - self.first_pts) / 1000

    def add(self, packet: EncodedPacket, t: float) -> None:
        """Mux one packet decoded at ``t`` seconds from the clip's start."""
        if packet.fmt is not self.fmt:
            raise ValueError("a packet of another stream format cannot join this clip")
        if self._lead is None:
            # The first frame is shown at 0: with B-frames decoding starts a little earlier
            # (negative decode times, which Matroska, storing presentation times, allows).
            self._lead = round(packet.pts_delay * 1000)
        dts = max(round(t * 1000) - self._lead, self._last_dts + 1)
        self._last_dts = dts
        pts = dts + round(packet.pts_delay * 1000)
        out = av.Packet(packet.data)
        out.stream = self._stream
        out.time_base = TIME_BASE
        out.dts = dts
        out.pts = pts
        out.is_keyframe = packet.keyframe
        if self._frame_ms:
            out.duration = self._frame_ms
        self._container.mux(out)
        self.frames += 1
        self.first_pts = pts if self.first_pts is None else min(self.first_pts, pts)
        self.end_pts = max(self.end_pts, pts + self._frame_ms)

    def close(self) -> None:
        """Write the rest of the container into the sink. Idempotent."""
        if not self._closed:
            self._closed = True
            self._container.close()

    def abort(self) -> None:
        """Stop without writing anything more into the sink. Idempotent."""
        self._out.detach()
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                log.debug("closing an aborted clip's muxer: %s", exc)


class _ReadOnly:
    """Hides ``seek`` from FFmpeg (the vault's reader streams front to back) and keeps the
    reader's own failure (a chunk that fails authentication) to raise it as it is, after
    FFmpeg has seen an end of file, instead of through FFmpeg's callback."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self.failure: Exception | None = None

    def read(self, n: int = -1) -> bytes:
        if self.failure is not None:
            return b""
        try:
            return self._raw.read(n)
        except Exception as exc:  # re-raised by check(), whatever the reader raised
            self.failure = exc
            return b""

    def check(self) -> None:
        """Raise what the reader raised, if it did."""
        if self.failure is not None:
            raise self.failure


def _open_input(raw: Readable) -> tuple[InputContainer, VideoStream, _ReadOnly]:
    src = _ReadOnly(raw)
    try:
        # skip_frame (PyAV hands these options to the probing decoder too): the stream's
        # parameters come from the Matroska header; without it FFmpeg decodes the first frame
        # while probing (12 ms for a 720p keyframe, on every open: a cut opens the clip twice).
        container = av.open(
            src, mode="r", format="matroska", buffer_size=_READ_BUFFER,
            options={"probesize": "65536", "analyzeduration": "0", "skip_frame": "all"},
        )
    except (av.error.FFmpegError, ValueError) as exc:
        src.check()
        raise MediaError(f"not a readable video: {exc}") from exc
    if not container.streams.video:
        container.close()
        src.check()
        raise MediaError("the clip holds no video stream")
    return container, container.streams.video[0], src


def open_clip_input(raw: Readable) -> tuple[InputContainer, VideoStream]:
    """Demux a clip from a front-to-back reader; raises MediaError when it is not a video."""
    container, stream, _ = _open_input(raw)
    return container, stream


def _seconds(value: int | None, time_base: Fraction | None) -> float:
    if value is None or time_base is None:
        return 0.0
    return float(value * time_base)


def _span(first: float | None, end: float, last_start: float, frames: int) -> float:
    """Presentation span; Matroska SimpleBlocks carry no duration, so when the last frame's
    is unknown it is taken as the clip's mean frame interval."""
    if first is None:
        return 0.0
    if end <= last_start and frames > 1:
        end = last_start + (last_start - first) / (frames - 1)
    return max(0.0, end - first)


def _decoded(
    container: InputContainer, stream: VideoStream, src: _ReadOnly, every: int
) -> Iterator[tuple[float, MatLike]]:
    stream.thread_type = "AUTO"
    t0: float | None = None
    n = 0
    try:
        for frame in container.decode(stream):
            t = _seconds(frame.pts, frame.time_base)
            t0 = t if t0 is None else t0
            if n % every == 0:
                yield t - t0, frame.to_ndarray(format="bgr24")
            n += 1
    except av.error.FFmpegError as exc:
        src.check()
        raise MediaError(f"the clip does not decode: {exc}") from exc
    src.check()


def iter_images(raw: Readable, *, every: int = 1) -> Iterator[tuple[float, MatLike]]:
    """Decode a clip: (seconds from its first frame, BGR image) for every ``every``-th frame."""
    container, stream, src = _open_input(raw)
    try:
        yield from _decoded(container, stream, src, every)
    finally:
        container.close()


def iter_jpegs(raw: Readable, *, quality: int = 80) -> Iterator[tuple[float, bytes]]:
    """A clip as (seconds from its first frame, JPEG) pairs: MJPEG clips give their stored
    JPEGs as they are; other codecs are decoded and JPEG-encoded one frame at a time."""
    container, stream, src = _open_input(raw)
    try:
        if stream.codec_context.name != "mjpeg":
            for t, image in _decoded(container, stream, src, 1):
                ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if ok:
                    yield t, buf.tobytes()
            return
        t0: float | None = None
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                t = _seconds(packet.pts, packet.time_base)
                t0 = t if t0 is None else t0
                yield t - t0, bytes(packet)
        except av.error.FFmpegError as exc:
            src.check()
            raise MediaError(f"the clip does not demux: {exc}") from exc
        src.check()
    finally:
        container.close()


@dataclass(frozen=True)
class ClipFacts:
    """What a read-through of a clip found."""

    codec: str
    width: int
    height: int
    frames: int
    duration: float
    keyframe_first: bool


class _PacketTally:
    """What :func:`probe` and :func:`remux` learn from a clip's packets as they pass: how many,
    the span they cover, and whether the first is a keyframe."""

    def __init__(self) -> None:
        self.frames = 0
        self.first: float | None = None
        self.end = 0.0
        self.last_start = 0.0
        self.key_first = False

    def add(self, packet: av.Packet) -> None:
        """Count one packet (its duration as stored, before any is filled in)."""
        t = _seconds(packet.pts, packet.time_base)
        if self.first is None:
            self.key_first = packet.is_keyframe
        self.first = t if self.first is None else min(self.first, t)
        self.end = max(self.end, t + _seconds(packet.duration, packet.time_base))
        self.last_start = max(self.last_start, t)
        self.frames += 1

    def facts(self, stream: VideoStream) -> ClipFacts:
        """The clip's facts from what was counted."""
        return ClipFacts(
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frames=self.frames,
            duration=_span(self.first, self.end, self.last_start, self.frames),
            keyframe_first=self.key_first,
        )


def probe(raw: Readable) -> ClipFacts:
    """Demux a whole clip (no decode): codec, size, packet count, duration, and whether it
    starts with a keyframe."""
    container, stream, src = _open_input(raw)
    try:
        tally = _PacketTally()
        try:
            for packet in container.demux(stream):
                if packet.size:
                    tally.add(packet)
        except av.error.FFmpegError as exc:
            src.check()
            raise MediaError(f"the clip does not demux: {exc}") from exc
        src.check()
        return tally.facts(stream)
    finally:
        container.close()


def remux(
    raw: Readable, target: Path, *, frames: int | None = None, duration: float | None = None
) -> ClipFacts:
    """Copy a clip packet for packet into a seekable Matroska file at ``target`` that carries
    its ``Duration`` and a ``NUMBER_OF_FRAMES`` statistics tag (the owner's export).

    ``frames`` (from the index) is checked against what was copied when given; with the
    index's ``duration`` too, frames without a duration get the clip's mean frame interval.
    """
    container, stream, src = _open_input(raw)
    try:
        with av.open(str(target), mode="w", format="matroska") as out:
            ostream = out.add_stream_from_template(stream, opaque=True)
            out.metadata["encoder"] = "doorbell-agent"
            tally = _PacketTally()
            # NUMBER_OF_FRAMES goes into the track's tags, which Matroska writes with the
            # header: the count must be known before the first packet, so it is the index's.
            if frames is not None:
                ostream.metadata["NUMBER_OF_FRAMES"] = str(frames)
            rate = stream.average_rate or stream.guessed_rate
            if frames and duration:
                rate = Fraction(frames / duration).limit_denominator(1000)
            try:
                for packet in container.demux(stream):
                    if not packet.size:
                        continue
                    tally.add(packet)
                    if not packet.duration and rate and packet.time_base:
                        # Matroska blocks carry no duration: the last frame's sets Duration.
                        packet.duration = round(1 / (rate * packet.time_base))
                    packet.stream = ostream
                    out.mux(packet)
            except av.error.FFmpegError as exc:
                src.check()
                raise MediaError(f"the clip does not demux: {exc}") from exc
            src.check()
        if frames is not None and tally.frames != frames:
            raise MediaError(
                f"the clip holds {tally.frames} frames but the index records {frames}"
            )
        return tally.facts(stream)
    finally:
        container.close()


BROWSER_CODECS: Final = frozenset({"h264"})
"""Stored codecs a browser's ``<video>`` plays from fragmented MP4 (others are served as JPEG
frames, :func:`iter_jpegs`)."""


def fragmented_mp4(raw: Readable) -> bytes:
    """A clip remuxed (packet for packet) into fragmented MP4 for the app's ``<video>``, in
    memory: the caller serves it (with byte ranges, so the player can seek) and drops it;
    nothing is written to disk."""
    container, stream, src = _open_input(raw)
    out = io.BytesIO()
    try:
        if stream.codec_context.name not in BROWSER_CODECS:
            raise MediaError(f"{stream.codec_context.name} is not played by browsers")
        rate = stream.average_rate or stream.guessed_rate
        with av.open(out, mode="w", format="mp4", options={
            "movflags": "frag_keyframe+empty_moov+default_base_moof",
        }) as mp4:
            ostream = mp4.add_stream_from_template(stream, opaque=True)
            try:
                for packet in container.demux(stream):
                    if not packet.size:
                        continue
                    if not packet.duration and rate and packet.time_base:
                        packet.duration = round(1 / (rate * packet.time_base))
                    packet.stream = ostream
                    mp4.mux(packet)
            except av.error.FFmpegError as exc:
                src.check()
                raise MediaError(f"the clip does not demux: {exc}") from exc
            src.check()
    finally:
        container.close()
    return out.getvalue()
