"""``with part:`` for the agent's long-lived parts: started on the way in, closed on the way out.

The MQTT client, the request service and its worker, the approval coordinator and the control
socket each have ``start()`` and an idempotent ``close()``; :class:`StartStop` gives them the
context-manager protocol once instead of once per class.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, TypeVar


class Startable(Protocol):
    """A part that starts and closes (``close`` idempotent)."""

    def start(self) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=Startable)


class StartStop:
    """Mixin: ``with part:`` calls ``part.start()``, then ``part.close()`` however it ends."""

    def __enter__(self: S) -> S:
        self.start()
        return self

    def __exit__(
        self: Startable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
