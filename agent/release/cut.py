"""The cut (contract §5.1): a released file holds only the frames inside the request's window.

For each stored clip overlapping the window a new Matroska file is made, frame-exact:

- intra-only video (MJPEG) is cut on frames: the stored packets whose presentation times fall in
  ``[window.start, window.end]``, copied as they are;
- inter-coded video (H.264, H.265, MPEG-4) is copied packet for packet from the first keyframe
  inside the window that starts a closed group of pictures (no later packet is shown before
  it); the frames from ``window.start`` to that keyframe (the lead), and those at the end whose
  decoding needs a packet shown after ``window.end`` (the tail), are decoded and re-encoded with
  FFmpeg's software encoder for the stream's own codec (a "smart cut"). A copied packet is
  only ever decoded from packets that are copied too, so no decodable frame outside the window
  leaves.

Determinism: a cut by the same agent version is byte-identical when repeated. The encoders run
single-threaded with fixed settings and the bitexact flag; the muxer runs with ``fflags
+bitexact`` (no random UIDs, no write date, no version strings).

Two passes over the stored clip, both streaming from the vault's decrypting reader (no seek,
nothing on disk): :func:`plan_cut` demuxes (no decoding) up to the first keyframe after the
window and decides which frames are copied and which re-encoded; the same :class:`ClipCut` is
the owner's preview, so the preview is what the cut produces. :func:`cut_stream` then writes the
file in one pass. Because the plan knows the frame count and duration before the first byte,
Matroska's ``Duration`` and the ``NUMBER_OF_FRAMES`` tag go into the header, and the muxer never
needs to seek: the file is produced as a stream that delivery encrypts as it reads, so no
plaintext (and no temporary file) ever reaches the disk. Memory holds one cluster, one group of
pictures of re-encoded frames and a few integers per frame of the window, whatever the size of
the clip.

Re-encoded H.264 uses SPS/PPS id 31 (stored streams use 0), so the lead's in-band parameter sets
never replace those the copied packets refer to, even when the camera sent them only in the
track's CodecPrivate.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Final, Protocol

import av
import av.error
from av.container import OutputContainer
from av.video.frame import PictureType, VideoFrame
from av.video.stream import VideoStream

from agent.camera.media import CONTENT_TYPE, INTER_CODECS, MediaError, Readable, _open_input
from agent.errors import VaultError
from agent.release.cut_api import CutFile

log = logging.getLogger(__name__)

MS: Final = Fraction(1, 1000)
_US_PER_MS: Final = 1000
_END_SLACK: Final = timedelta(microseconds=1)
ENCODERS: Final = {"h264": "libx264", "hevc": "libx265", "mpeg4": "mpeg4"}
"""FFmpeg's software encoder for each inter-coded codec a clip may hold (contract §5.1)."""
_ENCODER_OPTIONS: Final[dict[str, dict[str, str]]] = {
    # Fixed settings: quality close to the source (the lead is at most a few seconds), no
    # B-frames (but see MPEG-4 below), one thread (deterministic).
    # libx264 ultrafast: the lead costs a third of veryfast's time (bench/release.py), and at
    # crf 17 a second or two of footage stays visually lossless (only bigger).
    "libx264": {
        "preset": "ultrafast",
        "crf": "17",
        "x264-params": "bframes=0:sps-id=31:threads=1:lookahead-threads=1:sliced-threads=0",
    },
    "libx265": {
        "preset": "veryfast",
        "crf": "20",
        "x265-params": (
            "bframes=0:pools=none:frame-threads=1:wpp=0:repeat-headers=1:log-level=error"
        ),
    },
    "mpeg4": {},
}
_MUXER_OPTIONS: Final = {"fflags": "+bitexact", "avoid_negative_ts": "disabled"}


@dataclass(frozen=True, slots=True)
class _Packet:
    pts: int
    """Milliseconds from the clip's first frame."""
    key: bool
    size: int
    headers: bool = True
    """Whether a keyframe carries its decoder configuration in-band (see :func:`_in_band`)."""


