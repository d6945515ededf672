"""Receipts on ``P/D/receipts`` (contract §5.2): a requester says it received a delivery.

Receipts have their own intake: paho's network thread hands each one (after the size check) to a
small bounded queue, acknowledged at once so a receipt never holds one of the broker's in-flight
slots that requests need, and a thread of its own handles at most ``rate`` a second. A flood of
receipts therefore never delays a request; what does not fit is dropped and counted.

Handling one, in order (each refusal changes nothing and writes nothing; it is counted in
``stats`` and logged locally):

1. :func:`agent.requests.verify.verify_receipt`: the request intake's size, shape and header
   checks with ``typ`` ``doorbell-receipt+jwt``, kid enrolled, signature, requester not revoked,
   ``iss``, ``aud``, ``iat``;
2. ``audit_head``, when present, must be a head signed by this device's key naming this device
   (a forged head refuses the whole receipt); it is kept as witnessed only if ``audit.jsonl``
   holds that very entry;
3. the store's :meth:`~agent.requests.store.RequestStore.acknowledge`: ``req`` is ``delivered``
   to ``iss`` and ``manifest`` is the SHA-256 of its newest attempt's manifest; then, in the
   same transaction and before it commits, ``delivery_acknowledged`` (with the receipt) goes to
   the audit log and the request becomes ``acknowledged``. Duplicates and late receipts find it
   acknowledged (or redelivered) and change nothing;
4. the witnessed head is written to :data:`agent.paths.WITNESSED_FILE` (the start-up check
   reads it) when it is newer than the one kept there.

Nothing is ever answered.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit import (
    AuditHead,
    AuditSink,
    iter_log_lines,
    parse_entry,
    parse_head_jws,
    read_witnessed_heads,
)
from agent.errors import AgentError, AuditError, AuditWriteError
from agent.files import replace_file
from agent.paths import StatePaths
from agent.requests.store import RequestStore
from agent.requests.verify import (
    RefusedReceipt,
    RequestPolicy,
    Unverifiable,
    VerifiedReceipt,
    verify_receipt,
)
from agent.timeutil import utcnow

log = logging.getLogger(__name__)

RECEIPT_QUEUE = 64
"""Receipts waiting to be handled; more are dropped (and counted)."""
RECEIPT_RATE = 20
"""Receipts handled per second at most."""
EARLY_WAIT = 60.0
"""Seconds a receipt that came before its delivery's ``delivered`` status waits for it."""
EARLY_MAX = 32
"""Such receipts kept waiting at most; more are refused (counted ``not_acknowledged``)."""
EARLY_RETRY = 0.2
"""Seconds between tries of the receipts that wait."""


class RequestLog(AuditSink, Protocol):
    """What receipts need of the request log (:class:`agent.audit.AuditLog`): its entries are
    read back from ``path`` to check a witnessed head."""

    @property
    def path(self) -> Path: ...


def log_holds(path: Path, head: AuditHead) -> bool:
    """Whether the log at ``path`` holds the entry ``head`` names (same seq, same line hash)."""
    for line in iter_log_lines(path):
        try:
            entry = parse_entry(line)
        except ValueError:
            continue
        if entry.seq == head.seq:
            return entry.hash == head.hash
    return False


def keep_witnessed(state_dir: Path, token: str, head: AuditHead, public_key: Ed25519PublicKey,
                   device_id: str) -> bool:
    """Keep ``token`` as the witnessed head unless one kept already is as new; durable.

    One head is kept (the newest): the start-up check only ever uses the newest. Returns whether
    the file changed.
    """
    path = StatePaths(state_dir).witnessed_heads
    kept = read_witnessed_heads(path, public_key, device_id)
    if any((k.seq, k.iat) >= (head.seq, head.iat) for k in kept):
        return False
    replace_file(path, token.encode("ascii") + b"\n")
    return True


