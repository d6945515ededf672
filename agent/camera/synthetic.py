"""Generated camera scenes with known ground truth, for the demo, the tests and the bench.

A :class:`Scene` is a static textured doorstep, zero or more :class:`Subject` rectangles
walking along straight lines, a :class:`Lighting` gain that can step or ramp, and Gaussian
sensor noise. ``render(n)`` is a pure function of the frame index (the noise is seeded per
frame), so a scene replays identically and tests can say exactly when a subject enters.

:func:`scenarios` lists the ground-truth scenes the tests and ``bench/pipeline.py`` share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.camera.frame import Image
from agent.camera.masks import Polygon

_NOISE_PAD = 32


@dataclass(frozen=True)
class Subject:
    """A person-sized block moving in a straight line from ``start_pos`` to ``end_pos``.

    Visible for frames ``start <= n < end``; positions are the block's centre as fractions of
    the frame, sizes fractions of the frame's width and height.
    """

    start: int
    end: int
    start_pos: tuple[float, float]
    end_pos: tuple[float, float]
    size: tuple[float, float] = (0.08, 0.35)
    colour: tuple[int, int, int] = (30, 40, 200)

    def visible(self, n: int) -> bool:
        """Whether the subject is in frame ``n``."""
        return self.start <= n < self.end

    def centre(self, n: int) -> tuple[float, float]:
        """Centre position (fractions) at frame ``n``."""
        span = max(self.end - self.start - 1, 1)
        t = min(max((n - self.start) / span, 0.0), 1.0)
        return (
            self.start_pos[0] + (self.end_pos[0] - self.start_pos[0]) * t,
            self.start_pos[1] + (self.end_pos[1] - self.start_pos[1]) * t,
        )


@dataclass(frozen=True)
class Lighting:
    """Multiplicative brightness over time: each change ``(start, frames, delta)`` moves the
    gain by ``delta`` linearly over ``frames`` frames (1 frame = a step)."""

    changes: tuple[tuple[int, int, float], ...] = ()

    def gain(self, n: int) -> float:
        """The gain at frame ``n`` (1.0 = the scene as drawn)."""
        g = 1.0
        for start, frames, delta in self.changes:
            g += delta * min(max((n - start + 1) / max(frames, 1), 0.0), 1.0)
        return g


@dataclass
class Scene:
    """A generated scene; see the module docstring."""

    width: int
    height: int
    subjects: tuple[Subject, ...] = ()
    lighting: Lighting = field(default_factory=Lighting)
    noise: float = 4.0
    seed: int = 0
    period: int | None = None
    """Frames after which the scene repeats (the demo loops); None: never."""

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._background = _doorstep(self.width, self.height, rng)
        self._noise_pos: NDArray[np.uint8] | None = None
        self._noise_neg: NDArray[np.uint8] | None = None
        if self.noise > 0:
            shape = (self.height + _NOISE_PAD, self.width + _NOISE_PAD, 3)
            plane = rng.normal(0.0, self.noise, shape)
            self._noise_pos = np.clip(plane, 0, 255).astype(np.uint8)
            self._noise_neg = np.clip(-plane, 0, 255).astype(np.uint8)

    def subjects_at(self, n: int) -> list[Subject]:
        """The subjects visible in frame ``n``."""
        k = n % self.period if self.period else n
        return [s for s in self.subjects if s.visible(k)]

    def render(self, n: int) -> Image:
        """Frame ``n`` as a BGR image."""
        k = n % self.period if self.period else n
        image: Image = self._background.copy()
        for s in self.subjects:
            if s.visible(k):
                _draw_subject(image, s, k)
        gain = self.lighting.gain(k)
        if gain != 1.0:
            image = cv2.convertScaleAbs(image, alpha=gain)
        if self._noise_pos is not None and self._noise_neg is not None:
            # Fresh-looking noise every frame without generating millions of normals: crop a
            # pre-drawn noise field at a per-frame random offset.
            rng = np.random.default_rng((self.seed, n))
            dy, dx = (int(v) for v in rng.integers(0, _NOISE_PAD, 2))
            h, w = self.height, self.width
            cv2.add(image, self._noise_pos[dy : dy + h, dx : dx + w], dst=image)
            ey, ex = (int(v) for v in rng.integers(0, _NOISE_PAD, 2))
            cv2.subtract(image, self._noise_neg[ey : ey + h, ex : ex + w], dst=image)
        return image


def _doorstep(width: int, height: int, rng: np.random.Generator) -> NDArray[np.uint8]:
    """A static, textured background: wall, door, path, plant pot."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (150, 160, 170)
    ground = int(height * 0.7)
    image[ground:] = (90, 100, 105)
    cv2.rectangle(
        image, (int(width * 0.4), int(height * 0.15)), (int(width * 0.6), ground), (60, 80, 120), -1
    )
    cv2.rectangle(
        image, (int(width * 0.1), int(height * 0.2)), (int(width * 0.3), int(height * 0.45)),
        (200, 190, 170), -1,
    )
    pot = (int(width * 0.8), int(height * 0.75))
    cv2.circle(image, pot, max(2, height // 12), (40, 110, 60), -1)
    texture = np.asarray(cv2.GaussianBlur(rng.normal(0.0, 6.0, (height, width)), (0, 0), 2.0))
    textured: NDArray[np.uint8] = np.clip(image + texture[:, :, None], 0, 255).astype(np.uint8)
    return textured


def _draw_subject(image: Image, s: Subject, n: int) -> None:
    height, width = image.shape[:2]
    cx, cy = s.centre(n)
    half_w = s.size[0] * width / 2
    half_h = s.size[1] * height / 2
    top_left = (round(cx * width - half_w), round(cy * height - half_h))
    bottom_right = (round(cx * width + half_w), round(cy * height + half_h))
    cv2.rectangle(image, top_left, bottom_right, s.colour, -1)
    head = (round(cx * width), round(cy * height - half_h - half_w * 0.6))
    cv2.circle(image, head, max(1, round(half_w * 0.7)), (140, 170, 210), -1)


@dataclass(frozen=True)
class Scenario:
    """A scene with its ground truth: the frame ranges in which a subject moves."""

    name: str
    scene: Scene
    frames: int
    fps: float
    events: tuple[tuple[int, int], ...]
    """(first, last) frame of each expected motion event."""
    motion_masks: tuple[Polygon, ...] = ()
    """Motion-ignore polygons the scene is meant to be run with."""


def scenarios(width: int = 320, height: int = 240, fps: float = 10.0) -> list[Scenario]:
    """The shared ground-truth scenes. The first 30 frames of each are static (warm-up)."""
    walk = Subject(40, 80, (-0.035, 0.55), (1.035, 0.55))
    right_strip: Polygon = ((0.6, 0.0), (1.0, 0.0), (1.0, 1.0), (0.6, 1.0))
    in_mask = Subject(40, 100, (0.72, 0.5), (0.9, 0.5), size=(0.06, 0.3))
    return [
        Scenario("subject enters", Scene(width, height, (walk,), seed=1), 120, fps, ((40, 79),)),
        Scenario(
            "sudden global brightness change",
            Scene(width, height, lighting=Lighting(((50, 1, 0.45),)), seed=2),
            100,
            fps,
            (),
        ),
        Scenario(
            "IR switch (darker over 3 frames)",
            Scene(width, height, lighting=Lighting(((50, 3, -0.55),)), seed=3),
            100,
            fps,
            (),
        ),
        Scenario(
            "slow lighting ramp",
            Scene(width, height, lighting=Lighting(((35, 120, 0.5),)), seed=4),
            160,
            fps,
            (),
        ),
        Scenario("sensor noise only", Scene(width, height, noise=8.0, seed=5), 150, fps, ()),
        Scenario(
            "motion inside a mask",
            Scene(width, height, (in_mask,), seed=6),
            120,
            fps,
            (),
            motion_masks=(right_strip,),
        ),
    ]


def demo_scene(width: int, height: int, fps: float) -> Scene:
    """The ``synthetic`` source: a visitor walks up to the door, waits, and leaves, every
    40 seconds."""
    period = max(int(40 * fps), 10)
    size = (0.12, 0.45)
    arrive = Subject(int(12 * fps), int(18 * fps), (-0.1, 0.55), (0.5, 0.5), size=size)
    wait = Subject(int(18 * fps), int(22 * fps), (0.5, 0.5), (0.52, 0.5), size=size)
    leave = Subject(int(22 * fps), int(27 * fps), (0.52, 0.5), (1.1, 0.6), size=size)
    return Scene(width, height, (arrive, wait, leave), noise=3.0, seed=7, period=period)
