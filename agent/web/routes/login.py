"""Logging in and out: ``/``, ``/login``, ``/logout`` and ``/api/session``.

The login form has its own double-submit token (there is no session yet) and the login
limiter; a login is audited as ``app_login`` before the session exists, a failed one as
``app_login_failed``.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from agent.errors import AuditError
from agent.timeutil import rfc3339
from agent.web import views
from agent.web.auth import FailureOutcome, Session, new_token, tokens_equal
from agent.web.routes.shared import SESSION_COOKIE, Denied, Site, client_of, form_field

log = logging.getLogger(__name__)

LOGIN_COOKIE: Final = "__Host-doorbell-login"


def routes(site: Site) -> list[BaseRoute]:
    """The login, logout and session routes."""
    return [
        Route("/", home),
        Route("/login", site.public(login_form), methods=["GET"]),
        Route("/login", site.public(login), methods=["POST"]),
        Route("/logout", site.page(logout), methods=["POST"]),
        Route("/api/session", site.api(api_session)),
    ]


async def home(request: Request) -> Response:
    """``/``: the requests page."""
    return RedirectResponse("/requests", status_code=303)


async def login_form(site: Site, request: Request) -> Response:
    """The login page, with a fresh double-submit token (no session exists yet)."""
    if site.session(request) is not None:
        return RedirectResponse("/requests", status_code=303)
    return _login_page(site, request, None, 200)


def _login_page(site: Site, request: Request, error: str | None, status: int) -> Response:
    token = new_token(32)
    response = site.render(
        request, None, "login.html", {"login_token": token, "error": error}, status=status
    )
    response.set_cookie(
        LOGIN_COOKIE, token, max_age=3600, path="/", secure=True, httponly=True,
        samesite="strict",
    )
    return response


async def login(site: Site, request: Request) -> Response:
    """Check the password under the lockout rules; on success start a session."""
    form = await request.form()
    client = client_of(request)
    cookie_token = request.cookies.get(LOGIN_COOKIE)
    form_token = form_field(form, "login_token")
    try:
        site.check_origin(request)
    except Denied as exc:
        return _login_page(site, request, exc.message, 403)
    if cookie_token is None or not tokens_equal(form_token, cookie_token):
        return _login_page(site, request, "The form expired. Please try again.", 403)
    # Counted before the password check, atomically: parallel guesses cannot outrun the lock.
    verdict = site.limiter.attempt(client)
    if not verdict.allowed:
        assert verdict.locked_until is not None
        wait = views.human_duration(verdict.locked_until - site.now())
        return _login_page(
            site, request, f"Too many failed attempts. Try again in {wait}.", 429
        )
    version = await run_in_threadpool(site.password.verify, form_field(form, "password") or "")
    if version is None:
        outcome = site.limiter.failure(client)
        await run_in_threadpool(_audit_login_failure, site, client, outcome)
        message = "Wrong password."
        if outcome.locked_until is not None or outcome.global_lock:
            message += " Logins are now locked for a few minutes."
        return _login_page(site, request, message, 401)
    site.limiter.success(client, verdict)
    if not await run_in_threadpool(_audit_login, site, client):
        return _login_page(
            site, request, "The login cannot be recorded (see the agent's log).", 503
        )
    session = site.sessions.create(version)
    response = RedirectResponse("/requests", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=int(site.sessions.lifetime.total_seconds()),
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True)
    return response


def _audit_login(site: Site, client: str) -> bool:
    """Record an owner login (durable before the session exists); False if it cannot be."""
    try:
        site.activity().append("app_login", client=client)
    except (AuditError, OSError) as exc:
        log.error("could not record an app login from %s; login refused: %s", client, exc)
        return False
    return True


def _audit_login_failure(site: Site, client: str, outcome: FailureOutcome) -> None:
    try:
        site.activity().append(
            "app_login_failed",
            client=client,
            failures=outcome.failures,
            locked_until=outcome.locked_until,
            global_lock=outcome.global_lock,
        )
    except (AuditError, OSError) as exc:
        # The login is refused either way; losing this record must not unlock anything.
        log.error("could not audit a failed app login from %s: %s", client, exc)


async def logout(site: Site, request: Request, session: Session) -> Response:
    """End the session and clear its cookie."""
    site.sessions.drop(session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True)
    return response


async def api_session(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/session``: the CSRF token for API calls and when the session ends."""
    return JSONResponse(
        {"csrf_token": session.csrf, "expires_at": rfc3339(session.expires_at)}
    )
