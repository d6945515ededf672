"""The owner's local web app: an ASGI (Starlette) application over :class:`AppServices`.

This module only assembles it: the routes of each topic (:mod:`agent.web.routes`), the static
files and the security-header middleware (:mod:`agent.web.headers`). Handlers are thin:
authentication, sessions, CSRF and lockout live in :mod:`agent.web.auth`, formatting in
:mod:`agent.web.views`, and every change goes through the component that owns it (the approval
engine, the vault, the request store), each of which audits before acting.

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

from pathlib import Path
from typing import Final

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from agent.web.headers import SecurityHeaders
from agent.web.routes import audit, clips, login, report, requesters, requests, status
from agent.web.routes.shared import Site

MAX_BODY: Final = 64 * 1024


class WebApp(Site):
    """The app: its state (:class:`~agent.web.routes.shared.Site`) and :meth:`asgi`."""

    def asgi(self) -> Starlette:
        """The Starlette application with every route and the security-header middleware."""
        static_dir = Path(__file__).with_name("static")
        routes = [
            *login.routes(self),
            *requests.routes(self),
            *clips.routes(self),
            *audit.routes(self),
            *requesters.routes(self),
            *status.routes(self),
            *report.routes(self),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ]
        app = Starlette(routes=routes, max_body_size=MAX_BODY)
        app.add_middleware(SecurityHeaders)
        return app