def _in_band(codec: str, data: bytes, length_size: int | None) -> bool:
    """Whether a keyframe carries the headers that reset the decoder.

    The re-encoded lead carries its own in-band headers (MPEG-4 VOL, H.265 VPS/SPS/PPS with
    id 0), which replace those of the track's CodecPrivate: a copied run may only start at a
    keyframe that brings its own back. H.264 needs no check (the lead uses SPS/PPS id 31).
    """
    if codec == "mpeg4":
        return any(data.find(bytes((0, 0, 1, code))) >= 0 for code in range(0x20, 0x30))
    if codec != "hevc":
        return True
    types: set[int] = set()
    if length_size is not None:
        i = 0
        while i + length_size < len(data):
            n = int.from_bytes(data[i:i + length_size], "big")
            types.add((data[i + length_size] >> 1) & 0x3F)
            i += length_size + n
    else:
        i = data.find(b"\x00\x00\x01")
        while 0 <= i < len(data) - 3:
            types.add((data[i + 3] >> 1) & 0x3F)
            i = data.find(b"\x00\x00\x01", i + 3)
    return {32, 33, 34} <= types


@dataclass(frozen=True)
class ClipCut:
    """What the cut of one stored clip releases; the owner's preview shows exactly this.

    Packet ranges index :attr:`packets`, which are the clip's packets in decode order from
    index :attr:`base` (counting every non-empty packet of the clip from 0).
    """

    clip_id: str
    codec: str
    first: datetime
    """Presentation time of the first frame released."""
    last: datetime
    """Presentation time of the last frame released."""
    frames: int
    duration: float
    """Seconds from the first frame's presentation to the end of the last one."""
    stored_bytes: int
    """Stored (plaintext packet) bytes of the frames released: an estimate of the file size."""
    copied: int
    """Frames copied as stored; the others are re-encoded."""
    source_sha256: str | None
    base: int
    packets: tuple[_Packet, ...]
    origin: int
    """Clip milliseconds of the first released frame (the file's time 0)."""
    frame_ms: int
    lead: tuple[int, ...]
    """Clip milliseconds of the re-encoded frames before the copied run."""
    copy: tuple[int, int]
    """``packets[copy[0]:copy[1]]`` are released as stored."""
    tail_from: int
    """Index in :attr:`packets` where decoding for the tail starts."""
    tail: tuple[int, ...]
    """Clip milliseconds of the re-encoded frames after the copied run."""
    dts: tuple[int, ...]
    """Decode times of the file's packets in order (file milliseconds)."""

    @property
    def reencoded(self) -> int:
        """Frames decoded and encoded again."""
        return len(self.lead) + len(self.tail)


class ClipIndex(Protocol):
    """What the cut reads of a clip's index entry (the vault's ClipInfo fits)."""

    @property
    def id(self) -> str: ...

    @property
    def start(self) -> datetime: ...

    @property
    def sha256(self) -> str | None: ...


class ClipStore(Protocol):
    """The part of the vault the cut reads (the vault's Vault fits)."""

    def get_clip(self, clip_id: str) -> ClipIndex: ...

    def clips_overlapping(self, start: datetime, end: datetime) -> Sequence[ClipIndex]: ...

    def open_clip(self, clip_id: str) -> PlainStreamReader: ...


class PlainStreamReader(Readable, Protocol):
    """A vault clip reader: front-to-back ``read`` and ``close``."""

    def close(self) -> None: ...


def _ms(value: int | None, time_base: Fraction | None) -> int:
    if value is None or time_base is None:
        return 0
    return round(value * time_base * 1000)


