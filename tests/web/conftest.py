"""Fixtures for the local app's tests (see ``tests/web/harness.py``).

- ``web``: a :class:`~tests.web.harness.WebHarness` (a real device state behind the app, with a
  TestClient on ``https://testserver``, not logged in).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.web.harness import WebHarness, close_harness, make_harness


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebHarness]:
    """The app over a real device state, with a TestClient (not logged in)."""
    harness = make_harness(tmp_path)
    yield harness
    close_harness(harness)
