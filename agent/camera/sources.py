"""Camera sources behind one small interface, chosen by ``camera.source``.

=================  ==========================================================================
``0``, ``/dev/video0``  a V4L2 (USB UVC) camera; MJPEG is requested, and when the camera
                   delivers it the JPEG bytes are passed through undecoded
``rtsp://``, ``http://``  a network stream through OpenCV's FFmpeg backend; an MJPEG stream
                   (``multipart/x-mixed-replace``) is passed through undecoded as well
``file:PATH``      a video file, paced at its frame rate unless ``camera.realtime: false``,
                   looping when ``camera.loop: true``
``synthetic``      a generated doorstep with a visitor (:mod:`agent.camera.synthetic`)
``picamera2``      a Raspberry Pi CSI camera through the picamera2 module (Bookworm's CSI
                   cameras do not work through OpenCV's V4L2)
``rpicam:ARGS``    the Pi camera through Raspberry Pi OS's ``rpicam-vid`` writing H.264 to a
                   pipe (hardware-encoded on a Pi 4), stored as it comes; needs no Python
                   bindings from the system
``pipe:COMMAND``   any command writing an H.264 elementary stream to its stdout
=================  ==========================================================================

Network streams, ``rpicam:``/``pipe:`` and files holding H.264/H.265/MPEG-4 are read with
PyAV (:mod:`agent.camera.avsource`) and stored packet for packet.

A source is opened, read frame by frame and closed by one capture thread
(:mod:`agent.camera.capture`), which reopens it with backoff when ``open`` or ``read`` raises.
``read`` returns None only when a non-looping file has ended.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shlex
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from agent.camera.avsource import StreamSource, probe_codec, rpicam_command
from agent.camera.frame import Clock, Frame, Image, jpeg_size
from agent.camera.media import INTER_CODECS
from agent.camera.synthetic import Scene, demo_scene
from agent.config import CameraConfig
from agent.errors import CameraError

log = logging.getLogger(__name__)

MJPG = "MJPG"
_MAX_CORRUPT_RUN = 25
_CATCH_UP_LIMIT = 1.0
"""A paced source more than this many seconds behind its timeline re-anchors it instead of
replaying the backlog as fast as it can."""


class Source(Protocol):
    """What the capture thread needs of a camera."""

    description: str
    """A log-safe name (credentials in URLs are redacted)."""

    def open(self) -> None:
        """Connect to the camera; raises CameraError."""
        ...

    def read(self) -> Frame | None:
        """The next frame (blocking); None when the source has ended for good. Raises
        CameraError when the camera failed or stalled."""
        ...

    def close(self) -> None:
        """Release the camera (idempotent)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Source-specific facts for status (resolution, passthrough, corrupt frames)."""
        ...


def redact(url: str) -> str:
    """``url`` with any user name and password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def _fourcc(cap: cv2.VideoCapture) -> str:
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    return "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4)).upper()


class _Decoded:
    """One frame's payload from OpenCV: an image, or the camera's JPEG bytes."""

    __slots__ = ("height", "image", "jpeg", "width")

    def __init__(self, image: Image | None, jpeg: bytes | None, width: int, height: int) -> None:
        self.image = image
        self.jpeg = jpeg
        self.width = width
        self.height = height