class ReceiptDesk:
    """Verifies and applies receipts on their own thread; see the module docstring."""

    def __init__(
        self,
        *,
        store: RequestStore,
        audit: RequestLog,
        policy: RequestPolicy,
        device_key: Ed25519PublicKey,
        state_dir: Path,
        queue_size: int = RECEIPT_QUEUE,
        rate: int = RECEIPT_RATE,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._audit = audit
        self._policy = policy
        self._device_key = device_key
        self._state_dir = state_dir
        self._rate = rate
        self._now = now
        self._clock = clock
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="receipts", daemon=True)
        self._started = False
        # Receipts that came before their delivery's ``delivered`` status: retried until then.
        self._early: dict[tuple[str, str], tuple[_Checked, float]] = {}
        self.stats: Counter[str] = Counter()
        """``received``, ``acknowledged``, ``witnessed``, ``dropped``, ``early`` (came before
        their delivery's ``delivered`` status and waited), and one count per refusal
        (``unverifiable_<reason>``, ``refused_<reason>``, ``forged_head``,
        ``not_acknowledged``, ``audit_failed``, ``failed``)."""

    def offer(self, payload: bytes) -> None:
        """Queue one receipt (paho's network thread): size check, a non-blocking put."""
        self.stats["received"] += 1
        if len(payload) > self._policy.max_bytes:
            self.stats["unverifiable_oversize"] += 1
            return
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.stats["dropped"] += 1

    def start(self) -> None:
        """Start handling receipts (after the start-up audit check)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; receipts still queued are dropped (requesters may send again)."""
        if self._started:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join(timeout)
            self._started = False

    def _run(self) -> None:
        interval = 1.0 / self._rate
        next_at = self._clock()
        while True:
            try:
                payload = self._queue.get(timeout=EARLY_RETRY if self._early else None)
            except queue.Empty:
                payload = b""
            if payload is None:
                return
            if self._early:
                self._retry_early()
            if not payload:
                continue
            wait = next_at - self._clock()
            if wait > 0:
                time.sleep(wait)
            next_at = max(next_at, self._clock()) + interval
            try:
                self.handle(payload)
            except Exception:
                self.stats["failed"] += 1
                log.exception("handling a receipt failed; it is dropped")

    def handle(self, payload: bytes) -> bool:
        """Verify and apply one receipt; whether it acknowledged a delivery."""
        result = verify_receipt(payload, self._store, self._policy, self._now())
        if isinstance(result, Unverifiable):
            self.stats[f"unverifiable_{result.reason}"] += 1
            log.info("unverifiable receipt (%s): %s", result.reason, result.detail)
            return False
        if isinstance(result, RefusedReceipt):
            self.stats[f"refused_{result.reason}"] += 1
            log.info(
                "receipt from %s refused (%s): %s", result.requester_id, result.reason,
                result.detail,
            )
            return False
        checked = self._check_head(result)
        if checked is None:
            return False
        outcome = self._acknowledge(checked)
        if outcome == "ending":
            key = (result.req, result.manifest)
            if key not in self._early and len(self._early) >= EARLY_MAX:
                return self._refused(result)
            self._early[key] = (checked, self._clock() + EARLY_WAIT)
            self.stats["early"] += 1
            log.info("receipt for %s came before its delivery ended: waiting", result.req)
            return False
        return outcome == "acknowledged"

    def _retry_early(self) -> None:
        """Apply the receipts that waited for their delivery's ``delivered`` status."""
        now = self._clock()
        for key, (checked, until) in list(self._early.items()):
            try:
                outcome = self._acknowledge(checked)
            except Exception:
                outcome = "failed"
                self.stats["failed"] += 1
                log.exception("retrying an early receipt failed; it is dropped")
            if outcome == "ending" and now < until:
                continue
            del self._early[key]
            if outcome == "ending":
                self._refused(checked.receipt)

    def _check_head(self, receipt: VerifiedReceipt) -> _Checked | None:
        """The receipt with its audit head checked (None: a forged head refuses it)."""
        if receipt.audit_head is None:
            return _Checked(receipt, None, False)
        try:
            head = parse_head_jws(receipt.audit_head, self._device_key)
        except AuditError as exc:
            self.stats["forged_head"] += 1
            log.warning(
                "receipt from %s for %s refused: its audit_head is not this device's: %s",
                receipt.requester_id, receipt.req, exc,
            )
            return None
        if head.iss != self._policy.device_id:
            self.stats["forged_head"] += 1
            log.warning("receipt from %s names another device's audit head", receipt.requester_id)
            return None
        holds = log_holds(self._audit.path, head)
        if not holds:
            log.warning(
                "receipt from %s carries audit head seq %d that audit.jsonl does not hold: "
                "not kept as witnessed", receipt.requester_id, head.seq,
            )
        return _Checked(receipt, head, holds)

    def _refused(self, receipt: VerifiedReceipt) -> bool:
        self.stats["not_acknowledged"] += 1
        log.info(
            "receipt from %s for %s changes nothing: no delivery to it awaits a receipt with "
            "that manifest", receipt.requester_id, receipt.req,
        )
        return False

    def _acknowledge(self, checked: _Checked) -> str:
        """``acknowledged``, ``ending`` (the delivery has not recorded ``delivered`` yet),
        ``refused`` or ``failed``; counts and logs all but ``ending``."""
        receipt = checked.receipt

        def record(attempt: int) -> None:
            self._audit.append(
                "delivery_acknowledged",
                jti=receipt.req,
                requester=receipt.requester_id,
                kid=receipt.kid,
                attempt=attempt,
                manifest_sha256=receipt.manifest,
                receipt=receipt.token,
            )
            # Kept before the request shows `acknowledged`, so whoever sees that status also
            # finds the head witnessed (a genuine device head stays valid even if the status
            # change then failed).
            self._witness(checked)

        try:
            moved = self._store.acknowledge(
                receipt.req, receipt.requester_id, receipt.manifest, record
            )
            ending = not moved and self._store.delivery_ending(
                receipt.req, receipt.requester_id, receipt.manifest
            )
        except AuditWriteError as exc:
            self.stats["audit_failed"] += 1
            log.error("receipt for %s not applied: it cannot be audited: %s", receipt.req, exc)
            return "failed"
        except AgentError as exc:
            self.stats["failed"] += 1
            log.error("receipt for %s not applied: %s", receipt.req, exc)
            return "failed"
        if ending:
            return "ending"
        if not moved:
            self._refused(receipt)
            return "refused"
        self.stats["acknowledged"] += 1
        log.info("request %s: delivery acknowledged by %s", receipt.req, receipt.requester_id)
        return "acknowledged"

    def _witness(self, checked: _Checked) -> None:
        """Keep the receipt's audit head as witnessed when it is the device's and
        ``audit.jsonl`` holds it; a failure to write it is logged, not fatal."""
        head, token = checked.head, checked.receipt.audit_head
        if head is None or not checked.holds or token is None:
            return
        try:
            if keep_witnessed(self._state_dir, token, head, self._device_key,
                              self._policy.device_id):
                self.stats["witnessed"] += 1
        except OSError as exc:
            log.error("cannot keep the witnessed audit head: %s", exc)


@dataclass(frozen=True)
class _Checked:
    """A verified receipt whose audit head (if any) is the device's; ``holds``: audit.jsonl
    holds that entry."""

    receipt: VerifiedReceipt
    head: AuditHead | None
    holds: bool
