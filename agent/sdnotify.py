"""systemd service notification (``sd_notify``) and the watchdog, without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an ``AF_UNIX`` datagram socket, a file
path or, with a leading ``@``, a Linux abstract socket name. The agent sends ``READY=1`` once the
camera, the vault and MQTT are up, ``STATUS=...`` lines that ``systemctl status`` shows,
``STOPPING=1`` when it begins a clean shutdown, and ``WATCHDOG=1`` every half ``WatchdogSec`` for
as long as its workers are healthy: a stuck worker stops the pings, and systemd restarts the
service. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a quiet no-op, so ``run`` behaves
the same from a shell.

Notification is best effort by design: a lost datagram must never take the doorbell down, so
send errors are logged, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta

from agent.lifecycle import Closing

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The socket address ``$NOTIFY_SOCKET`` names, or None when there is none we can use.

    A leading ``@`` means an abstract socket (its name starts with a NUL byte on the wire).
    systemd also knows ``vsock:`` addresses for virtual machines; a Pi never gets one, and the
    unit's ``RestrictAddressFamilies=`` would forbid ``AF_VSOCK`` anyway, so those are ignored.
    """
    value = environ.get(NOTIFY_SOCKET_ENV, "")
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        log.warning(
            "ignoring unusable %s=%r (not a path or @abstract name)", NOTIFY_SOCKET_ENV, value
        )
    return None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> timedelta | None:
    """The watchdog timeout systemd expects pings within, or None when no watchdog applies.

    ``$WATCHDOG_USEC`` is the timeout in microseconds; when ``$WATCHDOG_PID`` is set the watchdog
    belongs to that process only (a child that inherited the environment must not ping).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID_ENV)
    if owner is not None:
        try:
            owner_pid = int(owner)
        except ValueError:
            return None
        if owner_pid != (os.getpid() if pid is None else pid):
            return None
    return timedelta(microseconds=usec)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram and let a status text
    # (which may quote a config value) smuggle in READY=1 or similar.
    return " ".join(text.splitlines())


class Notifier(Closing):
    """Sends notifications to systemd; a no-op when the process is not a notify service.

    A context manager; ``close()`` is idempotent. Safe to call from several threads.
    """

    def __init__(self, address: str | bytes | None) -> None:
        """Notify ``address`` (from :func:`notify_address`); None makes every call a no-op."""
        self._address = address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` in ``environ`` (default: the process environment)."""
        return cls(notify_address(os.environ if environ is None else environ))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere (we run under systemd with ``Type=notify``)."""
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; True if systemd was told."""
        with self._lock:
            if self._sock is None or self._address is None:
                return False
            message = "\n".join(assignments).encode("utf-8", "replace")
            try:
                self._sock.sendto(message, self._address)
            except OSError as exc:
                log.warning("could not notify systemd (%s): %s", ", ".join(assignments), exc)
                return False
            return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``)."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls become no-ops."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Pings the systemd watchdog only while ``healthy()`` says the workers are healthy.

    ``run()`` loops until the daemon's ``stop`` event is set, checking every ``interval / 2``
    (systemd's advice: ping at half the timeout). A health check that returns False or raises
    withholds the ping, so systemd's timer runs out and it restarts the service; the transition
    is logged and put in the status line so ``systemctl status`` says why.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: timedelta,
        healthy: Callable[[], bool],
        stop: threading.Event,
    ) -> None:
        """Watch ``healthy`` and ping through ``notifier`` until ``stop`` is set."""
        if interval <= timedelta(0):
            raise ValueError("watchdog interval must be positive")
        self.notifier = notifier
        self.period = interval.total_seconds() / 2
        self._healthy = healthy
        self._stop = stop
        self._was_healthy = True

    @classmethod
    def from_env(
        cls,
        notifier: Notifier,
        healthy: Callable[[], bool],
        stop: threading.Event,
        environ: Mapping[str, str] | None = None,
    ) -> Watchdog | None:
        """A watchdog for ``$WATCHDOG_USEC``/``$WATCHDOG_PID``, or None when none is configured."""
        interval = watchdog_interval(environ)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, healthy, stop)

    def check(self) -> bool:
        """One round: ping if healthy. Returns whether the workers were healthy."""
        try:
            ok = bool(self._healthy())
        except Exception:
            log.exception("watchdog health check failed; treating the agent as unhealthy")
            ok = False
        if ok:
            self.notifier.watchdog()
            if not self._was_healthy:
                log.info("workers healthy again; watchdog pings resumed")
                self.notifier.status("running")
        elif self._was_healthy:
            log.error("a worker is unhealthy; withholding watchdog pings so systemd restarts us")
            self.notifier.status("unhealthy: a worker stopped responding; awaiting restart")
        self._was_healthy = ok
        return ok

    def run(self) -> None:
        """Check at once, then every period, until the stop event is set."""
        self.check()
        while not self._stop.wait(self.period):
            self.check()

    def start(self) -> threading.Thread:
        """Run in a daemon thread named ``sd-watchdog``; join it after setting the stop event."""
        thread = threading.Thread(target=self.run, name="sd-watchdog", daemon=True)
        thread.start()
        return thread
