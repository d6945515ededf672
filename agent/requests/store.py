"""``requests.db``: requester trust store, replay cache and request records (SQLite adapter).

One SQLite file in the state directory (WAL, ``synchronous=FULL``), shared by the daemon and the
CLI: ``requesters add|revoke`` and ``approve|deny`` run while ``run`` runs, and each side sees the
other's changes on its next query (nothing about requesters is cached across calls).

Tables:

- ``requesters``: enrolled keys; ``kid`` is unique for ever, so a revoked key can never be
  enrolled again (make a new key instead).
- ``replay``: every jti the device has recorded, kept until ``exp + clock_skew`` — past that the
  request is expired whatever it says, so it can never be accepted again anyway.
- ``requests``: one row per recorded request (``jti`` is the id). A jti goes into ``replay`` and
  ``requests`` in the same transaction that decides it, so a crash cannot let it in twice.

Status transitions: ``set_status`` enforces
:data:`agent.vocabulary.TRANSITIONS` as a compare-and-set.

Deliveries (§5, §5.2): ``release_salts`` keeps each request's random commitment salt;
``deliveries`` one row per delivery attempt (numbered from 1 across retries and re-deliveries)
with its files and, once recorded, its manifest's SHA-256 (a receipt must name the newest);
``redeliveries`` the owner's redeliver decisions.

A ``rejected`` row is also written directly for a signed request that broke a claim rule, while
the requester is under its rate limit (so a misbehaving requester cannot fill the disk).
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit import AuditSink
from agent.errors import (
    DeliveryError,
    DeliveryRevokedError,
    RequesterNotFoundError,
    RequestError,
    RequestNotFoundError,
)
from agent.keys import kid_for, public_jwk, raw_public_bytes
from agent.lifecycle import Closing
from agent.paths import StatePaths
from agent.requests.verify import (
    RATE_WINDOW,
    REQUESTER_ID_RE,
    REQUESTER_KINDS,
    Rejection,
    RequestPolicy,
    TrustedKey,
    VerifiedRequest,
    VerifyResult,
)
from agent.timeutil import TIME_MIN, clamp_epoch, parse_rfc3339, rfc3339, utcnow
from agent.vocabulary import TRANSITIONS, Status, request_audit_fields

# Columns set_status may change besides status itself (the rest describe the signed request).
MUTABLE_FIELDS: Final = frozenset(
    {"error", "detail", "channel", "decided_at", "clips", "finished_at", "responded"}
)
MAX_NAME: Final = 200
MAX_CONTACT: Final = 1000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS requesters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    public_key BLOB NOT NULL,
    kid TEXT NOT NULL UNIQUE,
    contact TEXT,
    added_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS replay (
    jti TEXT PRIMARY KEY,
    keep_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replay_keep_until ON replay (keep_until);
CREATE TABLE IF NOT EXISTS requests (
    jti TEXT PRIMARY KEY,
    requester TEXT NOT NULL REFERENCES requesters (id),
    kid TEXT NOT NULL,
    window_start TEXT,
    window_end TEXT,
    reason TEXT,
    legal_basis TEXT,
    legal_ref TEXT,
    case_ref TEXT,
    recipient TEXT,
    iat INTEGER NOT NULL,
    exp INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    detail TEXT,
    channel TEXT,
    decided_at TEXT,
    clips INTEGER,
    finished_at TEXT,
    correlation BLOB,
    responded TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_requester ON requests (requester, received_at);
CREATE INDEX IF NOT EXISTS requests_by_status ON requests (status);
CREATE TABLE IF NOT EXISTS release_salts (
    jti TEXT PRIMARY KEY REFERENCES requests (jti),
    salt BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    jti TEXT NOT NULL REFERENCES requests (jti),
    attempt INTEGER NOT NULL,
    redelivery INTEGER NOT NULL,
    files TEXT NOT NULL,
    manifest_sha256 TEXT,
    started_at TEXT NOT NULL,
    PRIMARY KEY (jti, attempt)
);
CREATE TABLE IF NOT EXISTS redeliveries (
    jti TEXT NOT NULL REFERENCES requests (jti),
    channel TEXT NOT NULL,
    decided_at TEXT NOT NULL
);
"""

_SELECT_REQUESTS: Final = (
    "SELECT r.jti, r.requester, q.name, q.kind, r.kid, r.window_start, r.window_end, r.reason, "
    "r.legal_basis, r.legal_ref, r.case_ref, r.recipient, r.iat, r.exp, r.received_at, r.status, "
    "r.error, r.detail, r.channel, r.decided_at, r.clips, r.finished_at, r.correlation, "
    "r.responded, r.updated_at FROM requests r JOIN requesters q ON q.id = r.requester"
)


