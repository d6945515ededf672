"""The app's routes, one module per topic; each has ``routes(site)`` giving its Starlette routes.

- :mod:`~agent.web.routes.shared`: :class:`~agent.web.routes.shared.Site` (the app's state and
  the page/API wrappers with the session and CSRF rules) and the helpers the topics share.
- :mod:`~agent.web.routes.login`: ``/``, ``/login``, ``/logout``, ``/api/session``.
- :mod:`~agent.web.routes.requests`: ``/requests``, ``/api/requests``, ``/api/events``.
- :mod:`~agent.web.routes.clips`: ``/clips``, ``/api/clips`` (playback, download, delete).
- :mod:`~agent.web.routes.audit`: ``/audit``, ``/api/audit``, ``/api/audit/export``.
- :mod:`~agent.web.routes.requesters`: ``/requesters``, ``/api/requesters`` (enrol, revoke).
- :mod:`~agent.web.routes.status`: ``/status``, ``/api/status``.
- :mod:`~agent.web.routes.report`: ``/report``, ``/api/report``.
"""
