"""Shared pytest fixtures.

MQTT (see ``tests/mosquitto.py`` for the classes):

- ``test_ca`` (session): a ``TestCA`` in a temporary directory; ``test_ca.ca_cert``,
  ``test_ca.server``, ``test_ca.client(cn) -> CertPair(cert, key)``.
- ``mosquitto``: a started anonymous broker on a free loopback port (plain TCP only);
  ``.host``, ``.port``, ``.restart()``, ``.kill()``, ``.start()``, ``.client(...) -> Collector``.
- ``mosquitto_factory``: ``mosquitto_factory(tls=test_ca, passwords={...}, acl="...",
  persistence=True, extra_conf="")`` starts another broker with those options; every broker it
  made is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Mosquitto, TestCA

CHROMIUM = Path("/usr/bin/chromium")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Browser tests fail, never skip, where Debian's Chromium is missing: a CI without it
    must not pass them silently (``-m "not browser"`` deselects them on purpose)."""
    if item.get_closest_marker("browser") is not None and not CHROMIUM.exists():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} (apt-get install "
                    "chromium), or deselect them with -m 'not browser'", pytrace=False)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A throw-away CA with a 127.0.0.1/localhost server certificate."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start mosquitto brokers with options; all are stopped at teardown."""
    brokers: list[Mosquitto] = []

    def make(**options: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A started anonymous mosquitto on a free loopback port."""
    return mosquitto_factory()
