"""What the device announces on MQTT by itself: its retained status (§6) and audit head (§7).

``status_payload`` builds the §6 JSON; ``Coalescer`` is the pure rate limiter behind the audit
head ("refreshed after each append, coalesced at most once a second"); ``Announcer`` is the
thread that publishes both through an :class:`agent.mqtt.MQTTClient`.

The will: the broker publishes it when our connection dies without a DISCONNECT, so it must be
registered before we connect. Its ``since`` is the time of the connection attempt whose loss it
reports (the broker cannot ask us for a better time); a clean shutdown publishes its own
``online: false`` with the real time instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.audit import AuditEntry, build_head_jws
from agent.errors import AgentError
from agent.keys import kid_for, public_jwk
from agent.lifecycle import Closing
from agent.mqtt import MessagePublisher, Will
from agent.timeutil import rfc3339, utcnow
from agent.topics import Topics

log = logging.getLogger(__name__)

T = TypeVar("T")


def status_document(
    device_id: str,
    signing_key: Ed25519PrivateKey,
    *,
    online: bool,
    since: datetime,
    audit: str = "ok",
) -> dict[str, Any]:
    """The §6 status object: device id, online flag, kid, public JWK, version, since, audit
    (``ok``, or ``broken`` once a start-up check found the request log cut short)."""
    if audit not in ("ok", "broken"):
        raise ValueError(f"audit state must be ok or broken, not {audit!r}")
    public = signing_key.public_key()
    return {
        "device_id": device_id,
        "online": online,
        "kid": kid_for(public),
        "public_jwk": public_jwk(public),
        "version": __version__,
        "since": rfc3339(since),
        "audit": audit,
    }


def status_payload(
    device_id: str,
    signing_key: Ed25519PrivateKey,
    *,
    online: bool,
    since: datetime,
    audit: str = "ok",
) -> bytes:
    """The §6 status as the UTF-8 JSON bytes published (retained) on ``P/D/status``."""
    doc = status_document(device_id, signing_key, online=online, since=since, audit=audit)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class Coalescer(Generic[T]):
    """Keep only the newest offered item and release it at most once per ``interval`` seconds.

    Pure: the caller passes the (monotonic) time. ``take(now)`` returns ``(item, None)`` when
    an item is due, ``(None, wait)`` when one is waiting but not yet due, ``(None, None)`` when
    nothing is waiting.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._item: T | None = None
        self._last: float | None = None

    def offer(self, item: T) -> None:
        """Replace whatever was waiting with ``item``."""
        self._item = item

    def take(self, now: float) -> tuple[T | None, float | None]:
        """The item if it may go out now, else how long until it may."""
        if self._item is None:
            return None, None
        if self._last is not None and now - self._last < self.interval:
            return None, self.interval - (now - self._last)
        item, self._item, self._last = self._item, None, now
        return item, None


class Publisher(MessagePublisher, Protocol):
    """What the announcer needs of :class:`agent.mqtt.MQTTClient`."""

    @property
    def connected(self) -> bool:
        """Whether the connection is up (an offline status is only worth sending then)."""
        ...


@dataclass(frozen=True)
class _Head:
    seq: int
    hash: str


