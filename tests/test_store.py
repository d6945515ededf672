"""requests.db: trust store, replay cache across restarts and kill -9, records, CAS, revocation."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditLog, read_entries, verify_file
from agent.errors import AuditWriteError, RequesterNotFoundError, RequestError, RequestNotFoundError
from agent.requests.store import RequestStore
from agent.requests.verify import Rejection, RequestPolicy, VerifiedRequest, verify_request
from agent.timeutil import rfc3339
from tests.test_verify import DEVICE, POLICY, RECIPIENT, T0, Party, token

REPO = Path(__file__).resolve().parent.parent


class Clock:
    """A settable clock for the store."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "requests.db"


@pytest.fixture
def store(db: Path, clock: Clock) -> Iterator[RequestStore]:
    with RequestStore(db, now=clock) as s:
        yield s


@pytest.fixture
def alice(store: RequestStore) -> Party:
    party = Party("alice-pd")
    store.add_requester("alice-pd", "Alice PD", "law-enforcement", party.key.public_key())
    return party


def receive(
    store: RequestStore, raw: bytes, now: datetime = T0, policy: RequestPolicy = POLICY, **kw: Any
) -> Any:
    return store.admit(verify_request(raw, store, store, policy, now), policy, now, **kw)


def unique(party: Party, n: int, **overrides: Any) -> bytes:
    return token(party, jti=f"jti-{n:016d}", **overrides)


