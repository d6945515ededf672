"""Requests: the list (``/requests``, its live fragment and event stream), approve, deny and
"Send again", as pages and under ``/api/requests``.

Decisions go through the approval engine (channel ``app``), never straight to the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from agent.errors import ApprovalError, PreviewChangedError, RequestError, RequestNotFoundError
from agent.requests.store import RequestRecord
from agent.web import views
from agent.web.auth import Session
from agent.web.routes.shared import Site, form_field, json_body, valid_id
from agent.web.services import Decision

SSE_KEEPALIVE_S: Final = 15.0


def routes(site: Site) -> list[BaseRoute]:
    """The request pages and API."""
    return [
        Route("/requests", site.page(requests_page)),
        Route("/requests/fragment", site.page(requests_fragment)),
        Route("/requests/{jti}/redeliver", site.page(redeliver_form), methods=["POST"]),
        Route("/requests/{jti}/{action:str}", site.page(decide_form), methods=["POST"]),
        Route("/api/requests", site.api(api_requests)),
        Route("/api/requests/{jti}", site.api(api_request)),
        Route("/api/requests/{jti}/redeliver", site.api(api_redeliver), methods=["POST"]),
        Route("/api/requests/{jti}/{action:str}", site.api(api_decide), methods=["POST"]),
        Route("/api/events", site.api(api_events)),
    ]


def _requests_context(site: Site) -> dict[str, Any]:
    records = site.services.requests.list_requests()
    pending, history = views.split_requests(records)
    now = site.now()
    deadlines = {r.jti: site.services.deadline(r) for r in pending}
    # What approving each would release, computed now (owner only; see §5.1).
    previews = {r.jti: site.services.decider.preview(r.jti) for r in pending}
    return {
        "pending": pending,
        "history": history[:50],
        "deadlines": deadlines,
        "previews": previews,
        "now": now,
        "fingerprint": views.requests_fingerprint(records),
    }


async def requests_page(site: Site, request: Request, session: Session) -> Response:
    """Pending requests first, then the history."""
    context = await run_in_threadpool(_requests_context, site)
    return site.render(request, session, "requests.html", context)


async def requests_fragment(site: Site, request: Request, session: Session) -> Response:
    """The requests list alone, for the page's live refresh."""
    context = await run_in_threadpool(_requests_context, site)
    return site.render(request, session, "_requests.html", context, use_flash=False)


async def decide_form(site: Site, request: Request, session: Session) -> Response:
    """Approve or deny from the page (channel ``app``), then back to the list.

    An approval carries the fingerprint of the preview the page showed; when what it would
    release changed meanwhile, nothing is approved and the list shows the new preview.
    """
    jti = valid_id(request.path_params["jti"])
    approve = _action(request.path_params["action"])
    # A form without a fingerprint binds to nothing that can match: refused as changed.
    shown = (form_field(await request.form(), "preview") or "") if approve else None
    return await _decide_then_list(
        site, session, partial(site.services.decider.decide, jti, approve, shown)
    )


async def redeliver_form(site: Site, request: Request, session: Session) -> Response:
    """"Send again" (§5.2, channel ``app``), then back to the list."""
    jti = valid_id(request.path_params["jti"])
    return await _decide_then_list(site, session, partial(site.services.decider.redeliver, jti))


async def _decide_then_list(
    site: Site, session: Session, decide: Callable[[], Decision]
) -> Response:
    """Run ``decide`` (in a worker thread), flash what it did or why it was refused, and go
    back to the list."""
    try:
        decision = await run_in_threadpool(decide)
    except ApprovalError as exc:
        site.set_flash(session, "error", exc.message)
    else:
        site.set_flash(session, "ok", decision.message)
    return RedirectResponse("/requests", status_code=303)


async def api_redeliver(site: Site, request: Request, session: Session) -> Response:
    """``POST /api/requests/{jti}/redeliver``."""
    jti = valid_id(request.path_params["jti"])
    decision = await run_in_threadpool(site.services.decider.redeliver, jti)
    return JSONResponse(
        {"request": _request_json(site, decision.record), "message": decision.message}
    )


async def api_requests(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/requests[?status=S]``."""
    status = request.query_params.get("status")
    statuses = [status] if status else None
    try:
        records = await run_in_threadpool(site.services.requests.list_requests, statuses)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return JSONResponse({"requests": [_request_json(site, r) for r in records]})


def _request_json(site: Site, record: RequestRecord) -> dict[str, Any]:
    deadline = site.services.deadline(record) if record.status == "pending" else None
    return views.request_json(record, deadline)


async def api_request(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/requests/{jti}``."""
    jti = valid_id(request.path_params["jti"])
    record = await run_in_threadpool(site.services.requests.get_request, jti)
    body: dict[str, Any] = {"request": _request_json(site, record)}
    if record.status == "pending":
        preview = await run_in_threadpool(site.services.decider.preview, jti)
        body["preview"] = preview.to_json() if preview is not None else None
    return JSONResponse(body)


async def api_decide(site: Site, request: Request, session: Session) -> Response:
    """``POST /api/requests/{jti}/approve|deny``."""
    jti = valid_id(request.path_params["jti"])
    approve = _action(request.path_params["action"])
    shown: str | None = None
    if approve and request.headers.get("content-type", "").startswith("application/json"):
        value = (await json_body(request)).get("preview")
        shown = value if isinstance(value, str) else None
    try:
        decision = await run_in_threadpool(site.services.decider.decide, jti, approve, shown)
    except PreviewChangedError as exc:
        preview = await run_in_threadpool(site.services.decider.preview, jti)
        return JSONResponse(
            {"error": exc.message, "preview": preview.to_json() if preview else None},
            status_code=409,
        )
    return JSONResponse(
        {"request": _request_json(site, decision.record), "message": decision.message}
    )


async def api_events(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/events``: server-sent events, ``requests`` whenever a request changes."""

    async def stream() -> AsyncIterator[bytes]:
        last: str | None = None
        idle = 0.0
        yield b"retry: 3000\n\n"
        while not site.stopping.is_set():
            if site.session(request) is None:
                yield b"event: logout\ndata: {}\n\n"
                return
            records = await run_in_threadpool(site.services.requests.list_requests)
            fingerprint = views.requests_fingerprint(records)
            if fingerprint != last:
                last = fingerprint
                idle = 0.0
                pending = sum(1 for r in records if r.status == "pending")
                data = json.dumps({"pending": pending, "fingerprint": fingerprint})
                yield f"event: requests\ndata: {data}\n\n".encode()
            elif idle >= SSE_KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(site.poll_interval)
            idle += site.poll_interval

    return StreamingResponse(stream(), media_type="text/event-stream")


def _action(action: str) -> bool:
    if action == "approve":
        return True
    if action == "deny":
        return False
    raise RequestNotFoundError(f"unknown action {action[:20]!r}")
