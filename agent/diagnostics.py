"""Saying where a part is stuck when it does not stop in time.

A hang at shutdown on a device would otherwise leave only "did not stop" in the journal, with
nothing to tell a wedged camera driver from a bug: :func:`stack_of` gives a thread's traceback
for the log line, and :func:`guard_exit` ends a process whose exit hangs with every thread's.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import traceback


def stack_of(thread: threading.Thread) -> str:
    """Where ``thread`` is now, as a Python traceback (most recent call last), for the log
    line of a thread that did not stop in time."""
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