def db_time(moment: datetime) -> str:
    """Fixed-width UTC text (microseconds always present) so that SQL string order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _from_db(text: str | None) -> datetime | None:
    return None if text is None else parse_rfc3339(text)


def _stored_time(value: object) -> datetime | None:
    """A stored timestamp read back tolerantly: None when it is absent or not one.

    Rows written by older agents hold whatever a requester signed; reading one back must never
    stop the daemon, a restart, ``requests list`` or the app (see :func:`_record`).
    """
    if not isinstance(value, str):
        return None
    try:
        return parse_rfc3339(value)
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True)
class Requester:
    """An enrolled requester."""

    id: str
    name: str
    kind: str
    public_key: Ed25519PublicKey
    kid: str
    contact: str | None
    added_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        """Whether the requester has been revoked."""
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        """The ``requesters list --json`` form."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "kid": self.kid,
            "public_jwk": public_jwk(self.public_key),
            "contact": self.contact,
            "added_at": rfc3339(self.added_at),
            "revoked_at": rfc3339(self.revoked_at) if self.revoked_at else None,
        }


@dataclass(frozen=True)
class RequestRecord:
    """One stored request with its requester's display name and kind."""

    jti: str
    requester_id: str
    requester_name: str
    kind: str
    kid: str
    window_start: datetime | None
    window_end: datetime | None
    reason: str | None
    legal_basis: str | None
    legal_ref: str | None
    case: str | None
    recipient: str | None
    iat: datetime
    exp: datetime
    received_at: datetime
    status: str
    error: str | None
    detail: str | None
    channel: str | None
    decided_at: datetime | None
    clips: int | None
    finished_at: datetime | None
    correlation: bytes | None
    responded: str | None
    updated_at: datetime

    def audit_fields(self) -> dict[str, Any]:
        """The fields naming this request in its audit entries (contract §7)."""
        return request_audit_fields(
            jti=self.jti,
            requester=self.requester_id,
            kid=self.kid,
            window=(
                rfc3339(self.window_start) if self.window_start else None,
                rfc3339(self.window_end) if self.window_end else None,
            ),
            reason=self.reason,
            legal_basis=self.legal_basis,
            legal_ref=self.legal_ref,
            case=self.case,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``pending --json`` / ``requests list --json`` form (id = jti)."""
        return {
            "id": self.jti,
            "requester": self.requester_id,
            "requester_name": self.requester_name,
            "kind": self.kind,
            "window": {
                "start": rfc3339(self.window_start) if self.window_start else None,
                "end": rfc3339(self.window_end) if self.window_end else None,
            },
            "reason": self.reason,
            "legal_basis": self.legal_basis,
            "legal_ref": self.legal_ref,
            "case": self.case,
            "status": self.status,
            "error": self.error,
            "channel": self.channel,
            "received_at": rfc3339(self.received_at),
            "expires_at": rfc3339(self.exp),
            "decided_at": rfc3339(self.decided_at) if self.decided_at else None,
        }


@dataclass(frozen=True)
class DeliveryAttempt:
    """One recorded delivery attempt of a request."""

    attempt: int
    redelivery: bool
    files: tuple[dict[str, Any], ...]
    """Each released file: ``id``, ``start``, ``end``, ``clip`` (the stored clip's id)..."""
    manifest_sha256: str | None
    started_at: datetime


@dataclass(frozen=True)
class Revocation:
    """What ``revoke_requester`` did: the requester, and the pending requests it cancelled."""

    requester: Requester
    cancelled: list[RequestRecord]
    already_revoked: bool


def validate_requester(requester_id: str, name: str, kind: str, contact: str | None) -> None:
    """Raise RequestError (with a hint) when an enrolment field breaks the contract's rules."""
    if not REQUESTER_ID_RE.fullmatch(requester_id):
        raise RequestError(
            f"requester id {requester_id!r} is invalid",
            hint="use 1-64 characters of a-z, 0-9 and -",
        )
    if not 1 <= len(name.strip()) <= MAX_NAME or not name.isprintable():
        raise RequestError(
            "the display name must be 1-200 printable characters",
            hint='quote names with spaces: --name "City Police Dept"',
        )
    if kind not in REQUESTER_KINDS:
        raise RequestError(
            f"requester kind {kind!r} is invalid", hint=f"use one of {', '.join(REQUESTER_KINDS)}"
        )
    if contact is not None and (len(contact) > MAX_CONTACT or not contact.isprintable()):
        raise RequestError(
            f"the contact text must be at most {MAX_CONTACT} printable characters",
            hint='one line, e.g. --contact "records@pd.example, +1 555 0100"',
        )


class RequestStore(Closing):
    """The SQLite adapter; thread-safe (one connection behind a lock), a context manager.

    It is also the :class:`agent.requests.verify.TrustView` and ``ReplayView`` the verifier reads.
    """

    def __init__(self, path: Path | str, *, now: Callable[[], datetime] = utcnow) -> None:
        self.path = Path(path)
        self._now = now
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._fd = -1
        # Created 0600 before SQLite opens it: it holds who may ask for footage and what they
        # asked. The creator holds an flock until its schema is committed, so another process
        # opening the store meanwhile waits instead of taking it for a wiped one. The descriptor
        # stays open while the store is: closing it would drop SQLite's POSIX locks on the file.
        try:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                self._fd = os.open(self.path, os.O_RDONLY)
                created = False
        except OSError as exc:
            raise RequestError(f"cannot open the request store {self.path}: {exc}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX if created else fcntl.LOCK_SH)
            self._open_db(created)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:
            self.close()
            raise

    def _open_db(self, created: bool) -> None:
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction() as conn:
                found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'requests'")
                if not created and found.fetchone() is None:
                    # Starting afresh would silently forget enrolled requesters, pending
                    # requests and the replay cache (old tokens would be accepted again).
                    raise RequestError(
                        f"the request store {self.path} is empty: it was wiped or truncated; "
                        "refusing to start a new one in its place",
                        hint="restore requests.db from a backup; if this device never enrolled "
                        "a requester, delete the file",
                    )
                # One statement at a time: executescript() would commit our transaction first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
        except sqlite3.DatabaseError as exc:
            raise RequestError(
                f"the request store {self.path} is damaged: {exc}",
                hint="restore requests.db from a backup; the agent does not replace it (it holds "
                "the enrolled requesters, pending requests and the replay cache)",
            ) from exc

    @classmethod
    def open(cls, state_dir: Path, *, now: Callable[[], datetime] = utcnow) -> RequestStore:
        """The store at ``state_dir/requests.db``."""
        return cls(StatePaths(state_dir).requests_db, now=now)

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RequestError(f"{self.path} is closed")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``) under the store lock; rolled back on error.

        For helpers that need several statements to commit together with their own checks.
        """
        with self._lock:
            conn = self._db
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # --- trust store --------------------------------------------------------------------------

    def add_requester(
        self,
        requester_id: str,
        name: str,
        kind: str,
        public_key: Ed25519PublicKey,
        contact: str | None = None,
        *,
        audit: AuditSink | None = None,
    ) -> Requester:
        """Enrol a requester; the audit entry is written before the row is committed.

        Raises RequestError for invalid fields, a taken id, or a key already enrolled (revoked
        keys included: a revoked key stays revoked).
        """
        validate_requester(requester_id, name, kind, contact)
        kid = kid_for(public_key)
        now = self._now()
        with self.transaction() as conn:
            row = conn.execute("SELECT id FROM requesters WHERE id = ?", (requester_id,)).fetchone()
            if row is not None:
                raise RequestError(
                    f"requester {requester_id} already exists",
                    hint="choose another id; `doorbell-agent requesters list` shows those enrolled",
                )
            row = conn.execute(
                "SELECT id, revoked_at FROM requesters WHERE kid = ?", (kid,)
            ).fetchone()
            if row is not None:
                state = "was revoked" if row[1] else "is already enrolled"
                raise RequestError(
                    f"this key (kid {kid}) {state} as requester {row[0]}",
                    hint="each requester needs its own key; `doorbell-request keygen` makes one",
                )
            raw = raw_public_bytes(public_key)
            conn.execute(
                "INSERT INTO requesters (id, name, kind, public_key, kid, contact, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (requester_id, name, kind, raw, kid, contact, db_time(now)),
            )
            if audit is not None:
                audit.append(
                    "requester_added", requester=requester_id, name=name, kind=kind, kid=kid,
                    contact=contact,
                )
        return self.get_requester(requester_id)

    def get_requester(self, requester_id: str) -> Requester:
        """The requester with this id; raises RequesterNotFoundError."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, kind, public_key, kid, contact, added_at, revoked_at "
                "FROM requesters WHERE id = ?",
                (requester_id,),
            ).fetchone()
        if row is None:
            raise RequesterNotFoundError(
                f"no requester {requester_id!r} is enrolled",
                hint="`doorbell-agent requesters list` shows the enrolled ones",
            )
        return _requester(row)

    def list_requesters(self) -> list[Requester]:
        """Every enrolled requester, revoked ones included, by id."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, kind, public_key, kid, contact, added_at, revoked_at "
                "FROM requesters ORDER BY id"
            ).fetchall()
        return [_requester(row) for row in rows]

    def revoke_requester(self, requester_id: str, *, audit: AuditSink | None = None) -> Revocation:
        """Revoke a requester at once and cancel its pending requests (``rejected``/``revoked``).

        The cancelled requests are returned, and stay listed by :meth:`unanswered_revocations`
        until :meth:`mark_responded` records that their ``rejected`` response went out. Revoking
        twice changes nothing and reports ``already_revoked``. Audit entries
        (``requester_revoked``, then ``request_rejected`` per cancelled request) are written
        before the change commits.
        """
        now = self._now()
        with self.transaction() as conn:
            requester = self.get_requester(requester_id)
            if requester.revoked:
                return Revocation(requester, [], already_revoked=True)
            conn.execute(
                "UPDATE requesters SET revoked_at = ? WHERE id = ?", (db_time(now), requester_id)
            )
            jtis = [
                row[0]
                for row in conn.execute(
                    "UPDATE requests SET status = ?, error = 'revoked', "
                    "detail = 'the requester was revoked', decided_at = ?, updated_at = ? "
                    "WHERE requester = ? AND status = ? RETURNING jti",
                    (Status.REJECTED, db_time(now), db_time(now), requester_id, Status.PENDING),
                ).fetchall()
            ]
            cancelled = [self.get_request(jti) for jti in sorted(jtis)]
            if audit is not None:
                audit.append(
                    "requester_revoked", requester=requester_id, kid=requester.kid,
                    cancelled=[r.jti for r in cancelled],
                )
                for record in cancelled:
                    audit.append(
                        "request_rejected", error=record.error, detail=record.detail,
                        **record.audit_fields(),
                    )
        return Revocation(self.get_requester(requester_id), cancelled, already_revoked=False)

    @contextmanager
    def release_gate(self, jti: str) -> Iterator[None]:
        """Hand one message of ``jti``'s delivery to the MQTT client inside this block.

        The block runs inside a write transaction (``BEGIN IMMEDIATE``): SQLite lets one
        writer at a time into the database, across processes, so a revocation
        (:meth:`revoke_requester`, in the CLI or the app) commits either before the block,
        which then raises DeliveryRevokedError and nothing is handed over, or after it. Keep
        the block short: it holds the store's write lock.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT q.revoked_at, r.status FROM requests r "
                "JOIN requesters q ON q.id = r.requester WHERE r.jti = ?",
                (jti,),
            ).fetchone()
            if row is None:
                raise RequestNotFoundError(f"no request {jti!r} is known")
            if row[0] is not None:
                raise DeliveryRevokedError(
                    f"the requester of request {jti} was revoked: its delivery stops"
                )
            if row[1] != Status.APPROVED:
                raise DeliveryError(f"request {jti} is {row[1]}, not approved: nothing is sent")
            yield

    def requester_revoked(self, jti: str) -> bool:
        """Whether the requester of request ``jti`` is revoked (read fresh)."""
        with self._lock:
            row = self._db.execute(
                "SELECT q.revoked_at FROM requests r JOIN requesters q ON q.id = r.requester "
                "WHERE r.jti = ?",
                (jti,),
            ).fetchone()
        if row is None:
            raise RequestNotFoundError(f"no request {jti!r} is known")
        return row[0] is not None

    def key_for_kid(self, kid: str) -> TrustedKey | None:
        """TrustView: the enrolled key with this kid, read fresh so revocations apply at once."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, kind, public_key, revoked_at FROM requesters WHERE kid = ?", (kid,)
            ).fetchone()
        if row is None:
            return None
        return TrustedKey(
            requester_id=row[0],
            kind=row[1],
            kid=kid,
            public_key=Ed25519PublicKey.from_public_bytes(row[2]),
            revoked=row[3] is not None,
        )

    # --- replay cache and rate limit ----------------------------------------------------------

    def jti_seen(self, jti: str) -> bool:
        """ReplayView: whether this jti was ever recorded (replay cache or request rows)."""
        with self._lock:
            return _jti_seen(self._db, jti)

    def recent_count(self, requester_id: str, since: datetime) -> int:
        """ReplayView: requests of this requester recorded at or after ``since``."""
        with self._lock:
            return _recent_count(self._db, requester_id, since)

    def prune_replay(self, now: datetime) -> int:
        """Forget jtis whose ``exp + clock_skew`` has passed; returns how many were dropped."""
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM replay WHERE keep_until < ?", (int(now.timestamp()),)
            ).rowcount

    # --- request records ----------------------------------------------------------------------

    def admit(
        self,
        result: VerifyResult,
        policy: RequestPolicy,
        now: datetime,
        *,
        correlation: bytes | None = None,
        audit: AuditSink | None = None,
    ) -> VerifyResult:
        """Record the verifier's answer atomically and return the final one.

        In one transaction: the jti is re-checked against the replay cache and the rate limit
        (another thread may have recorded it since the read-only verification), then burnt into
        the replay cache together with its row — ``pending`` for a verified request, ``rejected``
        for a recordable :class:`Rejection` while the requester is under its rate limit. The
        ``request_pending`` / ``request_rejected`` audit entry, when ``audit`` is given, is
        written inside the transaction (before the commit). Unverifiable results pass through
        untouched: the caller counts and logs those.
        """
        if isinstance(result, VerifiedRequest | Rejection):
            with self.transaction() as conn:
                conn.execute("DELETE FROM replay WHERE keep_until < ?", (int(now.timestamp()),))
                final = self._admit_locked(conn, result, policy, now, correlation)
                if audit is not None:
                    if isinstance(final, VerifiedRequest):
                        audit.append("request_pending", **final.audit_fields())
                    else:
                        audit.append("request_rejected", **final.audit_fields())
            return final
        return result

    def _admit_locked(
        self,
        conn: sqlite3.Connection,
        result: VerifiedRequest | Rejection,
        policy: RequestPolicy,
        now: datetime,
        correlation: bytes | None,
    ) -> VerifiedRequest | Rejection:
        if isinstance(result, Rejection) and not result.recordable:
            return result
        assert result.jti is not None
        if _jti_seen(conn, result.jti):
            return _as_rejection(result, "replayed", "this jti was seen before")
        recent = _recent_count(conn, result.requester_id, now - RATE_WINDOW)
        under_limit = recent < policy.rate_limit
        if isinstance(result, VerifiedRequest):
            if not under_limit:
                detail = f"more than {policy.rate_limit} requests in the last hour"
                return _as_rejection(result, "rate_limited", detail)
            _insert_request(conn, _verified_row(result), now, correlation, policy.clock_skew)
        elif under_limit:
            row = _rejected_row(result, now, policy.max_lifetime)
            _insert_request(conn, row, now, correlation, policy.clock_skew)
        return result

    def get_request(self, jti: str) -> RequestRecord:
        """The request with this id; raises RequestNotFoundError."""
        with self._lock:
            row = self._db.execute(_SELECT_REQUESTS + " WHERE r.jti = ?", (jti,)).fetchone()
        if row is None:
            raise RequestNotFoundError(
                f"no request {jti!r} is known",
                hint="`doorbell-agent requests list` shows every recorded request",
            )
        return _record(row)

    def list_requests(self, statuses: Iterable[str] | None = None) -> list[RequestRecord]:
        """Recorded requests, oldest first, optionally only those in ``statuses``."""
        query = _SELECT_REQUESTS
        params: tuple[str, ...] = ()
        if statuses is not None:
            params = tuple(_check_status(s) for s in statuses)
            query += f" WHERE r.status IN ({', '.join('?' * len(params))})"
        query += " ORDER BY r.received_at, r.jti"
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [_record(row) for row in rows]

    def set_status(
        self, jti: str, from_statuses: Iterable[str], to_status: str, **fields: object
    ) -> RequestRecord | None:
        """Compare-and-set: move ``jti`` to ``to_status`` only if it is in ``from_statuses``.

        ``fields`` may set error, detail, channel, decided_at, clips, finished_at, responded
        (datetimes are stored as UTC). Returns the updated record, or None when the request
        was in another status (someone else decided first). Raises RequestNotFoundError for an
        unknown jti and ValueError for a transition the state machine does not have.
        """
        sources = tuple(_check_status(s) for s in from_statuses)
        target = _check_status(to_status)
        for source in sources:
            if target not in TRANSITIONS[source]:
                raise ValueError(f"no transition from {source} to {to_status}")
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"set_status cannot change {', '.join(sorted(unknown))}")
        values = {k: db_time(v) if isinstance(v, datetime) else v for k, v in fields.items()}
        values["updated_at"] = db_time(self._now())
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self.transaction() as conn:
            exists = conn.execute("SELECT 1 FROM requests WHERE jti = ?", (jti,)).fetchone()
            if exists is None:
                raise RequestNotFoundError(f"no request {jti!r} is known")
            # Column names come from MUTABLE_FIELDS (checked above), values are bound.
            changed = conn.execute(
                f"UPDATE requests SET status = ?, {assignments} "  # noqa: S608
                f"WHERE jti = ? AND status IN ({', '.join('?' * len(sources))})",
                (to_status, *values.values(), jti, *sources),
            ).rowcount
        return self.get_request(jti) if changed else None

    def unanswered_revocations(self) -> list[RequestRecord]:
        """Requests cancelled by a revocation whose ``rejected`` response has not gone out yet.

        The CLI revokes while the daemon runs; the daemon polls this and answers each one.
        """
        return [
            r
            for r in self.list_requests([Status.REJECTED])
            if r.error == "revoked" and r.responded != Status.REJECTED
        ]

    def mark_responded(self, jti: str, status: str) -> None:
        """Record that the response for ``status`` was published for this request.

        Only a response for the request's current status counts: ``responded`` says whether
        that status was answered. Another one (the ``rejected``/``replayed`` answer to a replay
        of the token, a late acknowledgement of an earlier status) records nothing; recording
        it would make the next start answer the current status again.
        """
        _check_status(status)
        with self.transaction() as conn:
            if conn.execute(
                "UPDATE requests SET responded = ?, updated_at = ? WHERE jti = ? AND status = ?",
                (status, db_time(self._now()), jti, status),
            ).rowcount == 0 and not conn.execute(
                "SELECT EXISTS (SELECT 1 FROM requests WHERE jti = ?)", (jti,)
            ).fetchone()[0]:
                raise RequestNotFoundError(f"no request {jti!r} is known")


    # --- deliveries ---------------------------------------------------------------------------

    def release_salt(self, jti: str, make: Callable[[], bytes]) -> bytes:
        """The request's commitment salt, made with ``make`` (and kept) the first time."""
        with self.transaction() as conn:
            row = conn.execute("SELECT salt FROM release_salts WHERE jti = ?", (jti,)).fetchone()
            if row is not None:
                return bytes(row[0])
            salt = make()
            conn.execute("INSERT INTO release_salts (jti, salt) VALUES (?, ?)", (jti, salt))
            return salt

    def begin_attempt(self, jti: str) -> int:
        """Number and record a new delivery attempt of ``jti`` (1 for the first)."""
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(attempt), 0) FROM deliveries WHERE jti = ?", (jti,)
            ).fetchone()
            attempt = int(row[0]) + 1
            redelivery = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM redeliveries WHERE jti = ?)", (jti,)
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO deliveries (jti, attempt, redelivery, files, started_at) "
                "VALUES (?, ?, ?, '[]', ?)",
                (jti, attempt, int(bool(redelivery)), db_time(self._now())),
            )
        return attempt

    def record_attempt_files(self, jti: str, attempt: int, files: list[dict[str, Any]]) -> None:
        """Keep what attempt ``attempt`` releases (JSON-able dicts)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET files = ? WHERE jti = ? AND attempt = ?",
                (json.dumps(files, sort_keys=True), jti, attempt),
            )

    def record_manifest(self, jti: str, attempt: int, manifest_sha256: str) -> None:
        """Keep the SHA-256 of attempt ``attempt``'s manifest (a receipt must name it)."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE deliveries SET manifest_sha256 = ? WHERE jti = ? AND attempt = ?",
                (manifest_sha256, jti, attempt),
            )

    def attempts(self, jti: str) -> list[DeliveryAttempt]:
        """Every delivery attempt of ``jti``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT attempt, redelivery, files, manifest_sha256, started_at FROM deliveries "
                "WHERE jti = ? ORDER BY attempt",
                (jti,),
            ).fetchall()
        return [
            DeliveryAttempt(
                attempt=int(r[0]),
                redelivery=bool(r[1]),
                files=tuple(json.loads(r[2])),
                manifest_sha256=r[3],
                started_at=_stored_time(r[4]) or TIME_MIN,
            )
            for r in rows
        ]

    def newest_manifest(self, jti: str) -> DeliveryAttempt | None:
        """The newest attempt of ``jti`` that recorded a manifest, if any."""
        done = [a for a in self.attempts(jti) if a.manifest_sha256 is not None]
        return done[-1] if done else None

    def redeliver(self, jti: str, channel: str, now: datetime) -> RequestRecord | None:
        """Move a ``delivered``, ``acknowledged`` or ``failed``/``delivery_error`` request back to
        ``approved`` for another delivery, recording the owner's decision; None (nothing changed)
        when it is in none of those states or its requester is revoked."""
        with self.transaction() as conn:
            changed = conn.execute(
                "UPDATE requests SET status = ?, responded = ?, "
                "error = NULL, detail = NULL, updated_at = ? WHERE jti = ? AND "
                "(status IN (?, ?) OR (status = ? AND error = 'delivery_error')) AND requester IN "
                "(SELECT id FROM requesters WHERE revoked_at IS NULL)",
                (
                    Status.APPROVED, Status.APPROVED, db_time(now), jti,
                    Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED,
                ),
            ).rowcount
            if changed:
                conn.execute(
                    "INSERT INTO redeliveries (jti, channel, decided_at) VALUES (?, ?, ?)",
                    (jti, channel, db_time(now)),
                )
        return self.get_request(jti) if changed else None

    def delivery_ending(self, jti: str, requester_id: str, manifest_sha256: str) -> bool:
        """Whether ``jti`` is still ``approved`` for ``requester_id`` while its newest recorded
        manifest is ``manifest_sha256``: the manifest is out, the ``delivered`` status is about
        to follow (a fast requester's receipt may arrive first)."""
        with self._lock:
            row = self._db.execute(
                "SELECT r.status, r.requester, (SELECT manifest_sha256 FROM deliveries d WHERE "
                "d.jti = r.jti AND d.manifest_sha256 IS NOT NULL ORDER BY d.attempt DESC "
                "LIMIT 1) FROM requests r WHERE r.jti = ?",
                (jti,),
            ).fetchone()
        return (
            row is not None and row[0] == Status.APPROVED and row[1] == requester_id
            and row[2] is not None and hmac.compare_digest(str(row[2]), manifest_sha256)
        )

    def acknowledge(
        self, jti: str, requester_id: str, manifest_sha256: str, record: Callable[[int], None]
    ) -> bool:
        """Move ``jti`` to ``acknowledged`` if it is ``delivered`` to ``requester_id`` (not
        revoked) and ``manifest_sha256`` names its newest attempt's manifest.

        ``record`` (the audit entry, given the attempt acknowledged) runs inside the transaction,
        before the change commits; it raising leaves everything as it was. Returns whether the
        request moved.
        """
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT r.status, r.requester, q.revoked_at FROM requests r "
                "JOIN requesters q ON q.id = r.requester WHERE r.jti = ?",
                (jti,),
            ).fetchone()
            if row is None or row[0] != Status.DELIVERED or row[1] != requester_id or row[2]:
                return False
            newest = conn.execute(
                "SELECT manifest_sha256, attempt FROM deliveries WHERE jti = ? AND "
                "manifest_sha256 IS NOT NULL ORDER BY attempt DESC LIMIT 1",
                (jti,),
            ).fetchone()
            if newest is None or not hmac.compare_digest(str(newest[0]), manifest_sha256):
                return False
            record(int(newest[1]))
            conn.execute(
                "UPDATE requests SET status = ?, updated_at = ? WHERE jti = ?",
                (Status.ACKNOWLEDGED, db_time(self._now()), jti),
            )
        return True


