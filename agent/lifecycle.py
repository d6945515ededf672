"""``with part:`` for the agent's parts, in one place instead of once per class.

:class:`Closing` is for a part that is ready once made (a log, a store, the vault, a reader):
the block gives the part back and closes it however the block ends. :class:`StartStop` is for a
long-lived part with ``start()`` (the MQTT client, the request service and its worker, the
approval coordinator, the control socket): started on the way in, closed on the way out. Every
``close()`` is idempotent.
"""

from __future__ import annotations

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
