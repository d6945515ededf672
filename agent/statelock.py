"""One ``doorbell-agent run`` per state directory (contract §8).

Two daemons on one state directory would share the device key, the audit log, the vault and
the broker session: the second kicks the first off the broker and writes ``agent_started`` /
``agent_stopped`` into the real log. :class:`StateLock` is an exclusive ``flock`` on
``state_dir/run.lock``, taken before anything else is opened; the kernel drops it when the
process dies however it dies (kill -9 included), so a stale lock never blocks a restart.

The holder writes its pid into the file after it got the lock, so that a refused ``run`` can
name the process it lost to. The file is never truncated before the lock is held: a refused
``run`` changes nothing in the state directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from agent.errors import AgentError, StateLockedError
from agent.paths import StatePaths

_PID_BYTES = 32

def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file, as text for a message."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii").strip()
        if text.isdigit():
            return f"pid {text}"
    return "a process that has not written its pid yet"


class StateLock:
    """An exclusive, non-blocking lock on ``state_dir/run.lock`` held until :meth:`release`
    (or process exit). Raises :class:`StateLockedError` naming the holder when it is taken."""

    def __init__(self, state_dir: Path) -> None:
        self.path = StatePaths(state_dir).run_lock
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StateLockedError (nothing in the directory is changed then)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AgentError(f"cannot open the run lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AgentError(f"cannot lock {self.path}: {exc.strerror}") from None
            raise StateLockedError(
                f"another doorbell-agent run ({holder}) is using the state directory "
                f"{self.path.parent}",
                hint="only one agent may run per state directory; stop the other one first "
                "(systemctl stop doorbell-agent) or give this one its own state_dir",
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the lock holds without the pid; a refused run then says so
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases it). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            # A stale pid would name the wrong process to the next refused run.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
