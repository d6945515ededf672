"""Home Assistant discovery: payloads, templates, and publishing through a real mosquitto."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest

from agent import __version__
from agent.config import MQTTConfig
from agent.errors import MQTTError
from agent.homeassistant import (
    AVAILABILITY_TEMPLATE,
    ONLINE_TEMPLATE,
    HomeAssistantPublisher,
    Message,
    discovery_messages,
    motion_message,
    pending_message,
)
from agent.mqtt import MQTTClient
from agent.topics import check_discovery_prefix
from tests.mosquitto import HOST, Collector, Mosquitto

D = "front-door"
P = "doorbell"

# Home Assistant MQTT components and keys that would carry pictures or video.
IMAGE_COMPONENTS = {"camera", "image"}
IMAGE_KEYS = {
    "image_topic",
    "url_topic",
    "image_encoding",
    "entity_picture",
    "json_attributes_topic",
}


def _docs(messages: list[Message]) -> dict[str, dict[str, Any]]:
    return {m.topic: json.loads(m.payload) for m in messages}


def test_discovery_topics_and_retain() -> None:
    messages = discovery_messages(D, P)
    assert [m.topic for m in messages] == [
        f"homeassistant/binary_sensor/{D}/motion/config",
        f"homeassistant/sensor/{D}/pending/config",
        f"homeassistant/binary_sensor/{D}/online/config",
    ]
    assert all(m.retain for m in messages)
    custom = discovery_messages(D, "home/cams", discovery_prefix="ha/disc")
    assert all(m.topic.startswith("ha/disc/") for m in custom)
    assert _docs(custom)[f"ha/disc/sensor/{D}/pending/config"]["state_topic"] == (
        f"home/cams/{D}/ha/pending"
    )


def test_payloads_are_json_with_unique_ids_and_one_device() -> None:
    docs = _docs(discovery_messages(D, P))
    unique_ids = [doc["unique_id"] for doc in docs.values()]
    assert len(set(unique_ids)) == len(unique_ids) == 3
    assert all(D in uid for uid in unique_ids)
    devices = [doc["device"] for doc in docs.values()]
    assert all(dev == devices[0] for dev in devices)
    assert devices[0]["identifiers"] == [f"doorbell-agent_{D}"]
    assert devices[0]["sw_version"] == __version__
    assert all(doc["qos"] == 1 for doc in docs.values())


def test_no_image_or_camera_entities() -> None:
    messages = discovery_messages(D, P)
    for message in messages:
        component = message.topic.split("/")[1]
        assert component in {"binary_sensor", "sensor"}
        assert component not in IMAGE_COMPONENTS
        doc = json.loads(message.payload)
        assert IMAGE_KEYS.isdisjoint(doc)
        # Every topic Home Assistant is told to read is one of our small state topics.
        assert doc["state_topic"] in {
            f"{P}/{D}/ha/motion",
            f"{P}/{D}/ha/pending",
            f"{P}/{D}/status",
        }
        for key, value in doc.items():
            if key.endswith("topic"):
                assert "deliver" not in value
                assert "clip" not in value


def test_availability_follows_the_status_topic() -> None:
    docs = _docs(discovery_messages(D, P))
    for name in ("binary_sensor/front-door/motion", "sensor/front-door/pending"):
        doc = docs[f"homeassistant/{name}/config"]
        assert doc["availability"] == [
            {"topic": f"{P}/{D}/status", "value_template": AVAILABILITY_TEMPLATE}
        ]
        assert (doc["payload_available"], doc["payload_not_available"]) == ("online", "offline")
    online = docs[f"homeassistant/binary_sensor/{D}/online/config"]
    assert online["state_topic"] == f"{P}/{D}/status"
    assert online["device_class"] == "connectivity"
    assert "availability" not in online


@pytest.mark.parametrize(
    ("online", "available", "state"), [(True, "online", "ON"), (False, "offline", "OFF")]
)
def test_templates_render_with_jinja(online: bool, available: str, state: str) -> None:
    # Home Assistant templates are Jinja2 with the parsed payload as value_json.
    status = {"device_id": D, "online": online, "kid": "k", "version": "1", "since": "x"}
    env = jinja2.Environment(autoescape=False)  # renders plain words, not HTML
    assert env.from_string(AVAILABILITY_TEMPLATE).render(value_json=status) == available
    assert env.from_string(ONLINE_TEMPLATE).render(value_json=status) == state


def test_state_messages() -> None:
    assert motion_message(D, P, True) == Message(f"{P}/{D}/ha/motion", b"ON", True)
    assert motion_message(D, P, False).payload == b"OFF"
    assert pending_message(D, P, 3) == Message(f"{P}/{D}/ha/pending", b"3", True)
    with pytest.raises(ValueError, match="negative"):
        pending_message(D, P, -1)


@pytest.mark.parametrize("bad", ["", "home/#", "a/+/b", "/ha", "ha/", "a//b", "$SYS", "x" * 129])
def test_bad_discovery_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_discovery_prefix(bad)
    with pytest.raises(ValueError):
        discovery_messages(D, P, discovery_prefix=bad)


def test_publisher_drops_repeats_and_survives_errors() -> None:
    sent: list[tuple[str, bytes, bool]] = []
    fail = [False]

    def publish(topic: str, payload: bytes, *, retain: bool) -> None:
        if fail[0]:
            raise MQTTError("the MQTT client is closing")
        sent.append((topic, payload, retain))

    ha = HomeAssistantPublisher(publish, D, P)
    ha.announce(motion=False, pending=0)
    assert len(sent) == 5
    ha.set_motion(False)
    ha.set_pending(0)
    assert len(sent) == 5
    ha.set_motion(True)
    ha.set_pending(1)
    assert sent[5:] == [(f"{P}/{D}/ha/motion", b"ON", True), (f"{P}/{D}/ha/pending", b"1", True)]
    fail[0] = True
    ha.set_pending(2)  # logged, not raised: Home Assistant is optional
    assert len(sent) == 7


def test_publishes_through_the_agents_mqtt_client(mosquitto: Mosquitto) -> None:
    watcher = Collector("ha-watcher")
    watcher.connect(HOST, mosquitto.port)
    client = MQTTClient(
        MQTTConfig.model_validate({"host": HOST, "port": mosquitto.port}), client_id="ha-agent"
    )
    try:
        assert watcher.subscribe("#") == [1]
        client.start()
        assert client.wait_connected(10)
        ha = HomeAssistantPublisher(client.publish, D, P)
        ha.announce(motion=False, pending=0)
        ha.set_motion(True)
        ha.set_motion(True)
        ha.set_pending(2)
        got = [watcher.get() for _ in range(7)]
        assert [m.topic for m in got[:3]] == [m.topic for m in discovery_messages(D, P)]
        assert [(m.topic, m.payload) for m in got[3:]] == [
            (f"{P}/{D}/ha/motion", b"OFF"),
            (f"{P}/{D}/ha/pending", b"0"),
            (f"{P}/{D}/ha/motion", b"ON"),
            (f"{P}/{D}/ha/pending", b"2"),
        ]
        # The repeated motion ON was dropped: the next message is the next change.
        ha.set_pending(3)
        after = watcher.get()
        assert (after.topic, after.payload) == (f"{P}/{D}/ha/pending", b"3")
    finally:
        client.close()
        watcher.close()

    # The broker kept the configs and states retained for a Home Assistant that starts later.
    late = Collector("ha-late")
    late.connect(HOST, mosquitto.port)
    try:
        late.subscribe("homeassistant/#")
        retained = {m.topic: json.loads(m.payload) for m in (late.get(), late.get(), late.get())}
        assert retained == _docs(discovery_messages(D, P))
        late.subscribe(f"{P}/{D}/ha/#")
        states = {m.topic: m.payload for m in (late.get(), late.get())}
        assert states == {f"{P}/{D}/ha/motion": b"ON", f"{P}/{D}/ha/pending": b"3"}
    finally:
        late.close()
