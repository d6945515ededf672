"""The request service: MQTT queue → verify → store → respond → audit (CONTRACT §3, §4, §7).

Flow of one message on ``P/D/requests``:

1. paho's network thread (``RequestService.on_message``) drops anything over
   ``requests.max_bytes`` at once (counted as unverifiable ``oversize``) and sorts the rest,
   without blocking, into two bounded lanes by the ``kid`` its JWS header names (a base64 and
   JSON decode of at most 1 KiB, nothing more):

   - the *enrolled* lane, for a kid of an enrolled requester. QoS 1 messages here are
     acknowledged only once handled, so the broker's flow control (our Receive Maximum, half the
     lane) bounds how many are queued; QoS 0 ones (a flooder's choice, not the contract's) may
     only use the other half and are dropped and counted when it is full. The lane is served
     round robin by kid (:class:`FairQueue`): a flood of forgeries naming one requester's kid
     delays that requester's own requests, never another requester's.
   - the *suspect* lane, for everything else (unknown kid, no readable header). These are
     acknowledged at once, handled only when the enrolled lane is empty and at most
     ``suspect_rate`` a second, and dropped and counted when their lane is full.

   A flood of forgeries that do not name an enrolled kid therefore cannot delay a genuine
   request at all, and one that does is bounded by signature checks. The set of enrolled kids
   is refreshed from the store every ``kid_refresh`` seconds; a request from a requester
   enrolled since the last refresh takes the suspect lane once (it is still handled).
2. The worker thread verifies (:func:`agent.requests.verify.verify_request`) against a snapshot
   of the enrolled keys taken with the kid set (:class:`TrustSnapshot`; renewed before a suspect
   younger than it, at most every ``SNAPSHOT_MIN_AGE``), so a forgery costs one Ed25519
   verification and, under a flood, no database read: a kid names one key for ever (it is the key's
   thumbprint), and whatever can change about its requester (revocation, id, kind) is read
   fresh from the store for every message whose signature verifies. Unverifiable messages get
   no response; they are counted and written to the audit log as one ``request_unverifiable``
   entry per interval (count and reasons histogram), so a flood cannot fill the disk; the local
   log names the precise reason of the first ``log_burst`` a minute and summarises the rest.
3. A signed message: ``request_received`` is audited, then the store records it and audits
   ``request_pending`` / ``request_rejected`` in the same transaction, then the signed response
   goes to ``P/D/responses/R`` where ``R`` is the id enrolled for the signing key (never a topic
   from the message), echoing the message's Correlation Data. Rejections are answered at most
   ``burst`` times per requester per minute; beyond that they are counted and summarised in one
   ``request_rejected`` entry per interval (a replayed token cannot fill the disk either).
4. Only then is the message acknowledged. A crash before that makes the broker redeliver it
   (flagged ``dup``); its jti is then already recorded, and a redelivered duplicate is dropped
   silently instead of answered ``replayed``. Responses whose PUBACK never came (a crash, a
   lost connection) are sent again at the next start: the store records which status was
   answered.

The worker also polls the store for requests cancelled by ``doorbell-agent requesters revoke``
while the daemon runs and answers each ``rejected``/``revoked``.

Audit growth is bounded by per-requester budgets (see :mod:`agent.requests.intake`).

Responses are built, signed, sent and recorded by :class:`agent.requests.responder.Responder`;
:class:`agent.requests.worker.RequestsWorker` wires the MQTT client, the announcer (status and
audit head) and this service together for ``doorbell-agent run``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import (
    AuditSink,
    iter_log_lines,
    parse_entry,
)
from agent.errors import AgentError, AuditWriteError, MQTTError
from agent.lifecycle import StartStop
from agent.mqtt import InboundMessage, MessagePublisher
from agent.requests.intake import (
    AUDIT_BUDGET_BURST,
    AUDIT_BUDGET_PER_DAY,
    MAX_CORRELATION,
    SNAPSHOT_MIN_AGE,
    SUMMARY_INTERVAL,
    Budget,
    FairQueue,
    Tally,
    TrustSnapshot,
    audit_cost,
    peek_kid,
    received_fields,
)
from agent.requests.receipts import ReceiptDesk
from agent.requests.responder import Responder, Target, shown
from agent.requests.store import RequestStore
from agent.requests.verify import (
    Rejection,
    RequestPolicy,
    Unverifiable,
    VerifiedRequest,
    verify_request,
)
from agent.timeutil import utcnow
from agent.topics import Topics

log = logging.getLogger(__name__)

@dataclass
class ServiceStats:
    """Counters of the request service (status command, logs, benches)."""

    received: int = 0
    dropped: int = 0
    unverifiable: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    pending: int = 0
    duplicates: int = 0
    suppressed: int = 0
    audit_failures: int = 0
    failures: int = 0


class Publisher(MessagePublisher, Protocol):
    """What the service needs of :class:`agent.mqtt.MQTTClient`."""

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a handled QoS 1 message."""
        ...


