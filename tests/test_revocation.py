"""Revocation wins (contract §4): a revocation committed by another process stops a delivery
before the next message is handed to the MQTT client, the delivery never resumes (restarts
included) and ends ``failed`` with ``error: revoked``; pending requests are answered
``rejected``/``revoked``; everything published about a request carries a Message Expiry."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent import config
from agent.mqtt import BoundedPublisher, MQTTClient
from agent.requests.responder import response_expiry
from agent.requests.store import RequestStore
from agent.vocabulary import Channel
from tests.mosquitto import Mosquitto
from tests.test_approval_coordinator import (
    JTI,
    JTI2,
    REQUESTER,
    T0,
    Harness,
    add_clip,
    close_harness,
    open_harness,
)
from tests.test_mqtt_service import TOPIC_REQUESTS, AgentHarness, listen, next_response, request
from tests.test_release_deliver import LoopbackPublisher


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = open_harness(tmp_path)
    yield harness
    close_harness(harness)


class WitnessPublisher(LoopbackPublisher):
    """Counts the messages handed over after the revocation was committed, as an independent
    connection to the database sees it (what another process would see).

    When the ``revoke_at``-th message is being handed over, it lets the revoking thread go and
    waits up to a second for its commit *between the delivery's check and the hand-over*: a
    delivery that checked without holding the store's lock would hand that message over after
    the commit. Between messages it pauses briefly, so the revocation gets its turn.
    """

    def __init__(self, db: Path, revoke_at: int) -> None:
        super().__init__()
        self._db = sqlite3.connect(db, check_same_thread=False)
        self.revoke_at = revoke_at
        self.go = threading.Event()
        self.committed = threading.Event()
        self.after_commit = 0

    def revoked_in_db(self) -> bool:
        row = self._db.execute(
            "SELECT revoked_at FROM requesters WHERE id = ?", (REQUESTER,)
        ).fetchone()
        return row is not None and row[0] is not None

    def make_room(self) -> None:
        time.sleep(0.005)

    def publish(self, topic: str, payload: bytes, qos: int, *, expiry: int | None = None) -> None:
        if self.calls + 1 == self.revoke_at:
            self.go.set()
            self.committed.wait(1.0)
        if self.revoked_in_db():
            self.after_commit += 1
        super().publish(topic, payload, qos, expiry=expiry)


def revoke_from_another_connection(h: Harness, pub: WitnessPublisher) -> threading.Thread:
    def run() -> None:
        pub.go.wait(30)
        # Its own store, as `doorbell-agent requesters revoke` in another process has.
        with RequestStore(h.tmp / "requests.db") as store:
            store.revoke_requester(REQUESTER)
        pub.committed.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_no_chunk_is_handed_to_the_client_after_the_revocation_commits(h: Harness) -> None:
    add_clip(h, 20, 3_000_000, 1)  # ~46 chunks of 64 KiB
    h.add_request(JTI)
    pub = WitnessPublisher(h.tmp / "requests.db", revoke_at=5)
    h.publisher = pub
    revoker = revoke_from_another_connection(h, pub)
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(60)
    revoker.join(30)
    assert pub.revoked_in_db()
    assert pub.after_commit == 0
    assert 5 <= len(pub.messages) < 40  # stopped soon after the revocation, no manifest
    assert not any(t.endswith("/manifest") for t, _ in pub.messages)
    record = h.store.get_request(JTI)
    assert (record.status, record.error) == ("failed", "revoked")
    assert h.responses[-1] == (JTI, "failed", {"error": "revoked"})
    failed = h.entries("request_failed")
    assert [e["error"] for e in failed] == ["revoked"]
    assert h.vault.holds() == []


def test_revocation_while_the_agent_was_down_ends_the_delivery_failed_at_start(
    h: Harness,
) -> None:
    add_clip(h, 20, 500_000, 1)
    h.add_request(JTI)
    c = h.coordinator()
    c.decide(JTI, "approve", Channel.CLI)  # approved, then the agent "crashes" before delivering
    h.responses.clear()
    with RequestStore(h.tmp / "requests.db") as other:
        revocation = other.revoke_requester(REQUESTER)
    assert revocation.cancelled == []  # nothing pending: the approved one is the agent's to end
    with h.coordinator() as again:
        assert again.wait_idle(30)
    assert h.publisher.messages == []  # not one chunk
    record = h.store.get_request(JTI)
    assert (record.status, record.error) == ("failed", "revoked")
    assert h.responses == [(JTI, "failed", {"error": "revoked"})]
    # ... and a later start does not deliver it either, nor answer anew once answered.
    h.store.mark_responded(JTI, "failed")
    h.responses.clear()
    with h.coordinator() as third:
        assert third.wait_idle(30)
    assert h.publisher.messages == [] and h.responses == []


def test_failed_response_sent_again_at_start_keeps_its_error(h: Harness) -> None:
    add_clip(h, 20, 100_000, 1)
    h.add_request(JTI)
    h.publisher.fail_at = set(range(1, 100))
    h.retries = 0
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    h.responses.clear()
    h.coordinator().recover()  # its answer was never acknowledged
    assert h.responses == [(JTI, "failed", {"error": "delivery_error"})]


def test_revoking_answers_each_pending_request_rejected_revoked_and_releases_holds(
    h: Harness,
) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.add_request(JTI2)
    with h.coordinator() as c:
        assert {hold.holder for hold in h.vault.holds()} == {JTI, JTI2}
        with RequestStore(h.tmp / "requests.db") as other:
            revocation = other.revoke_requester(REQUESTER)
        assert sorted(r.jti for r in revocation.cancelled) == [JTI, JTI2]
        unanswered = h.store.unanswered_revocations()
        assert sorted(r.jti for r in unanswered) == [JTI, JTI2]
        assert all((r.status, r.error) == ("rejected", "revoked") for r in unanswered)
        c.tick()
        # The cancelled requests' holds go, so their footage can be shredded again.
        assert h.vault.holds() == []


def test_chunks_and_manifest_carry_the_request_remaining_lifetime_as_expiry(h: Harness) -> None:
    add_clip(h, 20, 200_000, 1)
    h.add_request(JTI, exp=timedelta(hours=2))  # received at T0
    h.clock.now = T0 + timedelta(minutes=30)
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert h.publisher.messages
    assert h.publisher.expiries == [90 * 60] * len(h.publisher.messages)


def test_publisher_refusing_on_connection_loss_is_still_a_delivery_error(h: Harness) -> None:
    # The gate must not turn ordinary broker trouble into "revoked".
    add_clip(h, 20, 100_000, 1)
    h.add_request(JTI)
    h.publisher.fail_at = {1}
    h.retries = 0
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    record = h.store.get_request(JTI)
    assert (record.status, record.error) == ("failed", "delivery_error")


# --- Message Expiry on responses, through a real broker -------------------------------------


def test_response_expiry_is_the_remaining_lifetime_bounded() -> None:
    cap = timedelta(days=7)
    assert response_expiry(T0 + timedelta(hours=1), T0, cap) == 3600
    assert response_expiry(T0 - timedelta(hours=1), T0, cap) == 1  # over: still delivered once
    assert response_expiry(T0 + timedelta(days=30), T0, cap) == 7 * 86400
    assert response_expiry(2**70, T0, cap) == 7 * 86400  # a rejected request's wild exp
    assert response_expiry(-(2**62), T0, cap) == 1
    assert response_expiry(None, T0, cap) == 7 * 86400


def test_responses_carry_message_expiry_at_the_broker(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    harness = AgentHarness(tmp_path, mosquitto)
    try:
        alice = harness.enroll("alice")
        harness.start()
        inbox = listen(mosquitto, alice)
        exp = int(time.time()) + 3600
        token, jti = request(alice, exp=exp)
        inbox.publish(TOPIC_REQUESTS, token)
        claims, msg = next_response(inbox, harness.public)
        assert (claims["req"], claims["status"]) == (jti, "pending")
        expiry = msg.properties.MessageExpiryInterval
        assert exp - int(time.time()) - 5 <= expiry <= 3600
        harness.revoke("alice")
        claims, msg = next_response(inbox, harness.public)
        assert (claims["req"], claims["status"], claims["error"]) == (jti, "rejected", "revoked")
        assert 0 < msg.properties.MessageExpiryInterval <= 3600
    finally:
        harness.stop()


def test_delivery_publisher_sets_message_expiry_at_the_broker(mosquitto: Mosquitto) -> None:
    settings = config.parse(
        {"device_id": "door-1", "mqtt": {"host": mosquitto.host, "port": mosquitto.port}}
    ).mqtt
    sink = mosquitto.client()
    sink.subscribe("chunks/#")
    with MQTTClient(settings, client_id="expiry-test") as client:
        client.wait_ready(10)
        pub = BoundedPublisher(client, 2)
        pub.make_room()
        pub.publish("chunks/0", b"x" * 100, 1, expiry=120)
        pub.publish("chunks/1", b"y", 1)
        pub.drain()
        first, second = sink.get(), sink.get()
        assert 0 < getattr(first.properties, "MessageExpiryInterval", 0) <= 120
        assert not hasattr(second.properties, "MessageExpiryInterval")