class _CaptureReader:
    """Reads frames from a ``cv2.VideoCapture``, passing MJPEG through when it can.

    Passthrough: when the stream is MJPEG, the capture is switched to raw mode
    (``CAP_PROP_FORMAT = -1`` for FFmpeg, ``CAP_PROP_CONVERT_RGB = 0`` for V4L2) and each
    read returns the JPEG bytes. If what comes back is not a JPEG after all, raw mode is
    switched off again and frames are decoded as usual.
    """

    def __init__(self, cap: cv2.VideoCapture, description: str, *, v4l2: bool) -> None:
        self.cap = cap
        self.description = description
        self.v4l2 = v4l2
        self.passthrough = False
        self.corrupt = 0
        self._corrupt_run = 0
        if _fourcc(cap) == MJPG:
            prop, value = (cv2.CAP_PROP_CONVERT_RGB, 0) if v4l2 else (cv2.CAP_PROP_FORMAT, -1)
            self.passthrough = bool(cap.set(prop, value))

    def _leave_passthrough(self) -> None:
        log.info("%s: raw frames are not JPEG; decoding instead", self.description)
        self.passthrough = False
        if self.v4l2:
            self.cap.set(cv2.CAP_PROP_CONVERT_RGB, 1)
        else:
            self.cap.set(cv2.CAP_PROP_FORMAT, 0)

    def read(self) -> _Decoded | None:
        """The next frame, or None at the end of the stream."""
        while True:
            ok, data = self.cap.read()
            if not ok or data is None:
                return None
            if not self.passthrough or (data.ndim == 3 and data.shape[2] == 3):
                if self.passthrough:
                    self._leave_passthrough()
                return _Decoded(data, None, int(data.shape[1]), int(data.shape[0]))
            jpeg = np.ascontiguousarray(data).tobytes()
            size = jpeg_size(jpeg)
            if size is not None:
                self._corrupt_run = 0
                return _Decoded(None, jpeg, size[0], size[1])
            self.corrupt += 1
            self._corrupt_run += 1
            if self._corrupt_run == 3 and self.corrupt == 3:
                # Never a good frame: the raw payload is not JPEG at all.
                self._leave_passthrough()
            elif self._corrupt_run >= _MAX_CORRUPT_RUN:
                raise CameraError(
                    f"{self.description}: {self._corrupt_run} corrupt frames in a row"
                )


