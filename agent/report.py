"""The transparency report: who asked this device for footage, how often, and what came of it.

Pure functions over the request store's records (the same source as the Requests page and
``requests list``, so the figures agree everywhere) and the request log's release entries (for
the seconds of footage released). It counts requests only: nothing in it depends on when or how
often the camera recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from agent.audit import AuditEntry
from agent.requests.store import Requester, RequestRecord
from agent.timeutil import parse_rfc3339, rfc3339
from agent.vocabulary import APPROVED_SINCE, RELEASED, Status

RELEASE_EVENTS: Final = frozenset({"request_delivered", "request_redelivered"})


@dataclass
class Tally:
    """Requests received and their outcomes, for one requester, one kind or everyone."""

    received: int = 0
    approved: int = 0
    denied: int = 0
    expired: int = 0
    rejected: int = 0
    pending: int = 0
    seconds_released: float = 0.0
    last_request: datetime | None = None

    def add(self, record: RequestRecord, released: float) -> None:
        """Count one request (``released``: seconds of footage it released)."""
        self.received += 1
        status = record.status
        self.approved += status in APPROVED_SINCE
        self.denied += status == Status.DENIED
        self.expired += status == Status.EXPIRED
        self.rejected += status == Status.REJECTED
        self.pending += status == Status.PENDING
        self.seconds_released += released
        if self.last_request is None or record.received_at > self.last_request:
            self.last_request = record.received_at

    def to_json(self) -> dict[str, Any]:
        """The counts as JSON (``last_request`` RFC 3339 or null)."""
        return {
            "received": self.received,
            "approved": self.approved,
            "denied": self.denied,
            "expired": self.expired,
            "rejected": self.rejected,
            "pending": self.pending,
            "seconds_released": round(self.seconds_released, 3),
            "last_request": rfc3339(self.last_request) if self.last_request else None,
        }


@dataclass
class RequesterLine:
    """One requester's line of the report."""

    id: str
    name: str
    kind: str
    revoked: bool
    tally: Tally = field(default_factory=Tally)


@dataclass
class Report:
    """Per requester (everyone enrolled, even without requests), per kind, and in total."""

    since: datetime | None
    requesters: list[RequesterLine]
    kinds: dict[str, Tally]
    total: Tally

    def to_json(self) -> dict[str, Any]:
        """The ``report --json`` document."""
        return {
            "since": rfc3339(self.since) if self.since else None,
            "requesters": [
                {"id": r.id, "name": r.name, "kind": r.kind, "revoked": r.revoked,
                 **r.tally.to_json()}
                for r in self.requesters
            ],
            "kinds": [{"kind": k, **t.to_json()} for k, t in self.kinds.items()],
            "total": self.total.to_json(),
        }


def _span_seconds(item: object) -> float | None:
    if not isinstance(item, dict):
        return None
    try:
        start, end = parse_rfc3339(str(item["start"])), parse_rfc3339(str(item["end"]))
    except (KeyError, ValueError):
        return None
    return max(0.0, (end - start).total_seconds())


def released_seconds(entries: Iterable[AuditEntry]) -> dict[str, float]:
    """Seconds of footage each request released, from the request log's release entries.

    An entry that lists its files with their spans (``files``: ``[{"start", "end"}, ...]``)
    counts those spans; a re-delivery sends the same window again, so the newest entry of a
    request replaces the earlier one rather than adding to it. Entries of any other event
    (camera activity included) are ignored.
    """
    out: dict[str, float] = {}
    for entry in entries:
        if entry.event not in RELEASE_EVENTS:
            continue
        jti = entry.fields.get("jti")
        files = entry.fields.get("files")
        if not isinstance(jti, str) or not isinstance(files, list):
            continue
        spans = [_span_seconds(f) for f in files]
        out[jti] = sum(s for s in spans if s is not None)
    return out


def _released(record: RequestRecord, logged: Mapping[str, float]) -> float:
    if record.status not in RELEASED:
        return 0.0
    if record.jti in logged:
        return logged[record.jti]
    # A release logged without file spans (older entries): the approved window, when any
    # clip went out, is what the owner agreed to release.
    if not record.clips or record.window_start is None or record.window_end is None:
        return 0.0
    return max(0.0, (record.window_end - record.window_start).total_seconds())


def build_report(
    records: Iterable[RequestRecord],
    requesters: Iterable[Requester],
    released: Mapping[str, float],
    *,
    since: datetime | None = None,
) -> Report:
    """The report over requests received at or after ``since`` (None: all of them).

    Every enrolled requester gets a line (zero requests is worth seeing); kinds are listed in
    the order of the first requester of each kind.
    """
    lines: dict[str, RequesterLine] = {
        r.id: RequesterLine(r.id, r.name, r.kind, r.revoked) for r in requesters
    }
    total = Tally()
    for record in records:
        if since is not None and record.received_at < since:
            continue
        line = lines.get(record.requester_id)
        if line is None:  # a requester no longer enrolled (kept for the record)
            line = lines[record.requester_id] = RequesterLine(
                record.requester_id, record.requester_name, record.kind, True
            )
        seconds = _released(record, released)
        line.tally.add(record, seconds)
        total.add(record, seconds)
    kinds: dict[str, Tally] = {}
    ordered = sorted(lines.values(), key=lambda r: (-r.tally.received, r.name.lower(), r.id))
    for line in ordered:
        kind = kinds.setdefault(line.kind, Tally())
        t = line.tally
        kind.received += t.received
        kind.approved += t.approved
        kind.denied += t.denied
        kind.expired += t.expired
        kind.rejected += t.rejected
        kind.pending += t.pending
        kind.seconds_released += t.seconds_released
        if t.last_request and (kind.last_request is None or t.last_request > kind.last_request):
            kind.last_request = t.last_request
    return Report(since, ordered, kinds, total)


def seconds_text(seconds: float) -> str:
    """Footage seconds for people: ``0 s``, ``45 s``, ``30 min``, ``1 h 5 min``."""
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"
