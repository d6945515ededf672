"""Intake accounting, pure: the lanes requests wait in and the budgets that bound a flood.

Nothing here does I/O (the trust snapshot reads the store only when asked to); the request
service (:mod:`agent.requests.service`) owns the thread, the MQTT client and the log.

Audit growth. Whatever one requester sends, at any rate the broker passes, it adds at most about
1 MiB a day to the audit log, because every per-message entry is paid for from a per-requester
budget and everything past the budget is aggregated:

- a signed request that is rejected is audited individually (``request_received`` +
  ``request_rejected``, and answered) only while its requester has audit budget left: a token
  bucket in bytes per requester, ``AUDIT_BUDGET_BURST`` (64 KiB) deep, refilled at
  ``AUDIT_BUDGET_PER_DAY`` (384 KiB) a day, charged :func:`audit_cost` (the entries' size);
  so at most 448 KiB of individual entries in any 24 h. Accepted requests are always audited
  (``requests.rate_limit`` bounds them) and are charged too, so they leave less room for
  rejections rather than adding to it. (The per-minute ``rejection_burst`` still caps answers.)
- past the budget a rejection is only counted: one ``request_rejected`` summary entry per
  requester per ``SUMMARY_INTERVAL`` (600 s: 144 a day, each under 1 KiB, < 144 KiB)
  with ``suppressed`` (how many) and ``errors`` (how many per code). Revoked requesters,
  replays and rate-limited floods all land here. These entries are ordinary chain entries.
- unverifiable messages (anyone's, a requester's forgeries included) are never audited one by
  one: one ``request_unverifiable`` entry per ``SUMMARY_INTERVAL`` with a count and a reasons
  histogram (< 144 KiB a day for all senders together). The first summary after a quiet
  interval is written at once, so the owner still hears of trouble when it starts.

So one requester accounts for < 448 + 144 + 144 KiB (736 KiB) < 1 MiB a day; what its
accepted requests add beyond that is bounded by ``requests.rate_limit``, not by this budget
(``tests/test_audit_growth.py`` measures it over a simulated day).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Generic, TypeVar

from agent.requests.store import RequestStore
from agent.requests.verify import (
    MAX_HEADER_SEGMENT,
    Rejection,
    TrustedKey,
    TrustView,
    VerifiedRequest,
)

SUMMARY_INTERVAL: Final = 600.0
"""Seconds: at most one ``request_unverifiable`` entry, and one ``request_rejected`` summary per
requester, per interval (144 a day each; see "Audit growth" in the module docstring)."""
AUDIT_BUDGET_PER_DAY: Final = 384 * 1024
"""Bytes of individual request entries a requester's rejections may add to the log per day."""
AUDIT_BUDGET_BURST: Final = 64 * 1024
"""How much of that a requester may use at once."""
ENTRY_OVERHEAD: Final = 320
"""Bytes an audit line adds around its event fields (seq, ts, event, prev, sig), rounded up."""
MAX_CORRELATION: Final = 256
"""Bytes of MQTT v5 Correlation Data a request may carry (CONTRACT §3); longer: unverifiable."""



def audit_cost(result: VerifiedRequest | Rejection) -> int:
    """The bytes ``request_received`` plus ``request_pending``/``request_rejected`` add to the
    audit log for ``result`` (fields as the log serialises them, plus ENTRY_OVERHEAD each)."""
    return sum(
        len(json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode())
        + ENTRY_OVERHEAD
        for fields in (received_fields(result), result.audit_fields())
    )
def peek_kid(payload: bytes) -> str | None:
    """The ``kid`` a compact JWS header names, or None when there is no readable header.

    Cheap enough for paho's network thread (at most 1 KiB decoded); it decides only which lane a
    message waits in, never whether it is valid.
    """
    head, dot, _ = payload.partition(b".")
    if not dot or len(head) > MAX_HEADER_SEGMENT:
        return None
    return _kid_of_header(head)


T = TypeVar("T")

SNAPSHOT_MIN_AGE: Final = 0.02
"""Seconds: the enrolled-key snapshot is renewed for suspects at most this often."""


@lru_cache(maxsize=256)
def _kid_of_header(head: bytes) -> str | None:
    # Cached: a requester's messages, and a flood under an enrolled kid, repeat one header.
    try:
        header = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


