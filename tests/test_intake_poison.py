"""Poison-proof intake (issue 10, item 1): requester-controlled values that are out of range or
of the wrong type never crash the verifier, the store, the worker, a restart, or the listings;
every message is acknowledged exactly once; requester text never forges log lines."""

from __future__ import annotations

import logging
import queue
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.audit import AuditLog
from agent.daemon import Daemon
from agent.keys import kid_for
from agent.logtext import OneLineFormatter
from agent.mqtt import InboundMessage
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requests.service import RequestService
from agent.requests.store import RequestStore
from agent.requests.verify import RequestPolicy
from agent.requests.worker import RequestsWorker
from agent.topics import Topics
from tests.mosquitto import Mosquitto
from tests.test_mqtt_service import (
    TOPIC_REQUESTS,
    AgentHarness,
    Requester,
    correlation_of,
    eventually,
    listen,
    next_response,
    request,
)
from tests.test_mqtt_units import FakeClient

POISON: list[dict[str, Any]] = [
    {"iat": 99999999999999},
    {"iat": -(2**62)},
    {"exp": 2**70},
    {"exp": 2**63},
    {"iat": -(2**63) - 1},
    {"iat": 1.5e300},
    {"exp": True},
    {"iat": "1700000000"},
    {"iat": [1]},
    {"exp": {"n": 1}},
    {"window": {"start": "0001-01-01T00:00:00Z", "end": "0001-01-01T00:10:00Z"}},
    {"window": {"start": "1999-12-31T23:50:00Z", "end": "2000-01-01T00:10:00Z"}},
    {"window": {"start": "9999-12-31T23:00:00Z", "end": "10000-01-01T00:10:00Z"}},
    {"window": {"start": 5, "end": 6}},
    {"reason": {"a": [1, 2]}},
    {"iat": 2**53 + 1, "exp": 2**53 + 2},
]


