"""What every route module shares: the app's state (:class:`Site`) and the rules of a route.

:class:`Site` holds the sessions, the login limiter, the owner's flash messages, the templates
and the two audit logs, and wraps each handler in the rules of its kind: :meth:`Site.page`
(no session: redirect to ``/login``; errors as an HTML page) or :meth:`Site.api` (no session:
401; errors as JSON). Both check the CSRF token and the origin of every state change first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime, tzinfo
from functools import wraps
from typing import Any, Final

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.templating import Jinja2Templates

from agent import __version__, report
from agent.audit import VerifyResult
from agent.display import visible
from agent.errors import (
    AgentError,
    ApprovalError,
    ClipNotFoundError,
    KeyFileError,
    RequesterNotFoundError,
    RequestError,
    RequestNotFoundError,
)
from agent.release.preview import sentence as preview_sentence
from agent.release.preview import size_text
from agent.timeutil import format_size, rfc3339, utcnow
from agent.web import views
from agent.web.auth import LoginLimiter, PasswordFile, Session, SessionStore, tokens_equal
from agent.web.services import AppServices, AuditPort

log = logging.getLogger(__name__)

SESSION_COOKIE: Final = "__Host-doorbell-session"
CSRF_HEADER: Final = "x-csrf-token"
CSRF_FIELD: Final = "csrf_token"
ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})

Endpoint = Callable[[Request], Awaitable[Response]]


class Denied(Exception):
    """A request failed an auth rule; ``status`` is 401 or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Site:
    """The app's state (sessions, limiter, flashes, templates) and the plumbing of its routes.

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

    # ------------------------------------------------------------------ auth plumbing

    def session(self, request: Request) -> Session | None:
        """The live session of ``request``'s cookie, or None."""
        return self.sessions.get(request.cookies.get(SESSION_COOKIE), self.password.version())

    @staticmethod
    def check_origin(request: Request) -> None:
        """Refuse a state change a browser says comes from another site.

        A second line behind the CSRF token. Browsers send ``Origin: null`` on same-origin
        POSTs under ``Referrer-Policy: no-referrer``, so ``null`` proves nothing either way;
        ``Sec-Fetch-Site`` (sent by current browsers) is the clearer signal.
        """
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise Denied(403, "cross-site request refused")
        origin = request.headers.get("origin")
        if origin not in (None, "null") and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise Denied(403, "cross-site request refused")

    async def _check_csrf(self, request: Request, session: Session, *, api: bool) -> None:
        if request.method not in UNSAFE_METHODS:
            return
        self.check_origin(request)
        if api:
            given = request.headers.get(CSRF_HEADER)
        else:
            form = await request.form()
            value = form.get(CSRF_FIELD)
            given = value if isinstance(value, str) else None
        if not tokens_equal(given, session.csrf):
            log.warning(
                "refused %s %s from %s: missing or wrong CSRF token",
                request.method, request.url.path, client_of(request),
            )
            raise Denied(403, "missing or wrong CSRF token")

    def public(self, handler: PublicHandler) -> Endpoint:
        """``handler`` for a route open without a session (the login form)."""

        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            return await handler(self, request)

        return endpoint

    def page(self, handler: Handler) -> Endpoint:
        """``handler`` as a page: no session redirects to ``/login``, errors show as HTML."""
        return self._guarded(handler, api=False)

    def api(self, handler: Handler) -> Endpoint:
        """``handler`` as an API call: no session is a 401, errors are JSON."""
        return self._guarded(handler, api=True)

    def _guarded(self, handler: Handler, *, api: bool) -> Endpoint:
        @wraps(handler)
        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            if session is None:
                if api:
                    return JSONResponse({"error": "not logged in"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            try:
                await self._check_csrf(request, session, api=api)
                return await handler(self, request, session)
            except Denied as exc:
                status, message = exc.status, exc.message
            except AgentError as exc:
                status, message = _error_status(exc), exc.message
                if status == 500:
                    log.error(
                        "app %s %s failed: %s", "API" if api else "page", request.url.path, exc
                    )
            if api:
                return JSONResponse({"error": message}, status_code=status)
            return self.render(
                request, session, "error.html", {"message": message}, status=status
            )

        return endpoint

    # ------------------------------------------------------------------ pages and flashes

    def render(
        self,
        request: Request,
        session: Session | None,
        template: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        use_flash: bool = True,
    ) -> HTMLResponse:
        """``template`` with ``context`` and what every page shows (session, flash, device)."""
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

    def set_flash(self, session: Session, kind: str, message: str) -> None:
        """Show ``message`` (``kind`` ok or error) on the session's next page."""
        with self._flash_lock:
            self._flash[session.id] = (kind, message)

    def _pop_flash(self, session: Session) -> tuple[str, str] | None:
        with self._flash_lock:
            # Flashes of sessions that ended are dropped with them, keeping this map small.
            for stale in [sid for sid in self._flash if sid != session.id and
                          self.sessions.get(sid, session.password_version) is None]:
                del self._flash[stale]
            return self._flash.pop(session.id, None)

    # ------------------------------------------------------------------ the two audit logs

    def activity(self) -> AuditPort:
        """The camera and owner log (logins go there); the request log when there is none."""
        return self.services.activity or self.services.audit

    def log_port(self, log: str) -> AuditPort:
        """The request log (``requests``) or the camera and owner log (``activity``)."""
        return self.activity() if log == "activity" else self.services.audit

    def verify_audit(self, log: str = "requests") -> VerifyResult:
        """The chain check of one log, redone only when its file changed (it reads every
        entry)."""
        port = self.log_port(log)
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


Handler = Callable[[Site, Request, Session], Awaitable[Response]]
"""A route's handler: the app's state, the request and its (checked) session."""
PublicHandler = Callable[[Site, Request], Awaitable[Response]]
"""The handler of a route open without a session: the app's state and the request."""


def _error_status(exc: AgentError) -> int:
    if isinstance(exc, RequestNotFoundError | RequesterNotFoundError | ClipNotFoundError):
        return 404
    if isinstance(exc, ApprovalError):
        return 409
    if isinstance(exc, RequestError | KeyFileError):
        return 400
    return 500


class Verbatim(str):
    """A string a template shows as it is (autoescaped for HTML, but newlines kept): the
    owner's own key text and its JWK, never requester text."""


def _finalize(value: object) -> object:
    if isinstance(value, str) and not isinstance(value, (Verbatim, Markup)):
        return visible(value)
    return value


def valid_id(value: str) -> str:
    """``value`` when it can be a request or requester id; else RequestNotFoundError."""
    if not ID_RE.fullmatch(value):
        raise RequestNotFoundError(f"{value[:40]!r} is not a valid id")
    return value


def client_of(request: Request) -> str:
    """The client's address, for the log and the login limiter."""
    return request.client.host if request.client else "unknown"


def form_field(form: FormData, name: str) -> str | None:
    """A text field of a form (None when missing or a file)."""
    value = form.get(name)
    return value if isinstance(value, str) else None


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body; RequestError when it is not one."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("send the body as application/json")
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise RequestError("the body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body
