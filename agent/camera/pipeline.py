"""camera → motion → recorder → vault, as one daemon worker.

:class:`FrameEncoder` and :class:`FrameProcessor` are pure (a frame in, a decision and sink
calls out); :class:`CameraWorker` is the thin threaded shell: a capture thread feeding a
bounded queue, and the worker's own thread processing frames until the stop event, then
finishing the open clip.

JPEG handling. A frame that arrives as JPEG (MJPEG camera or stream) is never fully decoded
for motion (the decoder's 1/2-1/8 scaling gives the small grey copy) and is stored as the
camera's own bytes, unless privacy masks must be drawn: then it is decoded, masked and
re-encoded. A decoded frame (synthetic, picamera2, a non-MJPEG camera) is masked and encoded
once at ``recording.jpeg_quality``, and only when the recorder keeps it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import cv2
import numpy as np

from agent.camera.capture import Backoff, Capture, FrameQueue
from agent.camera.frame import Clock, Frame, Image
from agent.camera.masks import Polygon, PrivacyMasker
from agent.camera.motion import MotionDetector, MotionParams, MotionResult
from agent.camera.recorder import ClipSink, Recorder, RecordingParams, RecState
from agent.camera.sources import Source, source_from_config
from agent.config import Config

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
    """The bytes stored for a frame: privacy-masked JPEG (camera bytes when nothing to mask)."""

    def __init__(self, privacy_masks: list[Polygon] | tuple[Polygon, ...], quality: int) -> None:
        self.masker = PrivacyMasker(privacy_masks)
        self.quality = quality
        self.encoded = 0
        self.passed_through = 0

    def __call__(self, frame: Frame) -> bytes | None:
        """Masked JPEG bytes for ``frame``; None when its JPEG does not decode."""
        if frame.jpeg is not None and not self.masker:
            self.passed_through += 1
            return frame.jpeg
        if frame.image is not None:
            # Masking draws on the image: work on a copy, the frame is shared.
            image = frame.image.copy() if self.masker else frame.image
        else:
            assert frame.jpeg is not None
            decoded: Image | None = cv2.imdecode(
                np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR
            )
            if decoded is None:
                return None
            image = decoded
        self.masker.apply(image)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return None
        self.encoded += 1
        return buf.tobytes()


class FrameProcessor:
    """Motion detection and recording for a stream of frames (pure; no threads)."""

    def __init__(self, motion: MotionParams | None, recorder: Recorder) -> None:
        self.motion = motion
        self.recorder = recorder
        self._detector: MotionDetector | None = None
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
            result = det.detect_frame(frame)
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
        )
        self.join_timeout = join_timeout
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
        source = source_from_config(cfg.camera, clock)
        processor = FrameProcessor.from_config(cfg, sink, fps=cfg.camera.fps)
        return cls(
            source,
            processor,
            clock=clock,
            queue_frames=cfg.camera.queue_frames,
            backoff_max=cfg.camera.reopen_backoff_max.total_seconds(),
        )

    def run(self, stop: threading.Event) -> None:
        """Process frames until ``stop`` (or a non-looping file ends); then finish the clip."""
        thread = self._thread = self.capture.start(stop)
        try:
            while not stop.is_set():
                frame = self.queue.get(timeout=0.5)
                if frame is None:
                    if self.queue.closed:
                        break
                    continue
                self._process(frame)
            # Frames already captured belong to the clip being finished.
            for frame in self.queue.drain():
                self._process(frame)
        finally:
            thread.join(self.join_timeout)
            if thread.is_alive():
                log.error("the camera thread did not stop within %.0f s", self.join_timeout)
            with self._lock:
                self.processor.close()

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
                           "last_error": self.last_error},
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
