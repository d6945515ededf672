"""The start-up check of the request log against the newest audit head the device knows (§7).

Once connected, the device subscribes to its own retained ``P/D/audit/head`` and waits up to
``wait`` seconds after the SUBACK for it (none: nothing to compare from the broker). Heads not
signed by the current device key, or naming another device, are ignored and logged. The newest
of that and of the witnessed receipt heads kept outside the logs
(:data:`agent.paths.WITNESSED_FILE`) is the expected head. If ``audit.jsonl`` does not hold that
entry (shorter, emptied, deleted, or another hash at that seq), the device records the gap in
``audit-broken.json`` (status says ``audit: broken`` from then on) and appends
``audit_discontinuity`` (see :meth:`agent.audit.AuditLog.append_discontinuity`), whose seq lies
past the expected head's, so the public head never goes backwards.

The caller keeps requests and receipts held and publishes no head until :meth:`StartupCheck.run`
returns; a broker unreachable at start delays it (the camera records meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit import (
    AuditEntry,
    AuditHead,
    AuditLog,
    HeadGap,
    compare_with_head,
    iter_log_lines,
    mark_broken,
    newest_head,
    parse_head_jws,
    read_witnessed_heads,
)
from agent.errors import AuditError, MQTTError
from agent.mqtt import InboundMessage
from agent.paths import StatePaths
from agent.timeutil import utcnow

log = logging.getLogger(__name__)

SUBACK_TIMEOUT = 10.0
"""Seconds to wait for the SUBACK before trying again (on this or the next connection)."""


class HeadSource(Protocol):
    """What the check needs of :class:`agent.mqtt.MQTTClient`."""

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a connection; whether there is one."""
        ...

    def subscribe(self, topic: str, handler: Callable[[InboundMessage], None]) -> Future[bool]:
        """Subscribe now; the future says on the SUBACK whether the broker granted it."""
        ...

    def unsubscribe(self, topic: str) -> None:
        """Drop that subscription."""
        ...


@dataclass(frozen=True)
class CheckOutcome:
    """What the check found: the newest head known (None: none) and the gap, if any."""

    expected: AuditHead | None
    source: str | None
    gap: HeadGap | None
    discontinuity: AuditEntry | None

    @property
    def floor(self) -> int:
        """The public head must not go below this seq."""
        return 0 if self.expected is None else self.expected.seq


class StartupCheck:
    """Runs the check once; see the module docstring."""

    def __init__(
        self,
        *,
        client: HeadSource,
        topic: str,
        device_id: str,
        public_key: Ed25519PublicKey,
        audit: AuditLog,
        state_dir: Path,
        wait: float = 5.0,
        suback_timeout: float = SUBACK_TIMEOUT,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.client = client
        self.topic = topic
        self.device_id = device_id
        self.public_key = public_key
        self.audit = audit
        self.state_dir = state_dir
        self.wait = wait
        self.suback_timeout = suback_timeout
        self.now = now

    def run(self, stop: threading.Event) -> CheckOutcome | None:
        """Fetch the retained head (waiting for a connection), compare, record any gap.

        Returns None when ``stop`` was set first. Raises AuditWriteError when the gap cannot be
        recorded (the agent must then not go on as if the log were whole).
        """
        tokens = self._fetch_retained(stop)
        if tokens is None:
            return None
        return self.judge(tokens)

    def judge(self, tokens: list[bytes]) -> CheckOutcome:
        """Compare the log with the newest of ``tokens`` (retained heads) and the witnessed
        heads; record a gap when the log does not hold it."""
        candidates: list[tuple[AuditHead, str]] = []
        for token in tokens:
            head = self._parse(token)
            if head is not None:
                candidates.append((head, "retained"))
        candidates += [
            (head, "witnessed")
            for head in read_witnessed_heads(
                StatePaths(self.state_dir).witnessed_heads, self.public_key, self.device_id
            )
        ]
        best = newest_head(candidates)
        if best is None:
            log.info("audit check: no audit head to compare with (a new device or broker)")
            return CheckOutcome(None, None, None, None)
        head, source = best
        gap = compare_with_head(self._lines(), head, source)
        if gap is None:
            log.info("audit check: the log holds the %s head (seq %d)", source, head.seq)
            return CheckOutcome(head, source, None, None)
        log.error(
            "audit check: %s does not hold the %s audit head seq %d (hash %s); found %s. "
            "Recording an audit_discontinuity; status says audit: broken from now on",
            self.audit.path, source, head.seq, head.hash,
            "nothing" if gap.found_seq is None else f"seq {gap.found_seq} hash {gap.found_hash}",
        )
        mark_broken(self.state_dir, gap, self.now())
        entry = self.audit.append_discontinuity(gap)
        return CheckOutcome(head, source, gap, entry)

    def _lines(self) -> Iterator[bytes]:
        try:
            yield from iter_log_lines(self.audit.path)
        except AuditError:
            if self.audit.path.exists():
                raise
            return  # a deleted log holds nothing

    def _parse(self, token: bytes) -> AuditHead | None:
        if not token:
            return None  # a cleared retained message
        try:
            head = parse_head_jws(token.decode("ascii"), self.public_key)
        except (AuditError, UnicodeDecodeError) as exc:
            log.warning("audit check: ignoring a retained head on %s: %s", self.topic, exc)
            return None
        if head.iss != self.device_id:
            log.warning("audit check: ignoring a retained head naming device %r", head.iss)
            return None
        return head

    def _fetch_retained(self, stop: threading.Event) -> list[bytes] | None:
        while not stop.is_set():
            if not self.client.wait_connected(0.5):
                continue
            tokens = self._try_fetch(stop)
            if tokens is not None:
                return tokens
        return None

    def _try_fetch(self, stop: threading.Event) -> list[bytes] | None:
        got: list[bytes] = []
        arrived = threading.Event()

        def on_head(message: InboundMessage) -> None:
            got.append(message.payload)
            # Only the broker's retained copy ends the wait: a copy left over in our persistent
            # session from an earlier run (not flagged retained) may be older.
            if message.retain:
                arrived.set()

        try:
            future = self.client.subscribe(self.topic, on_head)
            deadline = time.monotonic() + self.suback_timeout
            while not future.done() and not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    future.result(timeout=0.2)
            if stop.is_set():
                self._unsubscribe()
                return None
            granted = future.result(timeout=0)
        except (MQTTError, TimeoutError) as exc:
            log.warning("audit check: no SUBACK for %s (%s); trying again", self.topic, exc)
            self._unsubscribe()
            return None
        if not granted:
            log.warning(
                "audit check: the broker refused our subscription to %s (check its ACL); "
                "nothing to compare from the broker", self.topic,
            )
            self._unsubscribe()
            return []
        deadline = time.monotonic() + self.wait
        # One retained message is all the broker sends for a subscription; stop once it is here.
        while not arrived.is_set() and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            arrived.wait(min(remaining, 0.5))
        self._unsubscribe()
        if stop.is_set():
            return None
        return list(got)

    def _unsubscribe(self) -> None:
        try:
            self.client.unsubscribe(self.topic)
        except (MQTTError, ValueError, OSError) as exc:
            log.warning("audit check: could not unsubscribe from %s: %s", self.topic, exc)
