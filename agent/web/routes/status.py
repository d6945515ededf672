"""The status page and ``/api/status``: device, the daemon's live parts (camera, MQTT, ...),
storage and retention, the audit log's head and chain check, the TLS fingerprint."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent import __version__
from agent.timeutil import format_size
from agent.web import views
from agent.web.auth import Session
from agent.web.routes.shared import Site
from agent.web.services import StatusItem


def routes(site: Site) -> list[BaseRoute]:
    """The status page and API."""
    return [
        Route("/status", site.page(status_page)),
        Route("/api/status", site.api(api_status)),
    ]


def _status_items(site: Site) -> tuple[list[StatusItem], dict[str, Any]]:
    services = site.services
    clips = services.vault.list_clips()
    # The one source of the stored figure: the vault's index (what the Clips page lists).
    stored = sum(c.stored_bytes for c in clips)
    last = services.audit.last_entry()
    verify = site.verify_audit()
    audit_text = "no entries yet"
    if last is not None:
        entries = f"{last.seq} entr{'y' if last.seq == 1 else 'ies'}"
        check = "checked: intact" if verify.ok else f"BROKEN: {verify.summary()}"
        audit_text = f"{entries}, newest {views.human_time(last.timestamp, site.tz)} · {check}"
    items = [
        StatusItem("Device", f"{services.device_id} · doorbell-agent {__version__}"),
        *services.runtime(),
        StatusItem(
            "Storage",
            f"{format_size(stored)} of {format_size(services.max_bytes)} used by "
            f"{len(clips)} clip{'' if len(clips) == 1 else 's'} · clips are kept for "
            f"{views.human_period(services.retention)}",
            stored <= services.max_bytes,
        ),
        StatusItem("Audit log", audit_text, verify.ok),
    ]
    if site.tls_fingerprint:
        items.append(StatusItem("TLS certificate SHA-256", site.tls_fingerprint))
    usage = {
        "stored_bytes": stored,
        "max_bytes": services.max_bytes,
        "clips": len(clips),
        "retention": views.human_period(services.retention),
        "audit_head": None
        if last is None
        else {"seq": last.seq, "hash": last.hash, "ts": last.ts},
    }
    return items, usage


async def status_page(site: Site, request: Request, session: Session) -> Response:
    """Camera, MQTT, storage, retention, audit head, versions."""
    items, usage = await run_in_threadpool(_status_items, site)
    return site.render(request, session, "status.html", {"items": items, "usage": usage})


async def api_status(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/status``."""
    items, usage = await run_in_threadpool(_status_items, site)
    return JSONResponse(
        {
            "device_id": site.services.device_id,
            "version": __version__,
            "items": [{"label": i.label, "value": i.value, "ok": i.ok} for i in items],
            **usage,
        }
    )
