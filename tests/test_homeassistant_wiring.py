"""Home Assistant wired into the running agent: the worker's polling logic with fakes, then the
whole daemon (synthetic camera, real mosquitto) announcing discovery, motion ON then OFF and the
pending count, re-announcing after the broker lost its retained messages, publishing nothing
under the discovery prefix when disabled, and never a byte of image or video; and the example
ACL's Home Assistant lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.cli import main as agent_main
from agent.daemon import HomeAssistantWorker
from agent.errors import MQTTError, RequestError
from agent.homeassistant import HomeAssistantPublisher
from agent.keys import load_storage_key
from agent.provision import initialise
from agent.requester.cli import main as requester_main
from agent.requester.keyfiles import PUBLIC_JWK, generate_keys
from agent.timeutil import rfc3339, utcnow
from agent.vault import Vault
from tests.mosquitto import Collector, Mosquitto

DEVICE = "front-door"
PREFIX = "doorbell"
REQUESTER = "city-police"
DISCOVERY = "homeassistant"
MOTION_TOPIC = f"{PREFIX}/{DEVICE}/ha/motion"
PENDING_TOPIC = f"{PREFIX}/{DEVICE}/ha/pending"
CONFIG_TOPICS = {
    f"{DISCOVERY}/binary_sensor/{DEVICE}/motion/config",
    f"{DISCOVERY}/sensor/{DEVICE}/pending/config",
    f"{DISCOVERY}/binary_sensor/{DEVICE}/online/config",
}
# Start of a JPEG (SOI + marker) and of a Matroska/EBML file: the agent's frames and clips.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x1a\x45\xdf\xa3")
ACL_EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "mosquitto-acl.example"


# --- the worker's logic, with fakes --------------------------------------------------------


class Fakes:
    """A connection, a camera and a store the worker polls; what it published."""

    def __init__(self) -> None:
        self.generation: int | None = None
        self.motion = False
        self.pending: int | Exception = 0
        self.sent: list[tuple[str, bytes]] = []
        self.fail_publish = False

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        assert retain
        if self.fail_publish:
            raise MQTTError("the MQTT outbox stayed full for 1 s")
        self.sent.append((topic, payload))

    def count(self) -> int:
        if isinstance(self.pending, Exception):
            raise self.pending
        return self.pending

    def worker(self) -> HomeAssistantWorker:
        publisher = HomeAssistantPublisher(self.publish, DEVICE, PREFIX, DISCOVERY)
        return HomeAssistantWorker(
            publisher,
            connection=lambda: self.generation,
            motion=lambda: self.motion,
            pending=self.count,
        )

    def take(self) -> list[tuple[str, bytes]]:
        sent, self.sent = self.sent, []
        return sent


def test_worker_announces_per_connection_and_publishes_changes() -> None:
    f = Fakes()
    w = f.worker()
    f.motion = True
    w.tick()
    assert f.take() == []  # not connected: nothing queued, the announcement will carry it
    f.generation = 1
    w.tick()
    sent = f.take()
    assert {t for t, _ in sent[:3]} == CONFIG_TOPICS
    assert sent[3:] == [(MOTION_TOPIC, b"ON"), (PENDING_TOPIC, b"0")]
    w.tick()
    assert f.take() == []  # nothing changed
    f.motion, f.pending = False, 2
    w.tick()
    assert f.take() == [(MOTION_TOPIC, b"OFF"), (PENDING_TOPIC, b"2")]
    f.generation = None
    f.pending = 3
    w.tick()
    assert f.take() == []
    f.generation = 2  # reconnected: everything again, with the current values
    w.tick()
    sent = f.take()
    assert {t for t, _ in sent[:3]} == CONFIG_TOPICS
    assert sent[3:] == [(MOTION_TOPIC, b"OFF"), (PENDING_TOPIC, b"3")]
    assert w.stats() == {"announcements": 2, "motion": False, "pending": 3, "last_error": None}
    w.close()
    w.close()


@pytest.mark.parametrize(
    "error", [RequestError("requests.db is closed"), sqlite3.OperationalError("database is locked")]
)
def test_worker_survives_an_unreadable_store(error: Exception) -> None:
    f = Fakes()
    w = f.worker()
    f.generation, f.pending = 1, error
    w.tick()
    assert f.take() == []  # no announcement without a count
    assert "cannot count pending requests" in str(w.stats()["last_error"])
    f.motion = True
    f.pending = 1
    w.tick()
    assert f.take()[3:] == [(MOTION_TOPIC, b"ON"), (PENDING_TOPIC, b"1")]
    f.pending, f.motion = error, False
    w.tick()
    assert f.take() == [(MOTION_TOPIC, b"OFF")]  # motion still goes out
    assert w.stats()["pending"] == 1


def test_worker_survives_publish_failures() -> None:
    f = Fakes()
    w = f.worker()
    f.generation, f.fail_publish = 1, True
    w.tick()  # logged by the publisher, never raised into the daemon
    f.fail_publish, f.generation = False, 2
    w.tick()
    assert len(f.take()) == 5


# --- the daemon end to end -----------------------------------------------------------------


class Watch:
    """Every message a Collector receives, kept, with waits that fail fast if the daemon dies."""

    def __init__(self, collector: Collector, proc: subprocess.Popen[str]) -> None:
        self.collector = collector
        self.proc = proc
        self.seen: list[mqtt.MQTTMessage] = []

    def until(
        self, match: Callable[[mqtt.MQTTMessage], bool], what: str, timeout: float = 60
    ) -> mqtt.MQTTMessage:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.collector.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"daemon exited waiting for {what}: {self.proc.communicate()}"
                    ) from None
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                continue
            self.seen.append(msg)
            if match(msg):
                return msg

    def state(self, topic: str, payload: bytes, timeout: float = 60) -> None:
        self.until(lambda m: m.topic == topic and m.payload == payload, f"{topic}={payload!r}",
                   timeout)

    def configs(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        while set(found) != CONFIG_TOPICS:
            msg = self.until(lambda m: m.topic in CONFIG_TOPICS, "the discovery configs")
            found[msg.topic] = json.loads(msg.payload)
        return found

    def drain(self) -> list[mqtt.MQTTMessage]:
        self.seen.extend(self.collector.drain())
        return self.seen


def _config(state: Path, broker: Mosquitto, enabled: bool) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "state_dir": str(state),
        # The synthetic visitor walks in at 12 s and out by 27 s of every 40 s.
        "camera": {"source": "synthetic", "width": 320, "height": 240, "fps": 5},
        "recording": {"pre_roll": "1s", "post_roll": "1s", "merge_gap": "1s"},
        "mqtt": {"host": broker.host, "port": broker.port},
        "approval": {"channels": ["cli"]},
        "app": {"enabled": False},
        "homeassistant": {"enabled": enabled},
    }


@pytest.fixture
def agent_setup(tmp_path: Path) -> Iterator[Callable[[Mosquitto, bool], Path]]:
    """``setup(broker, enabled) -> config path``: state, an enrolled requester and keys."""

    def setup(broker: Mosquitto, enabled: bool) -> Path:
        state = tmp_path / "state"
        initialise(state, DEVICE, now=utcnow())
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(_config(state, broker, enabled)))
        generate_keys(tmp_path / "keys", REQUESTER, now=utcnow())
        key = str(tmp_path / "keys" / PUBLIC_JWK)
        add = ["requesters", "add", "--id", REQUESTER, "--name", "City Police"]
        assert agent_main(["--config", str(path), *add, "--kind", "law-enforcement",
                           "--key", key]) == 0
        return path

    yield setup


def start_daemon(cfg_path: Path) -> subprocess.Popen[str]:
    """``doorbell-agent run`` with every worker, as systemd would start it."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    code = "import sys\nfrom agent.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(cfg_path), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_daemon(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def send_request(cfg_path: Path, broker: Mosquitto) -> None:
    now = utcnow()
    keys = cfg_path.parent / "keys"
    assert requester_main([
        "send", "--device", DEVICE,
        "--from", rfc3339(now - timedelta(minutes=30)), "--to", rfc3339(now),
        "--reason", "parcel taken from the porch", "--legal-basis", "consent",
        "--key", str(keys), "--host", broker.host, "--port", str(broker.port),
    ]) == 0


def assert_no_footage(messages: list[mqtt.MQTTMessage]) -> None:
    for msg in messages:
        for magic in IMAGE_MAGIC:
            assert magic not in msg.payload, f"image or video bytes published on {msg.topic}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemon_announces_motion_and_pending(
    mosquitto_factory: Callable[..., Mosquitto],
    agent_setup: Callable[[Mosquitto, bool], Path],
) -> None:
    # Without persistence a broker restart loses every retained message: the agent must
    # announce again on its own.
    broker = mosquitto_factory(persistence=False)
    cfg_path = agent_setup(broker, True)
    spy = broker.client()
    spy.subscribe("#")
    proc = start_daemon(cfg_path)
    watch = Watch(spy, proc)
    later: Watch | None = None
    try:
        configs = watch.configs()
        motion = configs[f"{DISCOVERY}/binary_sensor/{DEVICE}/motion/config"]
        assert (motion["state_topic"], motion["device_class"]) == (MOTION_TOPIC, "motion")
        pending = configs[f"{DISCOVERY}/sensor/{DEVICE}/pending/config"]
        assert pending["state_topic"] == PENDING_TOPIC
        watch.state(PENDING_TOPIC, b"0")

        send_request(cfg_path, broker)
        watch.state(PENDING_TOPIC, b"1")

        watch.state(MOTION_TOPIC, b"ON", timeout=90)  # the visitor arrives
        watch.state(MOTION_TOPIC, b"OFF", timeout=90)  # and leaves

        spy.close()
        broker.restart()
        fresh = broker.client()
        fresh.subscribe(f"{DISCOVERY}/#")
        fresh.subscribe(f"{PREFIX}/{DEVICE}/ha/#")
        later = Watch(fresh, proc)
        assert set(later.configs()) == CONFIG_TOPICS
        later.state(PENDING_TOPIC, b"1")
        # Retained: Home Assistant starting now still finds them.
        late = broker.client()
        try:
            late.subscribe(f"{DISCOVERY}/#")
            retained = [late.get() for _ in CONFIG_TOPICS]
            assert {m.topic for m in retained} == CONFIG_TOPICS
            assert all(m.retain for m in retained)
        finally:
            late.close()
        stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        spy.close()
        if later is not None:
            later.collector.close()
    messages = watch.drain() + (later.drain() if later is not None else [])
    assert_no_footage(messages)
    for msg in messages:
        if msg.topic.startswith(f"{DISCOVERY}/"):
            assert msg.topic in CONFIG_TOPICS
        if msg.topic.startswith(f"{PREFIX}/{DEVICE}/ha/"):
            assert msg.topic in (MOTION_TOPIC, PENDING_TOPIC)
            assert msg.payload in (b"ON", b"OFF") or msg.payload.isdigit()
    state = cfg_path.parent / "state"
    with Vault(state, load_storage_key(state)) as vault:
        assert vault.list_clips()  # the visitor was recorded, and none of it went out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_disabled_publishes_nothing_for_home_assistant(
    mosquitto: Mosquitto, agent_setup: Callable[[Mosquitto, bool], Path]
) -> None:
    cfg_path = agent_setup(mosquitto, False)
    spy = mosquitto.client()
    spy.subscribe("#")
    proc = start_daemon(cfg_path)
    watch = Watch(spy, proc)
    try:
        watch.until(
            lambda m: m.topic == f"{PREFIX}/{DEVICE}/status" and json.loads(m.payload)["online"],
            "the online status",
        )
        send_request(cfg_path, mosquitto)
        # The pending response comes after the connection an enabled worker would have
        # announced on, and after the status change it would have published.
        watch.until(lambda m: m.topic == f"{PREFIX}/{DEVICE}/responses/{REQUESTER}", "pending")
        status = json.loads((cfg_path.parent / "state" / "status.json").read_text())
        assert "homeassistant" not in status["workers"]
        stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        spy.close()
    messages = watch.drain()
    assert not [m.topic for m in messages if m.topic.startswith(f"{DISCOVERY}/")]
    assert not [m.topic for m in messages if m.topic.startswith(f"{PREFIX}/{DEVICE}/ha/")]
    assert_no_footage(messages)


