"""Motion detection on a small grey copy of each frame (pure: frames in, decisions out).

The algorithm, per frame:

1. a grey copy ``frame_height`` pixels high (an MJPEG frame is decoded straight at 1/2, 1/4 or
   1/8 size by the JPEG decoder, which costs a fraction of a full decode);
2. Gaussian blur (``blur``) against sensor noise;
3. absolute difference against a running-average background (``alpha``), thresholded at
   ``threshold`` grey levels, with the ``masks`` polygons zeroed. The background is first
   scaled by the scene's overall brightness change (the median of per-pixel ratios, which a
   subject covering less than half of the frame cannot move), so exposure steps, clouds and
   dusk do not register as motion;
4. if the brightness jumped by more than ``relight_gain`` (25 %), or more than
   ``global_change`` of the unmasked pixels changed at once, it is not a subject but the light
   (a lamp, the IR cut filter, an exposure jump): the background snaps to the new frame and
   the detector recalibrates (background weight 0.2, no motion reported) until less than 5 %
   of the pixels differ, for at most ``max_calibration_frames``;
5. otherwise one dilation joins fragments and external contours of at least ``min_area``
   pixels are motion.

Frigate's detector reaches the same robustness with a per-frame 4th/96th percentile contrast
stretch; the single strided median here costs a fraction of that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.camera.frame import Frame, Image
from agent.camera.masks import Polygon, motion_keep_mask
from agent.config import MotionConfig

_REDUCED_GREY = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                 (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))

_DARK = 8.0
"""Added to both sides of a brightness ratio so near-black pixels do not dominate it."""
_GAIN_DEADBAND = 0.01
_KERNEL = np.ones((3, 3), np.uint8)

Box = tuple[int, int, int, int]
"""x, y, width, height in detection-frame pixels."""


@dataclass(frozen=True)
class MotionParams:
    """Detector settings; :meth:`from_config` maps the ``motion`` config section."""

    frame_height: int = 100
    threshold: int = 30
    min_area: int = 10
    blur: int = 3
    alpha: float = 0.01
    global_change: float = 0.5
    masks: Sequence[Polygon] = field(default_factory=tuple)
    calibration_alpha: float = 0.2
    calibrated_below: float = 0.05
    max_calibration_frames: int = 20
    relight_gain: float = 0.25
    """A brightness change beyond this factor (either way) recalibrates instead of being
    compensated."""

    @classmethod
    def from_config(cls, cfg: MotionConfig) -> MotionParams:
        """The detector settings of a ``motion`` config section."""
        return cls(
            frame_height=cfg.frame_height,
            threshold=cfg.threshold,
            min_area=cfg.min_area,
            blur=cfg.blur,
            alpha=cfg.alpha,
            global_change=cfg.global_change,
            masks=tuple(tuple(tuple(pt) for pt in poly) for poly in cfg.masks),
        )


@dataclass(frozen=True)
class MotionResult:
    """What the detector concluded about one frame."""

    motion: bool
    boxes: tuple[Box, ...] = ()
    changed: float = 0.0
    """Fraction of unmasked detection pixels that differ from the background."""
    calibrating: bool = False
    recalibrated: bool = False
    """This frame was a global change (lights, IR switch) and restarted calibration."""


def detection_size(width: int, height: int, frame_height: int) -> tuple[int, int]:
    """(width, height) of the detection frame for a source frame of ``width`` x ``height``."""
    h = min(frame_height, height)
    return max(1, round(width * h / height)), h


def downscale(frame: Frame, size: tuple[int, int]) -> Image | None:
    """The frame as a grey image of ``size``; None when its JPEG does not decode or it is a
    compressed packet that was not decoded.

    A JPEG-only frame is decoded at the smallest DCT scale that still covers ``size`` (no
    full-size decode); a decoded image is sampled down before the colour conversion, so the
    conversion only touches the small copy.
    """
    width, height = size
    if frame.image is not None:
        # Nearest-neighbour, as Frigate does: an order of magnitude cheaper than area
        # averaging on a full frame, and the blur that follows smooths the sampling noise.
        small = cv2.resize(frame.image, size, interpolation=cv2.INTER_NEAREST)
        if small.ndim == 3:
            small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        return small
    if frame.jpeg is None:
        return None
    flag = cv2.IMREAD_GRAYSCALE
    for factor, reduced in _REDUCED_GREY:
        if frame.height // factor >= height:
            flag = reduced
            break
    grey: Image | None = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), flag)
    if grey is None:
        return None
    if grey.shape[1] != width or grey.shape[0] != height:
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return grey


class MotionDetector:
    """Running-average motion detector for frames of one size (see the module docstring)."""

    def __init__(self, params: MotionParams, width: int, height: int) -> None:
        if params.blur % 2 == 0:
            raise ValueError("blur must be odd")
        self.params = params
        self.frame_size = (width, height)
        self.size = detection_size(width, height, params.frame_height)
        self._keep = motion_keep_mask(params.masks, *self.size)
        self._active = (
            self.size[0] * self.size[1] if self._keep is None else cv2.countNonZero(self._keep)
        )
        # The brightness estimate looks at every 2nd pixel in each direction: plenty for a
        # median, and a quarter of the work.
        self._sample_step = 2
        self._sample_keep = (
            None if self._keep is None else self._keep[::2, ::2] > 0
        )
        self._bg: NDArray[np.float32] | None = None
        self._calibrating = True
        self._calibration_frames = 0
        self.frames = 0
        self.recalibrations = 0

    @property
    def calibrating(self) -> bool:
        """Whether the background is still settling (no motion is reported meanwhile)."""
        return self._calibrating

    def reset(self) -> None:
        """Forget the background (after the source was reopened, say)."""
        self._bg = None
        self._calibrating = True
        self._calibration_frames = 0

    def _gain(self, grey: Image, background: NDArray[np.float32]) -> float:
        """The scene's brightness change against the background, robust to subjects: the
        median per-pixel ratio over a strided sample (a subject covering less than half the
        frame cannot move it), or 1.0 when the change is too small to matter."""
        step = self._sample_step
        f = grey[::step, ::step].astype(np.float32)
        b = background[::step, ::step]
        ratios = (f + _DARK) / (b + _DARK)
        flat = ratios.ravel() if self._sample_keep is None else ratios[self._sample_keep]
        if flat.size == 0:
            return 1.0
        # np.partition, not np.median: same middle value, a tenth of the overhead.
        mid = flat.size // 2
        gain = float(np.partition(flat, mid)[mid])
        return gain if abs(gain - 1.0) > _GAIN_DEADBAND else 1.0

    def _recalibrate(self, blurred: Image, changed: float) -> MotionResult:
        self._bg = blurred.astype(np.float32)
        self._calibrating = True
        self._calibration_frames = 0
        self.recalibrations += 1
        return MotionResult(motion=False, changed=changed, calibrating=True, recalibrated=True)

    def detect_frame(self, frame: Frame) -> MotionResult:
        """Downscale ``frame`` and :meth:`detect` on it (an undecodable JPEG is no motion)."""
        small = downscale(frame, self.size)
        if small is None:
            return MotionResult(motion=False, calibrating=self._calibrating)
        return self.detect(small)

    def detect(self, grey: Image) -> MotionResult:
        """Detect motion in a grey image of :attr:`size`."""
        p = self.params
        self.frames += 1
        if grey.shape[1] != self.size[0] or grey.shape[0] != self.size[1]:
            raise ValueError(f"expected a {self.size[0]}x{self.size[1]} grey image")
        blurred = cv2.GaussianBlur(grey, (p.blur, p.blur), 0) if p.blur > 1 else grey
        if self._bg is None:
            self._bg = blurred.astype(np.float32)
            self._calibrating = True
            self._calibration_frames = 0
            return MotionResult(motion=False, calibrating=True)
        gain = self._gain(blurred, self._bg)
        if abs(gain - 1.0) > p.relight_gain:
            # A big brightness jump (light switched, IR cut filter, exposure step): compensating
            # through clipped highlights and crushed shadows is unreliable, so start over.
            return self._recalibrate(blurred, 1.0)
        reference = cv2.convertScaleAbs(self._bg, alpha=gain)
        delta = cv2.absdiff(blurred, reference)
        _, thresh = cv2.threshold(delta, p.threshold, 255, cv2.THRESH_BINARY)
        if self._keep is not None:
            cv2.bitwise_and(thresh, self._keep, dst=thresh)
        changed_px = cv2.countNonZero(thresh)
        changed = changed_px / self._active if self._active else 0.0
        if changed > p.global_change:
            # Too much changed at once for a subject: the light changed. Start over from here.
            return self._recalibrate(blurred, changed)
        if self._calibrating:
            cv2.accumulateWeighted(blurred, self._bg, p.calibration_alpha)
            self._calibration_frames += 1
            if (
                changed < p.calibrated_below
                or self._calibration_frames >= p.max_calibration_frames
            ):
                self._calibrating = False
            return MotionResult(motion=False, changed=changed, calibrating=True)
        cv2.accumulateWeighted(blurred, self._bg, p.alpha)
        if changed_px == 0:
            return MotionResult(motion=False)
        dilated = cv2.dilate(thresh, _KERNEL)
        contours, _ = cv2.findContours(dilated, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        boxes = tuple(
            (x, y, w, h)
            for c in contours
            if cv2.contourArea(c) >= p.min_area
            for x, y, w, h in (cv2.boundingRect(c),)
        )
        return MotionResult(motion=bool(boxes), boxes=boxes, changed=changed)
