"""``with part:`` for the agent's parts, in one place instead of once per class.

:class:`Closing` is for a part that is ready once made (a log, a store, the vault, a reader):
the block gives the part back and closes it however the block ends. :class:`StartStop` is for a
long-lived part with ``start()`` (the MQTT client, the request service and its worker, the
approval coordinator, the control socket): started on the way in, closed on the way out. Every
``close()`` is idempotent. :func:`stack_of` says where a thread that would not stop is stuck;
:func:`guard_exit` ends a process whose exit hangs, saying where.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import traceback
from types import TracebackType
from typing import Protocol, Self, TypeVar


class Closeable(Protocol):
    """A part that closes (``close`` idempotent)."""

    def close(self) -> None: ...


class Startable(Closeable, Protocol):
    """A part that starts and closes."""

    def start(self) -> None: ...


S = TypeVar("S", bound=Startable)


class Closing:
    """Mixin: ``with part:`` gives ``part`` back, then calls ``part.close()`` however it ends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self: Closeable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class StartStop(Closing):
    """Mixin: ``with part:`` calls ``part.start()``, then ``part.close()`` however it ends."""

    def __enter__(self: S) -> S:
        self.start()
        return self


def stack_of(thread: threading.Thread) -> str:
    """Where ``thread`` is now, as a Python traceback (most recent call last).

    For the log line of a thread that did not stop in time: without it a hang at shutdown on
    a device leaves only "did not stop", and nothing to tell a stuck camera driver from a bug.
    """
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "  (the thread has no Python frame: it has ended or is starting)"
    return "".join(traceback.format_stack(frame)).rstrip()


def guard_exit(seconds: float) -> None:
    """Once the agent has stopped: if the process is still alive ``seconds`` later, write every
    thread's traceback to stderr and exit 1.

    A thread stuck in a C call (a wedged camera driver) can keep the interpreter from exiting;
    without this the process would sit there until systemd's SIGKILL, leaving nothing in the
    journal to say why. Only for a process that is about to exit: the timer is process-wide.
    """
    faulthandler.dump_traceback_later(seconds, exit=True)
