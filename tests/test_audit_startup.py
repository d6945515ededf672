"""Contract §7 against a real mosquitto: the log only grows, and the head leaks no activity.

- A cut tail or a deleted ``audit.jsonl`` is found at the next start by comparing with the
  device's own retained head: ``audit_discontinuity`` with the seq and prev §7 gives it, written
  before any request queued meanwhile is taken; status ``audit: broken`` (kept across restarts);
  the public head never goes backwards; ``audit verify`` exits 1 naming the gap.
- The bar of issue 10: the same request traffic against a camera that records nothing and one
  that records 500 clips gives identical head ``seq`` values, in the retained head and in every
  response's ``audit`` (injected clock; checkpoints on it).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pyrage import x25519

from agent import config
from agent.audit import (
    GENESIS_PREV,
    AuditHead,
    AuditLog,
    Checkpointer,
    audit_state,
    line_hash,
    parse_head_jws,
    read_entries,
)
from agent.cli import main
from agent.keys import kid_for, load_device_key
from agent.mqtt import InboundMessage, MQTTClient
from agent.paths import ACTIVITY_FILE, AUDIT_FILE
from agent.provision import initialise
from agent.requests.store import RequestStore
from agent.requests.worker import RequestsWorker
from agent.timeutil import utcnow
from agent.vault import Vault
from tests.mosquitto import Collector, Mosquitto
from tests.test_mqtt_service import (
    DEVICE,
    PREFIX,
    TOPIC_HEAD,
    TOPIC_REQUESTS,
    TOPIC_STATUS,
    AgentHarness,
    Requester,
    eventually,
    listen,
    next_response,
    request,
)


class HeadWatcher:
    """Every message on the retained head topic from subscription on (retained one first)."""

    def __init__(self, broker: Mosquitto, public: Ed25519PublicKey) -> None:
        self.public = public
        self.collector: Collector = broker.client()
        assert self.collector.subscribe(TOPIC_HEAD) == [1]
        self.seen: list[AuditHead] = []

    def poll(self) -> list[AuditHead]:
        for msg in self.collector.drain():
            if msg.payload:
                self.seen.append(parse_head_jws(bytes(msg.payload).decode(), self.public))
        return self.seen

    def close(self) -> None:
        self.collector.close()


def retained(broker: Mosquitto, topic: str, timeout: float = 2.0) -> bytes | None:
    c = broker.client()
    try:
        assert c.subscribe(topic) == [1]
        try:
            return bytes(c.get(timeout).payload)
        except queue.Empty:
            return None
    finally:
        c.close()


def retained_status(broker: Mosquitto) -> dict[str, Any]:
    payload = retained(broker, TOPIC_STATUS)
    assert payload is not None
    doc: dict[str, Any] = json.loads(payload)
    return doc


def config_file(h: AgentHarness) -> Path:
    path = h.state.parent / "agent.yaml"
    path.write_text(f"device_id: {DEVICE}\nstate_dir: {h.state}\n")
    return path


def _first_run(h: AgentHarness) -> tuple[Requester, Collector, int]:
    """Enrol alice, run once (fresh broker: nothing to compare), answer three requests and wait
    for the retained head to reach the log's last entry. Returns its seq."""
    alice = h.enroll("alice")
    h.start()
    inbox = listen(h.broker, alice)
    for _ in range(3):
        inbox.publish(TOPIC_REQUESTS, request(alice)[0])
        assert next_response(inbox, h.public)[0]["status"] == "pending"
    last = list(read_entries(h.audit_path))[-1]
    eventually(lambda: (head := retained(h.broker, TOPIC_HEAD)) is not None
               and parse_head_jws(head.decode(), h.public).seq == last.seq)
    assert audit_state(h.state) == "ok"
    assert not h.events("audit_discontinuity")
    h.stop()
    return alice, inbox, last.seq


def _restart_with_a_queued_request(
    h: AgentHarness, alice: Requester, inbox: Collector
) -> tuple[str, dict[str, Any]]:
    """Queue a request at the broker while the agent is down, start, return its response."""
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    h.start()
    claims, _ = next_response(inbox, h.public)
    assert claims["req"] == jti
    return jti, claims


def _assert_gap_recorded(
    h: AgentHarness, jti: str, claims: dict[str, Any], expected_seq: int, kept: int, prev: str
) -> dict[str, Any]:
    events = h.events()
    names = [e["event"] for e in events]
    gap = next(e for e in events if e["event"] == "audit_discontinuity")
    entries = list(read_entries(h.audit_path))
    gap_entry = next(e for e in entries if e.event == "audit_discontinuity")
    assert gap_entry.seq == max(kept, expected_seq) + 1
    assert gap_entry.prev == prev
    assert (gap["expected_seq"], gap["expected_from"]) == (expected_seq, "retained")
    # Nothing was taken from the broker before the check: the queued request comes after.
    received = next(i for i, e in enumerate(events)
                    if e["event"] == "request_received" and e.get("jti") == jti)
    assert names.index("audit_discontinuity") < received
    # The response's head (§4) and the public head moved on past the lost one.
    assert parse_head_jws(claims["audit"], h.public).seq > expected_seq
    assert audit_state(h.state) == "broken"
    eventually(lambda: retained_status(h.broker).get("audit") == "broken")
    return gap


