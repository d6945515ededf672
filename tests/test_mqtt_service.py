"""The request service end to end through a real mosquitto: every §4 answer, the unverifiable
path, restarts of the agent and of the broker, and requests queued while the agent was offline.

``AgentHarness`` (also used by the other ``test_mqtt_*`` files) runs a ``RequestsWorker`` on a
real state directory (device key, ``requests.db``, ``audit.jsonl``) against a test broker.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from pyrage import x25519

from agent import config
from agent.audit import AuditLog, parse_head_jws, read_entries
from agent.keys import create_device_keys, kid_for, okp_private
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requests.responder import REJECTION_DETAIL
from agent.requests.store import RequestStore
from agent.requests.verify import JWS_REGISTRY, REQUEST_TYP
from agent.requests.worker import RequestsWorker
from agent.timeutil import rfc3339, utcnow
from tests.mosquitto import Collector, Mosquitto

DEVICE = "front-door"
PREFIX = "doorbell"
TOPIC_REQUESTS = f"{PREFIX}/{DEVICE}/requests"
TOPIC_STATUS = f"{PREFIX}/{DEVICE}/status"
TOPIC_HEAD = f"{PREFIX}/{DEVICE}/audit/head"


def responses_topic(requester_id: str) -> str:
    return f"{PREFIX}/{DEVICE}/responses/{requester_id}"


@dataclass
class Requester:
    id: str
    key: Ed25519PrivateKey
    kid: str
    recipient: str


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class AgentHarness:
    """A device state directory plus a ``RequestsWorker`` that can be started and stopped."""

    def __init__(self, root: Path, broker: Mosquitto, overrides: dict[str, Any] | None = None):
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        self.key = create_device_keys(self.state)
        self.public: Ed25519PublicKey = self.key.public_key()
        self.broker = broker
        raw = merge(
            {
                "device_id": DEVICE,
                "state_dir": str(self.state),
                "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
            },
            overrides or {},
        )
        self.cfg = config.parse(raw)
        self.audit_path = self.state / "audit.jsonl"
        self.worker: RequestsWorker | None = None
        self.head_wait = 0.5  # seconds the start-up audit check waits for a retained head
        self._store: RequestStore | None = None
        self._audit: AuditLog | None = None

    def enroll(self, requester_id: str) -> Requester:
        key = Ed25519PrivateKey.generate()
        with RequestStore.open(self.state) as store, AuditLog(self.audit_path, self.key) as audit:
            store.add_requester(requester_id, requester_id.title(), "neighbor", key.public_key(),
                                audit=audit)
        recipient = str(x25519.Identity.generate().to_public())
        return Requester(requester_id, key, kid_for(key.public_key()), recipient)

    def revoke(self, requester_id: str) -> None:
        """What `doorbell-agent requesters revoke` does, from another process's connection."""
        with RequestStore.open(self.state) as store, AuditLog(self.audit_path, self.key) as audit:
            store.revoke_requester(requester_id, audit=audit)

    def start(self) -> RequestsWorker:
        self._store = RequestStore.open(self.state)
        self._audit = AuditLog(self.audit_path, self.key)
        self.worker = RequestsWorker(
            self.cfg, signing_key=self.key, store=self._store, audit=self._audit,
            summary_interval=0.2, revocation_poll=0.2, head_interval=0.2,
            head_wait=self.head_wait,
        )
        self.worker.start()
        self.worker.client.wait_ready(10)
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self._store is not None:
            self._store.close()
        if self._audit is not None:
            self._audit.close()

    def events(self, *names: str) -> list[dict[str, Any]]:
        out = []
        for entry in read_entries(self.audit_path):
            if not names or entry.event in names:
                out.append({"event": entry.event, **entry.fields})
        return out

    def store(self) -> RequestStore:
        return RequestStore.open(self.state)


