"""Pure presentation helpers: JSON shapes of the API and the small computations pages show."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Final

from agent.audit import AuditEntry, VerifyResult
from agent.requests.store import Requester, RequestRecord
from agent.timeutil import format_size, parse_rfc3339, rfc3339
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
    """``Sat 31 Jan 2026, 14:03:12 CET`` in the device's time zone (``tz`` None: system local).

    The one time format of every page, always with its zone.
    """
    if moment is None:
        return "—"
    return moment.astimezone(tz).strftime("%a %d %b %Y, %H:%M:%S %Z").rstrip()


def human_clock(moment: datetime, tz: tzinfo | None) -> str:
    """``14:03`` in the device's time zone (for a window inside a sentence that names the day)."""
    return moment.astimezone(tz).strftime("%H:%M")


def human_window(start: datetime | None, end: datetime | None, tz: tzinfo | None) -> str:
    """A footage window, start first: ``Sat 31 Jan 2026, 13:00-13:30 CET`` (one day) or both
    ends in full when it spans midnight."""
    if start is None or end is None:
        return "an unknown window"
    a, b = start.astimezone(tz), end.astimezone(tz)
    zone = a.strftime("%Z")
    if a.date() == b.date():
        fmt = "%H:%M:%S" if a.second or b.second else "%H:%M"
        return f"{a.strftime('%a %d %b %Y')}, {a.strftime(fmt)}-{b.strftime(fmt)} {zone}".rstrip()
    return f"{human_time(a, tz)} to {human_time(b, tz)}"


def human_period(delta: timedelta) -> str:
    """A configured period in words: ``7 days``, ``1 hour``, ``90 minutes``, ``30 seconds``."""
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} second{'' if seconds == 1 else 's'}"


