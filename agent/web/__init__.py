"""The homeowner's local web app (HTTPS, password login, CSRF-protected) served by the daemon.

- :mod:`agent.web.auth`: password check, sessions, CSRF tokens, login lockout (pure logic).
- :mod:`agent.web.services`: the protocols the app needs of the vault, store, engine and log.
- :mod:`agent.web.app`: assembles the Starlette application (pages and the JSON API under
  ``/api/``) from :mod:`agent.web.routes` (one module per topic, the shared rules in
  :mod:`agent.web.routes.shared`) and :mod:`agent.web.headers` (the security headers).
- playback reads clips through :mod:`agent.camera.media` (JPEG frames of any stored codec).
- :mod:`agent.web.server`: :class:`~agent.web.server.AppServer`, the uvicorn worker thread.
"""
