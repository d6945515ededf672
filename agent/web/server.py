"""Serving the local app: uvicorn over HTTPS in a thread of the daemon.

:class:`AppServer` is the daemon's worker: ``start()`` binds the socket (so a port in use is an
error the daemon sees at once, not a ``sys.exit`` inside uvicorn's thread) and starts
``uvicorn.Server`` in a thread; ``close()`` sets ``should_exit`` and joins it; ``run(stop)``
does both around a ``threading.Event``. :func:`build_server` assembles everything from the
configuration and the components the daemon already holds.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import uvicorn

from agent.config import Config
from agent.errors import AgentError
from agent.keys import check_secret
from agent.lifecycle import Closing
from agent.paths import StatePaths
from agent.provision import certificate_fingerprint
from agent.timeutil import format_size, utcnow
from agent.web.app import WebApp
from agent.web.auth import PasswordFile, SessionStore
from agent.web.services import (
    AppServices,
    AuditPort,
    DecidingEngine,
    EngineDecider,
    RequestsPort,
    StatusItem,
    VaultPort,
)
from agent.web.views import deadline_for

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S: Final = 15.0
GRACEFUL_SHUTDOWN_S: Final = 3


def _tls_context_factory(
    config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); raises AgentError if it fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AgentError(
            f"cannot listen on {host}:{port}: {exc.strerror}", hint="check app.bind"
        ) from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise AgentError(
            f"the local app cannot listen on {host}:{port}: {exc.strerror}",
            hint="another program uses that port, or change app.bind / app.port",
        ) from exc
    sock.set_inheritable(True)
    return sock


class AppServer(Closing):
    """The local app's HTTPS server as a daemon worker (context manager, idempotent close)."""

    name = "app"

    def __init__(
        self,
        web: WebApp,
        *,
        host: str,
        port: int,
        certfile: Path,
        keyfile: Path,
        log_level: str = "warning",
    ) -> None:
        self.web = web
        self.host = host
        self._requested_port = port
        self._config = uvicorn.Config(
            web.asgi(),
            host=host,
            port=port,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            ssl_context_factory=_tls_context_factory,
            log_level=log_level,
            log_config=None,  # keep the daemon's logging set-up
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            limit_concurrency=64,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        return self._requested_port if self._bound_port is None else self._bound_port

    @property
    def serving(self) -> bool:
        """Whether uvicorn is accepting connections (for status and for waiting on ``run``)."""
        return bool(self._server.started) and not self._closed

    @property
    def url(self) -> str:
        """The app's base URL as reachable from this machine."""
        host = "localhost" if self.host in ("0.0.0.0", "::", "127.0.0.1") else self.host  # noqa: S104
        return f"https://{host}:{self.port}"

    def start(self) -> None:
        """Bind, start serving in a thread, and return once uvicorn is accepting connections.

        Raises AgentError when the port cannot be bound or the server does not start.
        """
        with self._lock:
            if self._thread is not None or self._closed:
                raise AgentError("the local app server was already started")
            self._socket = bind_socket(self.host, self._requested_port)
            # Remembered: status asks for the port after the socket is closed at a stop.
            self._bound_port = int(self._socket.getsockname()[1])
            self._thread = threading.Thread(target=self._serve, name="app-server", daemon=True)
            self._thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                self.close()
                raise AgentError(
                    f"the local app server stopped while starting: {self._error or 'see the log'}"
                )
            if waited >= STARTUP_TIMEOUT_S:
                self.close()
                raise AgentError("the local app server did not start in time")
            deadline.wait(0.05)
            waited += 0.05
        log.info("local app listening on %s", self.url)

    def _serve(self) -> None:
        assert self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except SystemExit as exc:  # uvicorn exits on start-up failures
            self._error = exc
            log.error("the local app server failed to start (exit %s)", exc.code)
        except Exception as exc:
            self._error = exc
            log.exception("the local app server failed")

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving: end live streams, let requests finish briefly, join (idempotent)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self.web.stopping.set()
        self._server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._server.force_exit = True
                thread.join(timeout)
        if self._socket is not None:
            self._socket.close()

    def stats(self) -> dict[str, Any]:
        """For the daemon's ``status.json``: where the app listens and how many are logged in."""
        return {"url": self.url, "serving": self.serving, "sessions": len(self.web.sessions)}

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (the daemon's stop event), then close."""
        self.start()
        try:
            stop.wait()
        finally:
            self.close()


def build_server(
    cfg: Config,
    services: AppServices,
    *,
    now: Callable[[], datetime] = utcnow,
    port: int | None = None,
) -> AppServer:
    """The app server for a configured device: password file, TLS pair and session lifetime.

    Raises InsecurePermissionsError when the TLS key or password hash is readable by others.
    """
    state = StatePaths(cfg.state_dir)
    password_path = state.app_password
    certfile, keyfile = state.tls_cert, state.tls_key
    check_secret(password_path)
    check_secret(keyfile)
    web = WebApp(
        services,
        PasswordFile(password_path),
        SessionStore(cfg.app.session_lifetime, now=now),
        now=now,
        tls_fingerprint=certificate_fingerprint(certfile),
    )
    return AppServer(
        web,
        host=cfg.app.bind,
        port=cfg.app.port if port is None else port,
        certfile=certfile,
        keyfile=keyfile,
    )


def build_services(
    cfg: Config,
    *,
    store: RequestsPort,
    engine: DecidingEngine,
    vault: VaultPort,
    audit: AuditPort,
    runtime: Callable[[], Sequence[StatusItem]] = lambda: (),
    activity: AuditPort | None = None,
) -> AppServices:
    """The app's view of the daemon's components (decisions go through ``engine`` as ``app``)."""
    return AppServices(
        requests=store,
        decider=EngineDecider(engine, store),
        vault=vault,
        audit=audit,
        device_id=cfg.device_id,
        retention=cfg.storage.retention,
        max_bytes=cfg.storage.max_bytes,
        deadline=deadline_for(cfg.approval.timeout),
        runtime=runtime,
        camera_fps=cfg.camera.fps,
        activity=activity,
    )


def _camera_line(stats: dict[str, Any]) -> str:
    capture = stats.get("capture") or {}
    processing = stats.get("processing") or {}
    recorder = stats.get("recorder") or {}
    parts = [f"{capture.get('state', 'unknown')} {capture.get('source', '')}".strip()]
    fps = processing.get("fps")
    if isinstance(fps, int | float):
        parts.append(f"{fps:.1f} fps")
    parts.append(f"{capture.get('dropped', 0)} frames dropped")
    parts.append(f"recorder {recorder.get('state', 'unknown')}, {recorder.get('clips', 0)} clips")
    for error in (capture.get("last_error"), recorder.get("last_error")):
        if error:
            parts.append(str(error))
    return " · ".join(parts)


def _mqtt_line(stats: dict[str, Any]) -> str:
    parts = [
        "connected" if stats.get("connected") else "NOT connected",
        f"{stats.get('received', 0)} messages received",
        f"{stats.get('dropped', 0)} dropped",
        f"{stats.get('responses', 0)} responses sent",
    ]
    conflict = stats.get("client_id_conflict")
    if isinstance(conflict, dict):
        parts.insert(
            0,
            f"ANOTHER CLIENT USES THIS CLIENT ID ({conflict.get('client_id')}), last "
            f"{conflict.get('last')}: give each agent its own mqtt.client_id",
        )
    return " · ".join(parts)


def _disk_line(stats: dict[str, Any]) -> str:
    free = stats.get("free_bytes")
    parts = [f"{format_size(free)} free" if isinstance(free, int) else "not measured yet"]
    if stats.get("storage") == "full":
        parts.append("FULL: recording is paused until space is freed")
    if stats.get("last_error"):
        parts.append(str(stats["last_error"]))
    return " · ".join(parts)


def _button_line(stats: dict[str, Any]) -> str:
    button = stats.get("button")
    if button == "ok":
        text = "connected"
        if stats.get("pending_indicator"):
            text += " · light blinking: a request waits"
        return text
    return "not in use" if button in (None, "off") else f"not working: {button}"


def _homeassistant_line(stats: dict[str, Any]) -> str:
    if stats.get("last_error"):
        return str(stats["last_error"])
    return "up to date" if stats.get("announcements") else "waiting for the broker"


def _no_stats(_stats: dict[str, Any]) -> str:
    # Counters of other workers are for `status --json`, not for the owner's page.
    return ""


_SUMMARIES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "camera": ("Camera", _camera_line),
    "requests": ("MQTT", _mqtt_line),
    "retention": ("Disk space", _disk_line),
    "approval": ("Button", _button_line),
    "homeassistant": ("Home Assistant", _homeassistant_line),
}


def snapshot_items(snapshot: dict[str, Any]) -> list[StatusItem]:
    """Status-page lines for the daemon's workers (camera, requests/MQTT, ...) from its snapshot.

    One line per worker: its state (when not running), its error if any, and a summary of its
    stats written for the owner (known workers) or its scalar stats (others).
    """
    items: list[StatusItem] = []
    workers = snapshot.get("workers")
    if not isinstance(workers, dict):
        return items
    for name, info in workers.items():
        if name == AppServer.name or not isinstance(info, dict):
            continue
        state = str(info.get("state", "unknown"))
        label, summarise = _SUMMARIES.get(str(name), (str(name).capitalize(), _no_stats))
        parts = [] if state == "running" else [state]
        if info.get("error"):
            parts.append(str(info["error"]))
        stats = info.get("stats")
        if isinstance(stats, dict) and stats and "error" not in stats:
            parts.append(summarise(stats))
        text = " · ".join(p for p in parts if p) or state
        conflict = isinstance(stats, dict) and stats.get("client_id_conflict")
        ok = state == "running" and not conflict and not (
            isinstance(stats, dict)
            and (stats.get("storage") == "full" or stats.get("connected") is False)
        )
        items.append(StatusItem(label, text, ok))
    return items
