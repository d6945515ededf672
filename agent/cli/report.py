"""``doorbell-agent report``: the transparency report (see :mod:`agent.report`).

Reads ``requests.db`` and the request log directly, so it works while ``run`` is running.
"""

from __future__ import annotations

import argparse
from datetime import date, datetime, time

from agent.audit import read_entries
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.errors import UsageError
from agent.paths import StatePaths
from agent.report import Report, Tally, build_report, released_seconds, seconds_text
from agent.requests.store import RequestStore
from agent.timeutil import parse_rfc3339


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``report`` command."""
    p = sub.add_parser(
        "report",
        help="transparency report: requests per requester and kind, and what came of them",
        description="For each requester and each kind of requester: requests received, "
        "approved, denied, expired and refused automatically, seconds of footage released and "
        "the last request. It counts requests only, never camera activity.",
    )
    p.add_argument(
        "--since",
        metavar="DATE",
        help="only requests received from this day on (YYYY-MM-DD, local time) or this "
        "moment (RFC 3339)",
    )
    add_json_flag(p)
    p.set_defaults(func=handler)


def parse_since(text: str) -> datetime:
    """``YYYY-MM-DD`` (the start of that day in local time) or an RFC 3339 time.

    Raises UsageError for anything else.
    """
    try:
        return datetime.combine(date.fromisoformat(text), time()).astimezone()
    except ValueError:
        pass
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r} is not a date",
            hint="write a day as 2026-12-01 or a moment as 2026-12-01T08:00:00Z",
        ) from None


def _row(label: str, t: Tally) -> str:
    last = t.last_request.astimezone().strftime("%Y-%m-%d %H:%M %Z") if t.last_request else "never"
    return (
        f"{label:<34} {t.received:>8} {t.approved:>8} {t.denied:>6} {t.expired:>7} "
        f"{t.rejected:>7} {seconds_text(t.seconds_released):>10}  {last}"
    )


HEADER = (
    f"{'':<34} {'received':>8} {'approved':>8} {'denied':>6} {'expired':>7} "
    f"{'refused':>7} {'released':>10}  last request"
)


def render(report: Report, device_id: str) -> str:
    """The report as text tables (per requester, per kind, total)."""
    since = (
        f"since {report.since.astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
        if report.since else "all time"
    )
    lines = [f"Requests to {device_id} for footage, {since}", "", "By requester", HEADER]
    if not report.requesters:
        lines.append("  (no requester is enrolled)")
    for r in report.requesters:
        label = f"{r.name} ({r.id})" + (" [revoked]" if r.revoked else "")
        lines.append(_row(label[:34], r.tally))
    lines += ["", "By kind", HEADER]
    lines += [_row(kind, tally) for kind, tally in report.kinds.items()]
    lines += ["", _row("Total", report.total)]
    lines += [
        "",
        "refused: refused automatically (broke a rule); released: footage sent to the "
        "requester. Requests still waiting: " + str(report.total.pending) + ".",
    ]
    return "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    """Print the report as text or one JSON document."""
    since = parse_since(args.since) if args.since else None
    cfg = load_config(args)
    require_initialised(cfg)
    with RequestStore.open(cfg.state_dir) as store:
        records = store.list_requests()
        requesters = store.list_requesters()
    log = StatePaths(cfg.state_dir).audit_log
    released = released_seconds(read_entries(log)) if log.exists() else {}
    report = build_report(records, requesters, released, since=since)
    if args.json:
        print_json(report.to_json())
    else:
        print(render(report, cfg.device_id))
    return 0