# --- row helpers ------------------------------------------------------------------------------


def _check_status(status: str) -> Status:
    try:
        return Status(status)
    except ValueError:
        raise ValueError(f"unknown request status {status!r}") from None


def _jti_seen(conn: sqlite3.Connection, jti: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM replay WHERE jti = ?) OR "
        "EXISTS (SELECT 1 FROM requests WHERE jti = ?)",
        (jti, jti),
    ).fetchone()
    return bool(row[0])


def _recent_count(conn: sqlite3.Connection, requester_id: str, since: datetime) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM requests WHERE requester = ? AND received_at >= ?",
        (requester_id, db_time(since)),
    ).fetchone()
    return int(row[0])


def _as_rejection(result: VerifiedRequest | Rejection, error: Any, detail: str) -> Rejection:
    if isinstance(result, Rejection):
        return Rejection(
            error=error, detail=detail, requester_id=result.requester_id, kind=result.kind,
            kid=result.kid, jti=result.jti, iat=result.iat, exp=result.exp, claims=result.claims,
        )
    return Rejection(
        error=error, detail=detail, requester_id=result.requester_id, kind=result.kind,
        kid=result.kid, jti=result.jti, iat=int(result.iat.timestamp()),
        exp=int(result.exp.timestamp()), claims=result.claims,
    )


