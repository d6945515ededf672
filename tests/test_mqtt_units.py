"""Pure parts of the MQTT side (response claims, coalescing, flood accounting, status payload,
topics) and the service's handling of redelivered duplicates, with a recording fake client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.audit import AuditLog, read_entries
from agent.keys import kid_for, public_jwk
from agent.mqtt import InboundMessage
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requests.intake import Budget, FairQueue, Tally, peek_kid
from agent.requests.responder import REJECTION_DETAIL, response_claims
from agent.requests.service import RequestService
from agent.requests.store import RequestStore
from agent.requests.verify import RequestPolicy, TrustedKey
from agent.status import Coalescer, status_payload
from agent.topics import Topics
from agent.vocabulary import REJECTION_CODES
from tests.test_mqtt_service import TOPIC_REQUESTS, Requester, eventually, request

NOW = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)


# --- response claims ------------------------------------------------------------------------


def base(status: str, **extra: object) -> dict[str, object]:
    return response_claims(
        device_id="D", requester_id="r", jti="J" * 16, status=status, now=NOW, **extra  # type: ignore[arg-type]
    )


def test_response_claims_carry_exactly_what_each_status_allows() -> None:
    common = {"iss": "D", "aud": "r", "iat": int(NOW.timestamp()), "req": "J" * 16}
    assert base("pending") == {**common, "status": "pending"}
    assert base("expired") == {**common, "status": "expired"}
    assert base("failed", error="revoked") == {
        **common, "status": "failed", "error": "revoked",
        "detail": "the requester was revoked; the delivery was stopped",
    }
    assert base("failed", error="delivery_error")["error"] == "delivery_error"
    assert base("rejected", error="expired") == {
        **common, "status": "rejected", "error": "expired", "detail": REJECTION_DETAIL["expired"]
    }
    assert base("approved", clips=2, channel="button") == {
        **common, "status": "approved", "clips": 2, "channel": "button"
    }
    assert base("denied", channel="app") == {**common, "status": "denied", "channel": "app"}
    assert base("delivered", clips=0) == {**common, "status": "delivered", "clips": 0}


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        ("pending", {"clips": 1}),  # pending never says anything about footage
        ("pending", {"error": "expired"}),
        ("rejected", {}),
        ("rejected", {"error": "nope"}),
        ("approved", {"clips": 1}),
        ("approved", {"channel": "button"}),
        ("approved", {"clips": -1, "channel": "button"}),
        ("denied", {"channel": "telepathy"}),
        ("delivered", {"clips": True}),
        ("expired", {"channel": "cli"}),
        ("failed", {}),  # failed says why: revoked or delivery_error
        ("failed", {"error": "expired"}),
        ("lost", {}),
    ],
)
def test_response_claims_refuse_claims_that_do_not_fit(
    status: str, extra: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        base(status, **extra)


def test_every_contract_error_code_has_a_fixed_detail() -> None:
    assert set(REJECTION_DETAIL) == set(REJECTION_CODES)


# --- coalescing and flood accounting --------------------------------------------------------


def test_coalescer_releases_the_newest_item_at_most_once_per_interval() -> None:
    c: Coalescer[int] = Coalescer(1.0)
    assert c.take(0.0) == (None, None)
    c.offer(1)
    assert c.take(0.0) == (1, None)
    c.offer(2)
    c.offer(3)
    item, wait = c.take(0.4)
    assert item is None and wait == pytest.approx(0.6)
    assert c.take(1.0) == (3, None)
    assert c.take(5.0) == (None, None)
    c.offer(4)
    assert c.take(5.0) == (4, None)


def test_tally_reports_the_first_at_once_then_sums_per_interval() -> None:
    t = Tally(60.0)
    t.add("bad_shape")
    assert t.take(0.0) == {"bad_shape": 1}
    for _ in range(1000):
        t.add("unknown_kid")
    t.add("oversize", 5)
    assert t.take(30.0) is None
    assert t.take(60.0) == {"unknown_kid": 1000, "oversize": 5}
    assert t.take(200.0) is None
    t.add("typ")
    assert t.take(201.0, force=True) == {"typ": 1}


def test_budget_allows_a_burst_then_refills() -> None:
    b = Budget(3, 60.0)
    assert [b.allow("r", 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.allow("other", 0.0)
    assert not b.allow("r", 10.0)
    assert b.allow("r", 20.0)  # 20 s at 3 per minute refills one token


# --- status and topics ----------------------------------------------------------------------


def test_status_payload_is_the_contract_document() -> None:
    key = Ed25519PrivateKey.generate()
    doc = json.loads(status_payload("D", key, online=True, since=NOW))
    assert doc == {
        "device_id": "D",
        "online": True,
        "kid": kid_for(key.public_key()),
        "public_jwk": public_jwk(key.public_key()),
        "version": doc["version"],
        "since": "2026-01-31T12:00:00Z",
        "audit": "ok",
    }
    broken = json.loads(status_payload("D", key, online=False, since=NOW, audit="broken"))
    assert broken["audit"] == "broken" and broken["online"] is False
    with pytest.raises(ValueError, match="ok or broken"):
        status_payload("D", key, online=True, since=NOW, audit="fine")


def test_topics_follow_the_contract() -> None:
    t = Topics("doorbell", "D")
    assert t.requests == "doorbell/D/requests"
    assert t.status == "doorbell/D/status"
    assert t.audit_head == "doorbell/D/audit/head"
    assert t.responses("r") == "doorbell/D/responses/r"
    assert t.deliveries("r", "J") == "doorbell/D/deliveries/r/J"


# --- the service with a recording client ----------------------------------------------------


class FakeClient:
    """Records publishes (acknowledged at once) and acks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bytes | None]] = []
        self.expiries: list[int | None] = []
        self.acked: list[int] = []
        self.changed = threading.Condition()

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        expiry: int | None = None,
        timeout: float | None = None,
    ) -> Future[None]:
        data = payload.encode() if isinstance(payload, str) else payload
        with self.changed:
            self.published.append((topic, data, correlation_data))
            self.expiries.append(expiry)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def ack(self, message: InboundMessage) -> None:
        if message.qos == 0:  # as MQTTClient.ack: QoS 0 has nothing to acknowledge
            return
        with self.changed:
            self.acked.append(message.mid)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[RequestService, FakeClient, Requester, Path]]:
    key = Ed25519PrivateKey.generate()
    alice_key = Ed25519PrivateKey.generate()
    store = RequestStore(tmp_path / "requests.db")
    audit = AuditLog(tmp_path / "audit.jsonl", key)
    store.add_requester("alice", "Alice", "neighbor", alice_key.public_key())
    svc = RequestService(
        topics=Topics("doorbell", "front-door"),
        policy=RequestPolicy(device_id="front-door"),
        store=store,
        audit=audit,
        signing_key=key,
        summary_interval=0.1,
        revocation_poll=0.1,
    )
    client = FakeClient()
    svc.attach(client)
    svc.start()
    alice = Requester(
        "alice", alice_key, kid_for(alice_key.public_key()),
        str(x25519.Identity.generate().to_public()),
    )
    yield svc, client, alice, tmp_path
    svc.close()
    store.close()


