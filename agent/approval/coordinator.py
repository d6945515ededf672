"""The approval coordinator: runs the pure machine against the store, the audit log and delivery.

Every decision (button, app, CLI), every tick and every delivery outcome goes through
:meth:`ApprovalCoordinator._execute`, which carries out the effects of a machine
:class:`~agent.approval.machine.Transition` in a fixed order:

1. the audit entry (``request_approved`` ...) is appended and fsync'd; if that fails nothing else
   happens (fail closed: no release without its audit entry);
2. the new status is persisted with the store's compare-and-set (``pending -> approved`` only if
   still pending, so a concurrent revocation or decision wins cleanly);
3. the response is queued, the delivery is scheduled, the retention hold is released.

Revocation wins: a delivery hands each message to the MQTT client inside the store's
:meth:`~agent.requests.store.RequestStore.release_gate`, so nothing is handed over once a
revocation has committed; the delivery then ends ``failed`` with ``error: revoked``, and an
``approved`` request of a revoked requester is never delivered (again), restarts included.

Holds: every pending or approved request holds its window in the vault, from its arrival (the
vault calls :meth:`ApprovalCoordinator.sync_holds` before each retention pass, the tick every
second) until it ends; holds whose request ended in any way (revocation in another process
included) are released by the same sync. A hold the vault refuses (held footage over its cap)
leaves the request pending with its footage unheld; the owner is told in the log,
``status`` and ``pending``.

Releases (§5, §7): each delivery runs with an :class:`AuditedLedger`, which numbers its attempts
in the store and writes ``release_started`` before the first chunk and ``request_delivered``
(``request_redelivered`` after the owner's :meth:`ApprovalCoordinator.redeliver`) before the
manifest. ``redeliver`` moves a ``delivered``, ``acknowledged`` or ``failed``/``delivery_error``
request back to ``approved`` for a new attempt, through the same channels as a first approval,
and refuses a revoked requester, a window whose footage was deleted since, and a window over
``delivery.max_bytes`` (approvals are refused over it too).

Decisions are serialised by one lock. Delivery runs on its own worker thread, one request at a
time; a tick thread expires overdue requests, applies decisions the CLI stored while the daemon
was down, places retention holds on new pending requests and drives the LED.

At start (:meth:`recover`): queued decisions are applied, holds are checked, ``approved``
requests (a crash mid-delivery) are delivered again unless their requester was revoked (then
they end ``failed``/``revoked``), and responses whose status the store does not record as
answered are sent again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from agent.approval.decisions import Action, DecisionLog
from agent.approval.machine import (
    OUTCOMES,
    ApprovalState,
    Approve,
    Audit,
    DeliveryFailed,
    DeliverySucceeded,
    Deny,
    Event,
    Factor,
    Policy,
    Redeliver,
    Refusal,
    ReleaseHold,
    Respond,
    StartDelivery,
    Tick,
    Transition,
    transition,
)
from agent.audit import AuditSink
from agent.camera.media import MediaError
from agent.errors import (
    AgentError,
    ApprovalError,
    AuditWriteError,
    DeliveryError,
    DeliveryRevokedError,
    HoldRefusedError,
    PreviewChangedError,
    RequestNotFoundError,
)
from agent.lifecycle import StartStop
from agent.release.deliver import DeliveryJob, DeliveryLedger, Gate, PlannedFile, new_salt
from agent.release.manifest import ManifestClip
from agent.release.preview import Preview, exceeds_message, sentence
from agent.requests.responder import RespondFn, answer_unanswered
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import rfc3339, utcnow
from agent.vocabulary import REDELIVERABLE, Channel, Status

log = logging.getLogger(__name__)


class HoldingVault(Protocol):
    """The vault calls the coordinator makes."""

    def hold(self, holder: str, start: datetime, end: datetime) -> None: ...

    def release_hold(self, holder: str, reason: str = ...) -> bool: ...

    def holds(self) -> Sequence[HoldView]: ...

    hold_sync: Callable[[], None] | None

    def clips_overlapping(self, start: datetime, end: datetime) -> Sequence[object]: ...


class HoldView(Protocol):
    """A hold as the vault lists it (:class:`agent.vault.Hold`)."""

    @property
    def holder(self) -> str: ...


class Deliverer(Protocol):
    """Releases one approved request (:class:`agent.release.deliver.Deliverer`)."""

    def deliver(
        self, job: DeliveryJob, gate: Gate | None = None, *, ledger: DeliveryLedger | None = None
    ) -> tuple[ManifestClip, ...]: ...


class AuditedLedger:
    """The daemon's :class:`~agent.release.deliver.DeliveryLedger`: attempts numbered in the
    request store, ``release_started`` and ``request_delivered`` (``request_redelivered`` for an
    owner's re-delivery) appended durably to the audit log before their effects (§7)."""

    def __init__(self, store: RequestStore, audit: AuditSink, record: RequestRecord, salt: bytes):
        self._store = store
        self._audit = audit
        self._record = record
        self._salt = salt
        self._redelivery = False

    def begin_attempt(self) -> int:
        """A new attempt, numbered after every earlier one of this request."""
        attempt = self._store.begin_attempt(self._record.jti)
        self._redelivery = self._store.attempts(self._record.jti)[-1].redelivery
        return attempt

    def started(self, attempt: int, files: Sequence[PlannedFile]) -> None:
        """``release_started`` (file ids and spans), then the attempt's files in the store."""
        self._audit.append(
            "release_started",
            **self._record.audit_fields(),
            attempt=attempt,
            files=[f.span() for f in files],
        )
        self._store.record_attempt_files(
            self._record.jti, attempt, [{**f.span(), "clip": f.clip_id} for f in files]
        )

    def delivered(
        self,
        attempt: int,
        files: Sequence[PlannedFile],
        entries: Sequence[ManifestClip],
        manifest_sha256: str,
    ) -> None:
        """``request_delivered`` with what left and how to open its commitments; then the
        manifest's hash in the store (the receipt for this attempt must name it)."""
        released = [
            {
                **plan.span(),
                "frames": entry.frames,
                "sha256": entry.sha256,
                "plaintext_sha256": entry.plaintext_sha256,
                "source": {"commitment": entry.source},
                "clip": plan.clip_id,
                "clip_sha256": plan.source_sha256,
            }
            for plan, entry in zip(files, entries, strict=True)
        ]
        self._audit.append(
            "request_redelivered" if self._redelivery else "request_delivered",
            **self._record.audit_fields(),
            attempt=attempt,
            clips=len(entries),
            files=released,
            manifest_sha256=manifest_sha256,
            salt=self._salt.hex(),
        )
        self._store.record_attempt_files(self._record.jti, attempt, released)
        self._store.record_manifest(self._record.jti, attempt, manifest_sha256)


@dataclass(frozen=True)
class DecisionResult:
    """What a decision did."""

    jti: str
    status: Status
    awaiting_confirmation: bool = False

    def to_json(self) -> dict[str, object]:
        """The result as the control socket and ``approve --json`` report it."""
        return {
            "id": self.jti,
            "status": self.status.value,
            "awaiting_confirmation": self.awaiting_confirmation,
        }


class ApprovalCoordinator(StartStop):
    """Applies owner decisions, expiry and delivery outcomes; see the module docstring."""

    def __init__(
        self,
        *,
        store: RequestStore,
        audit: AuditSink,
        policy: Policy,
        vault: HoldingVault,
        respond: RespondFn,
        deliverer_factory: Callable[[], Deliverer],
        device_id: str,
        previewer: Callable[[RequestRecord], Preview] | None = None,
        now: Callable[[], datetime] = utcnow,
        tick_interval: float = 1.0,
        indicator: Callable[[bool], None] | None = None,
        activity: AuditSink | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._store = store
        self.decisions = DecisionLog(store)
        self._audit = audit
        # Camera and owner events (§7 activity.jsonl); a caller with one log passes none.
        self._activity = activity if activity is not None else audit
        self.policy = policy
        self._vault = vault
        self._respond = respond
        self._deliverer_factory = deliverer_factory
        self._device_id = device_id
        self._max_bytes = max_bytes
        self._now = now
        self._tick_interval = tick_interval
        self._indicator = indicator
        self._lit: bool | None = None
        self._unheld: set[str] = set()
        self._previewer = previewer
        self._lock = threading.RLock()
        self._deliveries: queue.Queue[str | None] = queue.Queue()
        self._scheduled: set[str] = set()
        self._idle = threading.Condition()
        self._busy = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover from the last run, then start the tick and delivery threads."""
        if self._started:
            return
        self._started = True
        self.recover()
        self._vault.hold_sync = self.sync_holds
        for name, target in (("approval-tick", self._tick_loop), ("delivery", self._worker)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the threads (a delivery still running is redone at the next start). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._vault.hold_sync == self.sync_holds:
            self._vault.hold_sync = None
        self._stop.set()
        self._deliveries.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._set_indicator(False)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no delivery is scheduled or running; says whether that happened."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # -- decisions -------------------------------------------------------------------------

    def preview(self, jti: str) -> Preview | None:
        """What approving ``jti`` would release now (owner only); None without a previewer."""
        record = self._store.get_request(jti)
        if self._previewer is None or record.window_start is None:
            return None
        return self._previewer(record)

    def _bind_preview(self, record: RequestRecord, shown: str | None) -> dict[str, object]:
        """The preview an approval binds to, computed now: refused when it is over
        ``delivery.max_bytes`` or differs from the one the owner was ``shown``."""
        if self._previewer is None or record.status != "pending":
            return {}
        try:
            preview = self._previewer(record)
        except (AgentError, MediaError, ValueError) as exc:
            # The owner may still decide (an unreadable clip fails the delivery, which then
            # says why); the approval is recorded as bound to no preview.
            log.warning("request %s: no preview of what it releases: %s", record.jti, exc)
            return {"preview": None}
        if preview.exceeds:
            raise ApprovalError(
                exceeds_message(preview),
                hint="raise delivery.max_bytes in the config (and restart), or deny the request",
            )
        if shown is not None and shown != preview.fingerprint:
            raise PreviewChangedError(
                f"what approving request {record.jti} would release changed since it was "
                f"shown; now: {sentence(preview)} Nothing was approved.",
                hint="look at the new preview and approve again",
            )
        return {
            "preview": {
                "fingerprint": preview.fingerprint,
                "files": len(preview.files),
                "seconds": round(preview.seconds, 3),
                "bytes_estimate": preview.stored_bytes,
            }
        }

    def decide(
        self,
        jti: str,
        action: Action,
        channel: Channel,
        *,
        at: datetime | None = None,
        preview: str | None = None,
    ) -> DecisionResult:
        """Apply the owner's decision on ``jti`` made on ``channel`` (at ``at``, default now).

        An approval binds to the preview computed now (its fingerprint goes into the audit
        entry): it is refused when the window holds more than ``delivery.max_bytes``, and
        with ``preview`` (the fingerprint the owner was shown) when that changed meanwhile
        (:class:`PreviewChangedError`).

        Raises RequestNotFoundError for an unknown jti, ApprovalError when the request is not
        pending (or expired, or the channel is disabled, or the button is pressed without a
        first factor under ``require: all``), AuditWriteError when the decision could not be
        audited (then nothing happened).
        """
        event: Event = Approve(channel) if action == "approve" else Deny(channel)
        with self._lock:
            record = self._store.get_request(jti)
            if record.status == "rejected":
                raise ApprovalError(
                    f"request {jti} is not pending: it was rejected ({record.error})"
                )
            now = at or self._now()
            t = transition(self._state_of(record), event, self.policy, now)
            if action == "approve" and t.refusal is None:
                self._check_size(record)
            extra = {"made_at": rfc3339(at)} if at is not None else {}
            bound = (
                self._bind_preview(record, preview)
                if action == "approve" and t.refusal is None
                else {}
            )
            self._execute(record, t, now, {**extra, **bound})
            self._refresh_indicator()
        if t.refusal is not None:
            raise ApprovalError(self._refusal_message(record, t, channel))
        return DecisionResult(jti, t.after.status, t.after.awaiting_confirmation(self.policy, now))

    def redeliver(
        self, jti: str, channel: Channel, *, at: datetime | None = None
    ) -> DecisionResult:
        """Send a delivered, acknowledged or failed (``delivery_error``) request's window again
        (§5.2), with the same channels as a first approval (``require: all``: a button press
        within ``confirm_window`` completes it).

        Raises RequestNotFoundError, ApprovalError saying why when it cannot be redelivered (not
        in one of those states, requester revoked, footage of the window shredded since, over
        ``delivery.max_bytes``, channel disabled).
        """
        with self._lock:
            record = self._store.get_request(jti)
            now = at or self._now()
            self._check_redeliverable(record)
            t = transition(self._state_of(record), Redeliver(channel), self.policy, now)
            if t.refusal is not None:
                raise ApprovalError(self._refusal_message(record, t, channel))
            if not t.status_changed:
                self.decisions.record_factor(jti, Factor(channel, now))
                return DecisionResult(jti, t.after.status, True)
            updated = self._store.redeliver(jti, t.after.decided_by[-1].channel.value, now)
            if updated is None:
                raise ApprovalError(f"request {jti} changed meanwhile; nothing was done")
            log.info("request %s: the owner sends its footage again", jti)
            self._schedule(jti)
            return DecisionResult(jti, Status.APPROVED)

    def _check_redeliverable(self, record: RequestRecord) -> None:
        jti = record.jti
        status = Status(record.status)
        if status not in REDELIVERABLE or (status is Status.FAILED and record.error == "revoked"):
            why = f"it is {record.status}" + (f" ({record.error})" if record.error else "")
            raise ApprovalError(
                f"request {jti} cannot be redelivered: {why}; only a delivered, acknowledged "
                "or failed (delivery_error) request can be"
            )
        if self._store.requester_revoked(jti):
            raise ApprovalError(
                f"request {jti} cannot be redelivered: its requester {record.requester_id} "
                "was revoked"
            )
        assert record.window_start is not None and record.window_end is not None
        stored = {
            getattr(c, "id", None)
            for c in self._vault.clips_overlapping(record.window_start, record.window_end)
        }
        released = {
            f.get("clip") for a in self._store.attempts(jti) for f in a.files
        } - {None}
        gone = sorted(str(c) for c in released - stored)
        if gone:
            raise ApprovalError(
                f"request {jti} cannot be redelivered: footage of its window was shredded "
                f"since it was released (clip {', '.join(gone)})"
            )
        self._check_size(record)

    def _check_size(self, record: RequestRecord) -> None:
        """Refuse an approval whose window's stored bytes exceed ``delivery.max_bytes``."""
        if self._max_bytes is None or record.window_start is None or record.window_end is None:
            return
        clips = self._vault.clips_overlapping(record.window_start, record.window_end)
        stored = sum(int(getattr(c, "stored_bytes", 0) or getattr(c, "size", 0)) for c in clips)
        if stored > self._max_bytes:
            raise ApprovalError(
                f"request {record.jti} cannot be approved: its window covers {stored} bytes of "
                f"stored footage, more than delivery.max_bytes ({self._max_bytes} bytes); "
                "raise delivery.max_bytes (and the broker's max_queued_bytes) to release it"
            )

    def button_press(self) -> DecisionResult | None:
        """A short press: approve (or, with ``require: all``, confirm) the oldest pending request.

        With nothing to approve the press is audited as ``button_ignored`` and None returned.
        """
        with self._lock:
            now = self._now()
            self._expire_due(now)
            pending = self._store.list_requests(["pending"])
            if self.policy.require == "all":
                waiting = [
                    r for r in pending if self._state_of(r).awaiting_confirmation(self.policy, now)
                ]
                if not waiting:
                    again = self._awaiting_redelivery(now)
                    if again:
                        try:
                            return self.redeliver(again[0].jti, Channel.BUTTON)
                        except AgentError as exc:
                            log.error("button redelivery of %s not applied: %s", again[0].jti, exc)
                            return None
                    why = (
                        "nothing pending"
                        if not pending
                        else "no request was approved in the app or CLI within the "
                        "confirmation window"
                    )
                    self._ignored("approve", why)
                    return None
                target = waiting[0]
            else:
                if not pending:
                    self._ignored("approve", "nothing pending")
                    return None
                target = pending[0]
            return self._button_decide(target.jti, "approve")

    def button_hold(self) -> DecisionResult | None:
        """A long press: deny the oldest pending request (audited ``button_ignored`` if none)."""
        with self._lock:
            self._expire_due(self._now())
            pending = self._store.list_requests(["pending"])
            if not pending:
                self._ignored("deny", "nothing pending")
                return None
            return self._button_decide(pending[0].jti, "deny")

    def _button_decide(self, jti: str, action: Action) -> DecisionResult | None:
        try:
            return self.decide(jti, action, Channel.BUTTON)
        except AgentError as exc:
            # Runs on gpiozero's callback thread: report, never raise into it.
            log.error("button %s of request %s not applied: %s", action, jti, exc)
            return None

    def _ignored(self, action: str, reason: str) -> None:
        try:
            self._activity.append("button_ignored", action=action, reason=reason)
        except AuditWriteError as exc:
            log.error("cannot audit an ignored button press: %s", exc)
        log.info("button %s ignored: %s", action, reason)

    # -- periodic work ---------------------------------------------------------------------

    def tick(self) -> None:
        """Apply stored decisions, expire overdue requests, hold new ones' clips, drive the LED."""
        with self._lock:
            self._apply_queued()
            now = self._now()
            self._expire_due(now)
            self.sync_holds()
            self._refresh_indicator()

    def sync_holds(self) -> None:
        """Hold the window of every pending or approved request, release the holds of every
        other request (holds not named after a request are left alone).

        Run by the tick, at start and by the vault before each retention pass. Requests whose
        hold the vault refuses (over the held-footage cap) stay pending, unheld; the owner is
        told once per request (log, ``status``, ``pending``).
        """
        with self._lock:
            live = {r.jti: r for r in self._store.list_requests(["pending", "approved"])}
            try:
                holds = {h.holder for h in self._vault.holds()}
            except AgentError as exc:
                log.error("cannot read the retention holds: %s", exc)
                return
            for holder in sorted(holds - live.keys()):
                try:
                    self._store.get_request(holder)
                except RequestNotFoundError:
                    continue  # not a request's hold (the owner's): not ours to release
                self._release_hold(holder)
            for jti, record in live.items():
                if jti not in holds:
                    self._hold(record)
            self._unheld &= live.keys()

    @property
    def unheld(self) -> list[str]:
        """Pending or approved requests whose footage is not held (held-footage cap reached)."""
        return sorted(self._unheld)

    def recover(self) -> None:
        """At start: finish what the last run left (see the module docstring)."""
        with self._lock:
            self._apply_queued()
            self._expire_due(self._now())
            finished = [s.value for s in OUTCOMES]
            answer_unanswered(self._store.list_requests(finished), self._respond, self._now())
            self._fail_revoked()
            self.sync_holds()
            approved = self._store.list_requests(["approved"])
            answer_unanswered(approved, self._respond, self._now())
            for record in approved:
                log.info("request %s was approved but not delivered: delivering again", record.jti)
                self._schedule(record.jti)
            self._refresh_indicator()

    def _fail_revoked(self) -> None:
        """End every approved request of a revoked requester ``failed``/``revoked``: it was
        revoked while the agent was down, or while its delivery waited its turn."""
        for record in self._store.list_requests(["approved"]):
            if self._store.requester_revoked(record.jti):
                self._end_delivery(record.jti, DeliveryFailed(
                    "the requester was revoked before the delivery ended", error="revoked"
                ))

    def _apply_queued(self) -> None:
        for decision in self.decisions.queued():
            try:
                self.decide(decision.jti, decision.action, decision.channel, at=decision.made_at)
            except AuditWriteError as exc:
                log.error("stored decision on %s not applied yet: %s", decision.jti, exc)
                return
            except (ApprovalError, RequestNotFoundError) as exc:
                log.warning("stored decision on %s refused: %s", decision.jti, exc)
                self.decisions.settle(decision.id, False, exc.message)
            else:
                self.decisions.settle(decision.id, True)

    def _expire_due(self, now: datetime) -> None:
        for record in self._store.list_requests(["pending"]):
            t = transition(self._state_of(record), Tick(), self.policy, now)
            if t.status_changed:
                try:
                    self._execute(record, t, now)
                except (AuditWriteError, ApprovalError) as exc:
                    log.error("cannot expire request %s yet: %s", record.jti, exc)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self._tick_interval):
            try:
                self.tick()
            except Exception:
                log.exception("approval tick failed")

    # -- delivery --------------------------------------------------------------------------

    def _schedule(self, jti: str) -> None:
        if jti in self._scheduled:
            return
        self._scheduled.add(jti)
        with self._idle:
            self._busy += 1
        self._deliveries.put(jti)

    def _worker(self) -> None:
        while True:
            jti = self._deliveries.get()
            if jti is None or self._stop.is_set():
                return
            try:
                self._deliver(jti)
            except Exception:
                log.exception("delivery of %s crashed; it is retried at the next start", jti)
            finally:
                self._scheduled.discard(jti)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _deliver(self, jti: str) -> None:
        record = self._store.get_request(jti)
        if record.status != "approved":
            return
        assert record.window_start and record.window_end and record.recipient
        salt = self._store.release_salt(jti, new_salt)
        job = DeliveryJob(
            device_id=self._device_id,
            requester_id=record.requester_id,
            jti=jti,
            window_start=record.window_start,
            window_end=record.window_end,
            recipient=record.recipient,
            exp=record.exp,
            salt=salt,
        )
        ledger = AuditedLedger(self._store, self._audit, record, salt)

        def gate() -> AbstractContextManager[None]:
            return self._store.release_gate(jti)

        event: Event
        try:
            if self._store.requester_revoked(jti):
                raise DeliveryRevokedError(f"the requester of request {jti} was revoked")
            entries = self._deliverer_factory().deliver(job, gate, ledger=ledger)
            event = DeliverySucceeded(len(entries))
        except DeliveryRevokedError as exc:
            log.warning("delivery of %s stopped: %s", jti, exc)
            event = DeliveryFailed(exc.message, error="revoked")
        except DeliveryError as exc:
            log.error("delivery of %s failed: %s", jti, exc)
            event = DeliveryFailed(exc.message)
        self._end_delivery(jti, event)

    def _end_delivery(self, jti: str, event: Event) -> None:
        with self._lock:
            record = self._store.get_request(jti)
            now = self._now()
            t = transition(self._state_of(record), event, self.policy, now)
            try:
                self._execute(record, t, now)
            except AuditWriteError as exc:
                log.critical(
                    "delivery of %s ended but its audit entry failed (%s); "
                    "it stays approved and is redone at the next start",
                    jti,
                    exc,
                )

    # -- effects ---------------------------------------------------------------------------

    def _state_of(self, record: RequestRecord) -> ApprovalState:
        status = Status(record.status)
        first = None
        if self.policy.require == "all" and (status is Status.PENDING or status in REDELIVERABLE):
            first = self.decisions.first_factor(record.jti)
            if status is not Status.PENDING and first is not None and (
                record.finished_at is None or first.at <= record.finished_at
            ):
                # The factor of an earlier decision: a redelivery needs a fresh one.
                first = None
        return ApprovalState(record.jti, status, record.received_at, record.exp, first)

    def _awaiting_redelivery(self, now: datetime) -> list[RequestRecord]:
        """Redeliverable requests whose app or CLI ``redeliver`` waits for the button."""
        waiting = []
        for record in self._store.list_requests([s.value for s in REDELIVERABLE]):
            first = self._state_of(record).first_factor
            if first is not None and first.at <= now <= first.at + self.policy.confirm_window:
                waiting.append(record)
        return waiting

    def _execute(
        self,
        record: RequestRecord,
        t: Transition,
        now: datetime,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        for effect in t.effects:
            if isinstance(effect, Audit):
                self._audit.append(
                    effect.event, **record.audit_fields(), **dict(effect.fields), **(extra or {})
                )
        if t.status_changed:
            updated = self._store.set_status(
                record.jti,
                [t.before.status.value],
                t.after.status.value,
                **self._columns(record, t, now),
            )
            if updated is None:
                log.error(
                    "request %s changed while %s was being applied; the audit entry stands "
                    "but nothing else was done",
                    record.jti,
                    t.after.status.value,
                )
                raise ApprovalError(f"request {record.jti} changed meanwhile; nothing was done")
            record = updated
        elif t.after.first_factor != t.before.first_factor and t.after.first_factor is not None:
            self.decisions.record_factor(record.jti, t.after.first_factor)
        for effect in t.effects:
            if isinstance(effect, Respond):
                self._answer(record, effect.status, dict(effect.fields))
            elif isinstance(effect, StartDelivery):
                self._schedule(record.jti)
            elif isinstance(effect, ReleaseHold):
                self._release_hold(record.jti)

    def _columns(self, record: RequestRecord, t: Transition, now: datetime) -> dict[str, object]:
        after = t.after.status
        if after is Status.APPROVED:
            return {
                "channel": t.after.decided_by[-1].channel.value,
                "decided_at": now,
                "clips": self._clip_count(record),
            }
        if after is Status.DENIED:
            return {"channel": t.after.decided_by[-1].channel.value, "decided_at": now}
        if after is Status.EXPIRED:
            return {"decided_at": now, "detail": "not approved before its deadline"}
        if after is Status.DELIVERED:
            respond = next(e for e in t.effects if isinstance(e, Respond))
            return {"finished_at": now, "clips": respond.fields["clips"]}
        audit = next(e for e in t.effects if isinstance(e, Audit))
        return {
            "finished_at": now,
            "error": audit.fields["error"],
            "detail": str(audit.fields["detail"])[:1000],
        }

    def _clip_count(self, record: RequestRecord) -> int:
        assert record.window_start is not None and record.window_end is not None
        return len(self._vault.clips_overlapping(record.window_start, record.window_end))

    def _answer(self, record: RequestRecord, status: Status, claims: dict[str, object]) -> None:
        if status is Status.APPROVED and "clips" not in claims:
            claims["clips"] = record.clips if record.clips is not None else 0
        try:
            self._respond(record, status.value, **claims)
        except (AgentError, ValueError) as exc:
            log.warning("response %s to request %s not sent: %s", status.value, record.jti, exc)

    def _hold(self, record: RequestRecord) -> None:
        if record.window_start is None or record.window_end is None:
            return
        try:
            self._vault.hold(record.jti, record.window_start, record.window_end)
        except HoldRefusedError as exc:
            if record.jti not in self._unheld:
                log.warning(
                    "request %s stays pending but its footage is NOT held and may age out "
                    "before you decide: %s", record.jti, exc.message,
                )
            self._unheld.add(record.jti)
            return
        except AgentError as exc:
            log.error("cannot hold the clips of request %s: %s", record.jti, exc)
            return
        self._unheld.discard(record.jti)

    def _release_hold(self, jti: str) -> None:
        try:
            self._vault.release_hold(jti)
        except AgentError as exc:
            log.error("cannot release the hold of request %s: %s", jti, exc)
        self._unheld.discard(jti)

    def _refresh_indicator(self) -> None:
        self._set_indicator(bool(self._store.list_requests(["pending"])))

    def _set_indicator(self, lit: bool) -> None:
        if self._indicator is None or lit == self._lit:
            return
        self._lit = lit
        try:
            self._indicator(lit)
        except Exception:
            log.exception("the pending indicator failed")

    def _refusal_message(self, record: RequestRecord, t: Transition, channel: Channel) -> str:
        jti = record.jti
        if t.refusal is Refusal.NOT_DELIVERED:
            return f"request {jti} cannot be redelivered (it is {t.before.status.value})"
        if t.refusal is Refusal.NEEDS_FIRST_FACTOR and t.before.status is not Status.PENDING:
            return (
                f"approval.require is all: run `doorbell-agent redeliver {jti}` (or Send again "
                "in the app) first, then press the button within approval.confirm_window"
            )
        if t.refusal is Refusal.NOT_PENDING:
            return f"request {jti} is not pending (it is {t.after.status.value})"
        if t.refusal is Refusal.EXPIRED:
            return f"request {jti} expired at {rfc3339(t.before.deadline(self.policy))}"
        if t.refusal is Refusal.CHANNEL_DISABLED:
            return f"the {channel.value} channel is not enabled in approval.channels"
        if t.refusal is Refusal.NEEDS_FIRST_FACTOR:
            return (
                f"approval.require is all: approve request {jti} in the app or with "
                "`doorbell-agent approve` first, then press the button within "
                "approval.confirm_window"
            )
        return f"request {jti} is not approved"
