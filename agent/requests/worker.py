"""The requests part of ``doorbell-agent run``: MQTT client, announcer and request service.

:class:`RequestsWorker` connects to the broker, holds every inbound message until the start-up
audit check is done (§7), then starts the announcer (status and audit head) and the request
service (:mod:`agent.requests.service`), whose responder also answers for the approval
coordinator.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import GENESIS_PREV, AuditEntry, AuditLog, audit_state, build_head_jws
from agent.config import Config
from agent.errors import AgentError
from agent.headcheck import CheckOutcome, StartupCheck
from agent.lifecycle import StartStop
from agent.mqtt import BoundedPublisher, MQTTClient
from agent.provision import device_client_id
from agent.requests.intake import SUMMARY_INTERVAL
from agent.requests.receipts import ReceiptDesk
from agent.requests.service import RequestService, admission_audited
from agent.requests.store import RequestStore
from agent.requests.verify import RequestPolicy
from agent.status import Announcer
from agent.timeutil import utcnow
from agent.topics import Topics

log = logging.getLogger(__name__)


class RequestsWorker(StartStop):
    """MQTT client + announcer (status, audit head) + request service, as one daemon worker.

    ``start()`` connects in the background and starts every thread; ``close()`` stops the
    service, publishes ``online: false`` and disconnects. The approval coordinator answers
    through ``service.responder`` and delivers through ``delivery_publisher()``.
    """

    name = "requests"

    def __init__(
        self,
        cfg: Config,
        *,
        signing_key: Ed25519PrivateKey,
        store: RequestStore,
        audit: AuditLog,
        now: Callable[[], datetime] = utcnow,
        summary_interval: float = SUMMARY_INTERVAL,
        revocation_poll: float = 2.0,
        head_interval: float = 1.0,
        head_wait: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self._audit = audit
        self._key = signing_key
        self._now = now
        self.announcer = Announcer(
            topics=self.topics,
            signing_key=signing_key,
            last_entry=audit.last_entry,
            head_interval=head_interval,
            now=now,
            audit_state=lambda: audit_state(cfg.state_dir),
        )
        self.checked = threading.Event()
        """Set once the start-up audit check is done and requests are being taken."""
        self.check_error: BaseException | None = None
        self.check_outcome: CheckOutcome | None = None
        self._head_wait = (
            cfg.audit.head_wait.total_seconds() if head_wait is None else head_wait
        )
        self._stopping = threading.Event()
        self._gate = threading.Thread(target=self._check_then_open, name="audit-check", daemon=True)
        self.service = RequestService(
            topics=self.topics,
            policy=RequestPolicy.from_config(cfg),
            store=store,
            audit=audit,
            signing_key=signing_key,
            queue_size=cfg.requests.queue_size,
            summary_interval=summary_interval,
            revocation_poll=revocation_poll,
            admission_audited=lambda event, jti: admission_audited(audit.path, event, jti),
            audit_head=self.current_head,
            receipts=ReceiptDesk(
                store=store,
                audit=audit,
                policy=RequestPolicy.from_config(cfg),
                device_key=signing_key.public_key(),
                state_dir=cfg.state_dir,
                now=now,
            ),
            now=now,
        )
        self.client = MQTTClient(
            cfg.mqtt,
            client_id=cfg.mqtt.client_id or device_client_id(cfg.state_dir, cfg.device_id),
            subscriptions=[self.topics.requests, self.topics.receipts],
            on_message=self.service.on_message,
            on_connect=self.announcer.connected,
            will_factory=self.announcer.will,
            persistent=True,
            manual_ack=True,
            receive_maximum=self.service.receive_maximum,
            maximum_packet_size=cfg.requests.max_bytes + 1024,
            # Room for a full delivery window plus responses and announcements.
            max_inflight=cfg.delivery.max_inflight + 8,
            # Nothing is taken from the broker before the start-up audit check (§7).
            hold_inbound=True,
        )
        self.service.attach(self.client)
        self.supervise_interval = 1.0
        self._previous_hook = audit.on_append
        self._closed = False

    def delivery_publisher(self) -> BoundedPublisher:
        """A publisher for one delivery (``agent.release.deliver.Publisher``)."""
        return BoundedPublisher(self.client, self.cfg.delivery.max_inflight)

    def _on_append(self, entry: AuditEntry) -> None:
        if self._previous_hook is not None:
            self._previous_hook(entry)
        self.announcer.audit_appended(entry)

    def current_head(self) -> str:
        """An audit-head JWS freshly signed over the newest request-log entry (§4, §7)."""
        last = self._audit.last_entry()
        seq, hsh = (0, GENESIS_PREV) if last is None else (last.seq, last.hash)
        return build_head_jws(self._key, self.topics.device_id, seq, hsh, self._now())

    def start(self) -> None:
        """Connect (in the background); once the start-up audit check is done (§7), start the
        announcer and the service and take the messages held meanwhile."""
        self._audit.on_append = self._on_append
        self.client.start()
        self._gate.start()

    def wait_checked(self, stop: threading.Event) -> bool:
        """Wait until the start-up audit check is done (True) or ``stop`` is set (False)."""
        while not self.checked.wait(0.2):
            if stop.is_set() or self.check_error is not None:
                return False
        return True

    def _check_then_open(self) -> None:
        check = StartupCheck(
            client=self.client,
            topic=self.topics.audit_head,
            device_id=self.topics.device_id,
            public_key=self._key.public_key(),
            audit=self._audit,
            state_dir=self.cfg.state_dir,
            wait=self._head_wait,
        )
        try:
            outcome = check.run(self._stopping)
            if outcome is None:
                return
            self.check_outcome = outcome
            self.announcer.set_floor(outcome.floor)
            self.announcer.start(self.client)
            self.service.start()
            self.client.release_inbound()
            # QoS 0 messages past what the hold keeps were dropped: count them as the lanes do.
            self.service.stats.dropped += self.client.held_dropped
        except Exception as exc:
            self.check_error = exc
            log.exception("the start-up audit check failed")
            return
        self.checked.set()

    def run(self, stop: threading.Event) -> None:
        """Daemon worker entry (:mod:`agent.daemon`): start, then wait for ``stop``.

        Raises what the start-up audit check raised (the agent must not run on a log whose gap
        it could not record), and AgentError if the service thread has died meanwhile (it
        catches every failure of a message or of housekeeping, so that means a bug): the daemon
        then stops with exit status 1 and systemd starts it again, rather than running on
        without answering.
        """
        self.start()
        while not stop.wait(self.supervise_interval):
            if self.check_error is not None:
                raise self.check_error
            if not self.service.alive:
                raise AgentError("the request service thread died; no request would be answered")

    def stats(self) -> dict[str, object]:
        """Counters for ``status.json``."""
        s, c = self.service.stats, self.client.stats
        return {
            "connected": self.client.connected,
            "connects": c.connects,
            "disconnects": c.disconnects,
            "received": s.received,
            "dropped": s.dropped,
            "unverifiable": dict(s.unverifiable),
            "rejected": dict(s.rejected),
            "admitted": s.pending,
            "duplicates": s.duplicates,
            "suppressed": s.suppressed,
            "responses": self.service.responder.responses,
            "audit_failures": s.audit_failures,
            "failures": s.failures,
            "receipts": dict(self.service.receipts.stats) if self.service.receipts else {},
            "client_id": self.client.client_id,
            "client_id_conflict": self.client.client_id_conflict(),
            # Requests wait at the broker until the start-up audit check is done (§7).
            "audit_check": "failed" if self.check_error is not None
            else "done" if self.checked.is_set() else "waiting for the broker",
        }

    def close(self) -> None:
        """Stop the service, announce ``online: false``, disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._gate.is_alive():
            self._gate.join(self._head_wait + 2.0)
        if not self.checked.is_set():
            self.announcer.attach(self.client)  # a clean stop still says offline
        self.service.close()
        self.announcer.close()
        self.client.close()
        self._audit.on_append = self._previous_hook

