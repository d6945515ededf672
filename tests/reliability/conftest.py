"""Fixtures of the reliability suite (the broker fixtures come from ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.harness import make_motion_video


@pytest.fixture(scope="session")
def motion_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 s MJPG loop with motion from 2 s to 8 s (the camera records clips every loop)."""
    return make_motion_video(tmp_path_factory.mktemp("video") / "doorstep.avi")