def _assert_verify_names_the_gap(
    h: AgentHarness, capsys: pytest.CaptureFixture[str], first_missing: int
) -> None:
    capsys.readouterr()
    assert main(["--config", str(config_file(h)), "audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert f"broken at seq {first_missing}" in err and "gap before seq" in err


def test_a_cut_tail_is_found_at_start_and_the_head_never_goes_back(
    harness: AgentHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, inbox, head_seq = _first_run(harness)
    watcher = HeadWatcher(harness.broker, harness.public)
    try:
        lines = harness.audit_path.read_bytes().splitlines()
        harness.audit_path.write_bytes(b"\n".join(lines[:3]) + b"\n")
        jti, claims = _restart_with_a_queued_request(harness, alice, inbox)
        gap = _assert_gap_recorded(
            harness, jti, claims, head_seq, kept=3, prev=line_hash(lines[2])
        )
        assert (gap["found_seq"], gap["found_hash"]) == (3, line_hash(lines[2]))
        last = list(read_entries(harness.audit_path))[-1]
        eventually(lambda: bool(watcher.poll()) and watcher.seen[-1].seq == last.seq)
        assert watcher.seen[0].seq == head_seq  # the retained one, then onwards
        assert all(h.seq >= head_seq for h in watcher.seen)
        _assert_verify_names_the_gap(harness, capsys, first_missing=4)
        # Broken stays broken across a restart that finds nothing new.
        harness.stop()
        harness.start()
        assert harness.worker is not None and harness.worker.checked.wait(10)
        assert len(harness.events("audit_discontinuity")) == 1
        eventually(lambda: retained_status(harness.broker).get("audit") == "broken")
    finally:
        watcher.close()


def test_a_deleted_log_is_a_discontinuity_too(
    harness: AgentHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, inbox, head_seq = _first_run(harness)
    harness.audit_path.unlink()
    jti, claims = _restart_with_a_queued_request(harness, alice, inbox)
    gap = _assert_gap_recorded(harness, jti, claims, head_seq, kept=0, prev=GENESIS_PREV)
    assert (gap["found_seq"], gap["found_hash"]) == (None, None)
    _assert_verify_names_the_gap(harness, capsys, first_missing=1)


def test_an_emptied_log_is_a_discontinuity_too(harness: AgentHarness) -> None:
    alice, inbox, head_seq = _first_run(harness)
    harness.audit_path.write_bytes(b"")
    jti, claims = _restart_with_a_queued_request(harness, alice, inbox)
    _assert_gap_recorded(harness, jti, claims, head_seq, kept=0, prev=GENESIS_PREV)


def test_an_intact_log_passes_the_check_and_stays_ok(harness: AgentHarness) -> None:
    alice, inbox, _ = _first_run(harness)
    _restart_with_a_queued_request(harness, alice, inbox)
    assert not harness.events("audit_discontinuity")
    assert audit_state(harness.state) == "ok"
    eventually(lambda: retained_status(harness.broker).get("audit") == "ok")


def test_nothing_is_taken_from_the_broker_before_the_check_is_done(
    harness: AgentHarness,
) -> None:
    alice = harness.enroll("alice")
    inbox = listen(harness.broker, alice)
    harness.head_wait = 2.0
    harness.start()  # no retained head on a fresh broker: the check waits its full head_wait
    worker = harness.worker
    assert worker is not None and not worker.checked.is_set()
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    # Ordering, not timing: as long as the check is not done, the request is neither logged,
    # answered nor acknowledged, and no head or status went out.
    watcher = HeadWatcher(harness.broker, harness.public)
    try:
        rounds = 0
        while True:
            # Look first, then ask whether the check had ended: the check's outcome is set
            # before anything is published or taken, so what was seen while it was still
            # missing happened before the check was done (on a slow machine the head and
            # status go out in the moment between the outcome and ``checked``).
            seen = (
                harness.events("request_received"),
                inbox.messages.empty(),
                worker.client.stats.published,
                watcher.poll(),
            )
            if worker.check_outcome is not None or worker.checked.is_set():
                break
            rounds += 1
            assert seen[0] == [] and seen[1] and seen[2] == 0 and not seen[3], seen
            worker.checked.wait(0.05)
        assert rounds > 1  # the request did wait at the broker while the check ran
        claims, _ = next_response(inbox, harness.public)
        assert claims["req"] == jti and claims["status"] == "pending"
    finally:
        watcher.close()


def test_the_head_read_at_start_is_acknowledged_so_no_stale_copy_returns(
    mosquitto: Mosquitto,
) -> None:
    """The device's session is persistent and acknowledges requests by hand; a retained head
    read at start that stayed unacknowledged would be offered again, stale, at the next
    connection, before the broker's current retained head."""
    settings = config.parse({
        "device_id": DEVICE, "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
    }).mqtt
    publisher = mosquitto.client()
    publisher.publish(TOPIC_HEAD, b"old-head", retain=True)
    got: queue.Queue[InboundMessage] = queue.Queue()
    first = MQTTClient(settings, client_id="device-session", persistent=True, manual_ack=True,
                       on_message=got.put)
    with first:
        first.wait_ready(10)
        heads: queue.Queue[InboundMessage] = queue.Queue()
        assert first.subscribe(TOPIC_HEAD, heads.put).result(10) is True
        assert heads.get(timeout=10).payload == b"old-head"
        first.unsubscribe(TOPIC_HEAD)
    publisher.publish(TOPIC_HEAD, b"new-head", retain=True)
    barrier = f"{PREFIX}/{DEVICE}/barrier"
    second = MQTTClient(settings, client_id="device-session", persistent=True, manual_ack=True,
                        subscriptions=[barrier], on_message=got.put)
    with second:
        second.wait_ready(10)
        publisher.publish(barrier, b"after")
        # The broker sends a session's left-over messages right after the CONNACK, so anything
        # stale would come before the barrier message.
        assert got.get(timeout=10).payload == b"after"
    publisher.close()


# --- the bar: camera activity does not move the public head -----------------------------------


class Clock:
    """An injected wall clock that only moves when told."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.now += delta


ROUNDS = 4
CLIPS_PER_ROUND = 125  # 500 in all


def _traffic(root: Path, broker: Mosquitto, clips_per_round: int) -> dict[str, Any]:
    """Initialise a device, run the same request traffic, record ``clips_per_round`` clips (and
    delete a few) before each round, checkpoint on an injected clock. Returns the head seqs."""
    state = root / "state"
    initialise(state, DEVICE, now=utcnow())
    key = load_device_key(state)
    cfg = config.parse({
        "device_id": DEVICE, "state_dir": str(state),
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
    })
    clock = Clock(utcnow().replace(microsecond=0))
    audit = AuditLog(state / AUDIT_FILE, key, now=clock)
    activity = AuditLog(state / ACTIVITY_FILE, key, now=clock)
    vault = Vault.from_config(cfg, audit=activity)
    store = RequestStore.open(state)
    alice_key = Ed25519PrivateKey.generate()
    store.add_requester("alice", "Alice", "neighbor", alice_key.public_key(), audit=audit)
    alice = Requester("alice", alice_key, kid_for(alice_key.public_key()),
                      str(x25519.Identity.generate().to_public()))
    worker = RequestsWorker(cfg, signing_key=key, store=store, audit=audit, now=clock,
                            head_interval=0.2, head_wait=0.5)
    checkpoints = Checkpointer(audit, activity, 600)
    response_seqs: list[int] = []
    inbox = listen(broker, alice)
    try:
        worker.start()
        assert worker.checked.wait(10)
        checkpoints.tick(clock())
        for _ in range(ROUNDS):
            for n in range(clips_per_round):
                start = clock() - timedelta(minutes=20)
                with vault.create_clip(start, "video/x-msvideo") as writer:
                    writer.write(b"frame" * 20)
                    info = writer.finish(start + timedelta(seconds=5), 10)
                if n % 25 == 0:
                    vault.delete_clip(info.id, "owner")
            for overrides in ({}, {"aud": "another-device"}):
                inbox.publish(TOPIC_REQUESTS, request(alice, **overrides)[0])
                claims, _ = next_response(inbox, key.public_key())
                response_seqs.append(parse_head_jws(claims["audit"], key.public_key()).seq)
            clock.advance(timedelta(minutes=7))
            checkpoints.tick(clock())
        last = audit.last_entry()
        assert last is not None
        eventually(lambda: (head := retained(broker, TOPIC_HEAD)) is not None
                   and parse_head_jws(head.decode(), key.public_key()).seq == last.seq)
        return {
            "responses": response_seqs,
            "retained": last.seq,
            "events": [(e.seq, e.event) for e in read_entries(state / AUDIT_FILE)],
            "activity": sum(1 for _ in read_entries(state / ACTIVITY_FILE))
            if (state / ACTIVITY_FILE).exists() else 0,
            "checkpoints": checkpoints.written,
        }
    finally:
        inbox.close()
        worker.close()
        vault.close()
        store.close()


def test_the_head_is_the_same_whether_the_camera_recorded_nothing_or_500_clips(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    quiet = _traffic(tmp_path / "quiet", mosquitto_factory(), 0)
    busy = _traffic(tmp_path / "busy", mosquitto_factory(), CLIPS_PER_ROUND)
    assert busy["activity"] == ROUNDS * CLIPS_PER_ROUND + ROUNDS * 5  # recorded + deleted
    assert quiet["activity"] == 0
    assert quiet["checkpoints"] == busy["checkpoints"] >= 2
    assert quiet["responses"] == busy["responses"]
    assert len(quiet["responses"]) == 2 * ROUNDS
    assert quiet["retained"] == busy["retained"]
    assert quiet["events"] == busy["events"]
    assert all(event != "clip_recorded" for _, event in busy["events"])


@pytest.fixture
def harness(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[AgentHarness]:
    h = AgentHarness(tmp_path, mosquitto)
    yield h
    h.stop()