class FairQueue(Generic[T]):
    """A bounded queue of items filed by key, served round robin by key (thread-safe).

    Each key keeps its own arrival order; ``get`` takes the oldest item of the key whose turn it
    is, so a key with a thousand items waiting delays another key's next item by at most one.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a queue needs room for at least one item")
        self.capacity = capacity
        self._items: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()
        self._size = 0
        self._cond = threading.Condition()

    def qsize(self) -> int:
        """How many items wait."""
        return self._size

    def put_nowait(self, key: str, item: T) -> bool:
        """File ``item`` under ``key``; False (nothing stored) when the queue is full."""
        with self._cond:
            if self._size >= self.capacity:
                return False
            waiting = self._items.get(key)
            if waiting is None:
                waiting = self._items[key] = deque()
                self._turns.append(key)
            waiting.append(item)
            self._size += 1
            self._cond.notify()
            return True

    def get(self, timeout: float = 0.0) -> T | None:
        """The next item in round-robin order, waiting up to ``timeout`` s; None if none came."""
        with self._cond:
            if not self._size and timeout > 0:
                self._cond.wait(timeout)
            if not self._size:
                return None
            key = self._turns.popleft()
            waiting = self._items[key]
            item = waiting.popleft()
            self._size -= 1
            if waiting:
                self._turns.append(key)
            else:
                del self._items[key]
            return item

    def clear(self) -> None:
        """Forget every waiting item."""
        with self._cond:
            self._items.clear()
            self._turns.clear()
            self._size = 0

    def wake(self) -> None:
        """Wake a waiting ``get`` (it returns None unless an item came)."""
        with self._cond:
            self._cond.notify_all()


class TrustSnapshot:
    """Enrolled keys as of one read of the store, as a :class:`TrustView` per message.

    A kid is the RFC 7638 thumbprint of its key, so a kid found here names the right key for
    ever: a signature checked with it is checked correctly. What can change about its requester
    (revoked, id, kind) may be stale; the service reads it fresh once a signature verified. A
    kid not found here is unknown to a message that arrived before the snapshot was taken (it
    was not enrolled then); for a younger message the store is asked.
    """

    def __init__(self, keys: Mapping[str, TrustedKey], taken: float, store: TrustView) -> None:
        self.keys = keys
        self.taken = taken
        self._store = store

    @classmethod
    def read(cls, store: RequestStore, taken: float) -> TrustSnapshot:
        """The enrolled keys now (revoked ones included); ``taken`` is the caller's clock."""
        keys = {
            r.kid: TrustedKey(r.id, r.kind, r.kid, r.public_key, r.revoked)
            for r in store.list_requesters()
        }
        return cls(keys, taken, store)

    def view(self, arrived: float) -> TrustView:
        """The trust view for a message that arrived at ``arrived`` (the same clock)."""
        return _SnapshotView(self, arrived)

    def lookup(self, kid: str, arrived: float) -> TrustedKey | None:
        """The key enrolled for ``kid`` as far as a message that arrived then can tell."""
        key = self.keys.get(kid)
        if key is not None or arrived <= self.taken:
            return key
        return self._store.key_for_kid(kid)


@dataclass(frozen=True)
class _SnapshotView:
    snapshot: TrustSnapshot
    arrived: float

    def key_for_kid(self, kid: str) -> TrustedKey | None:
        return self.snapshot.lookup(kid, self.arrived)


class Tally:
    """Counts things by kind and releases the counts at most once per ``interval`` seconds.

    The first thing counted after a quiet interval is released at once (the owner hears about
    the start of trouble quickly); later ones are summed until the interval has passed.
    Thread-safe: paho's network thread counts oversize messages, the worker the rest.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._last = -math.inf
        self._lock = threading.Lock()

    def add(self, kind: str, n: int = 1) -> None:
        """Count ``n`` more of ``kind``."""
        with self._lock:
            self._counts[kind] += n

    def take(self, now: float, *, force: bool = False) -> dict[str, int] | None:
        """The counts since the last release if one is due at ``now`` (or ``force``), else None."""
        with self._lock:
            if not self._counts or (not force and now - self._last < self.interval):
                return None
            counts, self._counts = dict(self._counts), Counter()
            self._last = now
            return counts


class Budget:
    """A token bucket per key: ``burst`` tokens, refilled at ``burst`` per ``period`` seconds."""

    def __init__(self, burst: float, period: float) -> None:
        self.burst = burst
        self.rate = burst / period
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens for ``key`` if that many are left at ``now``."""
        tokens = self._tokens(key, now)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > 4096:
            # Full buckets carry no state worth keeping; this bounds memory per requester id.
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
        return True

    def charge(self, key: str, now: float, cost: float) -> None:
        """Take ``cost`` tokens for ``key`` unconditionally (the bucket may go down to
        ``-burst``: what must happen anyway still delays what may be dropped)."""
        self._buckets[key] = (max(-float(self.burst), self._tokens(key, now) - cost), now)


def received_fields(result: VerifiedRequest | Rejection) -> dict[str, Any]:
    fields = dict(result.audit_fields())
    fields.pop("error", None)
    fields.pop("detail", None)
    return fields