class OpenCVSource:
    """A live V4L2 camera or network stream (``kind`` ``v4l2`` or ``url``)."""

    def __init__(
        self,
        target: int | str,
        *,
        kind: str,
        clock: Clock,
        width: int,
        height: int,
        fps: float,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.kind = kind
        self.clock = clock
        self.width = width
        self.height = height
        self.fps = fps
        self.open_timeout = open_timeout
        self.read_timeout = read_timeout
        self.description = redact(target) if isinstance(target, str) else f"/dev/video{target}"
        self._reader: _CaptureReader | None = None
        self._seq = 0

    def open(self) -> None:
        """Open the device or stream; V4L2 cameras are asked for MJPEG at the configured size."""
        self.close()
        if self.kind == "v4l2":
            cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
            if cap.isOpened():
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*MJPG))
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        else:
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout * 1000),
            ]
            cap = cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open camera {self.description}")
        self._reader = _CaptureReader(cap, self.description, v4l2=self.kind == "v4l2")
        log.info(
            "opened %s (%s, %s)", self.description, _fourcc(cap) or "?",
            "JPEG passthrough" if self._reader.passthrough else "decoded",
        )

    def read(self) -> Frame:
        """The next frame; raises CameraError when the stream ended, broke or stalled."""
        if self._reader is None:
            raise CameraError(f"{self.description} is not open")
        got = self._reader.read()
        if got is None:
            raise CameraError(f"{self.description}: no frame (stream ended, broke or stalled)")
        self._seq += 1
        return Frame(
            self._seq, self.clock.monotonic(), self.clock.now(), got.width, got.height,
            got.image, got.jpeg,
        )

    def close(self) -> None:
        """Release the capture (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cap.release()

    def stats(self) -> dict[str, Any]:
        """Passthrough and corrupt-frame counters."""
        reader = self._reader
        return {
            "kind": self.kind,
            "passthrough": bool(reader and reader.passthrough),
            "corrupt_frames": reader.corrupt if reader else 0,
        }


class _Pacer:
    """A frame timeline ``t0 + n / fps`` for sources that are not live (files, generated).

    With ``realtime`` each frame waits (on the injected clock) until it is due; without, frames
    come as fast as they are read but keep their timeline timestamps, so the pipeline
    downstream behaves exactly as it would live.
    """

    def __init__(self, clock: Clock, fps: float, realtime: bool) -> None:
        self.clock = clock
        self.fps = fps
        self.realtime = realtime
        self.t0 = clock.monotonic()
        self.wall0 = clock.now()
        self.n = 0

    def next(self) -> tuple[float, datetime]:
        """(ts, wall) of the next frame, after waiting for it when real-time."""
        offset = self.n / self.fps
        due = self.t0 + offset
        if self.realtime:
            delay = due - self.clock.monotonic()
            if delay > 0:
                self.clock.sleep(delay)
            elif delay < -_CATCH_UP_LIMIT:
                behind = -delay
                self.t0 += behind
                self.wall0 += timedelta(seconds=behind)
                due += behind
        self.n += 1
        return due, self.wall0 + timedelta(seconds=offset)


class FileSource:
    """A video file played as a camera (``file:PATH``)."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        loop: bool,
        realtime: bool,
        fallback_fps: float,
    ) -> None:
        self.path = path
        self.clock = clock
        self.loop = loop
        self.realtime = realtime
        self.fallback_fps = fallback_fps
        self.description = f"file:{path}"
        self.fps = fallback_fps
        self._reader: _CaptureReader | None = None
        self._pacer: _Pacer | None = None
        self._seq = 0
        self.loops = 0

    def _open_capture(self) -> _CaptureReader:
        if not self.path.is_file():
            raise CameraError(f"video file {self.path} does not exist")
        cap = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open video file {self.path}")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps <= 240 else self.fallback_fps
        return _CaptureReader(cap, self.description, v4l2=False)

    def open(self) -> None:
        """Open the file and start its timeline."""
        self.close()
        self._reader = self._open_capture()
        self._pacer = _Pacer(self.clock, self.fps, self.realtime)

    def read(self) -> Frame | None:
        """The next frame at its due time; at the end, start over (loop) or return None."""
        if self._reader is None or self._pacer is None:
            raise CameraError(f"{self.description} is not open")
        got = self._reader.read()
        if got is None:
            if not self.loop:
                return None
            # Seeking back is unreliable in some containers: reopening is not.
            self._reader.cap.release()
            self._reader = self._open_capture()
            got = self._reader.read()
            if got is None:
                raise CameraError(f"video file {self.path} has no frames")
            self.loops += 1
        ts, wall = self._pacer.next()
        self._seq += 1
        return Frame(self._seq, ts, wall, got.width, got.height, got.image, got.jpeg)

    def close(self) -> None:
        """Close the file (idempotent)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cap.release()

    def stats(self) -> dict[str, Any]:
        """File facts: frame rate, loops, passthrough."""
        reader = self._reader
        return {
            "kind": "file",
            "fps": self.fps,
            "loops": self.loops,
            "passthrough": bool(reader and reader.passthrough),
            "corrupt_frames": reader.corrupt if reader else 0,
        }


class SyntheticSource:
    """A generated scene (``synthetic``), paced like a file."""

    def __init__(self, scene: Scene, *, clock: Clock, fps: float, realtime: bool = True) -> None:
        self.scene = scene
        self.clock = clock
        self.fps = fps
        self.realtime = realtime
        self.description = "synthetic"
        self._pacer: _Pacer | None = None
        self._seq = 0

    def open(self) -> None:
        """Start the timeline (the scene continues where it was)."""
        self._pacer = _Pacer(self.clock, self.fps, self.realtime)

    def read(self) -> Frame:
        """The next rendered frame at its due time."""
        if self._pacer is None:
            raise CameraError("the synthetic source is not open")
        image = self.scene.render(self._seq)
        ts, wall = self._pacer.next()
        self._seq += 1
        return Frame(self._seq, ts, wall, self.scene.width, self.scene.height, image)

    def close(self) -> None:
        """Nothing to release."""
        self._pacer = None

    def stats(self) -> dict[str, Any]:
        """The scene's size."""
        return {"kind": "synthetic", "passthrough": False}