def _us(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _select(
    packets: Sequence[_Packet], lo_us: int, hi_us: int, inter: bool
) -> tuple[list[int], tuple[int, int], int, list[int]] | None:
    """(lead times, copied range, tail decode start, tail times) for the frames in
    ``[lo_us, hi_us]``; None when no frame falls inside."""
    inside = [p.pts for p in packets if lo_us <= p.pts * _US_PER_MS <= hi_us]
    if not inside:
        return None
    if not inter:
        idx = [i for i, p in enumerate(packets) if lo_us <= p.pts * _US_PER_MS <= hi_us]
        return [], (idx[0], idx[-1] + 1), len(packets), []
    # The first keyframe inside the window that starts a closed group of pictures: nothing
    # decoded after it is shown before it.
    suffix_min = [0] * len(packets)
    low = 1 << 62
    for i in range(len(packets) - 1, -1, -1):
        low = min(low, packets[i].pts)
        suffix_min[i] = low
    start = next(
        (
            i for i, p in enumerate(packets)
            if p.key and p.headers and lo_us <= p.pts * _US_PER_MS <= hi_us
            and suffix_min[i] == p.pts
        ),
        None,
    )
    if start is None:
        return sorted(inside), (0, 0), len(packets), []
    # Copied: a prefix in decode order (decoding needs only what came before) that shows
    # nothing after the window, and after which every frame still to show comes later.
    end = next(
        (i for i in range(start, len(packets)) if packets[i].pts * _US_PER_MS > hi_us),
        len(packets),
    )
    while end > start:
        shown = max(p.pts for p in packets[start:end])
        rest = [p.pts for p in packets[end:] if p.pts * _US_PER_MS <= hi_us]
        if not rest or min(rest) > shown:
            break
        end -= 1
    if end == start:
        return sorted(inside), (0, 0), len(packets), []
    key_pts = packets[start].pts
    lead = sorted(t for t in inside if t < key_pts)
    shown = max(p.pts for p in packets[start:end])
    tail = sorted(t for t in inside if t > shown)
    # The tail decodes from the group the copied run ends in.
    tail_from = (
        max(i for i in range(min(end + 1, len(packets))) if packets[i].key)
        if tail else len(packets)
    )
    return lead, (start, end), tail_from, tail


def _decode_times(pts: Sequence[int]) -> tuple[int, ...]:
    """Strictly increasing decode times for packets with presentation times ``pts`` (in
    decode order): the i-th smallest time, shifted back just enough that none is later than
    its packet's presentation."""
    ordered = sorted(pts)
    shift = max((o - p for o, p in zip(ordered, pts, strict=True)), default=0)
    return tuple(o - shift for o in ordered)


def plan_cut(
    raw: Readable,
    *,
    clip_id: str,
    clip_start: datetime,
    window_start: datetime,
    window_end: datetime,
    source_sha256: str | None = None,
) -> ClipCut | None:
    """Decide the cut of one clip (demux only, stops after the window): None when no frame
    of the clip is shown inside ``[window_start, window_end]``."""
    lo_us = _us(window_start - clip_start)
    hi_us = _us(window_end - clip_start)
    container, stream, src = _open_input(raw)
    try:
        codec = stream.codec_context.name
        inter = codec in INTER_CODECS
        length_size = _nal_length_size(codec, stream.codec_context.extradata)
        packets: list[_Packet] = []
        base = 0
        index = -1
        origin: int | None = None
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                index += 1
                pts = _ms(packet.pts, packet.time_base)
                origin = pts if origin is None else origin
                rel = pts - origin
                key = bool(packet.is_keyframe)
                over = rel * _US_PER_MS > hi_us
                if not inter:
                    if over:
                        break
                    if rel * _US_PER_MS < lo_us:
                        base = index + 1
                        continue
                elif key:
                    if over:
                        break
                    if rel * _US_PER_MS <= lo_us:
                        # A group starting at or before the window: what came before it is
                        # never needed.
                        packets.clear()
                        base = index
                headers = not key or _in_band(codec, bytes(packet), length_size)
                packets.append(_Packet(rel, key, packet.size, headers))
        except av.error.FFmpegError as exc:
            src.check()
            raise MediaError(f"clip {clip_id} does not demux: {exc}") from exc
        src.check()
        rate = stream.average_rate or stream.guessed_rate
    finally:
        container.close()
    chosen = _select(packets, lo_us, hi_us, inter)
    if chosen is None:
        return None
    lead, (c0, c1), tail_from, tail = chosen
    copied = [p.pts for p in packets[c0:c1]]
    times = lead + copied + tail
    first, last = min(times), max(times)
    count = len(times)
    if count > 1:
        frame_ms = max(1, round((last - first) / (count - 1)))
    else:
        frame_ms = max(1, round(1000 / rate)) if rate else 40
    in_window = {*lead, *tail}
    stored = sum(p.size for p in packets[c0:c1]) + sum(
        p.size for p in packets if p.pts in in_window
    )
    out = [t - first for t in times]
    return ClipCut(
        clip_id=clip_id,
        codec=codec,
        first=clip_start + timedelta(milliseconds=first),
        last=clip_start + timedelta(milliseconds=last),
        frames=count,
        duration=(last - first + frame_ms) / 1000,
        stored_bytes=stored,
        copied=len(copied),
        source_sha256=source_sha256,
        base=base,
        packets=tuple(packets),
        origin=first,
        frame_ms=frame_ms,
        lead=tuple(lead),
        copy=(c0, c1),
        tail_from=tail_from,
        tail=tuple(tail),
        dts=_decode_times(out),
    )


def _duration_tag(seconds: float) -> str:
    whole = int(seconds)
    nanos = round((seconds - whole) * 1e9)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}.{nanos:09d}"


