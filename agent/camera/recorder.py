"""From motion decisions to clips in the vault.

:class:`ClipPolicy` is the pure state machine deciding, frame by frame, when a clip starts,
continues, splits and ends::

    idle ──motion──> recording ──no motion──> post_roll ──tail elapsed──> idle
                        ^                         │
                        └────────motion───────────┘

- a clip starts on the first motion frame and begins with the pre-roll: the frames of the last
  ``pre_roll`` seconds, held compressed in a RAM ring buffer (never on disk) that always starts
  at a keyframe (for H.264/H.265/MPEG-4 the pre-roll may reach back to the keyframe before);
- it continues until no motion has been seen for the tail: ``max(post_roll, merge_gap)``, so
  motion that resumes within ``merge_gap`` continues the same clip even when ``post_roll`` is
  shorter (the gap is recorded rather than splitting one visit into two clips);
- a clip reaching ``max_clip`` is finished and the next frame opens a new one at once (no
  frame is lost or duplicated across the split).

:class:`Recorder` applies those decisions: it keeps the pre-roll ring, muxes stored packets into
Matroska (:class:`agent.camera.media.ClipMuxer`, live mode) and streams the bytes into a
:class:`ClipSink` (the vault), with an encrypted thumbnail per clip. Frames reach it already
privacy-masked and encoded (see :class:`agent.camera.pipeline.FrameEncoder`), so every byte it
writes is masked.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

import av.error
import cv2
import numpy as np

from agent.camera.frame import Frame, Image, jpeg_size
from agent.camera.media import CONTENT_TYPE, ClipMuxer, EncodedPacket, MediaError, StreamFormat
from agent.config import RecordingConfig
from agent.errors import AuditError, VaultError
from agent.timeutil import rfc3339

log = logging.getLogger(__name__)

THUMBNAIL_WIDTH = 480
RETRY_AFTER = 5.0
"""Seconds of frames after a vault failure before motion may open a clip again."""
THUMBNAIL_QUALITY = 80


class ClipSink(Protocol):
    """Where clips go (``agent.vault.Vault`` fits)."""

    def create_clip(self, start: datetime, content_type: str) -> ClipWriter:
        """Open a new clip starting at ``start``."""
        ...


class ClipWriter(Protocol):
    """One clip being written (``agent.vault.ClipWriter`` fits)."""

    @property
    def id(self) -> str:
        """The clip's id."""
        ...

    def write(self, data: bytes) -> None:
        """Append container bytes."""
        ...

    def set_thumbnail(self, jpeg: bytes) -> None:
        """Store the clip's thumbnail."""
        ...

    def finish(
        self,
        end: datetime,
        frames: int,
        *,
        duration: float | None = None,
        codec: str | None = None,
    ) -> object:
        """Seal and publish the clip (the index keeps frames, duration and codec)."""
        ...

    def abort(self) -> None:
        """Throw the unfinished clip away."""
        ...


class RecState(StrEnum):
    """Where the policy is."""

    IDLE = "idle"
    RECORDING = "recording"
    POST_ROLL = "post_roll"


@dataclass(frozen=True)
class Decision:
    """What to do with one frame, in this order: finish the open clip, open a new one (with
    the pre-roll when ``preroll``), write the frame into the open clip."""

    finish: bool = False
    start: bool = False
    preroll: bool = False
    write: bool = False


_BUFFER = Decision()