def clock_duration(seconds: float) -> str:
    """A video length as players show it: ``0:30``, ``12:05``, ``1:02:03`` (whole seconds)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def clip_seconds(clip: ClipInfo, default_fps: float) -> float:
    """How long a clip plays: its frame count over its frame rate.

    ``end - start`` runs from the first frame to the last one and so misses one frame's
    duration (a 300-frame clip at 10 fps spans 29.9 s but plays 30 s); the rate comes from the
    clip's own timestamps, ``default_fps`` only when it has fewer than two frames.
    """
    span = (clip.end - clip.start).total_seconds()
    if clip.frames >= 2 and span > 0:
        return span * clip.frames / (clip.frames - 1)
    return clip.frames / default_fps if default_fps > 0 else span


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


def clip_json(clip: ClipInfo, default_fps: float) -> dict[str, Any]:
    """A clip as the API returns it (the CLI's JSON with its playing time added)."""
    out = clip.to_json()
    out["duration_s"] = round(clip_seconds(clip, default_fps), 3)
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


@dataclass(frozen=True)
class AuditFilter:
    """What the audit page shows: entries of one kind (:data:`EVENT_KINDS`), about one
    requester, on one local day; None everywhere shows everything."""

    requester: str | None = None
    kind: str | None = None
    day: date | None = None
    tz: tzinfo | None = None

    def matches(self, entry: AuditEntry) -> bool:
        """Whether ``entry`` passes every filter that is set."""
        if self.requester is not None and entry.fields.get("requester") != self.requester:
            return False
        if self.kind is not None and event_kind(entry.event) != self.kind:
            return False
        return self.day is None or entry.timestamp.astimezone(self.tz).date() == self.day


def entry_matches(entry: AuditEntry, requester: str | None) -> bool:
    """Whether an audit entry concerns ``requester`` (None: every entry matches)."""
    return AuditFilter(requester=requester).matches(entry)


def newest_entries(
    entries: Iterable[AuditEntry],
    *,
    requester: str | None = None,
    before: int | None,
    limit: int,
    where: AuditFilter | None = None,
) -> tuple[list[AuditEntry], bool]:
    """The ``limit`` newest matching entries with ``seq < before``, newest first.

    Returns them and whether older matching entries exist (for an "older" link). Streams the
    log once, keeping at most ``limit + 1`` entries. ``where`` (else ``requester`` alone)
    says which entries match.
    """
    where = where or AuditFilter(requester=requester)
    kept: list[AuditEntry] = []
    for entry in entries:
        if before is not None and entry.seq >= before:
            break
        if where.matches(entry):
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


# ---------------------------------------------------------------------- words for people

KIND_NAMES: Final = {
    "law-enforcement": "Law enforcement",
    "neighbor": "Neighbour",
    "insurer": "Insurer",
    "other": "Other",
}
"""Requester kinds (CONTRACT §1) as the pages name them."""

STATUS_NAMES: Final = {
    "pending": "waiting for you",
    "rejected": "refused automatically",
    "approved": "approved, sending",
    "denied": "denied",
    "expired": "expired",
    "delivered": "sent",
    "acknowledged": "sent and received",
    "failed": "sending failed",
}
"""Request statuses (CONTRACT §4) in words."""

CHANNEL_PHRASES: Final = {
    "button": "with the button",
    "app": "in the app",
    "cli": "on the command line",
}

REJECTION_WORDS: Final = {
    "expired": "it had already expired",
    "not_yet_valid": "it was dated in the future",
    "lifetime_too_long": "it was valid for longer than allowed",
    "wrong_audience": "it was addressed to another device",
    "replayed": "it repeated an earlier request",
    "window_too_long": "it asked for a longer stretch than allowed",
    "window_outside_retention": "it asked for footage older than the camera keeps",
    "window_in_future": "it asked for footage that did not exist yet",
    "bad_claims": "it was malformed",
    "rate_limited": "they sent too many requests",
    "revoked": "their key is revoked",
}

EVENT_KINDS: Final = {
    "requests": ("Requests", (
        "request_received", "request_pending", "request_rejected", "request_unverifiable",
    )),
    "decisions": ("Your decisions", ("request_approved", "request_denied", "request_expired")),
    "releases": ("Footage sent", (
        "release_started", "request_delivered", "request_failed", "delivery_acknowledged",
        "request_redelivered",
    )),
    "requesters": ("Requesters enrolled or revoked", ("requester_added", "requester_revoked")),
    "clips": ("Camera recordings", (
        "clip_recorded", "clip_deleted", "clip_discarded", "clip_recovered", "storage_warning",
    )),
    "owner": ("Logins and button", ("app_login_failed", "app_login", "button_ignored")),
    "device": ("Device and log", (
        "device_initialized", "agent_started", "agent_stopped", "checkpoint",
        "audit_discontinuity", "audit_repaired",
    )),
}
"""Audit events grouped into the kinds the audit page filters by: (label, events)."""

_KIND_OF_EVENT: Final = {event: kind for kind, (_, events) in EVENT_KINDS.items()
                         for event in events}

EVENT_NAMES: Final = {
    "request_received": "Request arrived",
    "request_pending": "Request received",
    "request_rejected": "Request refused",
    "request_unverifiable": "Unverifiable requests",
    "request_approved": "Request approved",
    "request_denied": "Request denied",
    "request_expired": "Request expired",
    "release_started": "Sending footage",
    "request_delivered": "Footage sent",
    "request_failed": "Sending failed",
    "delivery_acknowledged": "Footage received",
    "request_redelivered": "Footage sent again",
    "requester_added": "Requester enrolled",
    "requester_revoked": "Requester revoked",
    "clip_recorded": "Clip recorded",
    "clip_deleted": "Clip deleted",
    "clip_discarded": "Recording discarded",
    "clip_recovered": "Recording recovered",
    "storage_warning": "Storage warning",
    "app_login_failed": "Wrong app password",
    "app_login": "App login",
    "button_ignored": "Button pressed",
    "device_initialized": "Device set up",
    "agent_started": "Agent started",
    "agent_stopped": "Agent stopped",
    "checkpoint": "Checkpoint",
    "audit_discontinuity": "Log gap found",
    "audit_repaired": "Log repaired",
}
"""Audit event names (CONTRACT §7) as the pages show them."""

_DELETION_REASONS: Final = {
    "retention": "it was older than the time clips are kept",
    "quota": "storage was full",
    "space": "the disk was nearly full",
    "owner": "you deleted it",
}


def event_kind(event: str) -> str:
    """The :data:`EVENT_KINDS` key an audit event belongs to (``device`` for unknown ones)."""
    return _KIND_OF_EVENT.get(event, "device")


def event_name(event: str) -> str:
    """An audit event's name for people (unknown events: their words, capitalised)."""
    return EVENT_NAMES.get(event) or event.replace("_", " ").capitalize()


def kind_name(kind: str | None) -> str:
    """A requester kind for people."""
    return KIND_NAMES.get(kind or "", kind or "unknown kind")


def _when(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        return None


def legal_phrase(basis: object, ref: object, case: object = None) -> str:
    """``on warrant W-2026-0042``, ``with consent``, ``as an emergency`` (+ ``, case C-17``)."""
    if basis in ("warrant", "subpoena"):
        text = f"on {basis} {ref}" if ref else f"on a {basis}"
    elif basis == "consent":
        text = "with consent"
    elif basis == "emergency":
        text = "as an emergency"
    else:
        text = "without a stated legal basis"
    return text + (f", case {case}" if case else "")


def _plural(count: object, word: str) -> str:
    n = count if isinstance(count, int) else 0
    return f"{n} {word}{'' if n == 1 else 's'}"


def entry_sentence(
    entry: AuditEntry, names: Mapping[str, str], tz: tzinfo | None
) -> str:
    """An audit entry as one sentence for the homeowner.

    ``names`` maps requester ids to display names. Example: ``City Police Dept. asked for
    Sat 06 Dec 2026, 13:00-13:30 CET on warrant W-2026-0042 — you approved it with the
    button.`` Entries of either log (requests or camera/owner activity) are understood.
    """
    f = entry.fields
    rid = f.get("requester")
    who = names.get(rid, str(rid)) if isinstance(rid, str) else "Someone"
    raw_window = f.get("window")
    window: dict[str, Any] = raw_window if isinstance(raw_window, dict) else {}
    span = human_window(_when(window.get("start")), _when(window.get("end")), tz)
    basis = legal_phrase(f.get("legal_basis"), f.get("legal_ref"), f.get("case"))
    asked = f"{who} asked for {span} {basis}"
    channel = CHANNEL_PHRASES.get(str(f.get("channel")), "")
    event = entry.event
    if event in ("request_pending", "request_received"):
        return f"{asked}; it waits for your decision."
    if event == "request_approved":
        return f"{asked} — you approved it {channel}.".replace("  ", " ").replace(" .", ".")
    if event == "request_denied":
        return f"{asked} — you denied it {channel}; nothing was sent.".replace(" ;", ";")
    if event == "request_expired":
        return f"{asked} — it expired before you decided; nothing was sent."
    if event == "request_rejected":
        why = REJECTION_WORDS.get(str(f.get("error")), str(f.get("error") or "it broke a rule"))
        return f"{asked} — refused automatically because {why}; nothing was sent."
    footage = f"footage {who} asked for ({span})"
    if event == "request_delivered":
        return f"The {footage} was sent: {_plural(f.get('clips'), 'clip')}."
    if event == "request_redelivered":
        return f"The {footage} was sent again."
    if event == "release_started":
        return f"Sending the {footage} started."
    if event == "request_failed":
        return f"Sending the {footage} failed: {f.get('error', 'error')}."
    if event == "delivery_acknowledged":
        return f"{who} confirmed receiving the footage of {span}."
    if event == "request_unverifiable":
        return (f"{_plural(f.get('count', 1), 'request')} that could not be verified "
                "(unknown key or bad signature) were ignored; nothing was answered.")
    if event == "requester_added":
        name = f.get("name") or who
        return f"You enrolled {name} ({kind_name(str(f.get('kind')))}) as a requester."
    if event == "requester_revoked":
        return f"You revoked {who}: their key can make no more requests."
    if event == "clip_recorded":
        clip_span = human_window(_when(f.get("start")), _when(f.get("end")), tz)
        size = f.get("bytes")
        return f"The camera recorded a clip ({clip_span}" + (
            f", {format_size(size)})." if isinstance(size, int) else ").")
    if event == "clip_deleted":
        why = _DELETION_REASONS.get(str(f.get("reason")), str(f.get("reason") or "no reason"))
        return f"A clip was deleted because {why}."
    if event == "app_login_failed":
        locked = " Logins from there are locked for a while." if f.get("locked_until") else ""
        client = f.get("client", "an unknown address")
        return f"Someone entered a wrong app password from {client}.{locked}"
    return _FIXED_SENTENCES.get(event) or f"{event_name(event)}."


_FIXED_SENTENCES: Final = {
    "button_ignored": "The button was pressed while no request was waiting; nothing happened.",
    "agent_started": "The agent started.",
    "agent_stopped": "The agent stopped.",
    "device_initialized": "The device was set up and its signing key made.",
    "checkpoint": "Checkpoint: the request log vouches for the camera log so far.",
    "audit_discontinuity": "The log was shorter than a copy seen before: entries may be missing.",
}
"""Sentences of the events whose entries say nothing more than that they happened."""