def _length_prefixed(annexb: bytes, size: int) -> bytes:
    """Annex B NAL units (start codes) as ``size``-byte length-prefixed units (avcC/hvcC)."""
    starts: list[int] = []
    i = annexb.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i)
        i = annexb.find(b"\x00\x00\x01", i + 3)
    units: list[bytes] = []
    for k, at in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(annexb)
        while end > at + 3 and annexb[end - 1] == 0:
            end -= 1  # the zero before a 4-byte start code belongs to no unit
        unit = annexb[at + 3:end]
        units.append(len(unit).to_bytes(size, "big") + unit)
    return b"".join(units)


def _nal_length_size(codec: str, extradata: bytes | None) -> int | None:
    """The track's NAL length size when it stores length-prefixed units, else None."""
    if not extradata or extradata[0] != 1:
        return None
    if codec == "h264" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 21:
        return (extradata[21] & 3) + 1
    return None


_Encoded = tuple[bytes, bool, int]
"""A re-encoded packet: payload, keyframe, presentation time (file milliseconds)."""


class _Reencoder:
    """Encodes decoded frames with the codec's software encoder, fixed settings, one thread."""

    def __init__(self, stream: VideoStream, frame_ms: int) -> None:
        codec = stream.codec_context.name
        name = ENCODERS.get(codec)
        if name is None:
            raise MediaError(f"no software encoder for {codec}: the window cannot be cut")
        ctx = av.CodecContext.create(name, "w")
        assert isinstance(ctx, av.VideoCodecContext)
        ctx.width = stream.codec_context.width
        ctx.height = stream.codec_context.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = MS
        ctx.framerate = Fraction(1000, frame_ms)
        ctx.gop_size = 600  # one keyframe per segment (the longest a segment is)
        if name == "mpeg4":
            ctx.bit_rate = 4_000_000  # no constant-quality mode: a rate well above a camera's
        # MPEG-4's VOL says whether B-frames follow (low_delay); the lead must say what the
        # copied run's says, or the decoder repeats or drops a frame where they meet.
        ctx.max_b_frames = 1 if codec == "mpeg4" and stream.codec_context.has_b_frames else 0
        ctx.thread_count = 1
        ctx.flags |= av.codec.context.Flags.bitexact
        ctx.options = dict(_ENCODER_OPTIONS[name])
        try:
            ctx.open()
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"{name} does not open: {exc}") from exc
        self._ctx = ctx
        self._length = _nal_length_size(codec, stream.codec_context.extradata)
        self._first = True

    def _out(self, packets: list[av.Packet]) -> list[_Encoded]:
        out = []
        for packet in packets:
            data = bytes(packet)
            if self._length is not None:
                data = _length_prefixed(data, self._length)
            out.append((data, bool(packet.is_keyframe), int(packet.pts or 0)))
        return out

    def encode(self, frame: VideoFrame, pts: int) -> list[_Encoded]:
        """Encode ``frame`` shown at file time ``pts`` (ms); packets ready now."""
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        frame = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
        frame.pts = pts
        frame.time_base = MS
        frame.pict_type = PictureType.I if self._first else PictureType.NONE
        self._first = False
        return self._out(self._ctx.encode(frame))

    def flush(self) -> list[_Encoded]:
        """The packets the encoder still holds."""
        return self._out(self._ctx.encode(None))


def _decoder(stream: VideoStream) -> av.VideoCodecContext:
    ctx = av.CodecContext.create(stream.codec_context.name, "r")
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.extradata = stream.codec_context.extradata
    # One thread: frame threads were seen to deadlock when a decoder is dropped mid-stream (an
    # abandoned cut), and the stored streams have one slice per frame, so slice threads add
    # nothing. Skipping non-reference frames saves more.
    ctx.thread_count = 1
    return ctx