def _verified_row(req: VerifiedRequest) -> dict[str, Any]:
    return {
        "jti": req.jti,
        "requester": req.requester_id,
        "kid": req.kid,
        "window_start": db_time(req.window_start),
        "window_end": db_time(req.window_end),
        "reason": req.reason,
        "legal_basis": req.legal_basis,
        "legal_ref": req.legal_ref,
        "case_ref": req.case,
        "recipient": req.recipient,
        "iat": int(req.iat.timestamp()),
        "exp": int(req.exp.timestamp()),
        "status": Status.PENDING.value,
        "error": None,
        "detail": None,
    }


def _rejected_row(rej: Rejection, now: datetime, max_lifetime: timedelta) -> dict[str, Any]:
    """The row of a recorded rejection. ``iat``/``exp`` the verifier found unusable (mistyped,
    outside 2000..9999) are stored as the arrival time and arrival + ``max_lifetime``: the row
    still counts toward the rate limit and keeps the jti burnt."""
    claims = rej.claims
    arrival = int(now.timestamp())
    iat = rej.iat if rej.iat is not None else arrival
    exp = rej.exp if rej.exp is not None else arrival + int(max_lifetime.total_seconds())
    window = claims.get("window")
    start = end = None
    if isinstance(window, dict):
        start, end = _loose_time(window.get("start")), _loose_time(window.get("end"))

    def text(name: str, limit: int) -> str | None:
        value = claims.get(name)
        return value[:limit] if isinstance(value, str) else None

    return {
        "jti": rej.jti,
        "requester": rej.requester_id,
        "kid": rej.kid,
        "window_start": start,
        "window_end": end,
        "reason": text("reason", 1000),
        "legal_basis": text("legal_basis", 32),
        "legal_ref": text("legal_ref", 256),
        "case_ref": text("case", 128),
        "recipient": text("recipient", 100),
        "iat": iat,
        "exp": exp,
        "status": Status.REJECTED.value,
        "error": rej.error,
        "detail": rej.detail,
    }


