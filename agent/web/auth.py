"""Authentication for the local app: password check, sessions, CSRF tokens and login lockout.

Everything here is plain logic with the clock and randomness injectable, so the rules the app
enforces (expiry, lockout, invalidation on password change) are unit-tested without a server.

- :class:`PasswordFile` checks a password against the argon2 hash in ``state_dir/app-password``
  and exposes a *version* (SHA-256 of the file's bytes): every session remembers the version it
  was created under, so a password change made by ``doorbell-agent app set-password`` (another
  process) drops every session on its next use.
- :class:`SessionStore` keeps sessions in memory (they do not survive a restart: the owner logs
  in again). Ids are 256-bit random; the store is keyed by the SHA-256 of the id so that neither
  a memory dump nor a timing side channel on the dict lookup gives a usable id.
- :class:`LoginLimiter` locks a client address out after repeated failures, and locks logins
  globally when failures from many addresses add up (a distributed guess), with bounded memory.
  Every attempt is counted, atomically, before its password is checked, so parallel guesses
  cannot all slip in before the first failure is recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from agent.errors import StateError
from agent.timeutil import utcnow

SESSION_ID_BYTES: Final = 32  # 256 bits
CSRF_TOKEN_BYTES: Final = 32
MAX_PASSWORD_CHARS: Final = 1024  # argon2 hashes anything, but a huge body is only a DoS


def new_token(nbytes: int) -> str:
    """A URL-safe random token of ``nbytes`` random bytes (the default token source)."""
    return secrets.token_urlsafe(nbytes)


def tokens_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one (None never matches)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class PasswordFile:
    """The argon2 hash of the app password in a file, re-read on every use.

    Re-reading (the file is ~100 bytes) is what makes a password set by another process take
    effect at once. Verification is serialised: an argon2id check uses 64 MiB by default, so
    concurrent login attempts must not multiply that on a small board.
    """

    def __init__(self, path: Path, hasher: PasswordHasher | None = None) -> None:
        self.path = path
        self._hasher = hasher or PasswordHasher()
        self._verify_lock = threading.Lock()

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError as exc:
            raise StateError(
                f"no app password at {self.path}",
                hint="run `doorbell-agent init` or `doorbell-agent app set-password`",
            ) from exc
        except OSError as exc:
            raise StateError(f"cannot read the app password {self.path}: {exc.strerror}") from exc

    def version(self) -> str:
        """A fingerprint of the current hash; it changes whenever the password is set."""
        return hashlib.sha256(self._read()).hexdigest()

    def verify(self, password: str) -> str | None:
        """Check ``password``; return the version it matched under, or None when wrong."""
        if not password or len(password) > MAX_PASSWORD_CHARS:
            return None
        data = self._read()
        with self._verify_lock:
            try:
                self._hasher.verify(data.decode("ascii").strip(), password)
            except (VerificationError, InvalidHashError, UnicodeDecodeError):
                return None
        return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Session:
    """One logged-in browser. ``id`` is the cookie value, ``csrf`` its synchronizer token."""

    id: str
    csrf: str
    created_at: datetime
    expires_at: datetime
    password_version: str


class SessionStore:
    """Server-side sessions with absolute expiry; thread-safe.

    ``max_sessions`` bounds memory: when full, the session closest to expiry is dropped.
    """

    def __init__(
        self,
        lifetime: timedelta,
        *,
        now: Callable[[], datetime] = utcnow,
        token: Callable[[int], str] = new_token,
        max_sessions: int = 64,
    ) -> None:
        if lifetime <= timedelta(0):
            raise ValueError("session lifetime must be positive")
        self.lifetime = lifetime
        self._now = now
        self._token = token
        self._max = max_sessions
        self._by_digest: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_digest)

    def create(self, password_version: str) -> Session:
        """Start a session for a login that succeeded under ``password_version``."""
        now = self._now()
        session = Session(
            id=self._token(SESSION_ID_BYTES),
            csrf=self._token(CSRF_TOKEN_BYTES),
            created_at=now,
            expires_at=now + self.lifetime,
            password_version=password_version,
        )
        with self._lock:
            self._purge(now)
            while len(self._by_digest) >= self._max:
                oldest = min(self._by_digest, key=lambda d: self._by_digest[d].expires_at)
                del self._by_digest[oldest]
            self._by_digest[_digest(session.id)] = session
        return session

    def get(self, session_id: str | None, password_version: str) -> Session | None:
        """The live session with this id, or None (unknown, expired, or password changed).

        A session found expired or made under another password is deleted on the spot.
        """
        if not session_id:
            return None
        digest = _digest(session_id)
        now = self._now()
        with self._lock:
            session = self._by_digest.get(digest)
            if session is None:
                return None
            if now >= session.expires_at or not hmac.compare_digest(
                session.password_version, password_version
            ):
                del self._by_digest[digest]
                return None
            return session

    def drop(self, session_id: str | None) -> None:
        """End one session (logout); unknown ids are ignored."""
        if session_id:
            with self._lock:
                self._by_digest.pop(_digest(session_id), None)

    def drop_all(self) -> None:
        """End every session."""
        with self._lock:
            self._by_digest.clear()

    def _purge(self, now: datetime) -> None:
        for digest in [d for d, s in self._by_digest.items() if now >= s.expires_at]:
            del self._by_digest[digest]


@dataclass(frozen=True)
class LoginVerdict:
    """What the limiter says about a login attempt from one address.

    ``number`` is the attempt's place among those counted since the address's last success
    (1-based); :meth:`LoginLimiter.success` needs it.
    """

    allowed: bool
    locked_until: datetime | None = None
    number: int = 0


@dataclass
class _Client:
    failures: int = 0
    locked_until: datetime | None = None


@dataclass(frozen=True)
class FailureOutcome:
    """After a failure: how many attempts in a row from this address, and any lock."""

    failures: int
    locked_until: datetime | None
    global_lock: bool


class LoginLimiter:
    """Lockout after repeated failed logins, per client address and globally.

    - :meth:`attempt` counts every attempt as a failure before its password is checked, in one
      step with the lock check, so that parallel guesses all count: the ``max_failures``-th
      attempt in a row from one address locks it for ``lockout``, and attempts made while it is
      locked are refused without a password check (the right password included).
    - :meth:`success` takes the count back, but only when no attempt from that address was
      counted after the successful one: a right password among parallel wrong ones logs in but
      does not clear the lock those set.
    - ``global_max_failures`` attempts from all addresses within ``lockout`` lock every login
      for ``lockout``: guessing from many addresses gains nothing over guessing from one.
    - At most ``max_clients`` addresses are remembered (least recently seen forgotten first),
      so a flood of spoofed addresses cannot grow memory; the global budget still applies.
    """

    def __init__(
        self,
        *,
        max_failures: int = 5,
        lockout: timedelta = timedelta(minutes=5),
        global_max_failures: int = 50,
        max_clients: int = 1024,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        self.global_max_failures = global_max_failures
        self._max_clients = max_clients
        self._now = now
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._recent: deque[datetime] = deque()
        self._global_until: datetime | None = None
        self._lock = threading.Lock()

    def attempt(self, client: str) -> LoginVerdict:
        """Count a login attempt from ``client``; whether its password may be checked at all."""
        now = self._now()
        with self._lock:
            if self._global_until is not None and now < self._global_until:
                return LoginVerdict(False, self._global_until)
            state = self._clients.pop(client, None) or _Client()
            self._clients[client] = state  # most recently seen goes last
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
            if state.locked_until is not None:
                if now < state.locked_until:
                    return LoginVerdict(False, state.locked_until)
                state.locked_until = None
                state.failures = 0
            state.failures += 1
            if state.failures >= self.max_failures:
                state.locked_until = now + self.lockout
            while self._recent and now - self._recent[0] >= self.lockout:
                self._recent.popleft()
            self._recent.append(now)
            if len(self._recent) >= self.global_max_failures:
                self._global_until = now + self.lockout
                self._recent.clear()
            return LoginVerdict(True, None, state.failures)

    def failure(self, client: str) -> FailureOutcome:
        """The state after a wrong password from ``client`` (already counted by attempt)."""
        now = self._now()
        with self._lock:
            state = self._clients.get(client) or _Client()
            global_lock = self._global_until is not None and now < self._global_until
            return FailureOutcome(state.failures, state.locked_until, global_lock)

    def success(self, client: str, verdict: LoginVerdict) -> None:
        """A correct password in the attempt ``verdict`` allowed: forget the address's count,
        unless a later attempt was counted meanwhile (its lock, if any, stays)."""
        with self._lock:
            state = self._clients.get(client)
            if state is not None and state.failures == verdict.number:
                del self._clients[client]
