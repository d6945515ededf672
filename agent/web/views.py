"""Pure presentation helpers: JSON shapes of the API and the small computations pages show."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from agent.audit import AuditEntry, VerifyResult
from agent.requests.store import Requester, RequestRecord
from agent.timeutil import rfc3339
from agent.vault import ClipInfo


def human_duration(delta: timedelta) -> str:
    """A short, rounded-down duration for people: ``2 d 3 h``, ``3 h 12 min``, ``45 s``."""
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def human_time(moment: datetime | None, tz: tzinfo | None) -> str:
    """``Sat 31 Jan 2026, 14:03:12`` in the device's time zone (``tz`` None: system local)."""
    if moment is None:
        return "—"
    return moment.astimezone(tz).strftime("%a %d %b %Y, %H:%M:%S")


def human_day(day: date) -> str:
    """``Saturday 31 January 2026``."""
    return day.strftime("%A %d %B %Y")


def request_json(record: RequestRecord, deadline: datetime | None) -> dict[str, Any]:
    """A request as the API returns it: the CLI's JSON plus what the app shows."""
    out = record.to_json()
    out.update(
        kid=record.kid,
        detail=record.detail,
        clips=record.clips,
        finished_at=rfc3339(record.finished_at) if record.finished_at else None,
        deadline=rfc3339(deadline) if deadline is not None else None,
    )
    return out


def requests_fingerprint(records: Iterable[RequestRecord]) -> str:
    """Changes whenever a request arrives or changes status: what the event stream watches."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.jti}|{record.status}|{rfc3339(record.updated_at)}\n".encode())
    return digest.hexdigest()


def split_requests(
    records: Sequence[RequestRecord],
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """(pending oldest first — the most urgent on top, history newest first)."""
    pending = [r for r in records if r.status == "pending"]
    history = sorted(
        (r for r in records if r.status != "pending"),
        key=lambda r: (r.decided_at or r.received_at, r.jti),
        reverse=True,
    )
    return pending, history


def clip_json(clip: ClipInfo) -> dict[str, Any]:
    """A clip as the API returns it (the CLI's JSON with the duration added)."""
    out = clip.to_json()
    out["duration_s"] = round((clip.end - clip.start).total_seconds(), 3)
    return out


@dataclass(frozen=True)
class ClipDay:
    """The final clips that started on one day, newest first."""

    day: date
    clips: list[ClipInfo]


def clips_by_day(clips: Iterable[ClipInfo], tz: tzinfo | None) -> list[ClipDay]:
    """Final clips grouped by local start day; newest day and newest clip first."""
    days: dict[date, list[ClipInfo]] = {}
    for clip in sorted(
        (c for c in clips if c.state == "final"), key=lambda c: (c.start, c.id), reverse=True
    ):
        days.setdefault(clip.start.astimezone(tz).date(), []).append(clip)
    return [ClipDay(day, items) for day, items in days.items()]


def requester_json(requester: Requester) -> dict[str, Any]:
    """A requester as the API returns it (the CLI's JSON)."""
    return requester.to_json()


def verify_json(result: VerifyResult) -> dict[str, Any]:
    """The audit chain check as the API returns it."""
    return {
        "ok": result.ok,
        "entries": result.count,
        "first_bad_seq": result.first_bad_seq,
        "reason": result.reason,
        "head_hash": result.head_hash,
        "summary": result.summary(),
    }


def entry_matches(entry: AuditEntry, requester: str | None) -> bool:
    """Whether an audit entry concerns ``requester`` (None: every entry matches)."""
    return requester is None or entry.fields.get("requester") == requester


def newest_entries(
    entries: Iterable[AuditEntry],
    *,
    requester: str | None,
    before: int | None,
    limit: int,
) -> tuple[list[AuditEntry], bool]:
    """The ``limit`` newest matching entries with ``seq < before``, newest first.

    Returns them and whether older matching entries exist (for an "older" link). Streams the
    log once, keeping at most ``limit + 1`` entries.
    """
    kept: list[AuditEntry] = []
    for entry in entries:
        if before is not None and entry.seq >= before:
            break
        if entry_matches(entry, requester):
            kept.append(entry)
            if len(kept) > limit + 1:
                kept.pop(0)
    more = len(kept) > limit
    return list(reversed(kept[-limit:])), more


def entry_summary(entry: AuditEntry) -> list[tuple[str, str]]:
    """An audit entry's fields as (name, text) pairs for display, in a stable order."""
    rows: list[tuple[str, str]] = []
    for name in sorted(entry.fields):
        value = entry.fields[name]
        if value is None:
            continue
        if isinstance(value, dict | list):
            text = ", ".join(
                f"{k}: {v}" for k, v in value.items()
            ) if isinstance(value, dict) else ", ".join(str(v) for v in value)
        else:
            text = str(value)
        rows.append((name, text))
    return rows


def deadline_for(
    timeout: timedelta,
) -> Callable[[RequestRecord], datetime]:
    """The approval rule for when a pending request expires: ``received + timeout`` or ``exp``."""

    def deadline(record: RequestRecord) -> datetime:
        return min(record.received_at + timeout, record.exp)

    return deadline
