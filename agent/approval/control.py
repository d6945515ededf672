"""The owner's local control channel: a Unix socket ``agent.sock`` in the state directory.

The daemon serves it; ``doorbell-agent approve|deny`` talk to it so a decision takes effect at
once. The socket file is created mode 0600 inside the 0700 state directory, and every connection's
peer credentials (``SO_PEERCRED``) are checked: only the daemon's own user (or root) is served.

Protocol: one JSON object per line each way. Request ``{"op": "decide", "jti": J, "action":
"approve"|"deny"}`` or ``{"op": "redeliver", "jti": J}`` (§5.2); reply ``{"ok": true,
"result": {...}}`` or ``{"ok": false, "error": CODE, "message": TEXT}`` with CODE one of
``not_found``, ``refused``, ``audit_failed``, ``bad_request``, ``internal``. Decisions over the
socket are always recorded as channel ``cli``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from agent.approval.decisions import ACTIONS, Action
from agent.errors import (
    AgentError,
    ApprovalError,
    AuditWriteError,
    RequestNotFoundError,
    StateError,
)
from agent.lifecycle import StartStop
from agent.paths import StatePaths
from agent.vocabulary import Channel

log = logging.getLogger(__name__)

MAX_LINE: Final = 4096
_UCRED = struct.Struct("3i")

DecideHandler = Callable[[str, Action, Channel], dict[str, object]]
RedeliverHandler = Callable[[str, Channel], dict[str, object]]


class DaemonUnavailableError(Exception):
    """Nobody is serving the control socket (the daemon is not running)."""


def socket_path(state_dir: Path) -> Path:
    """Where the control socket lives."""
    return StatePaths(state_dir).control_socket


def _peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        part = conn.recv(MAX_LINE)
        if not part:
            break
        data += part
        if len(data) > MAX_LINE:
            raise ValueError("request line too long")
    return data.split(b"\n", 1)[0]


class ControlServer(StartStop):
    """Serves the control socket on a background thread; a context manager."""

    def __init__(
        self,
        path: Path,
        decide: DecideHandler,
        *,
        redeliver: RedeliverHandler | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self._decide = decide
        self._redeliver = redeliver
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind the socket (0600) and start serving; refuses if another daemon serves it."""
        if self._sock is not None:
            return
        if self.path.exists() or self.path.is_symlink():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    live = False
                else:
                    live = True
            if live:
                raise StateError(
                    f"{self.path} is in use: another doorbell-agent is running",
                    hint="stop it first (systemctl stop doorbell-agent)",
                )
            self.path.unlink()  # a stale socket from a run that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            with conn:
                conn.settimeout(self._timeout)
                try:
                    self._handle(conn)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # The client went away before our answer (killed, or its output closed):
                    # its business, not a fault of the agent. A decision it asked for is
                    # applied and audited either way.
                    log.debug("control socket client left before the answer: %s", exc)
                except OSError as exc:
                    log.warning("control socket connection failed: %s", exc)

    def _handle(self, conn: socket.socket) -> None:
        uid = _peer_uid(conn)
        if uid not in (os.getuid(), 0):
            log.warning("control socket: refused a connection from uid %d", uid)
            conn.sendall(_encode(_error("refused", "not the device owner")))
            return
        try:
            request = json.loads(_read_line(conn))
        except (ValueError, UnicodeDecodeError):
            conn.sendall(_encode(_error("bad_request", "expected one JSON object per line")))
            return
        conn.sendall(_encode(self.dispatch(request)))

    def dispatch(self, request: Any) -> dict[str, object]:
        """Answer one decoded request (the protocol's pure core)."""
        op = request.get("op") if isinstance(request, dict) else None
        if op not in ("decide", "redeliver") or (op == "redeliver" and self._redeliver is None):
            return _error("bad_request", 'the operations are "decide" and "redeliver"')
        assert isinstance(request, dict)
        jti, action = request.get("jti"), request.get("action")
        if not isinstance(jti, str) or (op == "decide" and action not in ACTIONS):
            return _error("bad_request", "decide needs a jti and an action (approve or deny)")
        try:
            if op == "redeliver":
                assert self._redeliver is not None
                result = self._redeliver(jti, Channel.CLI)
            else:
                result = self._decide(
                    jti, "approve" if action == "approve" else "deny", Channel.CLI
                )
        except RequestNotFoundError as exc:
            return _error("not_found", exc.message)
        except ApprovalError as exc:
            return _error("refused", exc.message)
        except AuditWriteError as exc:
            return _error("audit_failed", f"the decision could not be audited: {exc.message}")
        except AgentError as exc:
            return _error("internal", exc.message)
        except Exception:
            log.exception("control socket: decide failed")
            return _error("internal", "the agent failed to apply the decision; see its log")
        return {"ok": True, "result": result}

    def close(self) -> None:
        """Stop serving and remove the socket file. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _error(code: str, message: str) -> dict[str, object]:
    return {"ok": False, "error": code, "message": message}


def _encode(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def send_decision(path: Path, jti: str, action: Action, *, timeout: float = 30.0) -> dict[str, Any]:
    """Ask the running daemon to apply a decision; returns the result object.

    Raises DaemonUnavailableError when no daemon serves ``path``, RequestNotFoundError or
    ApprovalError as the daemon reports them, and AuditWriteError/AgentError otherwise.
    """
    return _call(path, {"op": "decide", "jti": jti, "action": action}, timeout)


def send_redeliver(path: Path, jti: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Ask the running daemon to send request ``jti``'s footage again (§5.2); errors as
    :func:`send_decision`."""
    return _call(path, {"op": "redeliver", "jti": jti}, timeout)


def _call(path: Path, payload: dict[str, object], timeout: float) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailableError(str(exc)) from None
        sock.sendall(_encode(payload))
        line = _read_line(sock)
    finally:
        sock.close()
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise AgentError("the agent's control socket sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise AgentError("the agent's control socket sent a malformed reply")
    if reply.get("ok") is True and isinstance(reply.get("result"), dict):
        result: dict[str, Any] = reply["result"]
        return result
    message = str(reply.get("message", "the agent refused the decision"))
    code = reply.get("error")
    if code == "not_found":
        raise RequestNotFoundError(message, hint="`doorbell-agent pending` lists pending requests")
    if code == "refused":
        raise ApprovalError(message)
    if code == "audit_failed":
        raise AuditWriteError(message, hint="check the state directory's disk")
    raise AgentError(message)
