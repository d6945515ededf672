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
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MQTTConfig
from agent.errors import ConfigError, MQTTError
from agent.keys import check_secret

log = logging.getLogger(__name__)

_STOP = object()

HOLD_QOS0_MAX = 64
"""QoS 0 messages kept while inbound messages are held; more are dropped."""


@dataclass(frozen=True)
class Topics:
    """The contract's topics (§2) for one device under one prefix.

    Every level made from an id is one the caller has validated (``[A-Za-z0-9_-]``); response
    and delivery topics are always built from a verified ``iss``, never from a message.
    """

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        """``P/D``."""
        return f"{self.prefix}/{self.device_id}"

    @property
    def requests(self) -> str:
        """``P/D/requests``: the only topic the device subscribes to."""
        return f"{self.base}/requests"

    @property
    def status(self) -> str:
        """``P/D/status`` (retained)."""
        return f"{self.base}/status"

    @property
    def audit_head(self) -> str:
        """``P/D/audit/head`` (retained)."""
        return f"{self.base}/audit/head"

    def responses(self, requester_id: str) -> str:
        """``P/D/responses/R``."""
        return f"{self.base}/responses/{requester_id}"

    def deliveries(self, requester_id: str, jti: str) -> str:
        """``P/D/deliveries/R/J`` (chunks at ``/CLIP/SEQ``, the manifest at ``/manifest``)."""
        return f"{self.base}/deliveries/{requester_id}/{jti}"


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


class MQTTClient:
    """One MQTT v5 connection with reconnects, a publisher thread and bounded in-flight QoS 1.

    ``on_message`` runs on paho's network thread and must not block. ``on_connect`` (also on the
    network thread) is told whether the broker still had our session; use it to (re)announce
    state through ``publish`` (which only enqueues). ``will_factory``, if given, is called before
    every connection attempt so the will can carry the attempt's time.
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
        max_inflight: int = 16,
        outbox_size: int = 256,
        reconnect_min: int = 1,
        reconnect_max: int = 60,
        hold_inbound: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.stats = MQTTStats()
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
        self._client.enable_logger(logging.getLogger("agent.mqtt.paho"))
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

    def wait_ready(self, timeout: float) -> None:
        """Wait until connected and every subscription is acknowledged.

        Raises MQTTError if the broker refused a subscription or ``timeout`` passed first.
        """
        if not self._ready.wait(timeout):
            raise MQTTError(
                f"could not connect to the MQTT broker at {self.settings.host}:{self.settings.port}"
                f" within {timeout:g} s",
                hint="check --host/--port (mqtt.host/mqtt.port), TLS and credentials",
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

    def __enter__(self) -> MQTTClient:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
        timeout: float | None = None,
    ) -> Future[None]:
        """Queue a QoS 1 message for the publisher thread; the future completes on its PUBACK.

        Blocks while the outbox is full (``timeout`` None: indefinitely). Raises MQTTError when
        the client is closing or the outbox stayed full for ``timeout`` seconds. The future fails
        with MQTTError if the broker refuses the message or the client closes first.
        """
        if self._closing.is_set():
            raise MQTTError(f"the MQTT client is closing; not publishing to {topic}")
        props: Properties | None = None
        if correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation_data
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
            log.error(
                "MQTT broker %s:%s refused the connection: %s",
                self.settings.host, self.settings.port, reason.getName(),
            )
            return
        self._generation += 1
        self.stats.connects += 1
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
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connected.clear()
        self.stats.disconnects += 1
        if not self._closing.is_set():
            log.warning("lost the MQTT connection (%s); reconnecting", reason.getName())

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

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish one QoS 1 message, first waiting for room in the in-flight window."""
        if qos != 1:
            raise ValueError("deliveries are published with QoS 1")
        self._check_connection()
        while len(self._futures) >= self._max:
            self._wait_oldest()
        self._futures.append(self._client.publish(topic, payload, timeout=self._poll * 20))

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