class _Sink:
    """What the muxer writes into; :meth:`take` hands the bytes written so far on."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class _Segment:
    """Frames of the cut that are decoded and re-encoded (the lead or the tail).

    The decoder and encoder open at the segment's first packet and are released at its end, so
    at most one of each is alive at a time. Packets shown at no wanted time and referenced by
    none are not decoded at all.
    """

    def __init__(self, stream: VideoStream, plan: ClipCut, times: Sequence[int]) -> None:
        self._stream = stream
        self._plan = plan
        self.wanted = frozenset(times)
        self._dec: av.VideoCodecContext | None = None
        self._enc: _Reencoder | None = None
        self._origin: int | None = None
        self._done = False
        self.held: list[_Encoded] = []

    def _encode(self, frames: list[av.VideoFrame]) -> list[_Encoded]:
        assert self._enc is not None
        out: list[_Encoded] = []
        for frame in frames:
            t = _ms(frame.pts, frame.time_base or self._stream.time_base) - (self._origin or 0)
            if t in self.wanted:
                out += self._enc.encode(frame, t - self._plan.origin)
        return [(data, key, pts + self._plan.origin) for data, key, pts in out]

    def feed(self, packet: av.Packet, pts: int) -> list[_Encoded]:
        """Decode one stored packet (clip time ``pts``); the re-encoded packets ready now,
        with their clip times."""
        if self._done:
            return []
        if self._dec is None:
            self._dec = _decoder(self._stream)
            self._enc = _Reencoder(self._stream, self._plan.frame_ms)
            # Frame times are clip milliseconds: the packet's own time less the clip's.
            self._origin = _ms(packet.pts, packet.time_base) - pts
        self._dec.skip_frame = "DEFAULT" if pts in self.wanted else "NONREF"
        return self._encode(self._dec.decode(packet))

    def finish(self) -> list[_Encoded]:
        """Drain decoder and encoder; the rest of the segment's packets."""
        if self._done or self._dec is None or self._enc is None:
            self._done = True
            return []
        self._done = True
        out = self._encode(self._dec.decode(None))
        out += [(data, key, pts + self._plan.origin) for data, key, pts in self._enc.flush()]
        self._dec = self._enc = None
        return out

    def hold(self, packets: list[_Encoded]) -> None:
        """Keep packets to mux after the copied run (the tail)."""
        self.held += packets


def cut_stream(raw: Readable, plan: ClipCut) -> Iterator[bytes]:
    """The cut file's bytes, front to back, made in one pass over the stored clip ``raw``."""
    container, stream, src = _open_input(raw)
    sink = _Sink()
    out: OutputContainer | None = None
    try:
        muxer = out = av.open(sink, mode="w", format="matroska", options=dict(_MUXER_OPTIONS))
        ostream = muxer.add_stream_from_template(stream, opaque=True)
        ostream.time_base = MS
        ostream.metadata["NUMBER_OF_FRAMES"] = str(plan.frames)
        # Read by the muxer to write the header's Duration (the output is never seeked).
        ostream.metadata["DURATION"] = _duration_tag(plan.duration)
        written = 0

        def mux(data: bytes, pts: int, key: bool) -> None:
            nonlocal written
            if written >= len(plan.dts):
                raise MediaError(f"clip {plan.clip_id}: the cut made more frames than planned")
            packet = av.Packet(data)
            packet.stream = ostream
            packet.time_base = MS
            packet.pts = pts - plan.origin
            # Re-encoded MPEG-4 may reorder one B-frame: decode times keep that much room.
            packet.dts = plan.dts[written] - 2 * plan.frame_ms
            packet.duration = plan.frame_ms
            packet.is_keyframe = key
            muxer.mux(packet)
            written += 1

        c0, c1 = plan.copy
        lead = _Segment(stream, plan, plan.lead)
        tail = _Segment(stream, plan, plan.tail)
        index = -1
        end = plan.base + len(plan.packets)
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                index += 1
                if index < plan.base:
                    continue
                if index >= end:
                    break
                i = index - plan.base
                pts = plan.packets[i].pts
                if lead.wanted and (c0 == c1 or i < c0):
                    for data, key, t in lead.feed(packet, pts):
                        mux(data, t, key)
                    if i + 1 == c0:
                        for data, key, t in lead.finish():
                            mux(data, t, key)
                if c0 <= i < c1:
                    mux(bytes(packet), pts, bool(packet.is_keyframe))
                if tail.wanted and i >= plan.tail_from:
                    tail.hold(tail.feed(packet, pts))
                if i + 1 == len(plan.packets):
                    break
                yield sink.take()
        except av.error.FFmpegError as exc:
            src.check()
            raise MediaError(f"clip {plan.clip_id} does not cut: {exc}") from exc
        src.check()
        # No copied run (no usable keyframe in the window): the lead is the whole cut.
        for data, key, t in lead.finish():
            mux(data, t, key)
        tail.hold(tail.finish())
        for data, key, t in tail.held:
            mux(data, t, key)
        if written != plan.frames:
            raise MediaError(
                f"clip {plan.clip_id}: the cut made {written} frames, {plan.frames} planned"
            )
        out = None
        muxer.close()
        yield sink.take()
    finally:
        if out is not None:
            try:
                out.close()
            except (av.error.FFmpegError, ValueError, OSError) as exc:
                log.debug("closing an abandoned cut's muxer: %s", exc)
        container.close()