class ClipPolicy:
    """The recording state machine (pure; durations in seconds, ``ts`` monotonic seconds)."""

    def __init__(self, post_roll: float, max_clip: float, merge_gap: float) -> None:
        if max_clip <= 0:
            raise ValueError("max_clip must be positive")
        self.tail = max(post_roll, merge_gap)
        self.max_clip = max_clip
        self.state = RecState.IDLE
        self.clip_start: float | None = None
        self.last_motion: float | None = None

    def reset(self) -> None:
        """Back to idle (the open clip was lost); the next motion starts a new clip."""
        self.state = RecState.IDLE
        self.clip_start = None
        self.last_motion = None

    def step(self, ts: float, motion: bool, preroll_start: float | None = None) -> Decision:
        """Decide for the frame at ``ts``; ``preroll_start`` is the oldest buffered frame's
        time (the start of a clip opened now)."""
        if self.state is RecState.IDLE:
            if not motion:
                return _BUFFER
            self.state = RecState.RECORDING
            self.last_motion = ts
            self.clip_start = ts if preroll_start is None else min(preroll_start, ts)
            return Decision(start=True, preroll=True, write=True)
        assert self.last_motion is not None and self.clip_start is not None
        if motion:
            self.last_motion = ts
        elif ts - self.last_motion > self.tail:
            self.reset()
            return Decision(finish=True)
        self.state = RecState.RECORDING if motion else RecState.POST_ROLL
        if ts - self.clip_start >= self.max_clip:
            self.clip_start = ts
            return Decision(finish=True, start=True, write=True)
        return Decision(write=True)


@dataclass(frozen=True)
class RecordingParams:
    """Recorder settings in seconds; :meth:`from_config` maps the ``recording`` section."""

    pre_roll: float = 5.0
    post_roll: float = 10.0
    max_clip: float = 120.0
    merge_gap: float = 3.0

    @classmethod
    def from_config(cls, cfg: RecordingConfig) -> RecordingParams:
        """The recorder settings of a ``recording`` config section."""
        return cls(
            pre_roll=cfg.pre_roll.total_seconds(),
            post_roll=cfg.post_roll.total_seconds(),
            max_clip=cfg.max_clip.total_seconds(),
            merge_gap=cfg.merge_gap.total_seconds(),
        )


@dataclass(frozen=True, slots=True)
class StoredFrame:
    """A frame as it is stored: one compressed (masked) packet with its times."""

    ts: float
    wall: datetime
    packet: EncodedPacket

    @property
    def keyframe(self) -> bool:
        """Whether a clip may start here."""
        return self.packet.keyframe or not self.packet.fmt.inter

    @property
    def fmt(self) -> StreamFormat:
        """The packet's stream format."""
        return self.packet.fmt


class PreRoll:
    """The RAM ring of the last ``seconds`` of compressed frames (at most ``max_frames``),
    always starting at a keyframe: it reaches back to the newest keyframe at or before the
    window's start, so a clip opened from it decodes from its first frame."""

    def __init__(self, seconds: float, max_frames: int) -> None:
        self.seconds = seconds
        self.max_frames = max(max_frames, 1)
        self._frames: deque[StoredFrame] = deque()
        self.enabled = seconds > 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def bytes(self) -> int:
        """Compressed bytes held."""
        return sum(len(f.packet.data) for f in self._frames)

    def oldest(self, now: float) -> float | None:
        """The time of the oldest frame still within the window ending at ``now``."""
        self._trim(now)
        return self._frames[0].ts if self._frames else None

    def push(self, frame: StoredFrame) -> None:
        """Add a frame, dropping what fell out of the window."""
        if not self.enabled:
            return
        if not self._frames and not frame.keyframe:
            return  # nothing decodes before the first keyframe
        if self._frames and frame.fmt is not self._frames[-1].fmt:
            self._frames.clear()  # a new stream: older packets cannot join its clips
            if not frame.keyframe:
                return
        self._frames.append(frame)
        self._trim(frame.ts)

    def drain(self, now: float) -> list[StoredFrame]:
        """Take every frame within the window ending at ``now``, oldest first."""
        self._trim(now)
        frames = list(self._frames)
        self._frames.clear()
        return frames

    def _trim(self, now: float) -> None:
        frames = self._frames
        while frames and not frames[0].fmt.inter and (
            now - frames[0].ts > self.seconds or len(frames) > self.max_frames
        ):
            frames.popleft()
        # Inter-coded: whole groups of pictures go, once the next one starts early enough.
        while frames and frames[0].fmt.inter:
            nxt = next((i for i in range(1, len(frames)) if frames[i].keyframe), None)
            if nxt is None:
                break
            if now - frames[nxt].ts < self.seconds and len(frames) <= self.max_frames:
                break
            for _ in range(nxt):
                frames.popleft()
        if len(frames) > self.max_frames:
            # A stream that never sends another keyframe cannot grow the ring.
            frames.clear()


