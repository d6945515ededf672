"""The transparency report (``/report`` and ``/api/report``): requests and outcomes per
requester and per kind, as ``doorbell-agent report`` gives them."""

from __future__ import annotations

from datetime import date, datetime, time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent import report
from agent.audit import read_entries
from agent.errors import RequestError
from agent.report import Report
from agent.web.auth import Session
from agent.web.routes.shared import Site


def routes(site: Site) -> list[BaseRoute]:
    """The report page and API."""
    return [
        Route("/report", site.page(report_page)),
        Route("/api/report", site.api(api_report)),
    ]


def _report(site: Site, request: Request) -> Report:
    since = None
    if since_text := request.query_params.get("since"):
        try:
            since = datetime.combine(date.fromisoformat(since_text), time(), tzinfo=None)
        except ValueError:
            raise RequestError("since must be a day written YYYY-MM-DD") from None
        since = since.replace(tzinfo=site.tz) if site.tz is not None else since.astimezone()
    services = site.services
    path = services.audit.path
    released = report.released_seconds(read_entries(path)) if path.exists() else {}
    return report.build_report(
        services.requests.list_requests(),
        services.requests.list_requesters(),
        released,
        since=since,
    )


async def report_page(site: Site, request: Request, session: Session) -> Response:
    """The transparency report: requests and outcomes per requester and per kind."""
    result = await run_in_threadpool(_report, site, request)
    return site.render(request, session, "report.html", {"report": result})


async def api_report(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/report[?since=YYYY-MM-DD]``: as ``doorbell-agent report --json``."""
    result = await run_in_threadpool(_report, site, request)
    return JSONResponse(result.to_json())
