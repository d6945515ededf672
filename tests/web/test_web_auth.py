"""The app's authentication rules as plain classes: password file, sessions, CSRF, lockout."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from agent.errors import StateError
from agent.web.auth import (
    FailureOutcome,
    LoginLimiter,
    PasswordFile,
    SessionStore,
    new_token,
    tokens_equal,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HASHER = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_password_file_verifies_argon2id_and_versions_change_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app-password"
    path.write_text(HASHER.hash("first password 1"))
    pw = PasswordFile(path)
    v1 = pw.version()
    assert pw.verify("first password 1") == v1
    assert pw.verify("first password 2") is None
    assert pw.verify("") is None
    assert pw.verify("x" * 5000) is None  # never hashed: bounded work
    path.write_text(HASHER.hash("second password"))
    assert pw.version() != v1
    assert pw.verify("first password 1") is None
    assert pw.verify("second password") == pw.version()


def test_password_file_garbage_hash_refuses_everything(tmp_path: Path) -> None:
    path = tmp_path / "app-password"
    path.write_text("not an argon2 hash")
    assert PasswordFile(path).verify("anything at all") is None


def test_missing_password_file_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no app password"):
        PasswordFile(tmp_path / "absent").version()


def test_session_ids_are_256_bit_random_and_unique(clock: Clock) -> None:
    store = SessionStore(timedelta(hours=1), now=clock)
    sessions = [store.create("v1") for _ in range(20)]
    assert len({s.id for s in sessions}) == 20
    assert len({s.csrf for s in sessions}) == 20
    assert all(len(s.id) >= 43 for s in sessions)  # 32 bytes in base64url
    assert all(s.id != s.csrf for s in sessions)


def test_session_expires_at_its_absolute_lifetime(clock: Clock) -> None:
    store = SessionStore(timedelta(hours=1), now=clock)
    session = store.create("v1")
    clock.now = T0 + timedelta(minutes=59, seconds=59)
    assert store.get(session.id, "v1") == session
    clock.now = T0 + timedelta(hours=1)
    assert store.get(session.id, "v1") is None
    assert len(store) == 0  # dropped on the spot
    clock.now = T0  # even if the clock went back, it is gone
    assert store.get(session.id, "v1") is None


def test_session_dropped_when_the_password_changed(clock: Clock) -> None:
    store = SessionStore(timedelta(hours=1), now=clock)
    session = store.create("v1")
    assert store.get(session.id, "v2") is None
    assert store.get(session.id, "v1") is None  # gone for good, not only for v2


def test_unknown_empty_and_dropped_sessions(clock: Clock) -> None:
    store = SessionStore(timedelta(hours=1), now=clock)
    session = store.create("v1")
    assert store.get(None, "v1") is None
    assert store.get("", "v1") is None
    assert store.get(session.csrf, "v1") is None  # the CSRF token is not a session id
    store.drop(session.id)
    assert store.get(session.id, "v1") is None
    other = store.create("v1")
    store.drop_all()
    assert store.get(other.id, "v1") is None


def test_session_store_is_bounded(clock: Clock) -> None:
    counter = itertools.count()
    store = SessionStore(
        timedelta(hours=1), now=clock, token=lambda n: f"tok-{next(counter)}", max_sessions=3
    )
    first = store.create("v1")
    for _ in range(5):
        clock.now += timedelta(seconds=1)
        store.create("v1")
    assert len(store) == 3
    assert store.get(first.id, "v1") is None  # the one closest to expiry went first


def test_session_lifetime_must_be_positive(clock: Clock) -> None:
    with pytest.raises(ValueError, match="positive"):
        SessionStore(timedelta(0), now=clock)


def test_tokens_equal_is_exact() -> None:
    token = new_token(32)
    assert tokens_equal(token, token)
    assert not tokens_equal(None, token)
    assert not tokens_equal("", token)
    assert not tokens_equal(token[:-1], token)
    assert not tokens_equal(token + "x", token)


def fail(limiter: LoginLimiter, client: str) -> FailureOutcome:
    """One attempt from ``client`` that is let in and has the wrong password."""
    assert limiter.attempt(client).allowed
    return limiter.failure(client)


def test_lockout_after_five_failures_for_five_minutes(clock: Clock) -> None:
    limiter = LoginLimiter(now=clock)
    for n in range(1, 5):
        outcome = fail(limiter, "10.0.0.5")
        assert outcome.failures == n and outcome.locked_until is None
    outcome = fail(limiter, "10.0.0.5")
    assert outcome.locked_until == T0 + timedelta(minutes=5)
    verdict = limiter.attempt("10.0.0.5")
    assert not verdict.allowed and verdict.locked_until == T0 + timedelta(minutes=5)
    assert limiter.attempt("10.0.0.6").allowed  # another address is not affected
    clock.now = T0 + timedelta(minutes=4, seconds=59)
    assert not limiter.attempt("10.0.0.5").allowed
    clock.now = T0 + timedelta(minutes=5)
    assert fail(limiter, "10.0.0.5").failures == 1  # a fresh count after the lock


def test_success_resets_the_count(clock: Clock) -> None:
    limiter = LoginLimiter(now=clock)
    for _ in range(4):
        fail(limiter, "10.0.0.5")
    verdict = limiter.attempt("10.0.0.5")
    assert verdict.allowed and verdict.number == 5  # the 5th attempt is still checked
    limiter.success("10.0.0.5", verdict)
    assert fail(limiter, "10.0.0.5").failures == 1


def test_attempts_count_before_the_check_so_parallel_guesses_cannot_outrun_the_lock(
    clock: Clock,
) -> None:
    limiter = LoginLimiter(now=clock)
    # Ten attempts arrive together, none finished yet: only five are let in.
    verdicts = [limiter.attempt("10.0.0.5") for _ in range(10)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 5
    # The right password was the 3rd; the 4th and 5th were wrong. It logs in, but the lock
    # they set stays, and the right password while locked is not even checked.
    limiter.success("10.0.0.5", verdicts[2])
    assert limiter.failure("10.0.0.5").locked_until == T0 + timedelta(minutes=5)
    assert not limiter.attempt("10.0.0.5").allowed


def test_global_lockout_bounds_guessing_from_many_addresses(clock: Clock) -> None:
    limiter = LoginLimiter(now=clock, global_max_failures=10)
    for i in range(9):
        assert not fail(limiter, f"10.0.1.{i}").global_lock
    assert fail(limiter, "10.0.1.99").global_lock
    verdict = limiter.attempt("192.168.1.20")  # even an address that never failed
    assert not verdict.allowed and verdict.locked_until == T0 + timedelta(minutes=5)
    clock.now = T0 + timedelta(minutes=5)
    assert limiter.attempt("192.168.1.20").allowed


def test_global_budget_counts_only_recent_failures(clock: Clock) -> None:
    limiter = LoginLimiter(now=clock, global_max_failures=3)
    fail(limiter, "a")
    fail(limiter, "b")
    clock.now = T0 + timedelta(minutes=6)
    assert not fail(limiter, "c").global_lock  # the first two aged out
    assert limiter.attempt("d").allowed


def test_limiter_memory_is_bounded(clock: Clock) -> None:
    limiter = LoginLimiter(now=clock, max_clients=4, global_max_failures=10**6)
    for i in range(100):
        fail(limiter, f"10.1.{i // 256}.{i % 256}")
    assert len(limiter._clients) == 4
