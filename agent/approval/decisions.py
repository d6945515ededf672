"""The ``decisions`` table in ``requests.db``: owner decisions that outlive the daemon.

Two kinds of rows:

- ``queued``: ``doorbell-agent approve|deny J`` while the daemon is not running. The daemon
  applies them, oldest first, at start and on every tick (so one stored while it was starting is
  not missed), evaluated at the moment the owner made them, and marks them ``applied`` or
  ``refused`` (with the reason).
- ``factor``: with ``approval.require: all``, an app or CLI approval that waits for the button.
  The newest one per request is that request's first factor, so it survives a restart inside
  the confirmation window.

The table lives in the store's database and is written through its transactions, so decisions
commit atomically with respect to the daemon's and the CLI's other writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from agent.approval.machine import Factor
from agent.requests.store import RequestStore, db_time
from agent.timeutil import parse_rfc3339
from agent.vocabulary import Channel

Action = Literal["approve", "deny"]
ACTIONS: Final = ("approve", "deny")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    jti TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('approve', 'deny')),
    channel TEXT NOT NULL CHECK (channel IN ('button', 'app', 'cli')),
    made_at TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'factor', 'applied', 'refused')),
    note TEXT
)
"""
_INDEX: Final = "CREATE INDEX IF NOT EXISTS decisions_by_jti ON decisions (jti, state)"


@dataclass(frozen=True)
class Decision:
    """One stored decision."""

    id: int
    jti: str
    action: Action
    channel: Channel
    made_at: datetime
    state: str
    note: str | None


class DecisionLog:
    """Reads and writes the ``decisions`` table through a :class:`RequestStore`."""

    def __init__(self, store: RequestStore) -> None:
        self._store = store
        with store.transaction() as conn:
            conn.execute(_SCHEMA)
            conn.execute(_INDEX)

    def queue(self, jti: str, action: Action, channel: Channel, made_at: datetime) -> Decision:
        """Store a decision for the daemon to apply at its next start.

        Raises ValueError if a decision for ``jti`` is already waiting.
        """
        if action not in ACTIONS:
            raise ValueError(f"action must be approve or deny, not {action!r}")
        with self._store.transaction() as conn:
            waiting = conn.execute(
                "SELECT action FROM decisions WHERE jti = ? AND state = 'queued'", (jti,)
            ).fetchone()
            if waiting is not None:
                raise ValueError(f"a decision to {waiting[0]} request {jti} is already waiting")
            row_id = conn.execute(
                "INSERT INTO decisions (jti, action, channel, made_at, state) "
                "VALUES (?, ?, ?, ?, 'queued')",
                (jti, action, channel.value, db_time(made_at)),
            ).lastrowid
        assert row_id is not None
        return Decision(row_id, jti, action, channel, made_at, "queued", None)

    def queued(self) -> list[Decision]:
        """Decisions waiting for the daemon, oldest first."""
        return self._select("state = 'queued'", ())

    def settle(self, decision_id: int, applied: bool, note: str | None = None) -> bool:
        """Mark a queued decision applied or refused; False if it was no longer queued."""
        with self._store.transaction() as conn:
            changed = conn.execute(
                "UPDATE decisions SET state = ?, note = ? WHERE id = ? AND state = 'queued'",
                ("applied" if applied else "refused", note, decision_id),
            ).rowcount
        return changed > 0

    def record_factor(self, jti: str, factor: Factor) -> None:
        """Remember a first factor (``require: all``) for ``jti``."""
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO decisions (jti, action, channel, made_at, state) "
                "VALUES (?, 'approve', ?, ?, 'factor')",
                (jti, factor.channel.value, db_time(factor.at)),
            )

    def first_factor(self, jti: str) -> Factor | None:
        """The newest first factor recorded for ``jti``."""
        rows = self._select("jti = ? AND state = 'factor'", (jti,))
        if not rows:
            return None
        newest = max(rows, key=lambda d: (d.made_at, d.id))
        return Factor(newest.channel, newest.made_at)

    def for_request(self, jti: str) -> list[Decision]:
        """Every decision stored for ``jti``, oldest first."""
        return self._select("jti = ?", (jti,))

    def _select(self, where: str, params: tuple[str, ...]) -> list[Decision]:
        with self._store.transaction() as conn:
            rows = conn.execute(
                "SELECT id, jti, action, channel, made_at, state, note FROM decisions "  # noqa: S608
                f"WHERE {where} ORDER BY made_at, id",
                params,
            ).fetchall()
        return [
            Decision(
                id=int(r[0]),
                jti=str(r[1]),
                action="approve" if r[2] == "approve" else "deny",
                channel=Channel(r[3]),
                made_at=parse_rfc3339(str(r[4])),
                state=str(r[5]),
                note=r[6],
            )
            for r in rows
        ]
