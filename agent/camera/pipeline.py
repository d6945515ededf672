"""camera → motion → recorder → vault, as one daemon worker.

:class:`FrameEncoder` and :class:`FrameProcessor` are pure (a frame in, a decision and sink
calls out); :class:`CameraWorker` is the thin threaded shell: a capture thread feeding a
bounded queue, and the worker's own thread processing frames until the stop event, then
finishing the open clip.

What is stored (``recording.codec``, :class:`FrameEncoder`):

- ``auto``: a compressed camera stream (H.264/H.265/MPEG-4) is stored packet for packet and an
  MJPEG camera's JPEGs as they are; decoded frames (synthetic, picamera2, YUYV cameras) are
  encoded to H.264. Privacy masks force H.264 from decoded, masked frames: a mask must be
  burned into the pixels before anything is stored.
- ``copy``: the camera's own stream only (``config check`` refuses it for raw sources and with
  masks); ``h264``: always H.264; ``mjpeg``: always JPEG frames (the pre-2 format).

A JPEG frame is never fully decoded for motion (the decoder's 1/2-1/8 scaling gives the small
grey copy). Frames are encoded only when the recorder keeps them; after a gap the H.264 encoder
starts with a keyframe.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import cv2
import numpy as np

from agent.camera.capture import Backoff, Capture, FrameQueue
from agent.camera.frame import Clock, Frame, Image, jpeg_size
from agent.camera.masks import Polygon, PrivacyMasker
from agent.camera.media import (
    DEFAULT_PRESET,
    EncodedPacket,
    H264Encoder,
    MediaError,
    StreamFormat,
)
from agent.camera.motion import MotionDetector, MotionParams, MotionResult
from agent.camera.recorder import (
    ClipSink,
    Recorder,
    RecordingParams,
    RecState,
    StoredFrame,
    thumbnail_of,
)
from agent.camera.sources import Source, source_from_config
from agent.config import Config
from agent.diagnostics import stack_of

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5
"""Seconds before the first reopen of a failed camera."""


def single_threaded_opencv() -> None:
    """Run OpenCV's own operations on the calling thread (process-wide).

    Per frame the pipeline only calls OpenCV on small images or once per frame (a resize, a
    blur, one JPEG encode); handing those to OpenCV's worker pool costs more than it saves: on
    two cores the pool's wake-ups and spinning added 0.35-0.55 ms of CPU per 768x576 frame
    (``bench/pipeline.py``) and competed with the capture thread's decoder. The agent already
    spreads its work over threads of its own (capture, processing, MQTT).
    """
    cv2.setNumThreads(1)

_NO_MOTION = MotionResult(motion=False)


class FrameEncoder:
    """The packets stored for a frame, privacy-masked, in the codec ``recording.codec`` asks
    for (see the module docstring)."""

    def __init__(
        self,
        privacy_masks: list[Polygon] | tuple[Polygon, ...],
        quality: int,
        *,
        codec: str = "auto",
        fps: float = 10.0,
        preset: str = DEFAULT_PRESET,
        hardware: bool = True,
    ) -> None:
        self.masker = PrivacyMasker(privacy_masks)
        self.quality = quality
        self.codec = codec
        self.h264 = H264Encoder(fps, preset=preset, hardware=hardware)
        self.encoded = 0
        self.passed_through = 0
        self.copied = 0
        self._jpeg_formats: dict[tuple[int, int], StreamFormat] = {}
        self._last_seq: int | None = None
        self._image: tuple[int, Image] | None = None

    def mode(self, frame: Frame) -> str:
        """How ``frame`` is stored: ``copy``, ``mjpeg`` or ``h264``."""
        codec = self.codec
        if codec in ("auto", "copy"):
            if self.masker:
                return "h264"
            if frame.packet is not None:
                return "copy"
            return "mjpeg" if frame.jpeg is not None else "h264"
        return codec

    def __call__(self, frame: Frame) -> list[StoredFrame]:
        """The stored packets for ``frame`` (none when it cannot be decoded or encoded)."""
        gap = self._last_seq is not None and frame.seq != self._last_seq + 1
        self._last_seq = frame.seq
        mode = self.mode(frame)
        if mode == "copy":
            assert frame.packet is not None
            self.copied += 1
            return [StoredFrame(frame.ts, frame.wall, frame.packet)]
        if mode == "mjpeg":
            return self._mjpeg(frame)
        image = self._masked(frame)
        if image is None:
            return []
        try:
            packets = self.h264.encode(image, frame.ts, frame.wall, keyframe=gap)
        except (MediaError, ValueError) as exc:
            log.error("H.264 encoding failed: %s", exc)
            return []
        self.encoded += 1
        return [StoredFrame(ts, wall, packet) for ts, wall, packet in packets]

    def flush(self) -> list[StoredFrame]:
        """The packets the H.264 encoder still holds (a clip is ending); the next frame
        starts a new stream with a keyframe."""
        try:
            packets = self.h264.flush()
        except (MediaError, ValueError) as exc:
            log.error("H.264 encoding failed: %s", exc)
            return []
        return [StoredFrame(ts, wall, packet) for ts, wall, packet in packets]

    def thumbnail(self, frame: Frame) -> bytes | None:
        """A small JPEG of ``frame`` as stored (masked); None without a picture."""
        cached = self._image
        image = cached[1] if cached is not None and cached[0] == frame.seq else None
        if image is None:
            if frame.image is None and frame.jpeg is None:
                return None
            image = self._masked(frame)
        return None if image is None else thumbnail_of(image)

    def _masked(self, frame: Frame) -> Image | None:
        if frame.image is not None:
            # Masking draws on the image: work on a copy, the frame is shared.
            image = frame.image.copy() if self.masker else frame.image
        elif frame.jpeg is not None:
            decoded: Image | None = cv2.imdecode(
                np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR
            )
            if decoded is None:
                return None
            image = decoded
        else:
            return None  # a compressed packet that was not decoded
        self.masker.apply(image)
        self._image = (frame.seq, image)
        return image

    def _mjpeg(self, frame: Frame) -> list[StoredFrame]:
        if frame.jpeg is not None and not self.masker:
            jpeg: bytes = frame.jpeg
            self.passed_through += 1
        else:
            image = self._masked(frame)
            if image is None:
                return []
            ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                return []
            jpeg = buf.tobytes()
            self.encoded += 1
        size = jpeg_size(jpeg)
        if size is None:
            return []
        fmt = self._jpeg_formats.get(size)
        if fmt is None:
            try:
                fmt = StreamFormat.from_sample(jpeg, "mjpeg")
            except MediaError as exc:
                log.warning("a JPEG frame is not usable: %s", exc)
                return []
            self._jpeg_formats = {size: fmt}
        return [StoredFrame(frame.ts, frame.wall, EncodedPacket(jpeg, True, fmt))]


class FrameProcessor:
    """Motion detection and recording for a stream of frames (pure; no threads)."""

    def __init__(self, motion: MotionParams | None, recorder: Recorder) -> None:
        self.motion = motion
        self.recorder = recorder
        self._detector: MotionDetector | None = None
        self._last = _NO_MOTION
        self.frames = 0
        self.motion_frames = 0
        self.events = 0

    @classmethod
    def from_config(cls, cfg: Config, sink: ClipSink, *, fps: float) -> FrameProcessor:
        """A processor for the ``motion`` and ``recording`` sections, recording into ``sink``.

        Also makes OpenCV single-threaded for the process (see :func:`single_threaded_opencv`).
        """
        single_threaded_opencv()
        encoder = FrameEncoder(
            [tuple(tuple(p) for p in poly) for poly in cfg.recording.privacy_masks],
            cfg.recording.jpeg_quality,
            codec=cfg.recording.codec,
            fps=fps,
        )
        recorder = Recorder(sink, RecordingParams.from_config(cfg.recording), encoder, fps=fps)
        motion = MotionParams.from_config(cfg.motion) if cfg.motion.enabled else None
        return cls(motion, recorder)

    @property
    def detector(self) -> MotionDetector | None:
        """The detector for the current frame size (None until a frame arrived)."""
        return self._detector

    def process(self, frame: Frame) -> MotionResult:
        """Detect motion in ``frame`` and let the recorder act on it."""
        self.frames += 1
        if self.motion is None:
            result = _NO_MOTION
        else:
            det = self._detector
            if det is None or det.frame_size != (frame.width, frame.height):
                det = self._detector = MotionDetector(self.motion, frame.width, frame.height)
            if frame.image is None and frame.jpeg is None:
                # A compressed frame not decoded (CPU budget): it moves like the last one.
                result = self._last
            else:
                result = self._last = det.detect_frame(frame)
        if result.motion:
            self.motion_frames += 1
        decision = self.recorder.push(frame, result.motion)
        if decision.preroll:
            self.events += 1
        return result

    def close(self) -> None:
        """Finish the open clip (idempotent)."""
        self.recorder.close()

    def stats(self) -> dict[str, Any]:
        """Motion and recorder state for status."""
        det = self._detector
        return {
            "motion": {
                "enabled": self.motion is not None,
                "frames": self.frames,
                "motion_frames": self.motion_frames,
                "events": self.events,
                "calibrating": bool(det and det.calibrating),
                "recalibrations": det.recalibrations if det else 0,
                "detection_size": list(det.size) if det else None,
            },
            "recorder": self.recorder.stats(),
        }


class CameraWorker:
    """The daemon's camera worker: capture thread + processing until the stop event."""

    name = "camera"

    def __init__(
        self,
        source: Source,
        processor: FrameProcessor,
        *,
        clock: Clock,
        queue_frames: int = 8,
        backoff_max: float = 30.0,
        join_timeout: float = 15.0,
        stall_timeout: float = 2.0,
    ) -> None:
        self.source = source
        self.processor = processor
        self.clock = clock
        self.queue = FrameQueue(queue_frames)
        self.capture = Capture(
            source,
            self.queue,
            clock=clock,
            backoff=Backoff(min(INITIAL_BACKOFF, backoff_max), backoff_max),
            stall_after=stall_timeout,
        )
        self.join_timeout = join_timeout
        self.outages = 0
        self.errors = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._rate_mark: tuple[float, int] | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Config, sink: ClipSink, clock: Clock) -> CameraWorker:
        """The worker ``camera``, ``motion`` and ``recording`` describe, recording into ``sink``.

        Raises CameraError when the source can never work (picamera2 without its module).
        """
        # A compressed stream that is re-encoded (h264/mjpeg, or masks to burn in) must be
        # decoded frame by frame; a copied one only for motion.
        reencode = cfg.recording.codec in ("h264", "mjpeg") or bool(cfg.recording.privacy_masks)
        source = source_from_config(cfg.camera, clock, decode_all=reencode)
        processor = FrameProcessor.from_config(cfg, sink, fps=cfg.camera.fps)
        return cls(
            source,
            processor,
            clock=clock,
            queue_frames=cfg.camera.queue_frames,
            backoff_max=cfg.camera.reopen_backoff_max.total_seconds(),
            stall_timeout=cfg.camera.stall_timeout.total_seconds(),
        )

    def run(self, stop: threading.Event) -> None:
        """Process frames until ``stop`` (or a non-looping file ends); then finish the clip."""
        thread = self._thread = self.capture.start(stop)
        try:
            while not stop.is_set():
                frame = self.queue.get(timeout=min(0.5, self.capture.stall_after / 2))
                if frame is None:
                    if self.queue.closed:
                        break
                    self.check_outage()
                    continue
                self._process(frame)
            # Frames already captured belong to the clip being finished.
            for frame in self.queue.drain():
                self._process(frame)
        finally:
            thread.join(self.join_timeout)
            if thread.is_alive():
                log.error(
                    "the camera thread did not stop within %.0f s; it is at:\n%s",
                    self.join_timeout, stack_of(thread),
                )
            with self._lock:
                self.processor.close()

    def check_outage(self) -> bool:
        """Close the open clip when the camera is down or stalled (``camera.stall_timeout``
        without a frame): footage on either side of an outage goes into two clips, never one
        with a hole. True when a clip was closed."""
        recorder = self.processor.recorder
        if not recorder.recording and recorder.policy.state is RecState.IDLE:
            return False
        state = self.capture.stats()["state"]
        if state in ("streaming", "starting") or len(self.queue):
            return False
        log.warning("camera %s is %s: closing the open clip", self.capture.description, state)
        self.outages += 1
        with self._lock:
            self.processor.close()
        return True

    def _process(self, frame: Frame) -> None:
        try:
            with self._lock:
                self.processor.process(frame)
        except Exception as exc:
            # One bad frame (a decoder or driver oddity) must not end recording.
            self.errors += 1
            self.last_error = str(exc) or type(exc).__name__
            log.exception("processing frame %d failed", frame.seq)

    @property
    def motion_active(self) -> bool:
        """Whether a motion event is under way: from its first moving frame until the
        recorder's post-roll ends (Home Assistant's motion sensor). Lock-free: one read."""
        return self.processor.recorder.policy.state is not RecState.IDLE

    def stats(self) -> dict[str, Any]:
        """Capture, motion and recorder state (see ``status.json`` in the daemon)."""
        with self._lock:
            inner = self.processor.stats()
            frames = self.processor.frames
        now = self.clock.monotonic()
        fps = None
        if self._rate_mark is not None and now > self._rate_mark[0]:
            fps = round((frames - self._rate_mark[1]) / (now - self._rate_mark[0]), 2)
        self._rate_mark = (now, frames)
        return {
            "capture": self.capture.stats(),
            "processing": {"frames": frames, "fps": fps, "errors": self.errors,
                           "last_error": self.last_error, "outages": self.outages},
            **inner,
        }

    def close(self) -> None:
        """Finish any open clip and release the camera (idempotent)."""
        if self._closed:
            return
        self._closed = True
        # A processing thread stuck in a write holds the lock; do not hang the shutdown on it.
        if self._lock.acquire(timeout=self.join_timeout):
            try:
                self.processor.close()
            finally:
                self._lock.release()
        else:
            log.error("the camera worker is stuck; its open clip is left to vault recovery")
        if self._thread is None or not self._thread.is_alive():
            # Never release a camera under a capture thread still blocked in a read.
            self.source.close()
