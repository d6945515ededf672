"""Is the system clock synchronised? And what that means for the agent, in words for ``status``.

A Raspberry Pi has no battery-backed real-time clock. After a power cut it boots with the time
it last saved (Raspberry Pi OS's ``fake-hwclock``) or the firmware's epoch, and keeps that until
NTP answers over the network, which may be never if the network is down. The agent keeps
recording regardless (a doorbell that refuses to run without NTP helps nobody), so ``status``
must say plainly when the clock cannot be trusted and what that does to the time-based checks.

Two probes, best first: ``timedatectl show -p NTPSynchronized --value`` (systemd's view, through
D-Bus), then the kernel's own NTP state through ``adjtimex(2)`` with no modes set (a read that
needs no privilege). Parsing and the decision are pure functions; the probes are thin.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

# From <sys/timex.h>.
STA_UNSYNC = 0x0040
# The kernel caps maxerror at NTP_PHASE_LIMIT (16 s) and sets STA_UNSYNC when it gets there;
# below it, some NTP client vouched for the clock recently.
MAXERROR_LIMIT_US = 16_000_000

Source = Literal["timedatectl", "adjtimex", "none"]


@dataclass(frozen=True)
class ClockState:
    """The answer: ``synchronised`` is None when no probe could tell."""

    synchronised: bool | None
    source: Source
    detail: str


def parse_timedatectl(output: str) -> bool | None:
    """Read ``timedatectl show -p NTPSynchronized --value`` output: ``yes``/``no``, else None."""
    value = output.strip().lower()
    if value == "yes":
        return True
    if value == "no":
        return False
    return None


def synchronised_from_adjtimex(status: int, maxerror_us: int) -> bool:
    """The kernel's verdict from ``struct timex``: synchronised unless ``STA_UNSYNC`` says no.

    Some NTP clients (chrony without ``rtcsync``) keep ``STA_UNSYNC`` set on a synchronised
    clock just to stop the kernel from writing the RTC; systemd therefore trusts the maximum
    error instead, and so do we when the flag is set: an error estimate below the kernel's
    16 s cap means a client has disciplined the clock recently.
    """
    if not status & STA_UNSYNC:
        return True
    return maxerror_us < MAXERROR_LIMIT_US


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h>; the trailing padding is part of the kernel ABI.
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    )


def probe_adjtimex() -> tuple[int, int] | None:
    """``(status, maxerror_us)`` from ``adjtimex(2)`` in read-only mode, or None if refused.

    Inside the systemd unit ``ProtectClock=yes`` filters this call out, so there the
    ``timedatectl`` probe is the one that answers.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        adjtimex = libc.adjtimex
    except (OSError, AttributeError) as exc:
        log.debug("adjtimex unavailable: %s", exc)
        return None
    timex = _Timex()  # modes = 0: read only
    if adjtimex(ctypes.byref(timex)) < 0:
        log.debug("adjtimex refused: %s", os.strerror(ctypes.get_errno()))
        return None
    return int(timex.status), int(timex.maxerror)


def probe_timedatectl(timeout: float = 5.0) -> str | None:
    """Raw ``timedatectl show -p NTPSynchronized --value`` output, or None if it cannot answer."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C", "SYSTEMD_PAGER": ""},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("timedatectl failed: %s", exc)
        return None
    if done.returncode != 0:
        # Typical in containers: "System has not been booted with systemd as init system".
        log.debug("timedatectl exited %d: %s", done.returncode, done.stderr.strip())
        return None
    return done.stdout


def clock_state(
    timedatectl: Callable[[], str | None] = probe_timedatectl,
    adjtimex: Callable[[], tuple[int, int] | None] = probe_adjtimex,
) -> ClockState:
    """Ask ``timedatectl`` first, then the kernel; ``source="none"`` when neither answers."""
    raw = timedatectl()
    if raw is not None:
        verdict = parse_timedatectl(raw)
        if verdict is not None:
            return ClockState(verdict, "timedatectl", f"NTPSynchronized={raw.strip()}")
    kernel = adjtimex()
    if kernel is not None:
        status, maxerror = kernel
        flag = "set" if status & STA_UNSYNC else "clear"
        detail = f"STA_UNSYNC {flag}, maxerror {maxerror / 1e6:.3f} s"
        return ClockState(synchronised_from_adjtimex(status, maxerror), "adjtimex", detail)
    return ClockState(None, "none", "neither timedatectl nor adjtimex(2) answered")


UNSYNCHRONISED_NOTE = (
    "The system clock is not synchronised (no NTP time yet; a Raspberry Pi has no battery-backed "
    "clock, so after a power cut it may be hours or days off). The agent keeps recording and "
    "every time-based check uses this clock as it is: a valid request may be rejected as "
    "not_yet_valid (its iat looks like the future) and an expired one may be taken as pending; "
    "a request window may miss clips or cover the wrong ones, because clip start/end times, "
    "audit-log timestamps and signed iat values carry this clock's time; retention may shred "
    "clips early or keep them late; approval timeouts count from the wrong moment. Replay "
    "protection (jti) and the owner's approval of each request do not depend on the clock: "
    "nothing leaves the device without an approval. Check the network and NTP "
    "(timedatectl timesync-status); the checks are right again once the clock is."
)

UNKNOWN_NOTE = (
    "Whether the system clock is synchronised is unknown (neither timedatectl nor adjtimex(2) "
    "answered). Time-based checks (request iat/exp and windows, retention, approval timeouts) "
    "use this clock as it is; if it is wrong they are wrong in the same way. Replay protection "
    "and the owner's approval of each request do not depend on the clock."
)


def status_line(state: ClockState) -> str:
    """One line for ``doorbell-agent status``."""
    if state.synchronised is True:
        return f"clock: synchronised ({state.source}: {state.detail})"
    if state.synchronised is False:
        return f"clock: NOT synchronised ({state.source}: {state.detail})"
    return f"clock: synchronisation unknown ({state.detail})"


def status_text(state: ClockState) -> str:
    """The ``status`` text: the line, plus what it means when the clock cannot be trusted."""
    if state.synchronised is True:
        return status_line(state)
    note = UNSYNCHRONISED_NOTE if state.synchronised is False else UNKNOWN_NOTE
    return f"{status_line(state)}\n{note}"


def status_json(state: ClockState) -> dict[str, Any]:
    """The clock part of ``doorbell-agent status --json``."""
    note: str | None = None
    if state.synchronised is False:
        note = UNSYNCHRONISED_NOTE
    elif state.synchronised is None:
        note = UNKNOWN_NOTE
    return {
        "synchronised": state.synchronised,
        "source": state.source,
        "detail": state.detail,
        "note": note,
    }