def thumbnail_of(image: Image) -> bytes | None:
    """A small JPEG of a (masked) BGR image."""
    if image.shape[1] > THUMBNAIL_WIDTH:
        height = max(1, round(image.shape[0] * THUMBNAIL_WIDTH / image.shape[1]))
        image = cv2.resize(image, (THUMBNAIL_WIDTH, height), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])
    return buf.tobytes() if ok else None


def make_thumbnail(jpeg: bytes) -> bytes | None:
    """A small JPEG of a stored (already masked) JPEG frame, decoded at reduced size."""
    size = jpeg_size(jpeg)
    if size is None:
        return None
    flag = cv2.IMREAD_COLOR
    for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if size[0] // factor >= THUMBNAIL_WIDTH:
            flag = reduced
            break
    image: Image | None = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flag)
    return None if image is None else thumbnail_of(image)


Thumbnailer = Callable[[Frame], "bytes | None"]
"""Makes a clip's thumbnail from a frame (masked like the stored footage); None when the
frame has no picture to show (a compressed packet that was not decoded)."""


class _OpenClip:
    """The clip being written: its writer, muxer and bookkeeping."""

    def __init__(self, writer: ClipWriter, muxer: ClipMuxer, first: StoredFrame) -> None:
        self.writer = writer
        self.muxer = muxer
        self.t0 = first.ts
        self.start = first.wall
        self.last_wall = first.wall
        self.frames = 0
        self.thumbnail = False

    @property
    def bytes(self) -> int:
        """Container bytes written so far."""
        return self.muxer.bytes