class Picamera2Source:
    """A Raspberry Pi CSI camera through the ``picamera2`` module."""

    def __init__(self, *, clock: Clock, width: int, height: int, fps: float) -> None:
        self.clock = clock
        self.width = width
        self.height = height
        self.fps = fps
        self.description = "picamera2"
        self._camera: Any = None
        self._seq = 0

    def open(self) -> None:
        """Configure and start the camera for BGR frames at the configured size and rate."""
        self.close()
        try:
            module: Any = importlib.import_module("picamera2")
            camera = module.Picamera2()
        except Exception as exc:
            raise CameraError(f"cannot open the Pi camera: {exc}") from exc
        try:
            # libcamera's "RGB888" is B, G, R in memory: OpenCV's order.
            config = camera.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"},
                controls={"FrameRate": self.fps},
            )
            camera.configure(config)
            camera.start()
        except Exception as exc:
            camera.close()
            raise CameraError(f"cannot start the Pi camera: {exc}") from exc
        self._camera = camera

    def read(self) -> Frame:
        """The next frame from the camera."""
        if self._camera is None:
            raise CameraError("the Pi camera is not open")
        try:
            image = self._camera.capture_array("main")
        except Exception as exc:
            raise CameraError(f"the Pi camera failed: {exc}") from exc
        self._seq += 1
        height, width = image.shape[:2]
        return Frame(self._seq, self.clock.monotonic(), self.clock.now(), width, height, image)

    def close(self) -> None:
        """Stop and release the camera (idempotent)."""
        camera, self._camera = self._camera, None
        if camera is not None:
            try:
                camera.stop()
            finally:
                camera.close()

    def stats(self) -> dict[str, Any]:
        """Kind only: the Pi camera delivers decoded frames."""
        return {"kind": "picamera2", "passthrough": False}


def source_from_config(cfg: CameraConfig, clock: Clock, *, decode_all: bool = False) -> Source:
    """The source ``camera.source`` names. Raises CameraError for picamera2 without the module
    (the capture thread would only retry what cannot work). ``decode_all``: a compressed
    stream is decoded frame by frame (it is re-encoded), not only for motion."""
    spec = cfg.source
    if spec == "synthetic":
        scene = demo_scene(cfg.width, cfg.height, cfg.fps)
        return SyntheticSource(scene, clock=clock, fps=cfg.fps, realtime=cfg.realtime)
    if spec == "picamera2":
        if importlib.util.find_spec("picamera2") is None:
            raise CameraError(
                "camera.source is picamera2 but the picamera2 module is not installed",
                hint="apt install python3-picamera2 and create the venv with "
                "--system-site-packages",
            )
        return Picamera2Source(clock=clock, width=cfg.width, height=cfg.height, fps=cfg.fps)
    if spec.startswith("rpicam:"):
        command = rpicam_command(spec[len("rpicam:"):], width=cfg.width, height=cfg.height,
                                 fps=cfg.fps)
        return StreamSource(command, kind="pipe", clock=clock, fps=cfg.fps,
                            description="rpicam-vid", decode_all=decode_all)
    if spec.startswith("pipe:"):
        command = spec[len("pipe:"):].strip()
        return StreamSource(command, kind="pipe", clock=clock, fps=cfg.fps,
                            description=f"pipe:{shlex.split(command)[0]}", decode_all=decode_all)
    if spec.startswith(("rtsp://", "rtsps://", "http://", "https://")):
        return StreamSource(spec, kind="url", clock=clock, fps=cfg.fps, description=redact(spec),
                            decode_all=decode_all)
    if spec.startswith("file:"):
        path = Path(spec[len("file:"):]).expanduser()
        if probe_codec(path) in INTER_CODECS:
            return StreamSource(str(path), kind="file", clock=clock, fps=cfg.fps, loop=cfg.loop,
                                realtime=cfg.realtime, description=spec, decode_all=decode_all)
        return FileSource(
            Path(spec[len("file:"):]).expanduser(),
            clock=clock,
            loop=cfg.loop,
            realtime=cfg.realtime,
            fallback_fps=cfg.fps,
        )
    common: dict[str, Any] = {"clock": clock, "width": cfg.width, "height": cfg.height,
                              "fps": cfg.fps}
    if spec.isdigit():
        return OpenCVSource(int(spec), kind="v4l2", **common)
    if spec.startswith("/dev/"):
        return OpenCVSource(spec, kind="v4l2", **common)
    return OpenCVSource(spec, kind="url", **common)