@pytest.fixture
def harness(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[AgentHarness]:
    h = AgentHarness(tmp_path, mosquitto)
    yield h
    h.stop()


def sign(requester: Requester, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    hdr = {"alg": "EdDSA", "kid": requester.kid, "typ": REQUEST_TYP, **(header or {})}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return str(jws.serialize_compact(hdr, payload, okp_private(requester.key),
                                     registry=JWS_REGISTRY))


_counter = iter(range(10**6))


def claims_for(requester: Requester, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": requester.id,
        "aud": DEVICE,
        "iat": now,
        "exp": now + 3600,
        "jti": f"req-{next(_counter):06d}-{now}-abcdef",
        "window": {
            "start": rfc3339(utcnow() - timedelta(minutes=30)),
            "end": rfc3339(utcnow() - timedelta(minutes=10)),
        },
        "reason": "parcel stolen from the porch",
        "legal_basis": "consent",
        "recipient": requester.recipient,
    }
    claims.update(overrides)
    return claims


def request(requester: Requester, **overrides: Any) -> tuple[str, str]:
    """A signed request token and its jti."""
    claims = claims_for(requester, **overrides)
    return sign(requester, claims), claims["jti"]


def listen(broker: Mosquitto, requester: Requester) -> Collector:
    c = broker.client()
    assert c.subscribe(responses_topic(requester.id)) == [1]
    return c


def next_response(c: Collector, device: Ed25519PublicKey, timeout: float = 10.0
                  ) -> tuple[dict[str, Any], Any]:
    msg = c.get(timeout)
    claims = verify_device_jws(bytes(msg.payload), device, RESPONSE_TYP)
    return claims, msg


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (a wait for an asynchronous effect, not a timing test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{predicate.__name__} never held"
        time.sleep(0.02)


def correlation_of(msg: Any) -> bytes | None:
    props = getattr(msg, "properties", None)
    value = getattr(props, "CorrelationData", None)
    return None if value is None else bytes(value)


# --- valid requests -------------------------------------------------------------------------


def test_valid_request_gets_pending_with_nothing_about_footage(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    harness.start()
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token, correlation_data=b"corr-1")

    claims, msg = next_response(inbox, harness.public)
    assert set(claims) == {"iss", "aud", "iat", "req", "status", "audit"}
    assert claims["iss"] == DEVICE and claims["aud"] == "alice" and claims["req"] == jti
    assert claims["status"] == "pending"
    # §4: a head freshly signed over the newest request-log entry (here request_pending).
    head = parse_head_jws(claims["audit"], harness.public)
    last = list(read_entries(harness.audit_path))[-1]
    assert (head.iss, head.seq, head.hash) == (DEVICE, last.seq, last.hash)
    assert last.event == "request_pending"
    assert correlation_of(msg) == b"corr-1"
    assert not msg.retain
    with harness.store() as store:
        assert store.get_request(jti).status == "pending"
    events = harness.events("request_received", "request_pending")
    assert [e["event"] for e in events] == ["request_received", "request_pending"]
    for e in events:
        assert e["jti"] == jti and e["requester"] == "alice" and e["kid"] == alice.kid
        assert e["legal_basis"] == "consent" and e["reason"] == "parcel stolen from the porch"
        assert set(e["window"]) == {"start", "end"}


def test_response_without_correlation_data_has_none(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    harness.start()
    inbox = listen(harness.broker, alice)
    inbox.publish(TOPIC_REQUESTS, request(alice)[0])
    claims, msg = next_response(inbox, harness.public)
    assert claims["status"] == "pending"
    assert correlation_of(msg) is None


# --- every rejection code -------------------------------------------------------------------

DAY = 86400


def _overrides(code: str) -> dict[str, Any]:
    now = int(time.time())
    start = utcnow() - timedelta(hours=3)
    table: dict[str, dict[str, Any]] = {
        "expired": {"iat": now - 200, "exp": now - 100},
        "not_yet_valid": {"iat": now + 1000, "exp": now + 2000},
        "lifetime_too_long": {"iat": now, "exp": now + 8 * DAY},
        "wrong_audience": {"aud": "back-door"},
        "window_too_long": {
            "window": {"start": rfc3339(start), "end": rfc3339(start + timedelta(hours=2))}
        },
        "window_outside_retention": {
            "window": {
                "start": rfc3339(utcnow() - timedelta(days=8)),
                "end": rfc3339(utcnow() - timedelta(days=8) + timedelta(minutes=5)),
            }
        },
        "bad_claims": {"legal_basis": "curiosity"},
    }
    return table[code]


@pytest.mark.parametrize(
    "code",
    [
        "expired", "not_yet_valid", "lifetime_too_long", "wrong_audience", "window_too_long",
        "window_outside_retention", "bad_claims", "replayed", "rate_limited", "revoked",
    ],
)
def test_every_rejection_code_end_to_end(tmp_path: Path, mosquitto: Mosquitto, code: str) -> None:
    overrides = {"requests": {"rate_limit": 1}} if code == "rate_limited" else None
    h = AgentHarness(tmp_path, mosquitto, overrides)
    try:
        alice = h.enroll("alice")
        h.start()
        inbox = listen(mosquitto, alice)
        spy = mosquitto.client()
        spy.subscribe(f"{PREFIX}/#")
        first_jti = None
        if code in ("replayed", "rate_limited"):
            token, first_jti = request(alice)
            inbox.publish(TOPIC_REQUESTS, token)
            assert next_response(inbox, h.public)[0]["status"] == "pending"
            if code == "rate_limited":
                token, jti = request(alice)
            else:
                jti = first_jti
        else:
            if code == "revoked":
                h.revoke("alice")
                token, jti = request(alice)
            else:
                token, jti = request(alice, **_overrides(code))
        inbox.publish(TOPIC_REQUESTS, token, correlation_data=b"c-" + code.encode())

        claims, msg = next_response(inbox, h.public)
        assert claims == {
            "iss": DEVICE, "aud": "alice", "iat": claims["iat"], "req": jti,
            "status": "rejected", "error": code, "detail": REJECTION_DETAIL[code],
            "audit": claims["audit"],
        }
        assert parse_head_jws(claims["audit"], h.public).seq >= 1
        assert correlation_of(msg) == b"c-" + code.encode()
        h.stop()
        # Nothing else was published: only the request(s), the answers to alice, the status
        # and the audit head ever appear under the prefix.
        topics = {m.topic for m in spy.drain()}
        assert topics <= {TOPIC_REQUESTS, responses_topic("alice"), TOPIC_STATUS, TOPIC_HEAD}
        assert inbox.messages.empty()
        rejected = h.events("request_rejected")
        assert [e["error"] for e in rejected] == [code]
        assert rejected[0]["requester"] == "alice" and rejected[0]["kid"] == alice.kid
        assert h.events("request_received")[-1]["jti"] == jti
        with h.store() as store:
            pending = [r.jti for r in store.list_requests(["pending"])]
        assert pending == ([first_jti] if first_jti else [])
    finally:
        h.stop()


# --- unverifiable ---------------------------------------------------------------------------


def test_unverifiable_messages_get_no_response_and_are_counted(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    stranger = Requester("alice", Ed25519PrivateKey.generate(), "", alice.recipient)
    stranger.kid = kid_for(stranger.key.public_key())
    harness.start()
    inbox = listen(harness.broker, alice)
    good, _ = request(alice)
    head, payload, _sig = good.split(".")
    forged_sig = sign(alice, claims_for(alice)).split(".")[2]
    none_header = "eyJhbGciOiJub25lIiwia2lkIjoieCIsInR5cCI6ImRvb3JiZWxsLXJlcXVlc3Qrand0In0"
    bad = [
        b"garbage",
        b"\xff\xfe not ascii",
        b"x" * 9000,  # over requests.max_bytes: dropped in the network callback
        f"{head}.{payload}.{forged_sig}".encode(),  # alice's kid, signature of other claims
        sign(stranger, claims_for(alice)).encode(),  # a key nobody enrolled
        f"{none_header}.{payload}.".encode(),
        sign(alice, claims_for(alice), {"typ": "JWT"}).encode(),
    ]
    for payload_bytes in bad:
        inbox.publish(TOPIC_REQUESTS, payload_bytes)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    # The first answer on alice's topic is the one to the valid request sent last.
    claims, _ = next_response(inbox, harness.public)
    assert claims["req"] == jti and claims["status"] == "pending"
    worker = harness.worker
    assert worker is not None
    stats = worker.service.stats
    assert sum(stats.unverifiable.values()) == len(bad)
    assert stats.unverifiable["oversize"] == 1 and stats.unverifiable["bad_signature"] == 1
    assert stats.unverifiable["unknown_kid"] == 1
    harness.stop()
    assert inbox.messages.empty()
    summaries = harness.events("request_unverifiable")
    assert sum(e["count"] for e in summaries) == len(bad)
    assert sum(sum(e["reasons"].values()) for e in summaries) == len(bad)
    # Bounded: summaries, not one entry per message.
    assert len(summaries) < len(bad)
    assert harness.events("request_received")[-1]["jti"] == jti
    assert len(harness.events("request_received")) == 1


# --- restarts -------------------------------------------------------------------------------


def test_replay_is_refused_across_an_agent_restart(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    harness.start()
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    assert next_response(inbox, harness.public)[0]["status"] == "pending"
    harness.stop()
    harness.start()
    inbox.publish(TOPIC_REQUESTS, token)
    claims, _ = next_response(inbox, harness.public)
    assert (claims["req"], claims["status"], claims["error"]) == (jti, "rejected", "replayed")
    with harness.store() as store:
        assert store.get_request(jti).status == "pending"


def test_requests_sent_while_agent_is_down_are_handled_exactly_once(
    harness: AgentHarness,
) -> None:
    alice = harness.enroll("alice")
    harness.start()  # creates the persistent session and its subscription
    harness.stop()
    inbox = listen(harness.broker, alice)
    jtis = []
    for _ in range(3):
        token, jti = request(alice)
        jtis.append(jti)
        inbox.publish(TOPIC_REQUESTS, token)
    harness.start()
    got = [next_response(inbox, harness.public)[0] for _ in range(3)]
    assert [(c["req"], c["status"]) for c in got] == [(j, "pending") for j in jtis]
    harness.stop()
    assert inbox.messages.empty()
    # A second restart redelivers nothing and answers nothing again.
    harness.start()
    with pytest.raises(queue.Empty):
        inbox.get(timeout=1.0)
    assert [e["jti"] for e in harness.events("request_pending")] == jtis
    with harness.store() as store:
        assert sorted(r.jti for r in store.list_requests(["pending"])) == sorted(jtis)


def test_broker_restart_mid_run(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    worker = harness.start()
    inbox = listen(harness.broker, alice)
    inbox.publish(TOPIC_REQUESTS, request(alice)[0])
    assert next_response(inbox, harness.public)[0]["status"] == "pending"
    inbox.close()
    connects = worker.client.stats.connects
    harness.broker.restart()

    def reconnected() -> bool:
        return worker.client.stats.connects > connects and worker.client.connected

    eventually(reconnected, timeout=30)
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    claims, _ = next_response(inbox, harness.public)
    assert (claims["req"], claims["status"]) == (jti, "pending")
    status = harness.broker.client()
    status.subscribe(TOPIC_STATUS)
    doc = json.loads(status.get().payload)
    assert doc["online"] is True


def test_revocation_by_the_cli_answers_pending_requests(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    harness.start()
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token, correlation_data=b"keep-me")
    assert next_response(inbox, harness.public)[0]["status"] == "pending"
    harness.revoke("alice")
    claims, msg = next_response(inbox, harness.public)
    assert (claims["req"], claims["status"], claims["error"]) == (jti, "rejected", "revoked")
    assert correlation_of(msg) == b"keep-me"

    def answered() -> bool:
        with harness.store() as store:
            record = store.get_request(jti)
        return (record.status, record.responded) == ("rejected", "rejected")

    eventually(answered)
    # Answered once, not at every poll.
    with pytest.raises(queue.Empty):
        inbox.get(timeout=1.0)
