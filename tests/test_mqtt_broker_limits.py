"""The device's MQTT connection against a real mosquitto (contract §2, issue 10 item 7):
Maximum Packet Size at CONNECT, a client id nobody can guess, and two clients fighting over
one client id detected, backed off and reported in ``status`` (never in the retained status)."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from agent.config import MQTTConfig
from agent.mqtt import SESSION_TAKEN_OVER, MQTTClient, TakeoverGuard
from agent.paths import CLIENT_ID_SUFFIX
from agent.provision import device_client_id, initialise
from agent.timeutil import utcnow
from tests.mosquitto import Mosquitto
from tests.reliability.harness import AgentProcess, Requester, wait_until

MiB = 1024 * 1024


# --- the takeover guard (pure) ----------------------------------------------------------------


def test_takeover_guard_backs_off_on_session_taken_over_and_recovers() -> None:
    guard = TakeoverGuard(base=2.0, limit=60.0)
    t = 0.0
    waits = []
    for _ in range(7):
        guard.connected(t)
        t += 1.0
        waits.append(guard.disconnected(SESSION_TAKEN_OVER, t))
        t += waits[-1] or 0.0
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert guard.conflicts == 7
    # Within a series any loss of a connection shorter than twice the longest wait is the other
    # client coming back; one that outlasted it ends the series: the normal policy again.
    guard.connected(t)
    assert guard.disconnected(0x80, t + 30.0) == 60.0
    guard.connected(t + 100.0)
    assert guard.disconnected(0x80, t + 100.0 + 121.0) is None
    assert guard.conflicts == 8
    guard.connected(t + 400.0)
    assert guard.disconnected(SESSION_TAKEN_OVER, t + 401.0) == 2.0  # a fresh series


def test_takeover_guard_spots_repeated_immediate_drops_without_a_reason() -> None:
    guard = TakeoverGuard(base=2.0, limit=60.0, quick=5.0, quick_drops=3)
    t = 0.0
    waits = []
    for _ in range(5):
        guard.connected(t)
        waits.append(guard.disconnected(0x80, t + 0.5))
        t += 10.0
    assert waits == [None, None, 2.0, 4.0, 8.0]
    assert guard.conflicts == 3
    guard.connected(t)
    assert guard.disconnected(0x80, t + 20.0) == 16.0  # the series goes on: not quick, not long
    guard.connected(t)
    assert guard.disconnected(0x80, t + 200.0) is None  # a long connection ends the series
    guard.connected(t)
    assert guard.disconnected(0x80, t + 0.5) is None  # quick drops must add up again
    for _ in range(5):  # a broker that says why it drops us (here: shutting down) is believed
        guard.connected(t)
        assert guard.disconnected(0x8B, t + 0.5, from_server=True) is None


# --- client id ----------------------------------------------------------------------------------


def test_init_makes_a_random_client_id_suffix_and_first_use_makes_a_missing_one(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    initialise(a, "front-door", now=utcnow())
    initialise(b, "front-door", now=utcnow())
    id_a = device_client_id(a, "front-door")
    assert re.fullmatch(r"doorbell-agent-front-door-[0-9a-f]{20}", id_a)
    assert device_client_id(a, "front-door") == id_a  # kept
    assert device_client_id(b, "front-door") != id_a  # random per device
    assert (a / CLIENT_ID_SUFFIX).stat().st_mode & 0o077 == 0
    # A state directory made before the suffix existed gets one on first use, then keeps it.
    (b / CLIENT_ID_SUFFIX).unlink()
    made = device_client_id(b, "front-door")
    assert made == device_client_id(b, "front-door") != id_a


@pytest.mark.slow
def test_a_client_with_the_old_guessable_id_cannot_take_over_the_device(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        requester = Requester(tmp_path / "police", agent)
        agent.start()
        suffix = (agent.state_dir / CLIENT_ID_SUFFIX).read_text().strip()
        assert f"as doorbell-agent-front-door-{suffix}" in mosquitto.log_text()
        squatter = mosquitto.client("doorbell-agent-front-door")  # the revision-1 default id
        try:
            now = utcnow()
            jti = requester.send(now - timedelta(minutes=10), now - timedelta(minutes=5))
            requester.wait_status(jti, "pending")
            assert "already connected" not in mosquitto.log_text()
            status = wait_until(
                lambda: (s := agent.status()) is not None
                and s["workers"]["requests"]["stats"]["received"] >= 1
                and s,
                "status.json counting the request",
                agent=agent,
            )
            stats = status["workers"]["requests"]["stats"]
            # The broker's log says why, should the agent's connection ever have dropped.
            assert (stats["connects"], stats["disconnects"]) == (1, 0), mosquitto.log_text()[-4000:]
            assert stats["client_id"] == f"doorbell-agent-front-door-{suffix}"
        finally:
            squatter.close()
            requester.close()


# --- Maximum Packet Size ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = sock.recv(1)[0]
    length, shift = 0, 0
    while True:
        b = sock.recv(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return first, body


def raw_publish(host: str, port: int, topic: str, size: int) -> None:
    """Publish a ``size``-byte QoS 1 message with a hand-written MQTT v5 client that streams the
    payload (so the test itself never holds it) and wait for the PUBACK."""
    with socket.create_connection((host, port), timeout=60) as sock:
        client_id = b"oversize-sender"
        variable = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + len(client_id).to_bytes(2, "big")
        connect = variable + client_id
        sock.sendall(b"\x10" + _varint(len(connect)) + connect)
        kind, body = _read_packet(sock)
        assert kind == 0x20 and body[1] == 0, body
        name = topic.encode()
        header = len(name).to_bytes(2, "big") + name + (1).to_bytes(2, "big") + b"\x00"
        sock.sendall(b"\x32" + _varint(len(header) + size) + header)
        block = b"\x00" * MiB
        left = size
        while left:
            n = min(left, len(block))
            sock.sendall(block[:n])
            left -= n
        kind, body = _read_packet(sock)
        assert kind == 0x40 and body[:2] == (1).to_bytes(2, "big"), (kind, body)


def _peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@pytest.mark.slow
def test_oversize_messages_never_reach_the_agent(tmp_path: Path, mosquitto: Mosquitto) -> None:
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        requester = Requester(tmp_path / "police", agent)
        agent.start()
        topic = f"{agent.topic}/requests"
        peak_before = _peak_rss(agent.pid)
        # 200 MiB, and one byte more than the agent said it takes (8 KiB + 1 KiB).
        raw_publish(mosquitto.host, mosquitto.port, topic, 200 * MiB)
        raw_publish(mosquitto.host, mosquitto.port, topic, 8192 + 1024 + 1)
        # Sent after both on the same topic: once it is answered, both were routed before it.
        now = utcnow()
        jti = requester.send(now - timedelta(minutes=10), now - timedelta(minutes=5))
        requester.wait_status(jti, "pending")
        status = wait_until(
            lambda: (s := agent.status()) is not None
            and s["workers"]["requests"]["stats"]["admitted"] >= 1
            and s,
            "status.json counting the pending request",
            agent=agent,
        )
        stats = status["workers"]["requests"]["stats"]
        assert stats["received"] == 1, stats  # only the valid request reached the agent
        assert "oversize" not in stats["unverifiable"], stats
        grown = _peak_rss(agent.pid) - peak_before
        assert grown < 40 * MiB, f"the agent's peak RSS grew by {grown / MiB:.0f} MiB"
        requester.close()


# --- two clients, one client id -----------------------------------------------------------------


@pytest.mark.slow
def test_two_clients_with_one_client_id_detect_the_takeover_loop_and_back_off(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    settings = MQTTConfig(host=mosquitto.host, port=mosquitto.port)
    clients = [
        MQTTClient(settings, client_id="copied-config", persistent=True, reconnect_min=1)
        for _ in range(2)
    ]
    caplog.set_level(logging.ERROR, logger="agent.mqtt")
    try:
        for client in clients:
            client.start()
        # Ordering, not time: each must have been taken over at least twice (the first sign and
        # one after its first backoff), by which point its reconnect wait has doubled.
        def takeovers() -> list[int]:
            return [(c.client_id_conflict() or {}).get("conflicts", 0) for c in clients]

        wait_until(
            lambda: min(takeovers()) >= 1 and sum(takeovers()) >= 4,
            "both clients to see the takeover loop",
            timeout=120,
        )
        waits = [c.reconnect_wait for c in clients]
        assert max(w for w in waits if w is not None) >= 4.0, waits
        conflict = clients[0].client_id_conflict()
        assert conflict is not None and conflict["client_id"] == "copied-config"
        # mosquitto 2.0 closes the taken-over connection without a DISCONNECT 0x8E: the guard
        # recognises the series of immediate drops (a newer broker's 0x8E is the other path).
        assert "another client" in conflict["detail"]
        assert any("client id (copied-config)" in r.message for r in caplog.records)
    finally:
        threads = [threading.Thread(target=c.close) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@pytest.mark.slow
def test_two_agents_sharing_a_client_id_say_so_in_status_not_on_mqtt(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    shared = {"mqtt": {"client_id": "doorbell-agent-front-door"}}  # a copied config
    with AgentProcess(tmp_path / "one", mosquitto, config=shared) as one, AgentProcess(
        tmp_path / "two", mosquitto, config=shared
    ) as two:
        one.start()
        two.start(wait=False)

        def conflicted() -> bool:
            for agent in (one, two):
                result = agent.cli("status", "--json")
                doc = json.loads(result.out) if result.code == 0 else {}
                if doc.get("mqtt", {}).get("client_id_conflict"):
                    return True
            return False

        wait_until(conflicted, "an agent to report the client-id conflict", timeout=120)
        texts = [a.cli("status").out for a in (one, two)]
        assert any(
            "MQTT CLIENT ID CONFLICT: another client uses this client id" in t for t in texts
        ), texts
        logs = one.log_text() + two.log_text()
        assert "another client probably uses this client id (doorbell-agent-front-door)" in logs
        # The retained status (what requesters read) carries nothing of it.
        watcher = mosquitto.client()
        watcher.subscribe(f"{one.topic}/status")
        doc = json.loads(watcher.get().payload)
        assert set(doc) <= {"device_id", "online", "kid", "public_jwk", "version", "since", "audit"}
        watcher.close()
        assert two.exited is False and one.exited is False
