"""The owner's local web app: an ASGI (Starlette) application over :class:`AppServices`.

Handlers are thin: authentication, sessions, CSRF and lockout live in :mod:`agent.web.auth`,
formatting in :mod:`agent.web.views`, and every change goes through the component that owns it
(the approval engine, the vault, the request store), each of which audits before acting.

Rules every route obeys (tested in ``tests/web``):

- Pages without a live session redirect to ``/login``; ``/api/`` answers 401.
- Every state change (POST/DELETE) needs the session's CSRF token: the ``X-CSRF-Token`` header
  for ``/api/``, the ``csrf_token`` form field for pages; a wrong or missing token is a 403
  and nothing changes. A request whose ``Origin`` is another site is refused the same way.
- The login form has its own double-submit token (there is no session yet) and the login
  limiter; a failed login is audited as ``app_login_failed``.
- Every response carries the security headers (strict CSP without inline script, no-referrer,
  nosniff, HSTS, frame-ancestors none); everything but ``/static`` is ``no-store``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import date, datetime, time, tzinfo
from functools import wraps
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__, report
from agent.audit import AuditEntry, VerifyResult, read_entries
from agent.camera.media import BROWSER_CODECS, MediaError, fragmented_mp4, iter_jpegs
from agent.display import visible
from agent.errors import (
    AgentError,
    ApprovalError,
    AuditError,
    ClipNotFoundError,
    KeyFileError,
    PreviewChangedError,
    RequesterNotFoundError,
    RequestError,
    RequestNotFoundError,
)
from agent.keys import kid_for, parse_public_key_text, public_jwk
from agent.release.preview import sentence as preview_sentence
from agent.release.preview import size_text
from agent.report import Report
from agent.requests.store import Requester, RequestRecord, Revocation
from agent.requests.verify import REQUESTER_KINDS
from agent.timeutil import format_size, rfc3339, utcnow
from agent.vault import ClipInfo
from agent.web import views
from agent.web.auth import (
    FailureOutcome,
    LoginLimiter,
    PasswordFile,
    Session,
    SessionStore,
    new_token,
    tokens_equal,
)
from agent.web.services import AppServices, AuditPort, StatusItem

log = logging.getLogger(__name__)

SESSION_COOKIE: Final = "__Host-doorbell-session"
LOGIN_COOKIE: Final = "__Host-doorbell-login"
CSRF_HEADER: Final = "x-csrf-token"
CSRF_FIELD: Final = "csrf_token"
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS: Final = (
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
MAX_BODY: Final = 64 * 1024
ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
AUDIT_PAGE: Final = 100
AUDIT_LOGS: Final[dict[str, str]] = {
    "requests": "Requests",
    "activity": "Camera and owner",
}
"""The two logs (CONTRACT §7) the audit page shows, one at a time: ``?log=`` key -> tab label."""
SSE_KEEPALIVE_S: Final = 15.0
READ_CHUNK: Final = 64 * 1024
UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Handler = Callable[[Request, Session], Awaitable[Response]]


class SecurityHeaders:
    """ASGI middleware adding the security headers to every response (errors included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ours = {name for name, _ in SECURITY_HEADERS}
                if not static:
                    ours.add(b"cache-control")
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
                headers.extend(SECURITY_HEADERS)
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Denied(Exception):
    """Internal: a request failed an auth rule; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _valid_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise RequestNotFoundError(f"{value[:40]!r} is not a valid id")
    return value


def _error_status(exc: AgentError) -> int:
    if isinstance(exc, RequestNotFoundError | RequesterNotFoundError | ClipNotFoundError):
        return 404
    if isinstance(exc, ApprovalError):
        return 409
    if isinstance(exc, RequestError | KeyFileError):
        return 400
    return 500


class WebApp:
    """The app's state (sessions, limiter, flashes) and its handlers.

    ``now`` drives session expiry and lockout, ``sleep`` paces clip playback (tests pass a
    no-op), ``tz`` is the time zone pages show times in (None: the system's), ``poll_interval``
    is how often the event stream looks for request changes.
    """

    def __init__(
        self,
        services: AppServices,
        password: PasswordFile,
        sessions: SessionStore,
        *,
        limiter: LoginLimiter | None = None,
        now: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tz: tzinfo | None = None,
        poll_interval: float = 1.0,
        tls_fingerprint: str | None = None,
    ) -> None:
        self.services = services
        self.password = password
        self.sessions = sessions
        self.limiter = limiter or LoginLimiter(now=now)
        self.now = now
        self.sleep = sleep
        self.tz = tz
        self.poll_interval = poll_interval
        self.tls_fingerprint = tls_fingerprint
        self.stopping = threading.Event()
        self._flash: dict[str, tuple[str, str]] = {}
        self._flash_lock = threading.Lock()
        self._audit_cache: dict[str, tuple[tuple[int, int], VerifyResult]] = {}
        env = Environment(
            loader=PackageLoader("agent.web", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            # Every string shown goes through visible(): requester text cannot hide, reorder
            # (bidi controls) or break lines; only |verbatim values (key text) keep theirs.
            finalize=_finalize,
        )
        env.filters["verbatim"] = Verbatim
        env.filters["when"] = lambda d: views.human_time(d, self.tz)
        env.filters["day"] = views.human_day
        env.filters["time_of_day"] = lambda d: d.astimezone(self.tz).strftime("%H:%M:%S %Z")
        env.filters["duration"] = views.human_duration
        env.filters["size"] = format_size
        env.filters["iso"] = lambda d: rfc3339(d) if d is not None else ""
        env.filters["playtime"] = lambda clip: views.clock_duration(
            views.clip_seconds(clip, self.services.camera_fps)
        )
        env.filters["window"] = lambda r: views.human_window(r.window_start, r.window_end, self.tz)
        env.filters["release"] = lambda p: preview_sentence(p, self.tz)
        env.filters["release_size"] = size_text
        env.filters["kind"] = views.kind_name
        env.filters["status_name"] = lambda status: views.STATUS_NAMES.get(status, status)
        env.filters["legal"] = lambda r: views.legal_phrase(r.legal_basis, r.legal_ref)
        env.filters["channel"] = lambda c: views.CHANNEL_PHRASES.get(c or "", "")
        env.filters["seconds"] = report.seconds_text
        env.filters["rejection"] = lambda e: views.REJECTION_WORDS.get(e or "", e or "a rule")
        self.templates = Jinja2Templates(env=env)

    # ------------------------------------------------------------------ assembly

    def asgi(self) -> Starlette:
        """The Starlette application with every route and the security-header middleware."""
        static_dir = Path(__file__).with_name("static")
        routes: list[BaseRoute] = [
            Route("/", self.home),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self._page(self.logout), methods=["POST"]),
            Route("/requests", self._page(self.requests_page)),
            Route("/requests/fragment", self._page(self.requests_fragment)),
            Route(
                "/requests/{jti}/redeliver", self._page(self.redeliver_form), methods=["POST"]
            ),
            Route("/requests/{jti}/{action:str}", self._page(self.decide_form), methods=["POST"]),
            Route("/clips", self._page(self.clips_page)),
            Route("/clips/{clip}", self._page(self.clip_page)),
            Route("/clips/{clip}/delete", self._page(self.clip_delete_confirm)),
            Route("/clips/{clip}/delete", self._page(self.clip_delete_form), methods=["POST"]),
            Route("/audit", self._page(self.audit_page)),
            Route("/requesters", self._page(self.requesters_page)),
            Route("/requesters/preview", self._page(self.requester_preview), methods=["POST"]),
            Route("/requesters/enroll", self._page(self.requester_enroll), methods=["POST"]),
            Route(
                "/requesters/{rid}/revoke", self._page(self.requester_revoke), methods=["POST"]
            ),
            Route("/status", self._page(self.status_page)),
            Route("/report", self._page(self.report_page)),
            Route("/api/report", self._api(self.api_report)),
            Route("/api/session", self._api(self.api_session)),
            Route("/api/requests", self._api(self.api_requests)),
            Route("/api/requests/{jti}", self._api(self.api_request)),
            Route(
                "/api/requests/{jti}/redeliver", self._api(self.api_redeliver), methods=["POST"]
            ),
            Route(
                "/api/requests/{jti}/{action:str}", self._api(self.api_decide), methods=["POST"]
            ),
            Route("/api/events", self._api(self.api_events)),
            Route("/api/clips", self._api(self.api_clips)),
            Route("/api/clips/{clip}", self._api(self.api_clip)),
            Route("/api/clips/{clip}", self._api(self.api_clip_delete), methods=["DELETE"]),
            Route("/api/clips/{clip}/thumbnail", self._api(self.api_thumbnail)),
            Route("/api/clips/{clip}/stream", self._api(self.api_stream)),
            Route("/api/clips/{clip}/video", self._api(self.api_video)),
            Route("/api/clips/{clip}/download", self._api(self.api_download)),
            Route("/api/audit", self._api(self.api_audit)),
            Route("/api/audit/export", self._api(self.api_audit_export)),
            Route("/api/requesters", self._api(self.api_requesters)),
            Route("/api/requesters", self._api(self.api_enroll), methods=["POST"]),
            Route("/api/requesters/preview", self._api(self.api_preview), methods=["POST"]),
            Route("/api/requesters/{rid}/revoke", self._api(self.api_revoke), methods=["POST"]),
            Route("/api/status", self._api(self.api_status)),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ]
        app = Starlette(routes=routes, max_body_size=MAX_BODY)
        app.add_middleware(SecurityHeaders)
        return app

    # ------------------------------------------------------------------ auth plumbing

    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE), self.password.version())

    @staticmethod
    def _check_origin(request: Request) -> None:
        """Refuse a state change a browser says comes from another site.

        A second line behind the CSRF token. Browsers send ``Origin: null`` on same-origin
        POSTs under ``Referrer-Policy: no-referrer``, so ``null`` proves nothing either way;
        ``Sec-Fetch-Site`` (sent by current browsers) is the clearer signal.
        """
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise _Denied(403, "cross-site request refused")
        origin = request.headers.get("origin")
        if origin not in (None, "null") and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise _Denied(403, "cross-site request refused")

    async def _check_csrf(self, request: Request, session: Session, *, api: bool) -> None:
        if request.method not in UNSAFE_METHODS:
            return
        self._check_origin(request)
        if api:
            given = request.headers.get(CSRF_HEADER)
        else:
            form = await request.form()
            value = form.get(CSRF_FIELD)
            given = value if isinstance(value, str) else None
        if not tokens_equal(given, session.csrf):
            log.warning(
                "refused %s %s from %s: missing or wrong CSRF token",
                request.method, request.url.path, _client(request),
            )
            raise _Denied(403, "missing or wrong CSRF token")

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return RedirectResponse("/login", status_code=303)
            try:
                await self._check_csrf(request, session, api=False)
                return await handler(request, session)
            except _Denied as exc:
                return self._render(
                    request, session, "error.html", {"message": exc.message}, status=exc.status
                )
            except AgentError as exc:
                status = _error_status(exc)
                if status == 500:
                    log.error("app page %s failed: %s", request.url.path, exc)
                return self._render(
                    request, session, "error.html", {"message": exc.message}, status=status
                )

        return endpoint

    def _api(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return JSONResponse({"error": "not logged in"}, status_code=401)
            try:
                await self._check_csrf(request, session, api=True)
                return await handler(request, session)
            except _Denied as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            except AgentError as exc:
                status = _error_status(exc)
                if status == 500:
                    log.error("app API %s failed: %s", request.url.path, exc)
                return JSONResponse({"error": exc.message}, status_code=status)

        return endpoint

    def _render(
        self,
        request: Request,
        session: Session | None,
        template: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        use_flash: bool = True,
    ) -> HTMLResponse:
        flash = self._pop_flash(session) if session is not None and use_flash else None
        base = {
            "session": session,
            "csrf_token": session.csrf if session else "",
            "device_id": self.services.device_id,
            "version": __version__,
            "flash": flash,
            "path": request.url.path,
        }
        return self.templates.TemplateResponse(
            request, template, {**base, **context}, status_code=status
        )

    def _set_flash(self, session: Session, kind: str, message: str) -> None:
        with self._flash_lock:
            self._flash[session.id] = (kind, message)

    def _pop_flash(self, session: Session) -> tuple[str, str] | None:
        with self._flash_lock:
            # Flashes of sessions that ended are dropped with them, keeping this map small.
            for stale in [sid for sid in self._flash if sid != session.id and
                          self.sessions.get(sid, session.password_version) is None]:
                del self._flash[stale]
            return self._flash.pop(session.id, None)

    # ------------------------------------------------------------------ login / logout

    async def home(self, request: Request) -> Response:
        """``/``: the requests page."""
        return RedirectResponse("/requests", status_code=303)

    async def login_form(self, request: Request) -> Response:
        """The login page, with a fresh double-submit token (no session exists yet)."""
        if self._session(request) is not None:
            return RedirectResponse("/requests", status_code=303)
        return self._login_page(request, None, 200)

    def _login_page(self, request: Request, error: str | None, status: int) -> Response:
        token = new_token(32)
        response = self._render(
            request, None, "login.html", {"login_token": token, "error": error}, status=status
        )
        response.set_cookie(
            LOGIN_COOKIE, token, max_age=3600, path="/", secure=True, httponly=True,
            samesite="strict",
        )
        return response

    async def login(self, request: Request) -> Response:
        """Check the password under the lockout rules; on success start a session."""
        form = await request.form()
        client = _client(request)
        cookie_token = request.cookies.get(LOGIN_COOKIE)
        form_token = _field(form, "login_token")
        try:
            self._check_origin(request)
        except _Denied as exc:
            return self._login_page(request, exc.message, 403)
        if cookie_token is None or not tokens_equal(form_token, cookie_token):
            return self._login_page(request, "The form expired. Please try again.", 403)
        # Counted before the password check, atomically: parallel guesses cannot outrun the lock.
        verdict = self.limiter.attempt(client)
        if not verdict.allowed:
            assert verdict.locked_until is not None
            wait = views.human_duration(verdict.locked_until - self.now())
            return self._login_page(
                request, f"Too many failed attempts. Try again in {wait}.", 429
            )
        version = await run_in_threadpool(self.password.verify, _field(form, "password") or "")
        if version is None:
            outcome = self.limiter.failure(client)
            await run_in_threadpool(self._audit_login_failure, client, outcome)
            message = "Wrong password."
            if outcome.locked_until is not None or outcome.global_lock:
                message += " Logins are now locked for a few minutes."
            return self._login_page(request, message, 401)
        self.limiter.success(client, verdict)
        if not await run_in_threadpool(self._audit_login, client):
            return self._login_page(
                request, "The login cannot be recorded (see the agent's log).", 503
            )
        session = self.sessions.create(version)
        response = RedirectResponse("/requests", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session.id,
            max_age=int(self.sessions.lifetime.total_seconds()),
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True)
        return response

    def _activity(self) -> AuditPort:
        return self.services.activity or self.services.audit

    def _audit_login(self, client: str) -> bool:
        """Record an owner login (durable before the session exists); False if it cannot be."""
        try:
            self._activity().append("app_login", client=client)
        except (AuditError, OSError) as exc:
            log.error("could not record an app login from %s; login refused: %s", client, exc)
            return False
        return True

    def _audit_login_failure(self, client: str, outcome: FailureOutcome) -> None:
        try:
            self._activity().append(
                "app_login_failed",
                client=client,
                failures=outcome.failures,
                locked_until=outcome.locked_until,
                global_lock=outcome.global_lock,
            )
        except (AuditError, OSError) as exc:
            # The login is refused either way; losing this record must not unlock anything.
            log.error("could not audit a failed app login from %s: %s", client, exc)

    async def logout(self, request: Request, session: Session) -> Response:
        """End the session and clear its cookie."""
        self.sessions.drop(session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True)
        return response

    # ------------------------------------------------------------------ requests

    def _requests_context(self) -> dict[str, Any]:
        records = self.services.requests.list_requests()
        pending, history = views.split_requests(records)
        now = self.now()
        deadlines = {r.jti: self.services.deadline(r) for r in pending}
        # What approving each would release, computed now (owner only; see §5.1).
        previews = {r.jti: self.services.decider.preview(r.jti) for r in pending}
        return {
            "pending": pending,
            "history": history[:50],
            "deadlines": deadlines,
            "previews": previews,
            "now": now,
            "fingerprint": views.requests_fingerprint(records),
        }

    async def requests_page(self, request: Request, session: Session) -> Response:
        """Pending requests first, then the history."""
        context = await run_in_threadpool(self._requests_context)
        return self._render(request, session, "requests.html", context)

    async def requests_fragment(self, request: Request, session: Session) -> Response:
        """The requests list alone, for the page's live refresh."""
        context = await run_in_threadpool(self._requests_context)
        return self._render(request, session, "_requests.html", context, use_flash=False)

    async def decide_form(self, request: Request, session: Session) -> Response:
        """Approve or deny from the page (channel ``app``), then back to the list.

        An approval carries the fingerprint of the preview the page showed; when what it would
        release changed meanwhile, nothing is approved and the list shows the new preview.
        """
        jti = _valid_id(request.path_params["jti"])
        approve = _action(request.path_params["action"])
        # A form without a fingerprint binds to nothing that can match: refused as changed.
        shown = (_field(await request.form(), "preview") or "") if approve else None
        try:
            decision = await run_in_threadpool(self.services.decider.decide, jti, approve, shown)
        except ApprovalError as exc:
            self._set_flash(session, "error", exc.message)
        else:
            self._set_flash(session, "ok", decision.message)
        return RedirectResponse("/requests", status_code=303)

    async def redeliver_form(self, request: Request, session: Session) -> Response:
        """"Send again" (§5.2, channel ``app``), then back to the list."""
        jti = _valid_id(request.path_params["jti"])
        try:
            decision = await run_in_threadpool(self.services.decider.redeliver, jti)
        except ApprovalError as exc:
            self._set_flash(session, "error", exc.message)
        else:
            self._set_flash(session, "ok", decision.message)
        return RedirectResponse("/requests", status_code=303)

    async def api_redeliver(self, request: Request, session: Session) -> Response:
        """``POST /api/requests/{jti}/redeliver``."""
        jti = _valid_id(request.path_params["jti"])
        decision = await run_in_threadpool(self.services.decider.redeliver, jti)
        return JSONResponse(
            {"request": self._request_json(decision.record), "message": decision.message}
        )

    async def api_requests(self, request: Request, session: Session) -> Response:
        """``GET /api/requests[?status=S]``."""
        status = request.query_params.get("status")
        statuses = [status] if status else None
        try:
            records = await run_in_threadpool(self.services.requests.list_requests, statuses)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return JSONResponse({"requests": [self._request_json(r) for r in records]})

    def _request_json(self, record: RequestRecord) -> dict[str, Any]:
        deadline = self.services.deadline(record) if record.status == "pending" else None
        return views.request_json(record, deadline)

    async def api_request(self, request: Request, session: Session) -> Response:
        """``GET /api/requests/{jti}``."""
        jti = _valid_id(request.path_params["jti"])
        record = await run_in_threadpool(self.services.requests.get_request, jti)
        body: dict[str, Any] = {"request": self._request_json(record)}
        if record.status == "pending":
            preview = await run_in_threadpool(self.services.decider.preview, jti)
            body["preview"] = preview.to_json() if preview is not None else None
        return JSONResponse(body)

    async def api_decide(self, request: Request, session: Session) -> Response:
        """``POST /api/requests/{jti}/approve|deny``."""
        jti = _valid_id(request.path_params["jti"])
        approve = _action(request.path_params["action"])
        shown: str | None = None
        if approve and request.headers.get("content-type", "").startswith("application/json"):
            value = (await _json_body(request)).get("preview")
            shown = value if isinstance(value, str) else None
        try:
            decision = await run_in_threadpool(self.services.decider.decide, jti, approve, shown)
        except PreviewChangedError as exc:
            preview = await run_in_threadpool(self.services.decider.preview, jti)
            return JSONResponse(
                {"error": exc.message, "preview": preview.to_json() if preview else None},
                status_code=409,
            )
        return JSONResponse(
            {"request": self._request_json(decision.record), "message": decision.message}
        )

    async def api_events(self, request: Request, session: Session) -> Response:
        """``GET /api/events``: server-sent events, ``requests`` whenever a request changes."""

        async def stream() -> AsyncIterator[bytes]:
            last: str | None = None
            idle = 0.0
            yield b"retry: 3000\n\n"
            while not self.stopping.is_set():
                if self._session(request) is None:
                    yield b"event: logout\ndata: {}\n\n"
                    return
                records = await run_in_threadpool(self.services.requests.list_requests)
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
                await asyncio.sleep(self.poll_interval)
                idle += self.poll_interval

        return StreamingResponse(stream(), media_type="text/event-stream")

    # ------------------------------------------------------------------ clips

    async def clips_page(self, request: Request, session: Session) -> Response:
        """Thumbnails grouped by day."""
        clips = await run_in_threadpool(self.services.vault.list_clips)
        days = views.clips_by_day(clips, self.tz)
        return self._render(request, session, "clips.html", {"days": days})

    def _clip(self, request: Request) -> ClipInfo:
        clip_id = request.path_params["clip"]
        if not ID_RE.fullmatch(clip_id):
            raise ClipNotFoundError(f"{clip_id[:40]!r} is not a valid clip id")
        return self.services.vault.get_clip(clip_id)

    async def clip_page(self, request: Request, session: Session) -> Response:
        """One clip: the player, its details, download and delete."""
        clip = await run_in_threadpool(self._clip, request)
        return self._render(
            request, session, "clip.html", {"clip": clip}
        )

    async def clip_delete_confirm(self, request: Request, session: Session) -> Response:
        """Ask before deleting; warn when a request's hold covers the clip."""
        clip = await run_in_threadpool(self._clip, request)
        holds = await run_in_threadpool(self.services.vault.holds)
        held = [h.holder for h in holds if h.covers(clip)]
        return self._render(request, session, "clip_delete.html", {"clip": clip, "held": held})

    async def clip_delete_form(self, request: Request, session: Session) -> Response:
        """Delete (audited ``clip_deleted`` with reason ``owner``) and go back to the list."""
        clip = await run_in_threadpool(self._clip, request)
        await run_in_threadpool(self.services.vault.delete_clip, clip.id, "owner")
        self._set_flash(session, "ok", f"Clip {clip.id} was deleted.")
        return RedirectResponse("/clips", status_code=303)

    async def api_clips(self, request: Request, session: Session) -> Response:
        """``GET /api/clips``."""
        clips = await run_in_threadpool(self.services.vault.list_clips)
        fps = self.services.camera_fps
        return JSONResponse({"clips": [views.clip_json(c, fps) for c in clips]})

    async def api_clip(self, request: Request, session: Session) -> Response:
        """``GET /api/clips/{id}``."""
        clip = await run_in_threadpool(self._clip, request)
        return JSONResponse({"clip": views.clip_json(clip, self.services.camera_fps)})

    async def api_clip_delete(self, request: Request, session: Session) -> Response:
        """``DELETE /api/clips/{id}``."""
        clip = await run_in_threadpool(self._clip, request)
        await run_in_threadpool(self.services.vault.delete_clip, clip.id, "owner")
        return JSONResponse({"deleted": clip.id})

    async def api_thumbnail(self, request: Request, session: Session) -> Response:
        """``GET /api/clips/{id}/thumbnail``: the decrypted JPEG, from memory."""
        clip = await run_in_threadpool(self._clip, request)
        jpeg = await run_in_threadpool(self.services.vault.read_thumbnail, clip.id)
        if jpeg is None:
            return Response(status_code=404)
        return Response(jpeg, media_type="image/jpeg")

    async def api_download(self, request: Request, session: Session) -> Response:
        """``GET /api/clips/{id}/download``: the owner's decrypted copy, streamed."""
        clip = await run_in_threadpool(self._clip, request)
        reader = await run_in_threadpool(self.services.vault.open_clip, clip.id)

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    data = await run_in_threadpool(reader.read, READ_CHUNK)
                    if not data:
                        return
                    yield data
            except AgentError as exc:
                # Headers are gone; ending short makes the download fail visibly.
                log.error("download of clip %s stopped: %s", clip.id, exc)
            finally:
                reader.close()

        return StreamingResponse(
            body(),
            media_type=clip.content_type,
            headers={
                "content-disposition": f'attachment; filename="clip-{clip.id}.mkv"',
                "content-length": str(clip.size),
            },
        )

    async def api_video(self, request: Request, session: Session) -> Response:
        """``GET /api/clips/{id}/video``: an H.264 clip as fragmented MP4 for ``<video>``,
        remuxed in memory (never written), with byte ranges so that the player can seek."""
        clip = await run_in_threadpool(self._clip, request)
        if clip.codec not in BROWSER_CODECS:
            return Response(status_code=415)

        def remux() -> bytes:
            reader = self.services.vault.open_clip(clip.id)
            try:
                return fragmented_mp4(reader)
            finally:
                reader.close()

        try:
            data = await run_in_threadpool(remux)
        except MediaError as exc:
            log.error("playback of clip %s failed: %s", clip.id, exc)
            return Response(status_code=500)
        headers = {"accept-ranges": "bytes", "cache-control": "no-store"}
        span = _byte_range(request.headers.get("range"), len(data))
        if span is None:
            return Response(data, media_type="video/mp4", headers=headers)
        if span == (-1, -1):
            return Response(status_code=416, headers={"content-range": f"bytes */{len(data)}"})
        first, last = span
        headers["content-range"] = f"bytes {first}-{last}/{len(data)}"
        return Response(data[first : last + 1], status_code=206, media_type="video/mp4",
                         headers=headers)

    async def api_stream(self, request: Request, session: Session) -> Response:
        """``GET /api/clips/{id}/stream``: MJPEG (multipart/x-mixed-replace) at the clip's pace."""
        clip = await run_in_threadpool(self._clip, request)
        reader = await run_in_threadpool(self.services.vault.open_clip, clip.id)
        # MJPEG clips give their stored JPEGs; H.264 and the others are decoded and re-encoded
        # frame by frame, in memory.
        frames: Iterator[tuple[float, bytes]] = iter_jpegs(reader)
        loop = asyncio.get_running_loop()

        def next_frame() -> tuple[float, bytes] | None:
            return next(frames, None)

        async def body() -> AsyncIterator[bytes]:
            started = loop.time()
            try:
                while not self.stopping.is_set():
                    frame = await run_in_threadpool(next_frame)
                    if frame is None:
                        return
                    time, jpeg = frame
                    delay = started + time - loop.time()
                    if delay > 0:
                        await self.sleep(delay)
                    yield (
                        b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                        + str(len(jpeg)).encode()
                        + b"\r\n\r\n"
                        + jpeg
                        + b"\r\n"
                    )
            except (AgentError, MediaError) as exc:
                log.error("playback of clip %s stopped: %s", clip.id, exc)
            finally:
                reader.close()

        return StreamingResponse(body(), media_type="multipart/x-mixed-replace; boundary=frame")

    # ------------------------------------------------------------------ audit

    def _log_port(self, log: str) -> AuditPort:
        """The request log (``requests``) or the camera and owner log (``activity``)."""
        return self._activity() if log == "activity" else self.services.audit

    def _verify_audit(self, log: str = "requests") -> VerifyResult:
        """The chain check of one log, redone only when its file changed (it reads every
        entry)."""
        port = self._log_port(log)
        try:
            stat = port.path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            key = (0, 0)
        cached = self._audit_cache.get(log)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = VerifyResult(True, 0, None, None, None) if key == (0, 0) else port.verify()
        self._audit_cache[log] = (key, result)
        return result

    def _audit_entries(
        self, log: str, where: views.AuditFilter, before: int | None
    ) -> tuple[list[AuditEntry], bool]:
        path = self._log_port(log).path
        if not path.exists():
            return [], False
        return views.newest_entries(
            read_entries(path),
            before=before,
            limit=AUDIT_PAGE,
            where=where,
        )

    def _audit_query(self, request: Request) -> tuple[str, views.AuditFilter, int | None]:
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
        return log, views.AuditFilter(requester, kind, day, self.tz), before

    async def audit_page(self, request: Request, session: Session) -> Response:
        """The log newest first, as sentences, with the chain check, filters and export."""
        log, where, before = self._audit_query(request)
        verify = await run_in_threadpool(self._verify_audit, log)
        entries, more = await run_in_threadpool(self._audit_entries, log, where, before)
        requesters = await run_in_threadpool(self.services.requests.list_requesters)
        names = {r.id: r.name for r in requesters}
        query = {
            k: v for k, v in (
                ("log", log if log != "requests" else None),
                ("requester", where.requester), ("kind", where.kind),
                ("date", where.day.isoformat() if where.day else None),
            ) if v
        }
        return self._render(
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
                "sentence": lambda e: views.entry_sentence(e, names, self.tz),
                "event_name": views.event_name,
                "summary": views.entry_summary,
            },
        )

    async def api_audit(self, request: Request, session: Session) -> Response:
        """``GET /api/audit[?requester=R][&kind=K][&date=YYYY-MM-DD][&before=SEQ]``:
        verification and 100 entries."""
        log, where, before = self._audit_query(request)
        verify = await run_in_threadpool(self._verify_audit, log)
        entries, more = await run_in_threadpool(self._audit_entries, log, where, before)
        return JSONResponse(
            {
                "verify": views.verify_json(verify),
                "entries": [e.to_dict() for e in entries],
                "more": more,
            }
        )

    async def api_audit_export(self, request: Request, session: Session) -> Response:
        """``GET /api/audit/export[?requester=R][&kind=K][&date=D]``: every matching entry as a
        JSON array."""
        log, where, _ = self._audit_query(request)
        requester = where.requester
        path = self._log_port(log).path
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
            f"{'activity' if log == 'activity' else 'audit'}-{self.services.device_id}"
            + (f"-{requester}" if requester else "")
        )
        return StreamingResponse(
            body(),
            media_type="application/json",
            headers={"content-disposition": f'attachment; filename="{name}.json"'},
        )

    # ------------------------------------------------------------------ requesters

    async def requesters_page(self, request: Request, session: Session) -> Response:
        """Enrolled requesters, revoke buttons, and the enrolment form."""
        requesters = await run_in_threadpool(self.services.requests.list_requesters)
        return self._render(
            request,
            session,
            "requesters.html",
            {"requesters": requesters, "kinds": REQUESTER_KINDS, "form": {}, "error": None},
        )

    async def requester_preview(self, request: Request, session: Session) -> Response:
        """Parse the pasted (or uploaded) key and show its kid before the owner confirms."""
        raw = await request.form()
        form = _enrol_fields(raw)
        try:
            form["key"] = await _key_text(raw)
            key = parse_public_key_text(form["key"])
        except (KeyFileError, ValueError) as exc:
            requesters = await run_in_threadpool(self.services.requests.list_requesters)
            return self._render(
                request,
                session,
                "requesters.html",
                {
                    "requesters": requesters,
                    "kinds": REQUESTER_KINDS,
                    "form": form,
                    "error": str(exc),
                },
                status=400,
            )
        return self._render(
            request,
            session,
            "requester_confirm.html",
            {"form": form, "kid": kid_for(key), "jwk": json.dumps(public_jwk(key), indent=2)},
        )

    async def requester_enroll(self, request: Request, session: Session) -> Response:
        """Enrol after confirmation (audited ``requester_added``)."""
        form = _enrol_fields(await request.form())
        try:
            requester = await run_in_threadpool(self._enroll, form)
        except (RequestError, KeyFileError) as exc:
            requesters = await run_in_threadpool(self.services.requests.list_requesters)
            return self._render(
                request,
                session,
                "requesters.html",
                {
                    "requesters": requesters,
                    "kinds": REQUESTER_KINDS,
                    "form": form,
                    "error": exc.message,
                },
                status=400,
            )
        self._set_flash(session, "ok", f"{requester.name} ({requester.id}) was enrolled.")
        return RedirectResponse("/requesters", status_code=303)

    def _enroll(self, form: dict[str, str]) -> Requester:
        try:
            key = parse_public_key_text(form["key"])
        except ValueError as exc:
            raise KeyFileError(str(exc)) from exc
        return self.services.requests.add_requester(
            form["id"],
            form["name"],
            form["kind"],
            key,
            form["contact"] or None,
            audit=self.services.audit,
        )

    async def requester_revoke(self, request: Request, session: Session) -> Response:
        """Revoke at once (pending requests of the requester are cancelled)."""
        rid = _valid_id(request.path_params["rid"])
        revocation = await run_in_threadpool(self._revoke, rid)
        cancelled = len(revocation.cancelled)
        message = f"{rid} is revoked" + (
            f"; {cancelled} pending request(s) cancelled." if cancelled else "."
        )
        self._set_flash(session, "ok", message)
        return RedirectResponse("/requesters", status_code=303)

    def _revoke(self, rid: str) -> Revocation:
        return self.services.requests.revoke_requester(rid, audit=self.services.audit)

    async def api_requesters(self, request: Request, session: Session) -> Response:
        """``GET /api/requesters``."""
        requesters = await run_in_threadpool(self.services.requests.list_requesters)
        return JSONResponse({"requesters": [views.requester_json(r) for r in requesters]})

    async def api_preview(self, request: Request, session: Session) -> Response:
        """``POST /api/requesters/preview`` ``{"key": ...}`` (or a form with the key file):
        the key's kid and JWK. The key is its text, never a path on the device."""
        text = (await _api_enrol_fields(request))["key"]
        if not text:
            raise RequestError("key is required: a JWK, a PEM public key or raw base64url")
        try:
            key = parse_public_key_text(text)
        except ValueError as exc:
            raise KeyFileError(str(exc)) from exc
        return JSONResponse({"kid": kid_for(key), "public_jwk": public_jwk(key)})

    async def api_enroll(self, request: Request, session: Session) -> Response:
        """``POST /api/requesters`` ``{"id","name","kind","key","contact"?}`` (or the same as a
        form, the key as text or an uploaded file)."""
        form = await _api_enrol_fields(request)
        requester = await run_in_threadpool(self._enroll, form)
        return JSONResponse({"requester": views.requester_json(requester)}, status_code=201)

    async def api_revoke(self, request: Request, session: Session) -> Response:
        """``POST /api/requesters/{id}/revoke``."""
        rid = _valid_id(request.path_params["rid"])
        revocation = await run_in_threadpool(self._revoke, rid)
        return JSONResponse(
            {
                "requester": views.requester_json(revocation.requester),
                "cancelled": [r.jti for r in revocation.cancelled],
                "already_revoked": revocation.already_revoked,
            }
        )

    # ------------------------------------------------------------------ status

    def _status_items(self) -> tuple[list[StatusItem], dict[str, Any]]:
        services = self.services
        clips = services.vault.list_clips()
        # The one source of the stored figure: the vault's index (what the Clips page lists).
        stored = sum(c.stored_bytes for c in clips)
        last = services.audit.last_entry()
        verify = self._verify_audit()
        audit_text = "no entries yet"
        if last is not None:
            entries = f"{last.seq} entr{'y' if last.seq == 1 else 'ies'}"
            check = "checked: intact" if verify.ok else f"BROKEN: {verify.summary()}"
            audit_text = f"{entries}, newest {views.human_time(last.timestamp, self.tz)} · {check}"
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
        if self.tls_fingerprint:
            items.append(StatusItem("TLS certificate SHA-256", self.tls_fingerprint))
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

    async def status_page(self, request: Request, session: Session) -> Response:
        """Camera, MQTT, storage, retention, audit head, versions."""
        items, usage = await run_in_threadpool(self._status_items)
        return self._render(request, session, "status.html", {"items": items, "usage": usage})

    async def api_status(self, request: Request, session: Session) -> Response:
        """``GET /api/status``."""
        items, usage = await run_in_threadpool(self._status_items)
        return JSONResponse(
            {
                "device_id": self.services.device_id,
                "version": __version__,
                "items": [{"label": i.label, "value": i.value, "ok": i.ok} for i in items],
                **usage,
            }
        )

    # ------------------------------------------------------------------ report

    def _report(self, request: Request) -> Report:
        since = None
        if since_text := request.query_params.get("since"):
            try:
                since = datetime.combine(date.fromisoformat(since_text), time(), tzinfo=None)
            except ValueError:
                raise RequestError("since must be a day written YYYY-MM-DD") from None
            since = since.replace(tzinfo=self.tz) if self.tz is not None else since.astimezone()
        services = self.services
        path = services.audit.path
        released = report.released_seconds(read_entries(path)) if path.exists() else {}
        return report.build_report(
            services.requests.list_requests(),
            services.requests.list_requesters(),
            released,
            since=since,
        )

    async def report_page(self, request: Request, session: Session) -> Response:
        """The transparency report: requests and outcomes per requester and per kind."""
        result = await run_in_threadpool(self._report, request)
        return self._render(request, session, "report.html", {"report": result})

    async def api_report(self, request: Request, session: Session) -> Response:
        """``GET /api/report[?since=YYYY-MM-DD]``: as ``doorbell-agent report --json``."""
        result = await run_in_threadpool(self._report, request)
        return JSONResponse(result.to_json())

    async def api_session(self, request: Request, session: Session) -> Response:
        """``GET /api/session``: the CSRF token for API calls and when the session ends."""
        return JSONResponse(
            {"csrf_token": session.csrf, "expires_at": rfc3339(session.expires_at)}
        )


