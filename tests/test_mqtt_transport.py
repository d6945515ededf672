"""MQTT transport around the request service: TLS, the example ACL, status and will, the audit
head, ``doorbell-request send``, a small flood, and the publisher used by deliveries."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent import config
from agent.audit import parse_head_jws, verify_file
from agent.errors import MQTTError
from agent.keys import kid_for, public_jwk
from agent.mqtt import BoundedPublisher, MQTTClient
from agent.requester.cli import main as request_main
from agent.requester.keyfiles import generate_keys
from agent.requests.store import RequestStore
from agent.timeutil import rfc3339, utcnow
from tests.mosquitto import Mosquitto, TestCA
from tests.test_mqtt_service import (
    DEVICE,
    PREFIX,
    TOPIC_HEAD,
    TOPIC_REQUESTS,
    TOPIC_STATUS,
    AgentHarness,
    eventually,
    listen,
    next_response,
    request,
    responses_topic,
)


@pytest.fixture
def harness(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[AgentHarness]:
    h = AgentHarness(tmp_path, mosquitto)
    yield h
    h.stop()


REPO = Path(__file__).resolve().parent.parent
ACL_EXAMPLE = REPO / "config" / "mosquitto-acl.example"
DEVICE_USER = "doorbell-front-door"


# --- TLS ------------------------------------------------------------------------------------


def test_tls_listener_with_ca_and_client_certificate(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto], test_ca: TestCA
) -> None:
    broker = mosquitto_factory(tls=test_ca)
    assert broker.tls_port is not None
    device_cert = test_ca.client("front-door")
    h = AgentHarness(
        tmp_path,
        broker,
        {
            "mqtt": {
                "port": broker.tls_port,
                "tls": {
                    "enabled": True,
                    "cafile": str(test_ca.ca_cert),
                    "certfile": str(device_cert.cert),
                    "keyfile": str(device_cert.key),
                },
            }
        },
    )
    try:
        alice = h.enroll("alice")
        h.start()
        inbox = broker.client(tls_client="alice")
        inbox.subscribe(responses_topic("alice"))
        token, jti = request(alice)
        inbox.publish(TOPIC_REQUESTS, token)
        claims, _ = next_response(inbox, h.public)
        assert (claims["req"], claims["status"]) == (jti, "pending")
    finally:
        h.stop()
    # Without a client certificate the TLS listener refuses the connection.
    assert _tls_refused(broker.host, broker.tls_port, test_ca)


def _tls_refused(host: str, port: int, ca: TestCA) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca.ca_cert))
    try:
        with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(
            raw, server_hostname="localhost"
        ) as tls:
            tls.sendall(b"\xe0\x00")  # any bytes: the broker must not talk to us
            return tls.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


# --- the example ACL ------------------------------------------------------------------------


def test_example_acl_confines_requesters(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    acl = ACL_EXAMPLE.read_text()
    broker = mosquitto_factory(
        passwords={DEVICE_USER: "device-pw", "alice": "alice-pw", "bob": "bob-pw"},
        acl=acl,
    )
    pwfile = tmp_path / "device.pw"
    pwfile.write_text("device-pw\n")
    os.chmod(pwfile, 0o600)
    h = AgentHarness(
        tmp_path, broker, {"mqtt": {"username": DEVICE_USER, "password_file": str(pwfile)}}
    )
    try:
        alice_req = h.enroll("alice")
        bob_req = h.enroll("bob")
        h.start()
        alice = broker.client(username="alice", password="alice-pw")
        bob = broker.client(username="bob", password="bob-pw")
        # alice listens as widely as she can; the broker hands her only what the ACL allows.
        alice.subscribe(f"{PREFIX}/#")
        snoop = alice.subscribe(responses_topic("bob"))
        bob.subscribe(responses_topic("bob"))
        retained = alice.get()
        while retained.topic != TOPIC_STATUS:
            assert retained.topic == TOPIC_HEAD
            retained = alice.get()
        assert json.loads(retained.payload)["online"] is True

        # alice tries to speak for the device: a status, a response to bob, an audit head.
        alice.publish(TOPIC_STATUS, b'{"online": false}', retain=True)
        alice.publish(responses_topic("bob"), b"forged")
        alice.publish(TOPIC_HEAD, b"forged", retain=True)

        token, bob_jti = request(bob_req)
        bob.publish(TOPIC_REQUESTS, token)
        claims, _ = next_response(bob, h.public)
        assert (claims["req"], claims["status"]) == (bob_jti, "pending")  # not "forged"

        # A marker alice may receive: her own answer. Everything before it has been delivered.
        token, _ = request(alice_req)
        alice.publish(TOPIC_REQUESTS, token)
        seen: list[tuple[str, bytes]] = []
        while True:
            msg = alice.get()
            seen.append((msg.topic, bytes(msg.payload)))
            if msg.topic == responses_topic("alice"):
                break
        assert {t for t, _ in seen} <= {TOPIC_HEAD, responses_topic("alice")}
        assert all(p != b"forged" for _, p in seen)
        assert bob.messages.empty()  # bob never saw alice's forged response
        probe = broker.client(username="bob", password="bob-pw")
        probe.subscribe(TOPIC_STATUS)
        assert json.loads(probe.get().payload)["online"] is True  # retained status untouched
        assert snoop == [0x87] or snoop == [1]  # refused, or granted and filtered as shown
    finally:
        h.stop()
    with pytest.raises(ConnectionError):
        broker.client(username="alice", password="wrong")


# --- status, will, audit head ---------------------------------------------------------------


RUNNER = """
import json, sys, time
from agent import config
from agent.audit import AuditLog
from agent.keys import load_device_key
from agent.requests.worker import RequestsWorker
from agent.requests.store import RequestStore
cfg = config.parse(json.loads(sys.argv[1]))
key = load_device_key(cfg.state_dir)
worker = RequestsWorker(cfg, signing_key=key, store=RequestStore.open(cfg.state_dir),
                        audit=AuditLog(cfg.state_dir / "audit.jsonl", key))
