"""A thin adapter over paho-mqtt 2.x (MQTT v5) shared by the agent and ``doorbell-request``.

Threads and why:

- paho's network thread runs every callback. It must never block (a blocked network thread
  misses keep-alives and the broker drops us), so ``on_message`` hands each message to the
  caller's handler, which is expected to do a cheap check and a non-blocking queue put.
- One publisher thread owns every ``publish`` call. Callers enqueue into a bounded outbox
  (``publish`` blocks or times out when it is full) and get a ``Future`` that completes when the
  broker acknowledged the message (PUBACK for QoS 1). At most ``max_inflight`` QoS 1 messages
  await their PUBACK at once, so a long delivery cannot grow memory without bound.
- Incoming QoS 1 messages can be acknowledged manually (``manual_ack=True``): the caller acks
  once the message is durably handled, so a crash before that makes the broker redeliver it.

With ``persistent=True`` the client connects with ``clean_start=False`` and a session expiry so
the broker keeps our subscription and queues QoS 1 messages while we are offline.

With ``hold_inbound=True`` messages on the subscriptions are held, unacknowledged and unseen by
the handler, until ``release_inbound()``: the broker's session may hand us queued requests the
moment we connect, before the agent has checked its audit log against its retained head (§7).
QoS 1 messages held are bounded by our Receive Maximum; QoS 0 ones beyond ``HOLD_QOS0_MAX`` are
dropped (at most once is their contract). ``subscribe(topic, handler)`` adds a subscription of
its own, answered by a future on its SUBACK, whose messages go to ``handler`` at once.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MQTTConfig
from agent.errors import ConfigError, MQTTError
from agent.keys import check_secret
from agent.lifecycle import StartStop
from agent.timeutil import rfc3339, utcnow

log = logging.getLogger(__name__)
paho_log = logging.getLogger("agent.mqtt.paho")

_STOP = object()
_PAHO_LEVELS: dict[int, int] = {
    paho.MQTT_LOG_INFO: logging.INFO,
    paho.MQTT_LOG_NOTICE: logging.INFO,
    paho.MQTT_LOG_WARNING: logging.WARNING,
    paho.MQTT_LOG_ERR: logging.ERROR,
    paho.MQTT_LOG_DEBUG: logging.DEBUG,
}
# paho's network loop logs this at ERROR on every pass without a socket: after a clean
# disconnect and on each reconnect attempt while the broker is down. Our own connect, disconnect
# and connect-failure messages already say what matters, once.
_PAHO_NO_SOCKET = "Client is not connected"


def _paho_log(_client: paho.Client, _userdata: Any, level: int, message: str) -> None:
    if message.startswith(_PAHO_NO_SOCKET):
        paho_log.debug("%s", message)
        return
    paho_log.log(_PAHO_LEVELS.get(level, logging.DEBUG), "%s", message)

SESSION_TAKEN_OVER = 0x8E
"""MQTT v5 DISCONNECT reason: another client connected with our client id."""
QUICK_DROP = 5.0
"""Seconds: a connection lost this soon after its CONNACK counts as an immediate drop."""
QUICK_DROPS = 3
"""Immediate drops in a row (without a reason code saying why) that suggest a client-id clash."""
TAKEOVER_BACKOFF_MAX = 300.0
"""Longest wait, in seconds, before reconnecting while another client uses our client id."""
CONFLICT_MEMORY = timedelta(hours=1)
"""How long ``status`` keeps saying "another client uses this client id" after the last sign."""

MAX_EXPIRY: Final = 2**32 - 1
"""Seconds: the largest MQTT v5 Message Expiry Interval (a four-byte integer)."""


def message_expiry(exp: datetime, now: datetime, cap: timedelta | None = None) -> int:
    """The Message Expiry Interval for something published about a request ending at ``exp``:
    its remaining lifetime in whole seconds, at least 1 (0 would mean "never expires" to some
    brokers' eyes, and an expired request's last answer must still reach a connected
    requester), at most ``cap`` (and the protocol's limit)."""
    remaining = math.ceil((exp - now).total_seconds())
    if cap is not None:
        remaining = min(remaining, math.ceil(cap.total_seconds()))
    return max(1, min(remaining, MAX_EXPIRY))

HOLD_QOS0_MAX = 64
"""QoS 0 messages kept while inbound messages are held; more are dropped."""


class MessagePublisher(Protocol):
    """What a part that sends needs of :class:`MQTTClient` (the responder, the announcer)."""

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        expiry: int | None = None,
        timeout: float | None = None,
    ) -> Future[None]:
        """Queue a QoS 1 message; the future completes on its PUBACK."""
        ...


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us if our connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class InboundMessage:
    """A message received on one of our subscriptions (paho's message, detached).

    ``dup`` is set when the broker is redelivering a QoS 1 message it already sent us once
    (after a reconnect) and never saw acknowledged.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    correlation_data: bytes | None
    mid: int
    generation: int


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    retain: bool
    properties: Properties | None
    future: Future[None] = field(default_factory=Future)


@dataclass
class MQTTStats:
    """Counters for logs, the status command and benches."""

    connects: int = 0
    disconnects: int = 0
    received: int = 0
    published: int = 0
    publish_failures: int = 0


@dataclass
class TakeoverGuard:
    """Spots two clients fighting over one client id and says how long to wait before the next
    reconnect. Pure: the caller passes monotonic seconds.

    Two agents with one client id (a copied config) knock each other off the broker as soon as
    either reconnects. A broker may say so (MQTT v5 DISCONNECT reason 0x8E, Session taken
    over); mosquitto 2.0 only closes the socket, which shows as connections dropped soon after
    their CONNACK, ``quick_drops`` times in a row. Once a series has started, every loss of a
    connection shorter than ``2 * limit`` continues it (the other client came back). Each sign
    doubles the wait, from ``base`` up to ``limit``, so the pair stops flapping every second;
    a connection that lasts ``2 * limit`` (longer than the other client can stay away) ends
    the series and the normal reconnect policy returns.
    """

    base: float = 2.0
    limit: float = TAKEOVER_BACKOFF_MAX
    quick: float = QUICK_DROP
    quick_drops: int = QUICK_DROPS
    conflicts: int = 0
    """Disconnects taken as another client using our client id, ever."""
    streak: int = 0
    _quick: int = 0
    _up_since: float | None = None

    def connected(self, now: float) -> None:
        """A CONNACK accepted us at ``now``."""
        self._up_since = now

    def disconnected(
        self, reason: int, now: float, *, from_server: bool = False
    ) -> float | None:
        """The connection ended at ``now`` with MQTT reason code ``reason`` (``from_server``:
        the broker sent a DISCONNECT saying so); returns the seconds to wait before
        reconnecting, or None for the normal reconnect policy."""
        lasted = None if self._up_since is None else now - self._up_since
        self._up_since = None
        if lasted is not None and lasted >= 2 * self.limit:
            self.streak = 0
            self._quick = 0
        if reason != SESSION_TAKEN_OVER:
            if from_server:
                # The broker said why (shutting down, keep-alive, ...), and it was not us.
                self._quick = 0
                return None
            if not self.streak:
                if lasted is None or lasted >= self.quick:
                    self._quick = 0
                    return None
                self._quick += 1
                if self._quick < self.quick_drops:
                    return None
        self.conflicts += 1
        self.streak += 1
        return min(self.base * 2.0 ** min(self.streak - 1, 30), self.limit)


def read_password_file(path: Path) -> str:
    """The broker password: the first line of ``path``, which must be private (0600)."""
    if not path.is_file():
        raise ConfigError(
            f"MQTT password file {path} does not exist",
            hint="set mqtt.password_file (or --password-file) to a file holding the password",
        )
    check_secret(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read MQTT password file {path}: {exc}") from None
    if not lines or not lines[0]:
        raise ConfigError(f"MQTT password file {path} is empty; put the password on its first line")
    return lines[0]


class MQTTClient(StartStop):
    """One MQTT v5 connection with reconnects, a publisher thread and bounded in-flight QoS 1.

    ``on_message`` runs on paho's network thread and must not block. ``on_connect`` (also on the
    network thread) is told whether the broker still had our session; use it to (re)announce
    state through ``publish`` (which only enqueues). ``will_factory``, if given, is called before
    every connection attempt so the will can carry the attempt's time. With ``fail_fast`` (a
    command line, not the daemon) :meth:`wait_ready` gives up as soon as one connection attempt
    fails (refused at once, or after paho's connect timeout) instead of waiting out retries.
    """

    def __init__(
        self,
        settings: MQTTConfig,
        *,
        client_id: str,
        subscriptions: Sequence[str] = (),
        on_message: Callable[[InboundMessage], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        will_factory: Callable[[], Will] | None = None,
        persistent: bool = False,
        manual_ack: bool = False,
        receive_maximum: int | None = None,
        maximum_packet_size: int | None = None,
        max_inflight: int = 16,
        outbox_size: int = 256,
        reconnect_min: int = 1,
        reconnect_max: int = 60,
        fail_fast: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
        hold_inbound: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.stats = MQTTStats()
        self._maximum_packet_size = maximum_packet_size
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._guard = TakeoverGuard(base=max(2.0, float(reconnect_min)))
        self.reconnect_wait: float | None = None
        """Seconds waited before the next reconnect while another client uses our client id
        (None: the normal reconnect policy)."""
        self._monotonic = monotonic
        self._now = now
        self._conflict_at: datetime | None = None
        self._conflict_kind: str | None = None
        self._subscriptions = tuple(subscriptions)
        self._handler = on_message
        self._connect_hook = on_connect
        self._will_factory = will_factory
        self._persistent = persistent
        self._receive_maximum = receive_maximum
        self._max_inflight = max_inflight
        self._outbox: queue.Queue[_Outgoing | object] = queue.Queue(maxsize=outbox_size)
        self._inflight = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()
        self._pending: dict[int, _Outgoing] = {}
        self._early: dict[int, ReasonCode] = {}
        self._sub_mids: dict[int, str] = {}
        self._extra_subs: dict[int, Future[bool]] = {}
        self._topic_handlers: dict[str, Callable[[InboundMessage], None]] = {}
        self._held: deque[InboundMessage] | None = deque() if hold_inbound else None
        self._hold_lock = threading.Lock()
        self._sub_lock = threading.Lock()
        self.held_dropped = 0
        self._generation = 0
        self._connected = threading.Event()
        self._ready = threading.Event()
        self._refused: str | None = None
        self._fail_fast = fail_fast
        self._attempt_failed = threading.Event()
        self._failure: str | None = None
        self._down_reported = False
        self._closing = threading.Event()
        self._closed = False
        self._started = False
        self._publisher = threading.Thread(
            target=self._publish_loop, name=f"mqtt-publisher-{client_id}", daemon=True
        )

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=manual_ack,
        )
        self._client.on_log = _paho_log
        self._client.max_inflight_messages_set(max_inflight)
        # paho's own queue stays unbounded only in theory: our semaphore never lets more than
        # max_inflight QoS 1 messages reach it.
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(reconnect_min, reconnect_max)
        if settings.username is not None:
            password = (
                read_password_file(settings.password_file)
                if settings.password_file is not None
                else None
            )
            self._client.username_pw_set(settings.username, password)
        if settings.tls.enabled:
            try:
                self._client.tls_set(
                    ca_certs=str(settings.tls.cafile) if settings.tls.cafile else None,
                    certfile=str(settings.tls.certfile) if settings.tls.certfile else None,
                    keyfile=str(settings.tls.keyfile) if settings.tls.keyfile else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot load the MQTT TLS files (mqtt.tls.*): {exc}",
                    hint="check mqtt.tls.cafile, certfile and keyfile name readable PEM files",
                ) from None
        self._client.on_pre_connect = self._on_pre_connect
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background (reconnecting with backoff) and publishing."""
        if self._started:
            return
        self._started = True
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        clean_start = not self._persistent
        if self._persistent:
            props.SessionExpiryInterval = int(self.settings.session_expiry.total_seconds())
        if self._receive_maximum is not None:
            # The broker sends at most this many unacknowledged QoS 1 messages at once.
            props.ReceiveMaximum = self._receive_maximum
        if self._maximum_packet_size is not None:
            # The broker then drops (and never sends us) anything larger: an oversize message
            # costs us nothing, not even the memory to read it and throw it away.
            props.MaximumPacketSize = self._maximum_packet_size
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=int(self.settings.keepalive.total_seconds()),
            clean_start=clean_start,
            properties=props,
        )
        self._client.loop_start()
        self._publisher.start()

    @property
    def paho_client(self) -> paho.Client:
        """The underlying paho client, for helpers that add topic callbacks of their own
        (``message_callback_add``) or subscribe further; never publish through it."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether a connection to the broker is up right now."""
        return self._connected.is_set()

    @property
    def generation(self) -> int:
        """How many times we have connected (changes on every reconnect)."""
        return self._generation

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; says whether there is one."""
        return self._connected.wait(timeout)

    def client_id_conflict(self) -> dict[str, Any] | None:
        """When another client recently used our client id (within CONFLICT_MEMORY): what was
        seen, for ``doorbell-agent status`` and the app (never for the retained MQTT status)."""
        at, kind = self._conflict_at, self._conflict_kind
        if at is None or kind is None or self._now() - at > CONFLICT_MEMORY:
            return None
        return {
            "client_id": self.client_id,
            "conflicts": self._guard.conflicts,
            "last": rfc3339(at),
            "detail": kind,
        }

    def wait_ready(self, timeout: float) -> None:
        """Wait until connected and every subscription is acknowledged.

        Raises MQTTError if the broker refused a subscription or ``timeout`` passed first.
        """
        where = f"{self.settings.host}:{self.settings.port}"
        hint = "check --host/--port (mqtt.host/mqtt.port), TLS and credentials"
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._fail_fast and self._attempt_failed.is_set():
                raise MQTTError(self._failure or f"could not connect to the MQTT broker at {where}",
                                hint=hint)
            if time.monotonic() >= deadline:
                raise MQTTError(
                    f"could not connect to the MQTT broker at {where} within {timeout:g} s",
                    hint=hint,
                )
        if self._refused is not None:
            raise MQTTError(self._refused, hint="check the broker's ACL for this user")

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (waiting up to ``timeout`` s for acks), disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._started:
            self._outbox.put(_STOP)
            self._publisher.join(timeout)
            if self._connected.is_set():
                self._wait_inflight(timeout)
            self._client.disconnect()
            self._client.loop_stop()
        with self._lock:
            leftovers = list(self._pending.values())
            self._pending.clear()
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Outgoing):
                leftovers.append(item)
        for out in leftovers:
            if not out.future.done():
                out.future.set_exception(
                    MQTTError(f"closed before the broker acknowledged a message to {out.topic}")
                )

    # -- extra subscriptions and held messages ----------------------------------------------

    def subscribe(
        self, topic: str, handler: Callable[[InboundMessage], None]
    ) -> Future[bool]:
        """Subscribe (QoS 1) to ``topic`` now, its messages going to ``handler`` (on paho's
        network thread: it must not block). The future completes on the SUBACK with whether
        the broker granted it, or fails with MQTTError when the request could not be sent."""
        future: Future[bool] = Future()
        with self._sub_lock:
            self._topic_handlers[topic] = handler
            # Under this lock, so the SUBACK (handled under it too) cannot beat the bookkeeping.
            result, mid = self._client.subscribe(topic, qos=1)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._extra_subs[mid] = future
                return future
        future.set_exception(MQTTError(f"could not subscribe to {topic}: {result}"))
        return future

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription made with :meth:`subscribe` (best effort)."""
        with self._sub_lock:
            self._topic_handlers.pop(topic, None)
        self._client.unsubscribe(topic)

    def release_inbound(self) -> None:
        """Hand the held messages, in arrival order, to the handler and stop holding."""
        with self._hold_lock:
            held, self._held = self._held, None
            for message in held or ():
                self._dispatch(message)

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        expiry: int | None = None,
        timeout: float | None = None,
    ) -> Future[None]:
        """Queue a QoS 1 message for the publisher thread; the future completes on its PUBACK.

        ``expiry`` is the MQTT v5 Message Expiry Interval in seconds (see
        :func:`message_expiry`): the broker drops the message once it has waited that long.
        Blocks while the outbox is full (``timeout`` None: indefinitely). Raises MQTTError when
        the client is closing or the outbox stayed full for ``timeout`` seconds. The future fails
        with MQTTError if the broker refuses the message or the client closes first.
        """
        if self._closing.is_set():
            raise MQTTError(f"the MQTT client is closing; not publishing to {topic}")
        if expiry is not None and not 1 <= expiry <= MAX_EXPIRY:
            raise ValueError(f"message expiry {expiry} s is out of range")
        props: Properties | None = None
        if correlation_data is not None or expiry is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry is not None:
                props.MessageExpiryInterval = expiry
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        out = _Outgoing(topic, data, retain, props)
        try:
            self._outbox.put(out, timeout=timeout)
        except queue.Full:
            raise MQTTError(
                f"the MQTT outbox stayed full for {timeout:g} s; not publishing to {topic}"
            ) from None
        return out.future

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a QoS 1 message received with ``manual_ack=True``.

        An ack for a message from an earlier connection is skipped: the broker has redelivered
        it on the new connection (flagged ``dup``) and that copy gets its own ack.
        """
        if message.qos == 0 or message.generation != self._generation:
            return
        self._client.ack(message.mid, message.qos)

    def _publish_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is _STOP:
                return
            assert isinstance(item, _Outgoing)
            while not self._inflight.acquire(timeout=0.5):
                if self._closing.is_set() and not self._connected.is_set():
                    self._fail(item, "closed while waiting for the broker")
                    break
            else:
                self._send(item)

    def _send(self, out: _Outgoing) -> None:
        try:
            info = self._client.publish(
                out.topic, out.payload, qos=1, retain=out.retain, properties=out.properties
            )
        except ValueError as exc:
            self._inflight.release()
            self._fail(out, str(exc))
            return
        # QoS 1 while disconnected is kept by paho and sent on reconnect; PUBACK resolves it.
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = out
        if early is not None:
            self._complete(out, early)

    def _complete(self, out: _Outgoing, reason: ReasonCode) -> None:
        self._inflight.release()
        if reason.is_failure:
            self._fail(out, f"the broker refused it: {reason.getName()}")
        else:
            self.stats.published += 1
            if not out.future.done():
                out.future.set_result(None)

    def _fail(self, out: _Outgoing, why: str) -> None:
        self.stats.publish_failures += 1
        log.warning("publishing to %s failed: %s", out.topic, why)
        if not out.future.done():
            out.future.set_exception(MQTTError(f"publishing to {out.topic} failed: {why}"))

    def _wait_inflight(self, timeout: float) -> None:
        acquired = 0
        try:
            for _ in range(self._max_inflight):
                if not self._inflight.acquire(timeout=timeout):
                    log.warning("closing with QoS 1 messages still unacknowledged")
                    return
                acquired += 1
        finally:
            for _ in range(acquired):
                self._inflight.release()

    # -- paho callbacks (network thread: never block) --------------------------------------

    def _on_pre_connect(self, client: paho.Client, _userdata: Any) -> None:
        if self._will_factory is not None:
            will = self._will_factory()
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._failure = (
                f"the MQTT broker at {self.settings.host}:{self.settings.port} refused the "
                f"connection: {reason.getName()}"
            )
            self._attempt_failed.set()
            log.log(logging.DEBUG if self._fail_fast else logging.ERROR, "%s", self._failure)
            return
        self._down_reported = False
        self._generation += 1
        self.stats.connects += 1
        self._guard.connected(self._monotonic())
        self._connected.set()
        log.info(
            "connected to MQTT broker %s:%s as %s (session present: %s)",
            self.settings.host, self.settings.port, self.client_id, flags.session_present,
        )
        # Subscribe every time: if the broker lost our session (restart without persistence)
        # the subscription went with it; renewing an existing one is harmless.
        with self._lock:
            self._sub_mids.clear()
        if self._subscriptions:
            result, mid = client.subscribe([(t, 1) for t in self._subscriptions])
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._lock:
                    self._sub_mids[mid] = ", ".join(self._subscriptions)
        else:
            self._ready.set()
        if self._connect_hook is not None:
            try:
                self._connect_hook(flags.session_present)
            except Exception:
                log.exception("on_connect hook failed")

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        # paho does not pass the OSError; refused, unreachable and timed out all end here.
        self._failure = (
            f"could not connect to the MQTT broker at {self.settings.host}:{self.settings.port}"
            f" (no answer, or the connection was refused; one attempt waits at most "
            f"{self._client.connect_timeout:g} s)"
        )
        self._attempt_failed.set()
        if self._fail_fast or self._down_reported or self._closing.is_set():
            log.debug("%s", self._failure)
            return
        # Once per outage: paho retries with backoff, and a line per attempt says nothing new.
        self._down_reported = True
        log.warning("%s; retrying in the background", self._failure)

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        codes: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        with self._sub_lock:
            extra = self._extra_subs.pop(mid, None)
        with self._lock:
            topics = self._sub_mids.pop(mid, None)
        if extra is not None:
            extra.set_result(not any(c.is_failure for c in codes))
            return
        if topics is None:
            return
        refused = [c for c in codes if c.is_failure]
        if refused:
            self._refused = (
                f"the broker refused our subscription to {topics}: {refused[0].getName()}"
            )
            log.error("%s", self._refused)
        self._ready.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connected.clear()
        self.stats.disconnects += 1
        if self._closing.is_set():
            return
        self._down_reported = True  # the failed reconnects that follow are the same outage
        wait = self._guard.disconnected(
            reason.value, self._monotonic(), from_server=flags.is_disconnect_packet_from_server
        )
        if wait is None:
            if self.reconnect_wait is not None:
                self.reconnect_wait = None
                self._client.reconnect_delay_set(self._reconnect_min, self._reconnect_max)
            log.warning("lost the MQTT connection (%s); reconnecting", reason.getName())
            return
        self.reconnect_wait = wait
        # paho waits min_delay before the next attempt (its delay was reset by our CONNACK).
        self._client.reconnect_delay_set(int(wait), max(int(wait), self._reconnect_max))
        if reason.value == SESSION_TAKEN_OVER:
            kind = (
                f"another MQTT client connected with this client id ({self.client_id}) and the "
                "broker handed it our session (reason: Session taken over)"
            )
        else:
            kind = (
                f"the broker keeps dropping our connection right after it accepts it "
                f"({reason.getName()}); another client probably uses this client id "
                f"({self.client_id})"
            )
        self._conflict_kind = kind
        self._conflict_at = self._now()
        log.error(
            "%s; waiting %d s before reconnecting. Two agents (a copied config or state "
            "directory?) must not share one client id: give each its own mqtt.client_id, or "
            "bind client ids to broker accounts (see config/mosquitto.example.conf)",
            kind, int(wait),
        )

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self.stats.received += 1
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        message = InboundMessage(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            dup=bool(msg.dup),
            correlation_data=bytes(correlation) if correlation is not None else None,
            mid=msg.mid,
            generation=self._generation,
        )
        with self._sub_lock:
            own = self._topic_handlers.get(message.topic)
        if own is not None:
            try:
                own(message)
            except Exception:
                log.exception("message handler failed for a message on %s", msg.topic)
            # Nobody acknowledges these later: unacknowledged, the broker would offer the
            # message again on every reconnect of a persistent session.
            self.ack(message)
            return
        with self._hold_lock:
            if self._held is not None:
                if message.qos == 0 and len(self._held) >= HOLD_QOS0_MAX:
                    self.held_dropped += 1
                else:
                    self._held.append(message)
                return
        self._dispatch(message)

    def _dispatch(self, message: InboundMessage) -> None:
        if self._handler is None:
            return
        try:
            self._handler(message)
        except Exception:
            log.exception("message handler failed for a message on %s", message.topic)

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        # Called with paho's message lock held: only touch our own lock, never call into paho.
        with self._lock:
            out = self._pending.pop(mid, None)
            if out is None:
                self._early[mid] = reason
                return
        self._complete(out, reason)



class BoundedPublisher:
    """Publishing for one long job (a delivery): at most ``max_inflight`` messages unacknowledged.

    Implements ``agent.release.deliver.Publisher``: ``publish`` blocks while ``max_inflight``
    messages of this publisher await their PUBACK and raises MQTTError when the connection is
    down or has dropped since this publisher's first unacknowledged message (the job then starts
    again); ``drain`` waits until everything is acknowledged, with the same rule. Memory is
    bounded by ``max_inflight`` payloads whatever the job's size.
    """

    def __init__(self, client: MQTTClient, max_inflight: int, *, poll: float = 0.5) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self._client = client
        self._max = max_inflight
        self._poll = poll
        self._futures: deque[Future[None]] = deque()
        self._generation: int | None = None

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; says whether there is one."""
        return self._client.wait_connected(timeout)

    def make_room(self) -> None:
        """Wait until the in-flight window has room for one more message (MQTTError when the
        connection is down or dropped meanwhile)."""
        self._check_connection()
        while len(self._futures) >= self._max:
            self._wait_oldest()

    def publish(
        self, topic: str, payload: bytes, qos: int, *, expiry: int | None = None
    ) -> None:
        """Hand one QoS 1 message to the client, first waiting for room in the in-flight window
        (after :meth:`make_room` there is room, so this returns at once)."""
        if qos != 1:
            raise ValueError("deliveries are published with QoS 1")
        self.make_room()
        self._futures.append(
            self._client.publish(topic, payload, expiry=expiry, timeout=self._poll * 20)
        )

    def drain(self) -> None:
        """Wait until every message published so far is acknowledged."""
        while self._futures:
            self._wait_oldest()
        self._generation = None

    def _check_connection(self) -> None:
        if not self._client.connected:
            self._reset()
            raise MQTTError("the MQTT connection is down")
        if self._generation is None:
            self._generation = self._client.generation
        elif self._generation != self._client.generation:
            self._reset()
            raise MQTTError("the MQTT connection dropped while publishing")

    def _wait_oldest(self) -> None:
        future = self._futures[0]
        while True:
            try:
                future.result(timeout=self._poll)
            except TimeoutError:
                self._check_connection()
                continue
            except MQTTError:
                self._reset()
                raise
            break
        self._futures.popleft()

    def _reset(self) -> None:
        self._futures.clear()
        self._generation = None