class RequestService(StartStop):
    """The worker thread between the MQTT client and the request store.

    ``on_message`` is the MQTT client's message handler; ``attach`` gives it the client to
    publish and acknowledge through. Its ``responder`` answers every request, for this service
    and for the approval coordinator alike; this service's thread records the answers the broker
    acknowledged and answers revocations (:class:`agent.requests.responder.Responder`).
    """

    def __init__(
        self,
        *,
        topics: Topics,
        policy: RequestPolicy,
        store: RequestStore,
        audit: AuditSink,
        signing_key: Ed25519PrivateKey,
        queue_size: int = 256,
        summary_interval: float = SUMMARY_INTERVAL,
        rejection_burst: int = 20,
        revocation_poll: float = 2.0,
        kid_refresh: float = 0.5,
        log_burst: int = 20,
        suspect_rate: int = 500,
        admission_audited: Callable[[str, str], bool] | None = None,
        audit_head: Callable[[], str] | None = None,
        receipts: ReceiptDesk | None = None,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.receipts = receipts
        self.policy = policy
        self.stats = ServiceStats()
        self._store = store
        self._audit = audit
        self._key = signing_key
        self._now = now
        self._clock = clock
        self.queue_size = queue_size
        # QoS 1 messages in flight are bounded by the Receive Maximum we announce; QoS 0 ones
        # only get the rest of the queue.
        self.receive_maximum = max(1, queue_size // 2)
        self._qos0_room = queue_size - self.receive_maximum
        # Items are (message, arrival time on ``clock``).
        self._queue: FairQueue[tuple[InboundMessage, float]] = FairQueue(queue_size)
        self._suspects: queue.Queue[tuple[InboundMessage, float]] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._trust = TrustSnapshot({}, -math.inf, store)
        self._kid_refresh = kid_refresh
        self._log_budget = Budget(log_burst, 60.0)
        self._suspect_budget = Budget(suspect_rate, 1.0)
        self._admission_audited = admission_audited
        self._unverifiable = Tally(summary_interval)
        self._suppressed: dict[str, Tally] = {}
        self._summary_interval = summary_interval
        self._budget = Budget(rejection_burst, 60.0)
        self._audit_budget = Budget(
            AUDIT_BUDGET_BURST, 86400.0 * AUDIT_BUDGET_BURST / AUDIT_BUDGET_PER_DAY
        )
        self._revocation_poll = revocation_poll
        self._client: Publisher | None = None
        self.responder = Responder(
            topics=topics,
            store=store,
            signing_key=signing_key,
            max_lifetime=policy.max_lifetime,
            audit_head=audit_head,
            now=now,
            clock=clock,
        )
        self._thread = threading.Thread(target=self._run, name="request-service", daemon=True)
        # Known before the first message can arrive (the client may connect before start()).
        self._refresh_kids()
        self._started = False
        self._closed = False

    # -- wiring ----------------------------------------------------------------------------

    def attach(self, client: Publisher) -> None:
        """Publish responses and acknowledge messages through ``client``."""
        self._client = client
        self.responder.attach(client)

    def start(self) -> None:
        """Answer what was left unanswered by the last run, then start the worker thread."""
        if self._started:
            return
        if self._client is None:
            raise MQTTError("the request service has no MQTT client attached")
        self.responder.resend_unanswered()
        # Marked started only once the thread runs: the supervisor (``alive``) must not take
        # the moments before for a dead thread.
        self._thread.start()
        self._started = True
        if self.receipts is not None:
            self.receipts.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (messages still queued stay unacknowledged: the broker redelivers
        them next time) and write the last unverifiable summary. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._stopping.set()
            self._queue.clear()
            while True:
                try:
                    self._suspects.get_nowait()
                except queue.Empty:
                    break
            self._queue.wake()
            self._thread.join(timeout)
        if self.receipts is not None:
            self.receipts.close(timeout)
        self._write_summaries(force=True)
        self.responder.mark_sent(wait=timeout)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (or was never started / was stopped on purpose)."""
        return not self._started or self._stopping.is_set() or self._thread.is_alive()

    # -- network thread --------------------------------------------------------------------

    def on_message(self, message: InboundMessage) -> None:
        """MQTT message handler (paho's network thread): cheap checks, a non-blocking put."""
        self.stats.received += 1
        client = self._client
        if message.topic == self.topics.receipts and self.receipts is not None:
            # Their own lane (agent.requests.receipts): acknowledged at once, never queued
            # with requests.
            if not self._closed:
                self.receipts.offer(message.payload)
                if client is not None:
                    client.ack(message)
            return
        if message.topic != self.topics.requests or self._closed:
            if client is not None and not self._closed:
                client.ack(message)
            return
        if len(message.payload) > self.policy.max_bytes:
            self._unverifiable.add("oversize")
            self.stats.unverifiable["oversize"] += 1
            if client is not None:
                client.ack(message)
            return
        if message.correlation_data is not None and len(message.correlation_data) > MAX_CORRELATION:
            # Never copied onto a response, so never verified: dropped like any unverifiable.
            self._unverifiable.add("correlation_too_long")
            self.stats.unverifiable["correlation_too_long"] += 1
            if client is not None:
                client.ack(message)
            return
        kid = peek_kid(message.payload)
        arrived = self._clock()
        if kid is None or kid not in self._trust.keys:
            # Acknowledged now: a suspect must not hold one of the broker's in-flight slots.
            if client is not None:
                client.ack(message)
            try:
                # Queued as QoS 0 so the worker's ack is a no-op: a second PUBACK for this
                # packet id could acknowledge another message the broker has sent under it.
                self._suspects.put_nowait((dataclasses.replace(message, qos=0), arrived))
            except queue.Full:
                self._dropped()
            return
        if message.qos == 0 and self._queue.qsize() >= self._qos0_room:
            self._dropped()
            return
        if not self._queue.put_nowait(kid, (message, arrived)):
            self._dropped()
            if client is not None:
                client.ack(message)

    def _dropped(self) -> None:
        self.stats.dropped += 1

    def _run(self) -> None:
        next_poll = next_kids = self._clock()
        while not self._stopping.is_set():
            item = self._next_item(max(0.0, min(next_poll, next_kids) - self._clock()))
            if self._stopping.is_set():
                return
            if item is not None:
                self._handle(*item)
            now = self._clock()
            due_kids, due_poll = now >= next_kids, now >= next_poll
            if due_kids:
                next_kids = now + self._kid_refresh
            if due_poll:
                next_poll = now + self._revocation_poll
            # Housekeeping reads stored records and writes the log: a failure of one step is
            # logged and the loop goes on (the next turn tries again), never ends the worker.
            steps: list[tuple[str, Callable[[], None]]] = [
                ("summaries", lambda: self._write_summaries(force=False)),
                ("sent responses", lambda: self.responder.mark_sent(wait=0.0)),
            ]
            if due_kids:
                steps.append(("enrolled keys", self._refresh_kids))
            if due_poll:
                steps.append(("revocations", self.responder.answer_revocations))
            for what, step in steps:
                try:
                    step()
                except Exception:
                    self.stats.failures += 1
                    log.exception("request service: %s failed; going on", what)

    def _next_item(self, timeout: float) -> tuple[InboundMessage, float] | None:
        """The next enrolled-lane item, else a suspect, else wait up to ``timeout`` (and 0.1 s,
        so suspects arriving meanwhile are not left waiting long)."""
        item = self._queue.get()
        if item is not None:
            return item
        now = self._clock()
        # Suspects share the process with paho's network thread: verifying every one of a
        # flood takes the CPU that reading the socket needs, and the broker then queues a
        # genuine request behind the backlog. Past ``suspect_rate`` they wait, and their full
        # lane drops (and counts) the rest.
        if not self._suspects.qsize() or not self._suspect_budget.allow("suspects", now):
            return self._queue.get(timeout=min(timeout, 0.1))
        try:
            suspect = self._suspects.get_nowait()
        except queue.Empty:
            return None
        if suspect[1] > self._trust.taken and now - self._trust.taken >= SNAPSHOT_MIN_AGE:
            # One read of the enrolled keys settles the kid of every suspect queued so far
            # (see TrustSnapshot): under a flood that replaces a database read per message.
            self._refresh_kids()
        return suspect

    def _refresh_kids(self) -> None:
        taken = self._clock()
        try:
            self._trust = TrustSnapshot.read(self._store, taken)
        except AgentError as exc:
            log.warning("cannot read the enrolled requesters: %s", exc)

    def _verify(
        self, message: InboundMessage, arrived: float, now: datetime
    ) -> VerifiedRequest | Rejection | Unverifiable:
        snapshot = self._trust
        # The window is judged against the moment the message arrived, not when its turn came.
        received = now - timedelta(seconds=max(0.0, self._clock() - arrived))
        result = verify_request(
            message.payload, snapshot.view(arrived), self._store, self.policy, now,
            received=received,
        )
        if isinstance(result, Unverifiable):
            return result
        # Signed by an enrolled key: judge it on what the store says now (revoked since the
        # snapshot, say). A kid keeps its key, so only a changed requester needs a second look.
        fresh = self._store.key_for_kid(result.kid)
        cached = snapshot.keys.get(result.kid)
        if fresh is None or cached is None or (
            (fresh.requester_id, fresh.kind, fresh.revoked)
            != (cached.requester_id, cached.kind, cached.revoked)
        ):
            result = verify_request(
                message.payload, self._store, self._store, self.policy, now, received=received
            )
        return result

    def _handle(self, message: InboundMessage, arrived: float) -> None:
        """Handle one message and acknowledge it exactly once, whatever happens meanwhile.

        A failure is logged and counted, never raised: a message that breaks the handler must
        not stop the worker, nor hold one of the broker's in-flight slots for ever (a few
        hundred such messages would fill the intake). Only a crash of the process leaves a
        message unacknowledged; the broker then redelivers it (see the module docstring).
        """
        assert self._client is not None
        try:
            self._process(message, arrived)
        except Exception:
            self.stats.failures += 1
            log.exception("handling a request failed; it is acknowledged and dropped")
        finally:
            try:
                self._client.ack(message)
            except Exception:
                log.exception("acknowledging a request failed")

    def _process(self, message: InboundMessage, arrived: float) -> None:
        now = self._now()
        result = self._verify(message, arrived, now)
        if isinstance(result, Unverifiable):
            if self._log_budget.allow("unverifiable", self._clock()):
                log.info("unverifiable request (%s): %s", result.reason, shown(result.detail))
            else:
                log.debug("unverifiable request (%s): %s", result.reason, shown(result.detail))
            self.stats.unverifiable[result.reason] += 1
            self._unverifiable.add(result.reason)
            return
        if isinstance(result, Rejection):
            if result.error == "replayed" and message.dup:
                self._duplicate(result)
                return
            clock = self._clock()
            if not (
                self._budget.allow(result.requester_id, clock)
                and self._audit_budget.allow(result.requester_id, clock, audit_cost(result))
            ):
                self.stats.suppressed += 1
                self._suppressed.setdefault(
                    result.requester_id, Tally(self._summary_interval)
                ).add(result.error)
                return
        else:
            # Accepted requests are always audited (the rate limit bounds them); they use up
            # the requester's audit budget, leaving less room for its rejections.
            self._audit_budget.charge(result.requester_id, self._clock(), audit_cost(result))
        try:
            self._audit.append("request_received", **received_fields(result))
            final = self._store.admit(
                result,
                self.policy,
                now,
                correlation=message.correlation_data,
                audit=self._admission_sink(message),
            )
        except AuditWriteError as exc:
            # No action without its audit entry: nothing is recorded nor answered. The message
            # is still acknowledged; left unacknowledged it would hold an in-flight slot until
            # the next start, and enough of them would close the intake for everyone.
            self.stats.audit_failures += 1
            log.error("request not handled, the audit log cannot be written: %s", exc)
            return
        # admit passes unverifiable results through untouched and never makes one.
        assert not isinstance(final, Unverifiable)
        target = Target(final.jti, final.requester_id, message.correlation_data, final.exp)
        if isinstance(final, VerifiedRequest):
            self.stats.pending += 1
            log.info("request %s from %s is pending", shown(final.jti), final.requester_id)
            self.responder.respond_logged(target, "pending")
        elif final.error == "replayed" and message.dup:
            self._duplicate(final)
        else:
            self.stats.rejected[final.error] += 1
            log.info(
                "request %s from %s rejected (%s): %s",
                shown(final.jti), final.requester_id, final.error, shown(final.detail),
            )
            self.responder.respond_logged(target, "rejected", error=final.error)

    def _admission_sink(self, message: InboundMessage) -> AuditSink:
        """Where ``admit`` writes ``request_pending``/``request_rejected`` for ``message``.

        A redelivered message whose jti the store does not know may come from a run that
        crashed after writing the admission entry but before committing the row (the entry is
        written inside the transaction). That entry stands for this admission: writing it again
        would make the log say the jti was accepted twice.
        """
        if not message.dup or self._admission_audited is None:
            return self._audit
        return _AdmissionAudit(self._audit, self._admission_audited)

    def _duplicate(self, rejection: Rejection) -> None:
        self.stats.duplicates += 1
        log.info("dropped a redelivered copy of request %s", shown(rejection.jti))

    def _write_summaries(self, *, force: bool) -> None:
        now = self._clock()
        counts = self._unverifiable.take(now, force=force)
        if counts is not None:
            self._append_summary(
                "request_unverifiable", count=sum(counts.values()), reasons=counts
            )
        for requester_id, tally in list(self._suppressed.items()):
            errors = tally.take(now, force=force)
            if errors is not None:
                self._append_summary(
                    "request_rejected", requester=requester_id,
                    suppressed=sum(errors.values()), errors=errors,
                )
            elif force:
                del self._suppressed[requester_id]

    def _append_summary(self, event: str, **fields: object) -> None:
        try:
            self._audit.append(event, **fields)
        except AuditWriteError as exc:
            self.stats.audit_failures += 1
            log.error("could not audit %s %s: %s", event, fields, exc)

ADMISSION_EVENTS: Final = ("request_pending", "request_rejected")


def admission_audited(path: Path, event: str, jti: str) -> bool:
    """Whether the audit log at ``path`` has an ``event`` entry (an admission) for ``jti``.

    Read only for redelivered messages (after a reconnect or a crash), so a full scan is
    affordable; lines that cannot contain the jti are skipped without parsing.
    """
    needle = f'"jti":{json.dumps(jti)}'.encode()
    for line in iter_log_lines(path):
        if needle not in line:
            continue
        try:
            entry = parse_entry(line)
        except ValueError:
            continue  # a torn tail; `audit verify` reports it, it proves nothing here
        if entry.event == event and entry.fields.get("jti") == jti:
            return True
    return False


class _AdmissionAudit:
    """An audit sink that skips an admission entry the log already holds (see
    :meth:`RequestService._admission_sink`); every other entry goes through."""

    def __init__(self, audit: AuditSink, audited: Callable[[str, str], bool]) -> None:
        self._audit = audit
        self._audited = audited

    def append(self, event: str, **fields: object) -> object:
        jti = fields.get("jti")
        if event in ADMISSION_EVENTS and isinstance(jti, str):
            try:
                if self._audited(event, jti):
                    log.info(
                        "request %s: %s already audited before a crash", shown(jti), event
                    )
                    return None
            except AgentError as exc:
                log.warning(
                    "cannot check the audit log for %s of %s: %s", event, shown(jti), exc
                )
        return self._audit.append(event, **fields)