worker.start()
worker.client.wait_ready(10)
worker.checked.wait(30)  # status and head go out once the start-up audit check is done
print("ready", flush=True)
time.sleep(600)
"""


def test_status_is_retained_and_the_will_reports_an_unclean_death(
    harness: AgentHarness,
) -> None:
    raw = {
        "device_id": DEVICE,
        "state_dir": str(harness.state),
        "mqtt": {"host": harness.broker.host, "port": harness.broker.port, "topic_prefix": PREFIX},
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(raw)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        watcher = harness.broker.client()
        watcher.subscribe(TOPIC_STATUS)
        online = watcher.get()
        doc = json.loads(online.payload)
        assert online.retain and doc["online"] is True
        assert doc["device_id"] == DEVICE
        assert doc["public_jwk"] == public_jwk(harness.public)
        assert doc["kid"] == kid_for(harness.public)
        assert set(doc) == {
            "device_id", "online", "kid", "public_jwk", "version", "since", "audit"
        }
        assert doc["audit"] == "ok"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        will = json.loads(watcher.get().payload)
        assert will["online"] is False and will["kid"] == doc["kid"] and will["audit"] == "ok"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    late = harness.broker.client()
    late.subscribe(TOPIC_STATUS)
    retained = late.get()
    assert retained.retain and json.loads(retained.payload)["online"] is False


def test_clean_stop_publishes_offline_status(harness: AgentHarness) -> None:
    harness.start()
    harness.stop()
    late = harness.broker.client()
    late.subscribe(TOPIC_STATUS)
    doc = json.loads(late.get().payload)
    assert doc["online"] is False and doc["device_id"] == DEVICE


def test_audit_head_is_retained_verifiable_and_coalesced(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    worker = harness.start()
    heads = harness.broker.client()
    heads.subscribe(TOPIC_HEAD)
    inbox = listen(harness.broker, alice)
    inbox.publish(TOPIC_REQUESTS, request(alice)[0])
    assert next_response(inbox, harness.public)[0]["status"] == "pending"
    audit = harness._audit
    assert audit is not None and worker is not None
    for _ in range(30):
        audit.append("agent_started", note="burst")
    last = audit.last_entry()
    assert last is not None
    received = []
    while True:
        head = parse_head_jws(heads.get().payload.decode(), harness.public)
        received.append(head)
        if head.seq == last.seq:
            break
    assert head.iss == DEVICE and head.hash == last.hash
    assert len(received) < 30  # coalesced, not one per append
    assert verify_file(harness.audit_path, harness.public, head=head).ok
    late = harness.broker.client()
    late.subscribe(TOPIC_HEAD)
    retained = late.get()
    assert retained.retain
    assert parse_head_jws(retained.payload.decode(), harness.public).seq == last.seq


# --- doorbell-request send ------------------------------------------------------------------


def _send_args(harness: AgentHarness, keydir: Path) -> list[str]:
    now = utcnow()
    return [
        "send", "--device", DEVICE,
        "--from", rfc3339(now.replace(microsecond=0) - timedelta(minutes=30)),
        "--to", rfc3339(now.replace(microsecond=0)),
        "--reason", "car scratched in the night", "--legal-basis", "consent",
        "--key", str(keydir), "--host", harness.broker.host, "--port", str(harness.broker.port),
    ]


@pytest.fixture
def enrolled_keys(harness: AgentHarness, tmp_path: Path) -> Path:
    keys = generate_keys(tmp_path / "alice-keys", "alice", now=utcnow())
    with RequestStore.open(harness.state) as store:
        store.add_requester("alice", "Alice", "neighbor", keys.signing_key.public_key())
    return keys.directory


def test_send_publishes_a_request_the_device_accepts(
    harness: AgentHarness, enrolled_keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.start()
    inbox = harness.broker.client()
    inbox.subscribe(responses_topic("alice"))
    assert request_main(_send_args(harness, enrolled_keys)) == 0
    jti = capsys.readouterr().out.split()[2]
    claims, msg = next_response(inbox, harness.public)
    assert (claims["req"], claims["status"]) == (jti, "pending")
    props = msg.properties
    assert len(bytes(props.CorrelationData)) == 16


def test_send_wait_prints_pending_then_exits_1_when_revoked(
    harness: AgentHarness, enrolled_keys: Path, tmp_path: Path
) -> None:
    harness.start()
    # Without PYTHONUNBUFFERED (CI, the emulated arm64 run, a user's shell) stdout on a pipe is
    # block-buffered: each response line must be flushed as it is printed, or a script reading
    # them (this test) sees nothing until the command gives up, and revokes only then.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from agent.requester.cli import main; sys.exit(main(sys.argv[1:]))",
         *_send_args(harness, enrolled_keys), "--wait", "--timeout", "60s",
         "-o", str(tmp_path / "evidence")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("sent request ")
        jti = first.split()[2].rstrip(";")
        pending = proc.stdout.readline().split()
        assert pending[1:] == [jti, "pending"]
        assert proc.poll() is None  # read while it still waits, not flushed at its exit
        harness.revoke("alice")
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 1
        assert f"{jti} rejected error=revoked" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- a small flood --------------------------------------------------------------------------


def test_flood_of_garbage_does_not_stop_a_valid_request(harness: AgentHarness) -> None:
    alice = harness.enroll("alice")
    worker = harness.start()
    flooder = harness.broker.client()
    sent = 0
    for i in range(400):
        qos = i % 2
        flooder.client.publish(TOPIC_REQUESTS, f"forged.{i}.x" * 10, qos=qos)
        sent += 1
    inbox = listen(harness.broker, alice)
    token, jti = request(alice)
    inbox.publish(TOPIC_REQUESTS, token)
    claims, _ = next_response(inbox, harness.public, timeout=30)
    assert (claims["req"], claims["status"]) == (jti, "pending")
    stats = worker.service.stats

    def all_accounted() -> bool:
        return sum(stats.unverifiable.values()) + stats.dropped == sent

    eventually(all_accounted, timeout=30)
    harness.stop()
    summaries = harness.events("request_unverifiable")
    assert sum(e["count"] for e in summaries) == sum(stats.unverifiable.values())
    assert len(summaries) < 50


# --- the publisher deliveries use -----------------------------------------------------------


def test_bounded_publisher_publishes_in_order_and_fails_when_the_connection_drops(
    mosquitto: Mosquitto,
) -> None:
    settings = config.parse(
        {"device_id": DEVICE, "mqtt": {"host": mosquitto.host, "port": mosquitto.port}}
    ).mqtt
    sink = mosquitto.client()
    sink.subscribe("chunks/#")
    with MQTTClient(settings, client_id="bounded-test", max_inflight=8) as client:
        client.wait_ready(10)
        pub = BoundedPublisher(client, 3)
        for seq in range(20):
            pub.publish(f"chunks/{seq}", bytes([seq]) * 1000, 1)
        pub.drain()
        got = [sink.get() for _ in range(20)]
        assert [m.topic for m in got] == [f"chunks/{i}" for i in range(20)]
        assert all(m.payload == bytes([i]) * 1000 for i, m in enumerate(got))
        mosquitto.stop()
        eventually(lambda: not client.connected)
        with pytest.raises(MQTTError):
            pub.publish("chunks/late", b"x", 1)
        assert not pub.wait_connected(0.1)
        mosquitto.start()
        assert pub.wait_connected(30)


def test_daemon_runs_the_requests_worker(harness: AgentHarness) -> None:
    import threading

    from agent.wiring import requests_worker, run_daemon

    alice = harness.enroll("alice")
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(
            run_daemon(harness.cfg, factories=(requests_worker,), stop=stop,
                       handle_signals=False)
        )
    )
    thread.start()
    try:
        watcher = harness.broker.client()
        watcher.subscribe(TOPIC_STATUS)
        assert json.loads(watcher.get(timeout=30).payload)["online"] is True
        inbox = listen(harness.broker, alice)
        token, jti = request(alice)
        inbox.publish(TOPIC_REQUESTS, token)
        claims, _ = next_response(inbox, harness.public, timeout=30)
        assert (claims["req"], claims["status"]) == (jti, "pending")
    finally:
        stop.set()
        thread.join(30)
    assert result == [0]
    late = harness.broker.client()
    late.subscribe(TOPIC_STATUS)
    assert json.loads(late.get().payload)["online"] is False
