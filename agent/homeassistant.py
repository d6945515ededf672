"""Optional Home Assistant MQTT discovery: motion, pending requests, online. Never images.

With ``homeassistant.enabled`` the agent announces three entities under Home Assistant's
discovery prefix (retained, so Home Assistant finds them whenever it starts):

- ``<discovery>/binary_sensor/D/motion/config``: motion at the door, state on ``P/D/ha/motion``
  (``ON``/``OFF``);
- ``<discovery>/sensor/D/pending/config``: how many footage requests await the owner, state on
  ``P/D/ha/pending`` (a decimal count);
- ``<discovery>/binary_sensor/D/online/config``: connectivity, read straight from the retained
  ``P/D/status`` (whose MQTT will turns it off).

The first two take their availability from ``P/D/status`` too. There is deliberately no camera
or image entity and no topic that carries a frame, a thumbnail or a clip: footage leaves the
device only through an approved request. The motion state does tell anyone who may read
``P/D/ha/#`` on the broker when someone is at the door, which is why this is off by default.

The builders are pure; :class:`HomeAssistantPublisher` sends through any ``publish(topic,
payload, *, retain)`` callable (``agent.mqtt.MQTTClient.publish`` fits) and drops repeats.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent import __version__
from agent.errors import AgentError
from agent.topics import DEFAULT_DISCOVERY_PREFIX, Topics, check_discovery_prefix

log = logging.getLogger(__name__)

# Home Assistant renders an availability topic through this template; our status is JSON.
AVAILABILITY_TEMPLATE = "{{ 'online' if value_json.online else 'offline' }}"
ONLINE_TEMPLATE = "{{ 'ON' if value_json.online else 'OFF' }}"


class Publish(Protocol):
    """What the publisher needs of an MQTT client: QoS 1 publish with a retain flag."""

    def __call__(self, topic: str, payload: bytes, *, retain: bool) -> object:
        """Queue ``payload`` for ``topic``."""


@dataclass(frozen=True)
class Message:
    """One MQTT message to publish (QoS 1)."""

    topic: str
    payload: bytes
    retain: bool


def state_topics(device_id: str, topic_prefix: str) -> tuple[str, str]:
    """The agent's own state topics: ``(P/D/ha/motion, P/D/ha/pending)``."""
    topics = Topics(topic_prefix, device_id)
    return topics.home_assistant("motion"), topics.home_assistant("pending")


def _device_block(device_id: str, version: str) -> dict[str, Any]:
    return {
        "identifiers": [f"doorbell-agent_{device_id}"],
        "name": f"Doorbell {device_id}",
        "manufacturer": "doorbell-agent",
        "model": "doorbell-agent",
        "sw_version": version,
    }


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def discovery_messages(
    device_id: str,
    topic_prefix: str,
    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX,
    version: str = __version__,
) -> list[Message]:
    """The retained discovery configs for the motion, pending and online entities."""
    check_discovery_prefix(discovery_prefix)
    status_topic = Topics(topic_prefix, device_id).status
    motion_topic, pending_topic = state_topics(device_id, topic_prefix)
    device = _device_block(device_id, version)
    origin = {"name": "doorbell-agent", "sw_version": version}
    availability = {
        "availability": [{"topic": status_topic, "value_template": AVAILABILITY_TEMPLATE}],
        "payload_available": "online",
        "payload_not_available": "offline",
    }
    motion = {
        "name": "Motion",
        "unique_id": f"doorbell-agent_{device_id}_motion",
        "device_class": "motion",
        "state_topic": motion_topic,
        "payload_on": "ON",
        "payload_off": "OFF",
        "qos": 1,
        "device": device,
        "origin": origin,
        **availability,
    }
    pending = {
        "name": "Pending footage requests",
        "unique_id": f"doorbell-agent_{device_id}_pending",
        "icon": "mdi:account-question",
        "state_topic": pending_topic,
        "state_class": "measurement",
        "qos": 1,
        "device": device,
        "origin": origin,
        **availability,
    }
    # No availability here: when the agent is gone this should read "disconnected", not
    # "unavailable".
    online = {
        "name": "Online",
        "unique_id": f"doorbell-agent_{device_id}_online",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "state_topic": status_topic,
        "value_template": ONLINE_TEMPLATE,
        "qos": 1,
        "device": device,
        "origin": origin,
    }
    return [
        Message(f"{discovery_prefix}/binary_sensor/{device_id}/motion/config", _json(motion), True),
        Message(f"{discovery_prefix}/sensor/{device_id}/pending/config", _json(pending), True),
        Message(f"{discovery_prefix}/binary_sensor/{device_id}/online/config", _json(online), True),
    ]


def motion_message(device_id: str, topic_prefix: str, active: bool) -> Message:
    """The retained motion state: ``ON`` while motion is seen, else ``OFF``."""
    return Message(state_topics(device_id, topic_prefix)[0], b"ON" if active else b"OFF", True)


def pending_message(device_id: str, topic_prefix: str, count: int) -> Message:
    """The retained count of requests awaiting the owner's decision."""
    if count < 0:
        raise ValueError("a pending count cannot be negative")
    return Message(state_topics(device_id, topic_prefix)[1], str(count).encode("ascii"), True)


class HomeAssistantPublisher:
    """Publishes discovery and state changes through ``publish``; repeats are dropped.

    Call :meth:`announce` after every (re)connection (a broker without persistence forgets
    retained messages), then :meth:`set_motion` and :meth:`set_pending` as often as convenient.
    A publish failure is logged and never raised: Home Assistant is an extra, the doorbell
    carries on without it. Thread-safe.
    """

    def __init__(
        self,
        publish: Publish,
        device_id: str,
        topic_prefix: str,
        discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX,
    ) -> None:
        """Publish for ``device_id`` under ``topic_prefix`` and Home Assistant's prefix."""
        self._publish = publish
        self._device_id = device_id
        self._topic_prefix = topic_prefix
        self._discovery = discovery_messages(device_id, topic_prefix, discovery_prefix)
        self._lock = threading.Lock()
        self._motion: bool | None = None
        self._pending: int | None = None

    def announce(self, motion: bool, pending: int) -> None:
        """Publish the discovery configs and the current states (again)."""
        with self._lock:
            self._send(self._discovery)
            self._motion, self._pending = motion, pending
            self._send(
                [
                    motion_message(self._device_id, self._topic_prefix, motion),
                    pending_message(self._device_id, self._topic_prefix, pending),
                ]
            )

    def set_motion(self, active: bool) -> None:
        """Publish the motion state if it changed."""
        with self._lock:
            if active == self._motion:
                return
            self._motion = active
            self._send([motion_message(self._device_id, self._topic_prefix, active)])

    def set_pending(self, count: int) -> None:
        """Publish the pending-request count if it changed."""
        with self._lock:
            if count == self._pending:
                return
            message = pending_message(self._device_id, self._topic_prefix, count)
            self._pending = count
            self._send([message])

    def _send(self, messages: Iterable[Message]) -> None:
        for message in messages:
            try:
                self._publish(message.topic, message.payload, retain=message.retain)
            except AgentError as exc:
                log.warning("Home Assistant update to %s not sent: %s", message.topic, exc)