def inbound(payload: str, mid: int, *, dup: bool = False, qos: int = 1) -> InboundMessage:
    return InboundMessage(TOPIC_REQUESTS, payload.encode(), qos, False, dup, b"cd", mid, 0)


def test_a_redelivered_duplicate_is_dropped_silently_but_a_replay_is_answered(
    service: tuple[RequestService, FakeClient, Requester, Path],
) -> None:
    svc, client, alice, _ = service
    token, jti = request(alice)
    svc.on_message(inbound(token, 1))
    eventually(lambda: 1 in client.acked)
    svc.on_message(inbound(token, 2, dup=True))  # the broker never saw our first PUBACK
    eventually(lambda: 2 in client.acked)
    assert len(client.published) == 1 and svc.stats.duplicates == 1
    svc.on_message(inbound(token, 3))  # someone publishes the same token again: a replay
    eventually(lambda: 3 in client.acked)
    assert len(client.published) == 2
    device_pub = svc._key.public_key()
    statuses = [
        verify_device_jws(p, device_pub, RESPONSE_TYP) for _, p, _ in client.published
    ]
    assert [(c["req"], c["status"], c.get("error")) for c in statuses] == [
        (jti, "pending", None), (jti, "rejected", "replayed")
    ]
    assert all(cd == b"cd" for _, _, cd in client.published)


def test_rejections_beyond_the_budget_are_summarised_not_answered(
    service: tuple[RequestService, FakeClient, Requester, Path],
) -> None:
    svc, client, alice, tmp_path = service
    token, _ = request(alice)
    svc.on_message(inbound(token, 1))
    for mid in range(2, 40):
        svc.on_message(inbound(token, mid))  # replays of one captured token
    eventually(lambda: len(client.acked) == 39)
    answered = len(client.published)
    assert answered == 1 + 20  # pending, then the per-minute burst of rejections
    assert svc.stats.suppressed == 18
    svc.close()
    entries = [e for e in read_entries(tmp_path / "audit.jsonl") if e.event == "request_rejected"]
    individual = [e for e in entries if "suppressed" not in e.fields]
    summaries = [e for e in entries if "suppressed" in e.fields]
    assert len(individual) == 20
    assert sum(e.fields["suppressed"] for e in summaries) == 18
    assert all(e.fields["errors"] == {"replayed": e.fields["suppressed"]} for e in summaries)