class Announcer(Closing):
    """Publishes the retained status on every (re)connect and the audit head after appends.

    Wire it up: pass ``will`` as the MQTT client's ``will_factory`` and ``connected`` as its
    ``on_connect``; set ``audit.on_append = announcer.audit_appended``. ``last_entry`` (the audit
    log's ``last_entry``) is polled every ``poll_interval`` seconds so appends made by other
    processes (``doorbell-agent approve`` and friends) also refresh the head. ``audit_state``
    gives the status's ``audit`` field. A head below ``floor`` (see :meth:`set_floor`: the
    newest head known at start) is never published: the public head never goes backwards.
    """

    def __init__(
        self,
        *,
        topics: Topics,
        signing_key: Ed25519PrivateKey,
        last_entry: Callable[[], AuditEntry | None],
        head_interval: float = 1.0,
        poll_interval: float = 5.0,
        now: Callable[[], datetime] = utcnow,
        audit_state: Callable[[], str] = lambda: "ok",
    ) -> None:
        self.topics = topics
        self._key = signing_key
        self._last_entry = last_entry
        self._audit_state = audit_state
        self._floor = 0
        self._now = now
        self._poll_interval = poll_interval
        self._heads: Coalescer[_Head] = Coalescer(head_interval)
        self._published_seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._announce_online = False
        self._publisher: Publisher | None = None
        self._thread = threading.Thread(target=self._run, name="mqtt-announcer", daemon=True)
        self._closed = False

    def will(self) -> Will:
        """The MQTT will: ``online: false``, retained, QoS 1 (for ``will_factory``)."""
        payload = self._status(online=False)
        return Will(self.topics.status, payload, qos=1, retain=True)

    def set_floor(self, seq: int) -> None:
        """Never publish a head with a lower ``seq`` than ``seq`` (the newest head known)."""
        with self._lock:
            self._floor = max(self._floor, seq)

    def refresh_status(self) -> None:
        """Publish the status again soon (its ``audit`` state changed)."""
        with self._lock:
            self._announce_online = True
        self._wake.set()

    def _status(self, *, online: bool) -> bytes:
        try:
            state = self._audit_state()
        except OSError as exc:
            log.warning("cannot read the audit state: %s", exc)
            state = "broken"
        return status_payload(
            self.topics.device_id, self._key, online=online, since=self._now(), audit=state
        )

    def attach(self, publisher: Publisher) -> None:
        """Publish through ``publisher`` without starting: only ``close``'s offline status goes
        out (an agent stopped before its start-up audit check announces nothing else)."""
        self._publisher = publisher

    def start(self, publisher: Publisher) -> None:
        """Start publishing through ``publisher``; announces the current audit head first."""
        self._publisher = publisher
        self._offer_latest()
        self._thread.start()

    def connected(self, _session_present: bool) -> None:
        """MQTT on_connect hook (network thread): announce status and head again, soon."""
        with self._lock:
            self._announce_online = True
            self._published_seq = 0  # a broker that lost its retained messages needs it again
        self._offer_latest()
        self._wake.set()

    def audit_appended(self, entry: AuditEntry) -> None:
        """AuditLog ``on_append`` hook: refresh the head (coalesced)."""
        with self._lock:
            self._heads.offer(_Head(entry.seq, entry.hash))
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, publish ``online: false`` (waiting up to ``timeout`` s). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._publisher is None or not self._publisher.connected:
            return  # the broker publishes our will when it notices we are gone
        payload = self._status(online=False)
        try:
            topic = self.topics.status
            done = self._publisher.publish(topic, payload, retain=True, timeout=timeout)
            done.result(timeout)
        except (AgentError, TimeoutError) as exc:
            log.warning("could not publish the offline status: %s", exc)

    def _offer_latest(self) -> None:
        try:
            entry = self._last_entry()
        except AgentError as exc:
            log.warning("cannot read the audit log's last entry: %s", exc)
            return
        if entry is None:
            return
        with self._lock:
            if entry.seq > self._published_seq:
                self._heads.offer(_Head(entry.seq, entry.hash))

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self._offer_latest()
                next_poll = now + self._poll_interval
            with self._lock:
                online, self._announce_online = self._announce_online, False
                head, wait = self._heads.take(now)
            if online:
                self._publish_status()
            if head is not None:
                self._publish_head(head)
            timeout = next_poll - time.monotonic()
            if wait is not None:
                timeout = min(timeout, wait)
            if head is None and not online:
                self._wake.wait(max(timeout, 0.0))
                self._wake.clear()

    def _publish_status(self) -> None:
        assert self._publisher is not None
        payload = self._status(online=True)
        try:
            self._publisher.publish(self.topics.status, payload, retain=True)
        except AgentError as exc:
            log.warning("could not publish the status: %s", exc)

    def _publish_head(self, head: _Head) -> None:
        assert self._publisher is not None
        with self._lock:
            floor = self._floor
        if head.seq < floor:
            log.error(
                "not publishing audit head seq %d: the public head is already at seq %d",
                head.seq, floor,
            )
            return
        token = build_head_jws(self._key, self.topics.device_id, head.seq, head.hash, self._now())
        try:
            self._publisher.publish(self.topics.audit_head, token, retain=True)
        except AgentError as exc:
            log.warning("could not publish the audit head: %s", exc)
            return
        with self._lock:
            self._published_seq = max(self._published_seq, head.seq)