# ---------------------------------------------------------------------- small helpers


class Verbatim(str):
    """A string a template shows as it is (autoescaped for HTML, but newlines kept): the
    owner's own key text and its JWK, never requester text."""


def _finalize(value: object) -> object:
    if isinstance(value, str) and not isinstance(value, (Verbatim, Markup)):
        return visible(value)
    return value


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _action(action: str) -> bool:
    if action == "approve":
        return True
    if action == "deny":
        return False
    raise RequestNotFoundError(f"unknown action {action[:20]!r}")


def _enrol_fields(form: FormData) -> dict[str, str]:
    return {
        name: (_field(form, name) or "").strip()
        for name in ("id", "name", "kind", "key", "contact")
    }


MAX_KEY_FILE: Final = 16 * 1024
"""Largest uploaded key file read (a JWK or PEM public key is a few hundred bytes)."""


async def _key_text(form: FormData) -> str:
    """The key from an enrolment form: the pasted text (``key``) or the content of an uploaded
    key file (``key_file``, or ``key`` sent as a file). Never a path on the device."""
    text = (_field(form, "key") or "").strip()
    upload = next(
        (v for n in ("key_file", "key") if isinstance(v := form.get(n), UploadFile)), None
    )
    if upload is None or not upload.filename:
        return text
    if text:
        raise KeyFileError("paste the key or upload its file, not both")
    data = await upload.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError("the uploaded file is too large to be a public key")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFileError("the uploaded file is not a text key (JWK, PEM or base64url)") from None


async def _api_enrol_fields(request: Request) -> dict[str, str]:
    """Enrolment fields of an API call: a JSON object, or a multipart form with a key file."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        fields = _enrol_fields(form)
        fields["key"] = await _key_text(form)
        return fields
    body = await _json_body(request)
    return {
        name: value.strip() if isinstance(value := body.get(name), str) else ""
        for name in ("id", "name", "kind", "key", "contact")
    }


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("send the body as application/json")
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise RequestError("the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes of a single ``Range: bytes=`` request; None for the whole
    body (no or unparsable header), (-1, -1) when it cannot be satisfied."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    start, _, end = header[len("bytes="):].strip().partition("-")
    try:
        if start:
            first = int(start)
            last = int(end) if end else size - 1
        else:
            first, last = max(0, size - int(end)), size - 1
    except ValueError:
        return None
    if first >= size or first > last:
        return (-1, -1)
    return first, min(last, size - 1)