class Recorder:
    """Turns (frame, motion) pairs into clips in a :class:`ClipSink`.

    ``encode`` turns a captured frame into the stored (masked) packets: none, one, or several
    (an encoder may hold frames back); it is only called for frames the recorder keeps
    (pre-roll or clip). A frame that gives no packet is skipped and counted. ``thumbnail``
    makes each clip's thumbnail from one of its frames. Vault failures never propagate: the
    clip is aborted and counted, and motion opens a new clip ``RETRY_AFTER`` seconds later.
    """

    def __init__(
        self,
        sink: ClipSink,
        params: RecordingParams,
        encode: Callable[[Frame], list[StoredFrame]],
        *,
        fps: float,
        on_clip: Callable[[object], None] | None = None,
        thumbnail: Thumbnailer | None = None,
    ) -> None:
        self.sink = sink
        self.params = params
        self.encode = encode
        # The encoder knows the privacy masks, so by default it makes the thumbnails too.
        self.thumbnail: Thumbnailer | None = (
            thumbnail if thumbnail is not None else getattr(encode, "thumbnail", None)
        )
        self.fps = fps
        self.on_clip = on_clip
        self.policy = ClipPolicy(params.post_roll, params.max_clip, params.merge_gap)
        # Bounded by frame count as well as time, so a source that lies about timestamps
        # cannot make the ring grow.
        self.preroll = PreRoll(params.pre_roll, int(params.pre_roll * fps * 1.5) + 2)
        self._clip: _OpenClip | None = None
        self._pending: list[StoredFrame] = []
        self._waiting = False
        self._last_frame: Frame | None = None
        self._retry_at: float | None = None
        self.clips = 0
        self.failures = 0
        self.skipped = 0
        self.last_clip: str | None = None
        self.last_error: str | None = None
        self.codec: str | None = None
        self.stored_bytes = 0
        self.stored_seconds = 0.0

    @property
    def recording(self) -> bool:
        """Whether a clip is open."""
        return self._clip is not None

    def push(self, frame: Frame, motion: bool) -> Decision:
        """Feed one frame and whether it shows motion; returns what was decided."""
        decision = self._push(frame, motion)
        self._last_frame = frame if self._waiting else None
        if self._clip is None and self.policy.state is not RecState.IDLE and not self._waiting:
            # The clip was lost to a vault error: idle again; motion opens a new clip after
            # RETRY_AFTER (a vault that recovers records the rest of the event, starting with
            # the pre-roll; a broken one is not hammered on every frame).
            self.policy.reset()
            self._retry_at = frame.ts + RETRY_AFTER
        return decision

    def _push(self, frame: Frame, motion: bool) -> Decision:
        if self._retry_at is not None:
            if frame.ts < self._retry_at:
                motion = False  # frames still go to the pre-roll ring meanwhile
            else:
                self._retry_at = None
        decision = self.policy.step(frame.ts, motion, self.preroll.oldest(frame.ts))
        if decision.finish:
            self._finish()
        if not decision.write:
            self._waiting = False
            if self.preroll.enabled:
                for stored in self._stored(frame):
                    self.preroll.push(stored)
            return decision
        packets = self._stored(frame)
        if decision.start or decision.preroll:
            self._pending = self.preroll.drain(frame.ts) if decision.preroll else []
        start = decision.start
        for stored in packets:
            clip = self._clip
            if start or clip is None:
                start = False  # the rest of this frame's packets join the new clip
                frames = [f for f in self._pending if f.fmt is stored.fmt]
                frames.append(stored)
                self._pending = []
                # Nothing decodes before a keyframe: a clip starts at one (the pre-roll ring
                # starts at one; a copied stream may make the clip wait for the next).
                while frames and not frames[0].keyframe:
                    frames.pop(0)
                if not frames:
                    self._waiting = True
                    continue
                self._waiting = False
                self._open(frames, frame)
            elif stored.fmt is not clip.muxer.fmt:
                # The camera came back at another resolution or with other parameters: a
                # clip holds one stream.
                self._finish()
                if stored.keyframe:
                    self._open([stored], frame)
                else:
                    self._waiting = True
            else:
                self._write(stored)
                if not clip.thumbnail:
                    self._thumbnail(clip, frame)
        if not packets and self._clip is None:
            self._waiting = True  # an encoder holding frames back: the clip opens with them
        return decision

    def close(self) -> None:
        """Finish the open clip, if any (at shutdown or when the camera drops). Idempotent."""
        flush = getattr(self.encode, "flush", None)
        if self._clip is None and self._waiting and flush is not None:
            # The clip's first frames are all still inside the encoder: open it with them.
            frames = [*self._pending, *flush()]
            self._pending = []
            while frames and not frames[0].keyframe:
                frames.pop(0)
            if frames:
                self._open([f for f in frames if f.fmt is frames[0].fmt], self._last_frame)
        self._finish()
        self._waiting = False
        self.policy.reset()

    def stats(self) -> dict[str, Any]:
        """Counters and the open clip, for status."""
        clip = self._clip
        return {
            "state": self.policy.state.value,
            "clips": self.clips,
            "failures": self.failures,
            "skipped_frames": self.skipped,
            "last_clip": self.last_clip,
            "last_error": self.last_error,
            "preroll_frames": len(self.preroll),
            "preroll_bytes": self.preroll.bytes,
            "codec": self.codec,
            "stored_bytes_per_minute": round(self.stored_bytes * 60 / self.stored_seconds)
            if self.stored_seconds > 0
            else None,
            "current": None
            if clip is None
            else {
                "id": clip.writer.id,
                "start": rfc3339(clip.start),
                "frames": clip.frames,
                "bytes": clip.bytes,
            },
        }

    def _stored(self, frame: Frame) -> list[StoredFrame]:
        packets = self.encode(frame)
        if not packets:
            self.skipped += 1
        return packets

    def _open(self, frames: list[StoredFrame], frame: Frame | None) -> None:
        first = frames[0]
        try:
            writer = self.sink.create_clip(first.wall, CONTENT_TYPE)
        except (VaultError, OSError) as exc:
            self._failed(None, f"cannot create a clip: {exc}")
            return
        try:
            muxer = ClipMuxer(writer, first.fmt, fps=self.fps)
        except (av.error.FFmpegError, MediaError, ValueError) as exc:
            self._failed(None, f"clip {writer.id}: cannot start the container: {exc}")
            self._abort_writer(writer)
            return
        clip = _OpenClip(writer, muxer, first)
        self._clip = clip
        self.codec = first.fmt.codec
        if frame is not None:
            self._thumbnail(clip, frame)
        if self._clip is not clip:
            return
        for f in frames:
            self._write(f)
            if self._clip is not clip:
                return

    def _thumbnail(self, clip: _OpenClip, frame: Frame) -> None:
        if self.thumbnail is None:
            clip.thumbnail = True
            return
        thumb = self.thumbnail(frame)
        if thumb is None:
            return
        try:
            clip.writer.set_thumbnail(thumb)
        except (VaultError, OSError, ValueError) as exc:
            self._failed(clip, f"clip {clip.writer.id}: {exc}")
            return
        clip.thumbnail = True

    def _write(self, frame: StoredFrame) -> None:
        clip = self._clip
        assert clip is not None
        try:
            clip.muxer.add(frame.packet, frame.ts - clip.t0)
        except (VaultError, OSError, av.error.FFmpegError, ValueError) as exc:
            self._failed(clip, f"clip {clip.writer.id}: {exc}")
            return
        clip.frames += 1
        clip.last_wall = max(clip.last_wall, frame.wall)

    def _finish(self) -> None:
        clip = self._clip
        if clip is None:
            return
        # An encoder with lookahead still holds the clip's last frames: they belong to it.
        flush = getattr(self.encode, "flush", None)
        if flush is not None and clip.muxer.fmt.inter:
            for stored in flush():
                if self._clip is clip and stored.fmt is clip.muxer.fmt:
                    self._write(stored)
        if self._clip is not clip:
            return  # writing them failed: the clip is already aborted
        self._clip = None
        if clip.frames == 0:
            self._abort(clip)
            return
        try:
            clip.muxer.close()
            muxer = clip.muxer
            info = clip.writer.finish(
                clip.last_wall, clip.frames, duration=muxer.duration, codec=muxer.fmt.codec
            )
        except (AuditError, VaultError, OSError, ValueError, av.error.FFmpegError) as exc:
            # AuditError: clip_recorded could not be made durable (disk full), so the clip was
            # not published; it is a recording failure like any other, shown in status.
            self._failed(clip, f"clip {clip.writer.id} could not be finished: {exc}")
            return
        self.clips += 1
        self.last_clip = clip.writer.id
        self.stored_bytes += clip.muxer.bytes
        self.stored_seconds += clip.muxer.duration
        log.info(
            "clip %s recorded: %d frames, %s to %s",
            clip.writer.id, clip.frames, rfc3339(clip.start), rfc3339(clip.last_wall),
        )
        if self.on_clip is not None:
            self.on_clip(info)

    def _failed(self, clip: _OpenClip | None, message: str) -> None:
        self.failures += 1
        self.last_error = message
        log.error("recording failed, the clip is discarded: %s", message)
        if clip is not None:
            self._abort(clip)
        self._clip = None

    @classmethod
    def _abort(cls, clip: _OpenClip) -> None:
        clip.muxer.abort()
        cls._abort_writer(clip.writer)

    @staticmethod
    def _abort_writer(writer: ClipWriter) -> None:
        try:
            writer.abort()
        except (VaultError, OSError) as exc:
            log.error("could not discard clip %s: %s", writer.id, exc)
