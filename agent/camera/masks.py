"""Polygon masks: where motion is ignored, and what is blacked out before anything is stored.

Polygons are lists of ``[x, y]`` pairs given as fractions (0..1) of the frame's width and
height, so one config fits any resolution the camera delivers.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from numpy.typing import NDArray

from agent.camera.frame import Image

Polygon = Sequence[Sequence[float]]

JPEG_BLOCK = 16
"""The largest JPEG block (a 4:2:0 MCU) in pixels."""
_CHROMA_REACH = 2


def _pixel_points(polygon: Polygon, width: int, height: int) -> NDArray[np.int32]:
    points = [(round(x * width), round(y * height)) for x, y in polygon]
    return np.array(points, dtype=np.int32).reshape(-1, 1, 2)


def polygon_mask(
    polygons: Sequence[Polygon], width: int, height: int
) -> NDArray[np.uint8] | None:
    """A single-channel mask: 255 inside any polygon, 0 elsewhere; None when there are none."""
    if not polygons:
        return None
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_pixel_points(p, width, height) for p in polygons], 255)
    return mask


def motion_keep_mask(
    polygons: Sequence[Polygon], width: int, height: int
) -> NDArray[np.uint8] | None:
    """255 where motion counts, 0 inside the ignore polygons; None when nothing is masked."""
    mask = polygon_mask(polygons, width, height)
    if mask is None:
        return None
    return cv2.bitwise_not(mask)  # type: ignore[return-value]


class PrivacyMasker:
    """Blacks out the privacy polygons of frames, in place, before they are encoded.

    The blacked-out area is the polygons grown by two pixels, then to whole 16x16 JPEG blocks:
    a block that mixes masked and visible pixels would decode with fringes and ringing inside
    the mask, while whole black blocks, away from the colour of their neighbours, decode to
    black. Masks are built once per frame size.
    """

    def __init__(self, polygons: Sequence[Polygon]) -> None:
        self.polygons = [list(map(tuple, p)) for p in polygons]
        self._keep: dict[tuple[int, int, int], NDArray[np.uint8]] = {}

    def __bool__(self) -> bool:
        return bool(self.polygons)

    def region(self, width: int, height: int) -> NDArray[np.bool_]:
        """The pixels that are blacked out for a frame of this size (True = black)."""
        exact = polygon_mask(self.polygons, width, height)
        if exact is None:
            return np.zeros((height, width), np.bool_)
        # Decoders smooth chroma across block edges (4:2:0 "fancy upsampling" reaches about
        # two pixels): grow first, so no polygon pixel sits on the edge of the black area.
        reach = np.ones((2 * _CHROMA_REACH + 1, 2 * _CHROMA_REACH + 1), np.uint8)
        bw = -(-width // JPEG_BLOCK)
        bh = -(-height // JPEG_BLOCK)
        padded = np.zeros((bh * JPEG_BLOCK, bw * JPEG_BLOCK), np.uint8)
        padded[:height, :width] = cv2.dilate(exact, reach)
        blocks = padded.reshape(bh, JPEG_BLOCK, bw, JPEG_BLOCK).max(axis=(1, 3)) > 0
        grown = np.repeat(np.repeat(blocks, JPEG_BLOCK, axis=0), JPEG_BLOCK, axis=1)
        return grown[:height, :width]

    def apply(self, image: Image) -> Image:
        """Fill the masked region of ``image`` with black, in place; returns ``image``."""
        if not self.polygons:
            return image
        height, width = image.shape[:2]
        channels = 1 if image.ndim == 2 else int(image.shape[2])
        key = (width, height, channels)
        keep = self._keep.get(key)
        if keep is None:
            plane = np.where(self.region(width, height), 0, 255).astype(np.uint8)
            keep = plane if channels == 1 else np.repeat(plane[:, :, None], channels, axis=2)
            self._keep[key] = keep
        cv2.bitwise_and(image, keep, dst=image)
        return image