class _ChunkStream:
    """A readable over an iterator of byte chunks (the cut, made as it is read)."""

    def __init__(self, chunks: Iterator[bytes], closer: PlainStreamReader, label: str) -> None:
        self._chunks: Iterator[bytes] | None = chunks
        self._closer = closer
        self._label = label
        self._buf = bytearray()

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes of the cut; b"" at the end. A stored clip that does not cut is a
        VaultError (delivery fails with it, as for any unreadable clip)."""
        while self._chunks is not None and (n < 0 or len(self._buf) < n):
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                self._chunks = None
            except MediaError as exc:
                self.close()
                raise VaultError(f"{self._label} cannot be cut: {exc}") from exc
        if n < 0 or n >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:n])
            del self._buf[:n]
        return data

    def close(self) -> None:
        """Stop the cut and close the stored clip's reader. Idempotent."""
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()
        self._closer.close()


class WindowCutter:
    """The real :class:`~agent.release.cut_api.Cutter`: frame-exact cuts out of the vault.

    Plans are kept for the last ``cache`` (clip, window) pairs: a final clip never changes (a
    new recording is a new id), and the app shows the preview of every pending request each
    time its list refreshes.
    """

    def __init__(self, vault: ClipStore, *, cache: int = 32) -> None:
        self._vault = vault
        self._cache: OrderedDict[tuple[str, datetime, datetime], ClipCut | None] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    def plan(self, clip_id: str, window_start: datetime, window_end: datetime) -> ClipCut | None:
        """The cut of one clip (what :meth:`cut` would release), or None."""
        key = (clip_id, window_start, window_end)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        info = self._vault.get_clip(clip_id)
        reader = self._vault.open_clip(clip_id)
        try:
            plan = plan_cut(
                reader, clip_id=clip_id, clip_start=info.start, window_start=window_start,
                window_end=window_end, source_sha256=info.sha256,
            )
        except MediaError as exc:
            raise VaultError(f"clip {clip_id} cannot be cut: {exc}") from exc
        finally:
            reader.close()
        with self._lock:
            self._cache[key] = plan
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return plan

    def preview(self, window_start: datetime, window_end: datetime) -> list[ClipCut]:
        """Every file a release of the window would hold, oldest first (none is valid)."""
        clips = self._vault.clips_overlapping(window_start, window_end + _END_SLACK)
        plans = (self.plan(c.id, window_start, window_end) for c in clips)
        return [p for p in plans if p is not None]

    def cut(self, clip_id: str, window_start: datetime, window_end: datetime) -> CutFile | None:
        """The released file for one clip: streamed as it is read; None when no frame of
        the clip is in the window."""
        plan = self.plan(clip_id, window_start, window_end)
        if plan is None:
            return None
        return self.cut_planned(plan)

    def cut_planned(self, plan: ClipCut) -> CutFile:
        """The file ``plan`` describes (a plan shown to the owner is cut exactly)."""
        if plan.source_sha256 is None:
            raise VaultError(f"clip {plan.clip_id} has no recorded SHA-256 (not final)")
        info = self._vault.get_clip(plan.clip_id)
        reader = self._vault.open_clip(plan.clip_id)
        return CutFile(
            stream=_ChunkStream(cut_stream(reader, plan), reader, f"clip {plan.clip_id}"),
            start=plan.first,
            end=plan.last,
            frames=plan.frames,
            content_type=CONTENT_TYPE,
            source_sha256=plan.source_sha256,
            clock_synchronized=bool(getattr(info, "clock_synchronized", False)),
        )