class Rig:
    """A RequestService on a real store and audit log, with a recording client."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = Ed25519PrivateKey.generate()
        self.alice_key = Ed25519PrivateKey.generate()
        store = RequestStore(root / "requests.db")
        store.add_requester("alice", "Alice", "neighbor", self.alice_key.public_key())
        store.close()
        self.alice = Requester(
            "alice", self.alice_key, kid_for(self.alice_key.public_key()),
            str(x25519.Identity.generate().to_public()),
        )
        self.svc: RequestService | None = None
        self.client = FakeClient()

    def start(self) -> RequestService:
        self.store = RequestStore(self.root / "requests.db")
        self.audit = AuditLog(self.root / "audit.jsonl", self.key)
        self.svc = RequestService(
            topics=Topics("doorbell", "front-door"),
            policy=RequestPolicy(device_id="front-door"),
            store=self.store,
            audit=self.audit,
            signing_key=self.key,
            summary_interval=0.1,
            revocation_poll=0.05,
        )
        self.client = FakeClient()
        self.svc.attach(self.client)
        self.svc.start()
        return self.svc

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.close()
            self.svc = None
            self.store.close()
            self.audit.close()

    def statuses(self) -> list[tuple[Any, Any, Any]]:
        out = []
        for _, payload, _ in self.client.published:
            c = verify_device_jws(payload, self.key.public_key(), RESPONSE_TYP)
            out.append((c["req"], c["status"], c.get("error")))
        return out


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.stop()


def inbound(payload: str, mid: int) -> InboundMessage:
    return InboundMessage(TOPIC_REQUESTS, payload.encode(), 1, False, False, b"cd", mid, 0)


@pytest.mark.parametrize("overrides", POISON)
def test_poison_claims_are_rejected_bad_claims_and_the_worker_lives(
    rig: Rig, overrides: dict[str, Any]
) -> None:
    svc = rig.start()
    poison, poison_jti = request(rig.alice, **overrides)
    svc.on_message(inbound(poison, 1))
    eventually(lambda: 1 in rig.client.acked)
    good, good_jti = request(rig.alice)
    svc.on_message(inbound(good, 2))
    eventually(lambda: 2 in rig.client.acked)
    # Give the revocation poll (which lists stored records) a few turns on the poisoned store.
    eventually(lambda: svc._thread.is_alive() and len(rig.client.published) >= 2)
    assert rig.statuses() == [
        (poison_jti, "rejected", "bad_claims"), (good_jti, "pending", None)
    ]
    assert sorted(rig.client.acked) == [1, 2]
    assert svc._thread.is_alive()
    assert [r.jti for r in rig.store.list_requests()]  # listing never raises


def test_the_far_future_within_range_is_a_window_in_the_future(rig: Rig) -> None:
    svc = rig.start()
    window = {"start": "9999-12-31T23:00:00Z", "end": "9999-12-31T23:59:59Z"}
    poison, jti = request(rig.alice, window=window)
    svc.on_message(inbound(poison, 1))
    eventually(lambda: len(rig.client.published) == 1)
    assert rig.statuses() == [(jti, "rejected", "window_in_future")]
    assert rig.client.acked == [1]
    assert rig.store.get_request(jti).window_end is not None


def _poison_row(db: Path, jti: str, **values: object) -> None:
    """Write a stored record with absurd values, as an older agent could have."""
    row: dict[str, object] = {
        "jti": jti, "requester": "alice", "kid": "k", "iat": 99999999999999, "exp": 2**62,
        "received_at": "2026-01-31T12:00:00.000000Z", "status": "rejected",
        "error": "bad_claims", "updated_at": "2026-01-31T12:00:00.000000Z",
        "window_start": "not a time", "decided_at": "0000-00-00",
    }
    row.update(values)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            f"INSERT INTO requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    conn.close()


def test_a_stored_poison_record_neither_kills_a_restart_nor_the_listings(rig: Rig) -> None:
    _poison_row(rig.root / "requests.db", "poison-000000000001")
    _poison_row(rig.root / "requests.db", "poison-000000000002", status="pending",
                iat=-(2**62), exp="soon", received_at=12, updated_at=3.5)
    svc = rig.start()  # answers what the last run left unanswered: must not raise
    good, good_jti = request(rig.alice)
    svc.on_message(inbound(good, 3))
    eventually(lambda: (good_jti, "pending", None) in rig.statuses())
    assert svc._thread.is_alive()
    records = {r.jti: r for r in rig.store.list_requests()}
    assert {"poison-000000000001", "poison-000000000002", good_jti} <= set(records)
    for record in records.values():
        record.to_json()  # `requests list --json` renders every record


def test_requester_text_cannot_forge_log_lines(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    svc = rig.start()
    forged = "abc\nERROR forged line\u202e\x1b[31m"
    token, _ = request(rig.alice, jti=forged)
    caplog.set_level(logging.DEBUG)
    svc.on_message(inbound(token, 1))
    eventually(lambda: 1 in rig.client.acked)
    eventually(lambda: len(rig.client.published) == 1)
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and "\x1b" not in text and "\u202e" not in text, text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_request_thread_stops_the_daemon_with_exit_1(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """If the service thread dies anyway (a bug), the daemon exits 1 so systemd restarts it,
    instead of running on with nobody answering requests."""
    harness = AgentHarness(tmp_path, mosquitto)
    store = harness.store()
    audit = AuditLog(harness.audit_path, harness.key)
    worker = RequestsWorker(harness.cfg, signing_key=harness.key, store=store, audit=audit)
    worker.supervise_interval = 0.05

    def broken(timeout: float) -> None:
        raise RuntimeError("a bug in the worker loop")

    worker.service._next_item = broken  # type: ignore[method-assign]
    stop = threading.Event()
    # On code that does not supervise the thread, the daemon would run on until this fires.
    watchdog = threading.Timer(30.0, stop.set)
    watchdog.start()
    try:
        assert Daemon([worker], stop, join_timeout=10.0).run() == 1
    finally:
        watchdog.cancel()
        store.close()
        audit.close()


def test_correlation_data_up_to_256_bytes_is_echoed_longer_is_unverifiable(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    harness = AgentHarness(tmp_path, mosquitto)
    alice = harness.enroll("alice")
    worker = harness.start()
    try:
        inbox = listen(mosquitto, alice)
        long_token, _ = request(alice)
        inbox.publish(TOPIC_REQUESTS, long_token, correlation_data=b"L" * 257)
        token, jti = request(alice)
        inbox.publish(TOPIC_REQUESTS, token, correlation_data=b"C" * 256)
        claims, msg = next_response(inbox, harness.public)
        # Handled in order: the first response is the second request's (the first got none).
        assert (claims["req"], claims["status"]) == (jti, "pending")
        assert correlation_of(msg) == b"C" * 256
        eventually(lambda: worker.service.stats.unverifiable["correlation_too_long"] == 1)
        with pytest.raises(queue.Empty):
            inbox.get(0.5)
    finally:
        harness.stop()
    assert "request_unverifiable" in {e["event"] for e in harness.events()}


def test_the_program_log_format_keeps_every_message_on_one_printable_line() -> None:
    formatter = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    forged = "J\n2026-01-01 00:00:00,000 ERROR agent: approved\u202e\x1b[2K"
    record = logging.LogRecord("agent.x", logging.INFO, __file__, 1, "request %s", (forged,), None)
    line = formatter.format(record)
    assert line == (
        "INFO agent.x: request J\\n2026-01-01 00:00:00,000 ERROR agent: approved\\u202e\\x1b[2K"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logging.LogRecord(
            "agent.x", logging.ERROR, __file__, 1, "failed %s", ("a\nb",), sys.exc_info()
        )
    text = formatter.format(failing)
    assert text.startswith("ERROR agent.x: failed a\\nb\nTraceback")  # the traceback stays
