"""Real footage for tests that need stored clips: JPEG frames of a moving, numbered square,
recorded into a vault by the camera's own recorder (MJPEG in Matroska), so a release can cut
them (contract §5.1) as it cuts what a camera records."""

from __future__ import annotations

from datetime import datetime, timedelta

import cv2
import numpy as np

from agent.camera.frame import Frame
from agent.camera.pipeline import FrameEncoder
from agent.camera.recorder import Recorder, RecordingParams
from agent.vault import ClipInfo, Vault


def jpeg_frame(i: int, width: int = 320, height: int = 240) -> bytes:
    """A real JPEG of a moving square with the frame number printed on it."""
    image = np.full((height, width, 3), (40, 60, 90), np.uint8)
    x = 10 + (i * 12) % (width - 60)
    cv2.rectangle(image, (x, 80), (x + 50, 130), (60, 200, 255), -1)
    cv2.putText(image, f"frame {i}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return bytes(buf.tobytes())


def record_clip(vault: Vault, start: datetime, frames: int = 15, fps: float = 10.0) -> ClipInfo:
    """Record a real clip (camera recorder, MJPEG in Matroska) of ``frames`` frames from
    ``start`` into ``vault``."""
    made: list[object] = []
    recorder = Recorder(
        vault,
        RecordingParams(pre_roll=0.0, post_roll=0.5, max_clip=60.0, merge_gap=0.0),
        FrameEncoder([], 85, codec="mjpeg"),
        fps=fps,
        on_clip=made.append,
    )
    for i in range(frames):
        wall = start + timedelta(seconds=i / fps)
        frame = Frame(seq=i, ts=i / fps, wall=wall, width=320, height=240, jpeg=jpeg_frame(i))
        recorder.push(frame, motion=True)
    recorder.close()
    assert len(made) == 1 and isinstance(made[0], ClipInfo), recorder.last_error
    return made[0]