def test_oversize_and_foreign_topics_are_dropped_in_the_callback(
    service: tuple[RequestService, FakeClient, Requester, Path],
) -> None:
    svc, client, _, _ = service
    svc.on_message(inbound("x" * 9000, 1))
    svc.on_message(InboundMessage("doorbell/front-door/other", b"x", 1, False, False, None, 2, 0))
    assert client.acked == [1, 2]
    assert svc.stats.unverifiable["oversize"] == 1
    assert client.published == []


def test_peek_kid_reads_only_the_header() -> None:
    key = Ed25519PrivateKey.generate()
    alice = Requester("alice", key, kid_for(key.public_key()),
                      str(x25519.Identity.generate().to_public()))
    token, _ = request(alice)
    assert peek_kid(token.encode()) == alice.kid
    assert peek_kid(b"garbage") is None
    assert peek_kid(b"!!!.x.y") is None
    assert peek_kid(b"eyJhbGciOiJFZERTQSJ9.x.y") is None  # header without a kid
    assert peek_kid(b"A" * 2000 + b".x.y") is None


def test_suspects_are_acked_at_once_and_enrolled_kids_are_queued_unacked(
    service: tuple[RequestService, FakeClient, Requester, Path],
) -> None:
    svc, client, alice, _ = service
    stranger_key = Ed25519PrivateKey.generate()
    stranger = Requester("mallory", stranger_key, kid_for(stranger_key.public_key()),
                         alice.recipient)
    svc.on_message(inbound(request(stranger)[0], 7))
    assert 7 in client.acked  # before any processing: it must not hold a broker slot
    eventually(lambda: svc.stats.unverifiable["unknown_kid"] == 1)
    assert client.acked.count(7) == 1  # and never acknowledged twice
    token, jti = request(alice)
    svc.on_message(inbound(token, 8))
    eventually(lambda: 8 in client.acked)
    claims = verify_device_jws(client.published[-1][1], svc._key.public_key(), RESPONSE_TYP)
    assert (claims["req"], claims["status"]) == (jti, "pending")


# --- fairness and the enrolled-key snapshot -------------------------------------------------


def test_fair_queue_serves_keys_round_robin_within_its_capacity() -> None:
    q: FairQueue[str] = FairQueue(5)
    for i in range(3):
        assert q.put_nowait("flood", f"f{i}")
    assert q.put_nowait("bob", "b0")
    assert q.put_nowait("carol", "c0")
    assert not q.put_nowait("bob", "b1")  # full: nothing stored
    assert q.qsize() == 5
    assert [q.get() for _ in range(5)] == ["f0", "b0", "c0", "f1", "f2"]
    assert q.get() is None and q.get(timeout=0.01) is None
    q.put_nowait("bob", "b2")
    q.clear()
    assert q.qsize() == 0 and q.get() is None


def _unstarted_service(
    tmp_path: Path, *names: str, kid_refresh: float = 3600.0
) -> tuple[RequestService, FakeClient, RequestStore, dict[str, Requester]]:
    key = Ed25519PrivateKey.generate()
    store = RequestStore(tmp_path / "requests.db")
    people: dict[str, Requester] = {}
    for name in names:
        k = Ed25519PrivateKey.generate()
        store.add_requester(name, name.title(), "neighbor", k.public_key())
        people[name] = Requester(name, k, kid_for(k.public_key()),
                                 str(x25519.Identity.generate().to_public()))
    svc = RequestService(
        topics=Topics("doorbell", "front-door"),
        policy=RequestPolicy(device_id="front-door", rate_limit=1000),
        store=store,
        audit=AuditLog(tmp_path / "audit.jsonl", key),
        signing_key=key,
        kid_refresh=kid_refresh,
    )
    client = FakeClient()
    svc.attach(client)
    return svc, client, store, people


def _forged(victim: Requester) -> str:
    token, _ = request(victim)
    head, payload, _sig = token.split(".")
    other = Requester(victim.id, Ed25519PrivateKey.generate(), victim.kid, victim.recipient)
    return f"{head}.{payload}.{request(other)[0].split('.')[2]}"