def _loose_time(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return db_time(parse_rfc3339(value))
    except (ValueError, OverflowError):
        return None


def _insert_request(
    conn: sqlite3.Connection,
    row: dict[str, Any],
    now: datetime,
    correlation: bytes | None,
    clock_skew: timedelta,
) -> None:
    stamp = db_time(now)
    row = {**row, "received_at": stamp, "updated_at": stamp, "correlation": correlation}
    if row["status"] == Status.REJECTED:
        row["decided_at"] = db_time(now)
    conn.execute(
        "INSERT INTO replay (jti, keep_until) VALUES (?, ?)",
        (row["jti"], row["exp"] + int(clock_skew.total_seconds())),
    )
    # Column names are this module's own constants; every value is bound.
    conn.execute(
        f"INSERT INTO requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
        tuple(row.values()),
    )


def _requester(row: tuple[Any, ...]) -> Requester:
    added = _from_db(row[6])
    assert added is not None
    return Requester(
        id=row[0],
        name=row[1],
        kind=row[2],
        public_key=Ed25519PublicKey.from_public_bytes(row[3]),
        kid=row[4],
        contact=row[5],
        added_at=added,
        revoked_at=_from_db(row[7]),
    )


def _record(row: tuple[Any, ...]) -> RequestRecord:
    """A stored row as a record, never raising: out-of-range times (rows an older agent wrote
    from a requester's absurd ``iat``/``exp``) are clamped to 2000-01-01..9999-12-31, and
    timestamps that do not parse read as absent (the required ones as 2000-01-01)."""
    received, updated = _stored_time(row[14]), _stored_time(row[24])
    clips = row[20] if isinstance(row[20], int) and not isinstance(row[20], bool) else None
    return RequestRecord(
        jti=row[0],
        requester_id=row[1],
        requester_name=row[2],
        kind=row[3],
        kid=row[4],
        window_start=_stored_time(row[5]),
        window_end=_stored_time(row[6]),
        reason=row[7],
        legal_basis=row[8],
        legal_ref=row[9],
        case=row[10],
        recipient=row[11],
        iat=clamp_epoch(row[12]),
        exp=clamp_epoch(row[13]),
        received_at=received or TIME_MIN,
        status=row[15],
        error=row[16],
        detail=row[17],
        channel=row[18],
        decided_at=_stored_time(row[19]),
        clips=clips,
        finished_at=_stored_time(row[21]),
        correlation=row[22] if isinstance(row[22], bytes) else None,
        responded=row[23],
        updated_at=updated or TIME_MIN,
    )
