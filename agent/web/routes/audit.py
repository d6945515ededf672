"""The audit page and ``/api/audit``: either log (CONTRACT §7) newest first, filtered, with its
chain check, and the export of every matching entry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import date
from typing import Final
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from agent.audit import AuditEntry, read_entries
from agent.errors import RequestError
from agent.web import views
from agent.web.auth import Session
from agent.web.routes.shared import ID_RE, Site

AUDIT_PAGE: Final = 100
AUDIT_LOGS: Final[dict[str, str]] = {
    "requests": "Requests",
    "activity": "Camera and owner",
}
"""The two logs (CONTRACT §7) the audit page shows, one at a time: ``?log=`` key -> tab label."""


def routes(site: Site) -> list[BaseRoute]:
    """The audit page and API."""
    return [
        Route("/audit", site.page(audit_page)),
        Route("/api/audit", site.api(api_audit)),
        Route("/api/audit/export", site.api(api_audit_export)),
    ]


def _audit_entries(
    site: Site, log: str, where: views.AuditFilter, before: int | None
) -> tuple[list[AuditEntry], bool]:
    path = site.log_port(log).path
    if not path.exists():
        return [], False
    return views.newest_entries(
        read_entries(path),
        before=before,
        limit=AUDIT_PAGE,
        where=where,
    )


def _audit_query(site: Site, request: Request) -> tuple[str, views.AuditFilter, int | None]:
    """``(log, filter, before)`` from the query: ``log`` is ``requests`` (``audit.jsonl``,
    the default) or ``activity`` (``activity.jsonl``); each log has its own seq numbers."""
    params = request.query_params
    log = params.get("log") or "requests"
    if log not in AUDIT_LOGS:
        raise RequestError(f"log must be one of {', '.join(AUDIT_LOGS)}")
    requester = params.get("requester") or None
    if requester is not None and not ID_RE.fullmatch(requester):
        raise RequestError("the requester filter is not a valid requester id")
    kind = params.get("kind") or None
    if kind is not None and kind not in views.EVENT_KINDS:
        raise RequestError(f"kind must be one of {', '.join(views.EVENT_KINDS)}")
    day = None
    if day_text := params.get("date"):
        try:
            day = date.fromisoformat(day_text)
        except ValueError:
            raise RequestError("date must be a day written YYYY-MM-DD") from None
    before_text = params.get("before")
    before = None
    if before_text:
        if not before_text.isdigit():
            raise RequestError("before must be an audit seq number")
        before = int(before_text)
    return log, views.AuditFilter(requester, kind, day, site.tz), before


async def audit_page(site: Site, request: Request, session: Session) -> Response:
    """The log newest first, as sentences, with the chain check, filters and export."""
    log, where, before = _audit_query(site, request)
    verify = await run_in_threadpool(site.verify_audit, log)
    entries, more = await run_in_threadpool(_audit_entries, site, log, where, before)
    requesters = await run_in_threadpool(site.services.requests.list_requesters)
    names = {r.id: r.name for r in requesters}
    query = {
        k: v for k, v in (
            ("log", log if log != "requests" else None),
            ("requester", where.requester), ("kind", where.kind),
            ("date", where.day.isoformat() if where.day else None),
        ) if v
    }
    return site.render(
        request,
        session,
        "audit.html",
        {
            "verify": verify,
            "log": log,
            "logs": AUDIT_LOGS,
            "entries": entries,
            "more": more,
            "where": where,
            "query": urlencode(query),
            "requesters": requesters,
            "kinds": views.EVENT_KINDS,
            "sentence": lambda e: views.entry_sentence(e, names, site.tz),
            "event_name": views.event_name,
            "summary": views.entry_summary,
        },
    )


async def api_audit(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/audit[?requester=R][&kind=K][&date=YYYY-MM-DD][&before=SEQ]``:
    verification and 100 entries."""
    log, where, before = _audit_query(site, request)
    verify = await run_in_threadpool(site.verify_audit, log)
    entries, more = await run_in_threadpool(_audit_entries, site, log, where, before)
    return JSONResponse(
        {
            "verify": views.verify_json(verify),
            "entries": [e.to_dict() for e in entries],
            "more": more,
        }
    )


async def api_audit_export(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/audit/export[?requester=R][&kind=K][&date=D]``: every matching entry as a
    JSON array."""
    log, where, _ = _audit_query(site, request)
    requester = where.requester
    path = site.log_port(log).path
    entries: Iterator[AuditEntry] = (
        iter(read_entries(path)) if path.exists() else iter(())
    )

    def next_line() -> bytes | None:
        return next((e.line for e in entries if where.matches(e)), None)

    async def body() -> AsyncIterator[bytes]:
        yield b"["
        first = True
        while (line := await run_in_threadpool(next_line)) is not None:
            yield (b"" if first else b",") + b"\n" + line
            first = False
        yield b"\n]\n"

    name = (
        f"{'activity' if log == 'activity' else 'audit'}-{site.services.device_id}"
        + (f"-{requester}" if requester else "")
    )
    return StreamingResponse(
        body(),
        media_type="application/json",
        headers={"content-disposition": f'attachment; filename="{name}.json"'},
    )