# --- the example ACL -----------------------------------------------------------------------


def test_example_acl_home_assistant_lines(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(
        passwords={"doorbell-front-door": "d-pw", "homeassistant": "ha-pw", "alice": "a-pw"},
        acl=ACL_EXAMPLE.read_text(),
    )
    device = broker.client(username="doorbell-front-door", password="d-pw")
    ha = broker.client(username="homeassistant", password="ha-pw")
    alice = broker.client(username="alice", password="a-pw")
    try:
        ha.subscribe(f"{DISCOVERY}/#")
        ha.subscribe(f"{PREFIX}/+/ha/#")
        ha.subscribe(f"{PREFIX}/+/status")
        alice.subscribe(f"{PREFIX}/#")
        alice.subscribe(f"{DISCOVERY}/#")
        allowed = [
            f"{DISCOVERY}/binary_sensor/{DEVICE}/motion/config",
            MOTION_TOPIC,
            PENDING_TOPIC,
            f"{PREFIX}/{DEVICE}/status",
        ]
        refused = [  # the device cannot speak for another device
            f"{DISCOVERY}/binary_sensor/back-door/motion/config",
            f"{PREFIX}/back-door/ha/motion",
        ]
        for topic in refused + allowed:
            device.publish(topic, b"ON")
        ha.publish(MOTION_TOPIC, b"OFF")  # Home Assistant only reads
        got = [ha.get().topic for _ in allowed]
        assert got == allowed
        last = f"{PREFIX}/{DEVICE}/status"
        device.publish(last, b"end")  # a marker: everything before it has been routed
        assert ha.get().topic == last
        assert [m.topic for m in ha.drain()] == []
        # alice sees both status messages and nothing of ha/# or the discovery configs
        assert [alice.get().topic for _ in range(2)] == [last, last]
        assert [m.topic for m in alice.drain()] == []
    finally:
        for c in (device, ha, alice):
            c.close()
