"""Time and size notation shared by the config, the protocol and the CLI.

Durations are written ``30s``, ``5m``, ``1h``, ``7d`` (also ``250ms``); sizes ``512KiB``,
``2GiB`` (also plain bytes and SI ``MB``). Timestamps on the wire are RFC 3339 UTC.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Final, TypeGuard

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|kB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """Parse ``30s``/``5m``/``1h``/``7d`` (or a number of seconds) into a timedelta.

    Raises ValueError with a message saying what is allowed.
    """
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or 7d")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = value
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds is not None:
        if not math.isfinite(seconds):
            raise ValueError(f"{value!r} is not a finite duration")
        try:
            return timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{value!r} is too long a duration") from None
    raise ValueError(f"{value!r} is not a duration; write it as 30s, 5m, 1h or 7d")


def format_duration(value: timedelta) -> str:
    """Render a timedelta in the largest unit that divides it exactly (``7d``, ``90s``)."""
    ms = round(value.total_seconds() * 1000)
    for unit, factor in (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms % factor == 0 and ms:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"


def parse_size(value: str | int) -> int:
    """Parse ``512KiB``/``2GiB``/``1000`` into a byte count. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512KiB or 2GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"{value!r} is not a size; write it as 512KiB, 64MiB or 2GiB")


def format_size(n: int) -> str:
    """Render a byte count with a binary unit for humans (``1.5 MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with a ``Z`` suffix (milliseconds kept if any)."""
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text: str) -> datetime:
    """Parse a strict RFC 3339 timestamp (offset required) into an aware UTC datetime.

    Raises ValueError for anything else, including naive timestamps.
    """
    if not isinstance(text, str) or not _RFC3339_RE.match(text):
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp such as 2026-01-31T12:00:00Z")
    norm = text.upper().replace("Z", "+00:00")
    frac = re.search(r"\.(\d+)", norm)
    if frac and len(frac.group(1)) > 6:
        norm = norm.replace(frac.group(0), "." + frac.group(1)[:6])
    return datetime.fromisoformat(norm).astimezone(UTC)


def to_epoch(moment: datetime) -> int:
    """Whole seconds since the epoch (for JWT ``iat``/``exp``)."""
    return int(moment.timestamp())


EPOCH_MIN: Final = 946684800
"""2000-01-01T00:00:00Z: the earliest time value a protocol message may carry (CONTRACT §3)."""
EPOCH_MAX: Final = 253402300799
"""9999-12-31T23:59:59Z: the latest one (and the last second a ``datetime`` can hold)."""


TIME_MIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""EPOCH_MIN as a datetime: the range of every time value a requester may send."""
TIME_MAX: Final = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
"""The end of that range (the last instant a ``datetime`` can hold)."""


def epoch_in_range(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a JSON integer (not a bool, not a float) within EPOCH_MIN..EPOCH_MAX.

    Every requester-supplied epoch time passes this before anything converts or stores it.
    """
    return (
        isinstance(value, int) and not isinstance(value, bool) and EPOCH_MIN <= value <= EPOCH_MAX
    )


def from_epoch(seconds: float) -> datetime:
    """An aware UTC datetime from seconds since the epoch.

    Raises ValueError (never OverflowError/OSError) for a value no datetime can hold.
    """
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"{seconds!r} s since the epoch is not a representable time") from exc


def clamp_epoch(value: object) -> datetime:
    """A stored epoch time read back tolerantly: clamped into EPOCH_MIN..EPOCH_MAX, and
    EPOCH_MIN for anything that is not a number. For records written by older agents (which
    stored whatever a requester signed); never raises."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return datetime.fromtimestamp(EPOCH_MIN, UTC)
    return datetime.fromtimestamp(min(max(value, EPOCH_MIN), EPOCH_MAX), UTC)