def test_a_flood_under_one_kid_does_not_delay_another_requester(tmp_path: Path) -> None:
    svc, client, store, people = _unstarted_service(tmp_path, "alice", "bob")
    for mid in range(1, 41):
        svc.on_message(inbound(_forged(people["alice"]), mid))
    token, jti = request(people["bob"])
    svc.on_message(inbound(token, 99))
    svc.start()
    try:
        eventually(lambda: len(client.acked) == 41)
        # Round robin by kid: bob's request is second, not behind alice's forty forgeries.
        assert client.acked.index(99) <= 1
        assert svc.stats.unverifiable["bad_signature"] == 40
        claims = verify_device_jws(client.published[0][1], svc._key.public_key(), RESPONSE_TYP)
        assert (claims["req"], claims["status"]) == (jti, "pending")
        assert len(client.published) == 1  # nothing answered the forgeries
    finally:
        svc.close()
        store.close()


def test_forgeries_under_an_enrolled_kid_cost_no_database_read(tmp_path: Path) -> None:
    svc, client, store, people = _unstarted_service(tmp_path, "alice")
    reads: list[str] = []
    real = store.key_for_kid

    def counting(kid: str) -> TrustedKey | None:
        reads.append(kid)
        return real(kid)

    store.key_for_kid = counting  # type: ignore[method-assign]
    svc.start()
    try:
        for mid in range(1, 21):
            svc.on_message(inbound(_forged(people["alice"]), mid))
        eventually(lambda: svc.stats.unverifiable["bad_signature"] == 20)
        assert reads == [] and client.published == []
        token, jti = request(people["alice"])
        svc.on_message(inbound(token, 21))
        eventually(lambda: 21 in client.acked)
        assert reads  # a verified signature reads the requester fresh
        claims = verify_device_jws(client.published[0][1], svc._key.public_key(), RESPONSE_TYP)
        assert (claims["req"], claims["status"]) == (jti, "pending")
    finally:
        svc.close()
        store.close()


def test_a_revocation_after_the_snapshot_applies_at_once(tmp_path: Path) -> None:
    svc, client, store, people = _unstarted_service(tmp_path, "alice")
    svc.start()
    try:
        store.revoke_requester("alice")  # the snapshot (kid_refresh 1 h) still says enrolled
        token, jti = request(people["alice"])
        svc.on_message(inbound(token, 1))
        eventually(lambda: 1 in client.acked)
        claims = verify_device_jws(client.published[-1][1], svc._key.public_key(), RESPONSE_TYP)
        assert (claims["req"], claims["status"], claims["error"]) == (jti, "rejected", "revoked")
        assert svc.stats.pending == 0
    finally:
        svc.close()
        store.close()


def test_a_requester_enrolled_after_the_snapshot_is_heard(tmp_path: Path) -> None:
    svc, client, store, _ = _unstarted_service(tmp_path)
    svc.start()
    try:
        k = Ed25519PrivateKey.generate()
        store.add_requester("carol", "Carol", "neighbor", k.public_key())
        carol = Requester("carol", k, kid_for(k.public_key()),
                          str(x25519.Identity.generate().to_public()))
        token, jti = request(carol)
        svc.on_message(inbound(token, 1))  # unknown to the snapshot: the suspect lane
        eventually(lambda: svc.stats.pending == 1)
        claims = verify_device_jws(client.published[-1][1], svc._key.public_key(), RESPONSE_TYP)
        assert (claims["req"], claims["status"]) == (jti, "pending")
    finally:
        svc.close()
        store.close()


def test_suspects_past_their_rate_wait_and_are_all_handled(tmp_path: Path) -> None:
    svc, client, store, _ = _unstarted_service(tmp_path)
    svc._suspect_budget = Budget(5, 0.5)  # 10 a second instead of 500
    for mid in range(1, 21):
        svc.on_message(inbound(f"garbage-{mid}", mid))
    assert sorted(client.acked) == list(range(1, 21))  # acknowledged at intake
    svc.start()
    try:
        eventually(lambda: sum(svc.stats.unverifiable.values()) == 20)
        assert svc.stats.dropped == 0 and client.published == []
    finally:
        svc.close()
        store.close()


def test_the_service_counts_as_alive_while_it_is_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up audit check starts the service from its own thread while the daemon polls
    ``alive``: answering unconfirmed responses first must not read as a dead service."""
    key = Ed25519PrivateKey.generate()
    with RequestStore(tmp_path / "requests.db") as store:
        svc = RequestService(
            topics=Topics("doorbell", "front-door"),
            policy=RequestPolicy(device_id="front-door"),
            store=store,
            audit=AuditLog(tmp_path / "audit.jsonl", key),
            signing_key=key,
        )
        svc.attach(FakeClient())
        seen: list[bool] = []
        monkeypatch.setattr(svc.responder, "resend_unanswered", lambda: seen.append(svc.alive))
        svc.start()
        assert seen == [True] and svc.alive
        svc.close()