class Sink:
    """An audit sink that records events, or fails like a full disk."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.fail = fail

    def append(self, event: str, **fields: object) -> object:
        if self.fail:
            raise AuditWriteError("audit log is full")
        self.events.append((event, fields))
        return None


# --- trust store ------------------------------------------------------------------------------


def test_add_get_list_requesters(store: RequestStore, alice: Party) -> None:
    bob = Party("bob")
    store.add_requester("bob", "Bob Next Door", "neighbor", bob.key.public_key(), "door 3")
    got = store.get_requester("alice-pd")
    assert (got.name, got.kind, got.kid, got.revoked) == (
        "Alice PD",
        "law-enforcement",
        alice.kid,
        False,
    )
    assert got.added_at == T0
    assert [r.id for r in store.list_requesters()] == ["alice-pd", "bob"]
    assert store.get_requester("bob").contact == "door 3"
    key = store.key_for_kid(bob.kid)
    assert key is not None and (key.requester_id, key.kind, key.revoked) == (
        "bob",
        "neighbor",
        False,
    )
    assert store.key_for_kid("nope") is None


@pytest.mark.parametrize(
    "requester_id,name,kind,contact",
    [
        ("Alice", "n", "other", None),
        ("a" * 65, "n", "other", None),
        ("", "n", "other", None),
        ("a_b", "n", "other", None),
        ("ok", "", "other", None),
        ("ok", "bad\x1bname", "other", None),
        ("ok", "n" * 201, "other", None),
        ("ok", "n", "police", None),
        ("ok", "n", "other", "c" * 1001),
    ],
)
def test_invalid_requester_fields_are_refused(
    store: RequestStore, requester_id: str, name: str, kind: str, contact: str | None
) -> None:
    with pytest.raises(RequestError) as info:
        store.add_requester(
            requester_id, name, kind, Ed25519PrivateKey.generate().public_key(), contact
        )
    assert info.value.hint
    assert store.list_requesters() == []


def test_duplicate_id_and_duplicate_key_are_refused(store: RequestStore, alice: Party) -> None:
    with pytest.raises(RequestError, match="already exists"):
        store.add_requester("alice-pd", "Again", "other", Ed25519PrivateKey.generate().public_key())
    with pytest.raises(RequestError, match="already enrolled"):
        store.add_requester("other", "Same key", "other", alice.key.public_key())


def test_a_revoked_key_cannot_be_enrolled_again(store: RequestStore, alice: Party) -> None:
    store.revoke_requester("alice-pd")
    with pytest.raises(RequestError, match="was revoked"):
        store.add_requester("alice-2", "Alice again", "law-enforcement", alice.key.public_key())


def test_add_writes_audit_before_commit_and_audit_failure_adds_nothing(
    store: RequestStore,
) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(AuditWriteError):
        store.add_requester("carol", "Carol", "insurer", key, audit=Sink(fail=True))
    assert store.list_requesters() == []
    sink = Sink()
    requester = store.add_requester("carol", "Carol", "insurer", key, audit=sink)
    assert sink.events == [
        (
            "requester_added",
            {
                "requester": "carol",
                "name": "Carol",
                "kind": "insurer",
                "kid": requester.kid,
                "contact": None,
            },
        ),
    ]


def test_unknown_requester(store: RequestStore) -> None:
    with pytest.raises(RequesterNotFoundError):
        store.get_requester("ghost")
    with pytest.raises(RequesterNotFoundError):
        store.revoke_requester("ghost")


def test_db_file_is_private(db: Path, store: RequestStore) -> None:
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# --- admitting requests -----------------------------------------------------------------------


def test_verified_request_is_recorded_pending_with_every_field(
    store: RequestStore, alice: Party
) -> None:
    raw = token(alice, legal_basis="warrant", legal_ref="W-1", case="C-2")
    result = receive(store, raw, correlation=b"\x00corr")
    assert isinstance(result, VerifiedRequest)
    record = store.get_request("jti-0123456789abcdef")
    assert record.status == "pending"
    assert (record.requester_id, record.requester_name, record.kind, record.kid) == (
        "alice-pd",
        "Alice PD",
        "law-enforcement",
        alice.kid,
    )
    assert record.window_start == result.window_start and record.window_end == result.window_end
    assert (record.reason, record.legal_basis, record.legal_ref, record.case, record.recipient) == (
        "Parcel stolen from the porch",
        "warrant",
        "W-1",
        "C-2",
        RECIPIENT,
    )
    assert (record.iat, record.exp, record.received_at) == (T0, T0 + timedelta(hours=1), T0)
    assert record.correlation == b"\x00corr"
    assert (record.error, record.channel, record.decided_at, record.responded) == (None,) * 4
    assert store.list_requests(["pending"]) == [record]
    assert record.to_json()["id"] == "jti-0123456789abcdef"
    assert record.to_json()["window"] == {
        "start": "2026-01-31T11:00:00Z",
        "end": "2026-01-31T11:30:00Z",
    }


def test_same_jti_is_replayed_and_nothing_changes(store: RequestStore, alice: Party) -> None:
    assert isinstance(receive(store, token(alice)), VerifiedRequest)
    again = receive(store, token(alice, reason="different text, same jti"))
    assert isinstance(again, Rejection) and again.error == "replayed"
    assert [r.reason for r in store.list_requests()] == ["Parcel stolen from the porch"]


def test_replay_survives_reopening_the_database(db: Path, clock: Clock) -> None:
    alice = Party("alice-pd")
    with RequestStore(db, now=clock) as first:
        first.add_requester("alice-pd", "A", "other", alice.key.public_key())
        assert isinstance(receive(first, token(alice)), VerifiedRequest)
    with RequestStore(db, now=clock) as second:
        result = receive(second, token(alice), now=T0 + timedelta(minutes=5))
        assert isinstance(result, Rejection) and result.error == "replayed"
        assert len(second.list_requests()) == 1


def test_replay_survives_kill_9_right_after_admit(db: Path, tmp_path: Path) -> None:
    alice = Party("alice-pd")
    with RequestStore(db) as s:
        s.add_requester("alice-pd", "A", "other", alice.key.public_key())
    raw_path = tmp_path / "req.jwt"
    now = datetime.now(T0.tzinfo)
    raw_path.write_bytes(
        token(
            alice,
            iat=int(now.timestamp()),
            exp=int(now.timestamp()) + 600,
            window={
                "start": rfc3339(now - timedelta(minutes=20)),
                "end": rfc3339(now - timedelta(minutes=10)),
            },
        )
    )
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from agent.requests.store import RequestStore
        from agent.requests.verify import RequestPolicy, VerifiedRequest, verify_request
        from agent.timeutil import utcnow
        store = RequestStore(Path({str(db)!r}))
        policy = RequestPolicy(device_id={DEVICE!r})
        now = utcnow()
        result = store.admit(verify_request(Path({str(raw_path)!r}).read_bytes(), store, store,
                                            policy, now), policy, now)
        assert isinstance(result, VerifiedRequest), result
        sys.stdout.write("admitted\\n"); sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == "admitted\n", proc.stderr
    assert proc.returncode == -9
    with RequestStore(db) as s:
        assert s.get_request("jti-0123456789abcdef").status == "pending"
        result = receive(s, raw_path.read_bytes(), now=datetime.now(T0.tzinfo))
        assert isinstance(result, Rejection) and result.error == "replayed"


def test_recordable_rejection_gets_a_row_and_burns_the_jti(
    store: RequestStore, alice: Party
) -> None:
    result = receive(store, token(alice, reason=""))
    assert isinstance(result, Rejection) and result.error == "bad_claims"
    record = store.get_request("jti-0123456789abcdef")
    assert (record.status, record.error, record.decided_at) == ("rejected", "bad_claims", T0)
    assert record.reason == ""
    fixed = receive(store, token(alice))
    assert isinstance(fixed, Rejection) and fixed.error == "replayed"


@pytest.mark.parametrize(
    "overrides", [{"exp": "soon"}, {"iat": 99999999999999}, {"exp": 2**70}, {"iat": -(2**62)}]
)
def test_rejection_with_unusable_times_is_recorded_with_stand_ins(
    store: RequestStore, alice: Party, overrides: dict[str, Any]
) -> None:
    # CONTRACT §3: every signed request counts toward the rate limit and burns its jti.
    result = receive(store, token(alice, **overrides))
    assert isinstance(result, Rejection) and result.error == "bad_claims"
    record = store.get_request("jti-0123456789abcdef")
    assert record.status == "rejected" and record.received_at == T0
    assert T0 <= record.iat <= record.exp <= T0 + POLICY.max_lifetime
    assert store.jti_seen("jti-0123456789abcdef")
    assert store.recent_count("alice-pd", T0) == 1


@pytest.mark.parametrize("overrides", [{"jti": "short"}, {"jti": 12345678901234567}])
def test_unrecordable_rejection_leaves_no_trace(
    store: RequestStore, alice: Party, overrides: dict[str, Any]
) -> None:
    result = receive(store, token(alice, **overrides))
    assert isinstance(result, Rejection) and result.error == "bad_claims"
    assert store.list_requests() == []


def test_revoked_requesters_requests_are_not_recorded(store: RequestStore, alice: Party) -> None:
    store.revoke_requester("alice-pd")
    result = receive(store, token(alice))
    assert isinstance(result, Rejection) and result.error == "revoked"
    assert store.list_requests() == []
    assert not store.jti_seen("jti-0123456789abcdef")


def test_rate_limit_counts_the_last_hour_and_records_nothing_beyond(
    store: RequestStore, alice: Party
) -> None:
    policy = RequestPolicy(device_id=DEVICE, rate_limit=3)
    for n in range(3):
        assert isinstance(receive(store, unique(alice, n), policy=policy), VerifiedRequest)
    over = receive(store, unique(alice, 3), policy=policy)
    assert isinstance(over, Rejection) and over.error == "rate_limited"
    bad = receive(store, unique(alice, 4, reason=""), policy=policy)
    assert isinstance(bad, Rejection) and bad.error == "bad_claims"
    assert len(store.list_requests()) == 3  # neither over-limit request was stored
    later = T0 + timedelta(hours=1, seconds=1)
    fresh = unique(alice, 3, iat=int(later.timestamp()), exp=int(later.timestamp()) + 60)
    assert isinstance(receive(store, fresh, now=later, policy=policy), VerifiedRequest)


def test_rate_limit_is_per_requester(store: RequestStore, alice: Party) -> None:
    bob = Party("bob")
    store.add_requester("bob", "Bob", "neighbor", bob.key.public_key())
    policy = RequestPolicy(device_id=DEVICE, rate_limit=1)
    assert isinstance(receive(store, unique(alice, 1), policy=policy), VerifiedRequest)
    assert isinstance(receive(store, unique(bob, 2), policy=policy), VerifiedRequest)


def test_admit_rechecks_replay_inside_its_transaction(store: RequestStore, alice: Party) -> None:
    # Two copies verified before either is recorded (QoS 1 duplicates on two threads).
    first = verify_request(token(alice), store, store, POLICY, T0)
    second = verify_request(token(alice), store, store, POLICY, T0)
    assert isinstance(store.admit(first, POLICY, T0), VerifiedRequest)
    late = store.admit(second, POLICY, T0)
    assert isinstance(late, Rejection) and late.error == "replayed"
    assert len(store.list_requests()) == 1


def test_admit_rechecks_rate_limit_inside_its_transaction(
    store: RequestStore, alice: Party
) -> None:
    policy = RequestPolicy(device_id=DEVICE, rate_limit=1)
    first = verify_request(unique(alice, 1), store, store, policy, T0)
    second = verify_request(unique(alice, 2), store, store, policy, T0)
    assert isinstance(store.admit(first, policy, T0), VerifiedRequest)
    late = store.admit(second, policy, T0)
    assert isinstance(late, Rejection) and late.error == "rate_limited"


def test_admit_audits_inside_the_transaction(store: RequestStore, alice: Party) -> None:
    sink = Sink()
    receive(store, unique(alice, 1), audit=sink)
    receive(store, unique(alice, 2, aud="elsewhere"), audit=sink)
    assert [e for e, _ in sink.events] == ["request_pending", "request_rejected"]
    assert sink.events[0][1]["jti"] == "jti-0000000000000001"
    assert sink.events[1][1]["error"] == "wrong_audience"
    with pytest.raises(AuditWriteError):
        receive(store, unique(alice, 3), audit=Sink(fail=True))
    assert not store.jti_seen("jti-0000000000000003")  # rolled back: it may come again


def test_unverifiable_passes_through_untouched(store: RequestStore) -> None:
    result = receive(store, b"garbage")
    assert result.__class__.__name__ == "Unverifiable"
    assert store.list_requests() == []


def test_prune_keeps_jti_until_exp_plus_skew(store: RequestStore, alice: Party, db: Path) -> None:
    receive(store, token(alice))
    exp = T0 + timedelta(hours=1)
    assert store.prune_replay(exp + POLICY.clock_skew) == 0
    assert store.prune_replay(exp + POLICY.clock_skew + timedelta(seconds=1)) == 1
    # the request row still remembers the jti
    assert store.jti_seen("jti-0123456789abcdef")


# --- status transitions -----------------------------------------------------------------------


def test_set_status_is_a_compare_and_set(store: RequestStore, alice: Party, clock: Clock) -> None:
    receive(store, token(alice))
    clock.now = T0 + timedelta(minutes=3)
    approved = store.set_status(
        "jti-0123456789abcdef", ["pending"], "approved", channel="button", decided_at=clock.now
    )
    assert approved is not None
    assert (approved.status, approved.channel, approved.decided_at) == (
        "approved",
        "button",
        clock.now,
    )
    assert approved.updated_at == clock.now
    assert store.set_status("jti-0123456789abcdef", ["pending"], "denied", channel="app") is None
    assert store.get_request("jti-0123456789abcdef").status == "approved"
    delivered = store.set_status("jti-0123456789abcdef", ["approved"], "delivered", clips=2)
    assert delivered is not None and delivered.clips == 2


@pytest.mark.parametrize(
    "sources,target",
    [
        (["pending"], "delivered"),
        (["denied"], "approved"),
        (["rejected"], "pending"),
        (["pending"], "bogus"),
    ],
)
def test_set_status_refuses_transitions_outside_the_machine(
    store: RequestStore, alice: Party, sources: list[str], target: str
) -> None:
    receive(store, token(alice))
    with pytest.raises(ValueError):
        store.set_status("jti-0123456789abcdef", sources, target)
    assert store.get_request("jti-0123456789abcdef").status == "pending"


def test_set_status_refuses_unknown_fields_and_jtis(store: RequestStore, alice: Party) -> None:
    receive(store, token(alice))
    with pytest.raises(ValueError, match="reason"):
        store.set_status("jti-0123456789abcdef", ["pending"], "approved", reason="changed")
    with pytest.raises(RequestNotFoundError):
        store.set_status("no-such-jti-here", ["pending"], "approved")
    with pytest.raises(RequestNotFoundError):
        store.get_request("no-such-jti-here")


# --- revocation -------------------------------------------------------------------------------


def test_revocation_cancels_pending_requests_and_tracks_their_answers(
    store: RequestStore, alice: Party, clock: Clock, tmp_path: Path
) -> None:
    bob = Party("bob")
    store.add_requester("bob", "Bob", "neighbor", bob.key.public_key())
    for n in range(3):
        receive(store, unique(alice, n))
    receive(store, unique(bob, 9))
    store.set_status("jti-0000000000000000", ["pending"], "approved", channel="cli")
    device_key = Ed25519PrivateKey.generate()
    clock.now = T0 + timedelta(minutes=1)
    with AuditLog(tmp_path / "audit.jsonl", device_key, now=clock) as audit:
        result = store.revoke_requester("alice-pd", audit=audit)
    assert not result.already_revoked and result.requester.revoked_at == clock.now
    assert [r.jti for r in result.cancelled] == ["jti-0000000000000001", "jti-0000000000000002"]
    assert all((r.status, r.error) == ("rejected", "revoked") for r in result.cancelled)
    assert store.get_request("jti-0000000000000000").status == "approved"
    assert store.get_request("jti-0000000000000009").status == "pending"
    events = [(e.event, e.fields.get("jti")) for e in read_entries(tmp_path / "audit.jsonl")]
    assert events == [
        ("requester_revoked", None),
        ("request_rejected", "jti-0000000000000001"),
        ("request_rejected", "jti-0000000000000002"),
    ]
    assert verify_file(tmp_path / "audit.jsonl", device_key.public_key()).ok
    # the daemon answers them, then they drop off the list
    assert [r.jti for r in store.unanswered_revocations()] == [
        "jti-0000000000000001",
        "jti-0000000000000002",
    ]
    store.mark_responded("jti-0000000000000001", "rejected")
    assert [r.jti for r in store.unanswered_revocations()] == ["jti-0000000000000002"]
    # revoked keys are refused from now on; revoking again changes nothing
    key = store.key_for_kid(alice.kid)
    assert key is not None and key.revoked
    again = store.revoke_requester("alice-pd", audit=Sink(fail=True))
    assert again.already_revoked and again.cancelled == []


def test_failed_revocation_audit_changes_nothing(store: RequestStore, alice: Party) -> None:
    receive(store, token(alice))
    with pytest.raises(AuditWriteError):
        store.revoke_requester("alice-pd", audit=Sink(fail=True))
    assert not store.get_requester("alice-pd").revoked
    assert store.get_request("jti-0123456789abcdef").status == "pending"


def test_revocation_by_another_connection_is_seen_at_once(
    db: Path, store: RequestStore, alice: Party
) -> None:
    receive(store, unique(alice, 1))
    with RequestStore(db) as cli:
        cli.revoke_requester("alice-pd")
    result = receive(store, unique(alice, 2))
    assert isinstance(result, Rejection) and result.error == "revoked"
    assert [r.jti for r in store.unanswered_revocations()] == ["jti-0000000000000001"]


def test_close_is_idempotent(db: Path) -> None:
    s = RequestStore(db)
    s.close()
    s.close()
    with pytest.raises(RequestError, match="closed"):
        s.list_requests()


def test_concurrent_admits_from_threads_accept_a_jti_once(
    store: RequestStore, alice: Party
) -> None:
    raw = token(alice)
    results: list[Any] = []
    lock = threading.Lock()

    def worker() -> None:
        r = receive(store, raw)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, VerifiedRequest) for r in results) == 1
    assert len(store.list_requests()) == 1
