"""Receipts (§5.2) end to end over a real mosquitto: the daemon in a subprocess, the real
requester tool (``doorbell-request send --wait``) publishing the receipt that moves the request
to ``acknowledged``, then ``doorbell-agent redeliver`` and, on ``P/D/receipts``, receipts that
are duplicate, late (an earlier attempt's manifest), carry a wrong manifest hash, are forged,
come from another requester, carry a forged audit head or come from a revoked requester: each
changes nothing and writes nothing, and is counted."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.audit import AuditLog, build_head_jws, read_entries, verify_file
from agent.cli import main as agent_main
from agent.keys import (
    b64url,
    b64url_decode,
    kid_for,
    load_device_key,
    load_storage_key,
    sign_jws,
)
from agent.mqtt import InboundMessage
from agent.paths import WITNESSED_FILE
from agent.provision import initialise
from agent.requester.cli import main as requester_main
from agent.requester.keyfiles import PUBLIC_JWK, generate_keys, load_keys
from agent.requests.receipts import ReceiptDesk
from agent.requests.service import RequestService
from agent.requests.store import RequestStore
from agent.requests.verify import (
    RECEIPT_TYP,
    RefusedReceipt,
    RequestPolicy,
    TrustedKey,
    Unverifiable,
    VerifiedReceipt,
    verify_receipt,
)
from agent.timeutil import rfc3339, to_epoch, utcnow
from agent.topics import Topics
from agent.vault import Vault
from tests.mosquitto import Mosquitto
from tests.realclips import record_clip
from tests.test_approval_coordinator import DEVICE as HDEVICE
from tests.test_approval_coordinator import (
    JTI,
    JTI2,
    REQUESTER,
    close_harness,
    open_harness,
)
from tests.test_mqtt_service import TOPIC_REQUESTS, Requester, eventually, request
from tests.test_mqtt_units import FakeClient
from tests.test_release_e2e import start_daemon, wait_for

DEVICE = "front-door"
POLICE = "city-police"
NEIGHBOR = "next-door"


def enrol(cfg_path: Path, rid: str, kind: str, keys: Path) -> None:
    assert agent_main([
        "--config", str(cfg_path), "requesters", "add", "--id", rid, "--name", rid,
        "--kind", kind, "--key", str(keys / PUBLIC_JWK),
    ]) == 0


def receipt(key: Ed25519PrivateKey, iss: str, jti: str, manifest: str, head: str | None,
            *, kid: str | None = None) -> bytes:
    claims: dict[str, Any] = {
        "iss": iss, "aud": DEVICE, "iat": to_epoch(utcnow()), "req": jti, "manifest": manifest,
    }
    if head is not None:
        claims["audit_head"] = head
    token = sign_jws(key, RECEIPT_TYP, claims)
    if kid is not None:
        # a forgery naming another requester's kid
        header = json.dumps({"alg": "EdDSA", "typ": RECEIPT_TYP, "kid": kid},
                            separators=(",", ":")).encode()
        head_seg = b64url(header)
        payload_seg = token.split(".")[1]
        signing_input = f"{head_seg}.{payload_seg}".encode()
        token = f"{head_seg}.{payload_seg}.{b64url(key.sign(signing_input))}"
    return token.encode()


def receipt_stats(state: Path) -> dict[str, int]:
    doc = json.loads((state / "status.json").read_text())
    stats: dict[str, int] = doc["workers"]["requests"]["stats"]["receipts"]
    return stats


@pytest.mark.timeout(240)
def test_receipts_acknowledge_and_refusals_change_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    state = tmp_path / "state"
    initialise(state, DEVICE, now=utcnow())
    device_key = load_device_key(state)
    now = utcnow()
    with Vault(state, load_storage_key(state)) as vault:
        record_clip(vault, now - timedelta(minutes=10), frames=20, noise=3)
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "device_id": DEVICE,
        "state_dir": str(state),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "approval": {"channels": ["app", "cli"]},
        "app": {"enabled": False},
        "delivery": {"chunk_bytes": "16KiB"},
    }))
    police_dir, neighbor_dir = tmp_path / "police", tmp_path / "neighbor"
    generate_keys(police_dir, POLICE, now=now)
    generate_keys(neighbor_dir, NEIGHBOR, now=now)
    enrol(cfg_path, POLICE, "law-enforcement", police_dir)
    enrol(cfg_path, NEIGHBOR, "neighbor", neighbor_dir)
    police, neighbor = load_keys(police_dir), load_keys(neighbor_dir)
    out = tmp_path / "evidence"
    codes: list[int] = []
    daemon = start_daemon(cfg_path)
    sender = threading.Thread(target=lambda: codes.append(requester_main([
        "send", "--device", DEVICE, "--from", rfc3339(now - timedelta(minutes=30)),
        "--to", rfc3339(now - timedelta(minutes=1)), "--reason", "parcel theft",
        "--legal-basis", "consent", "--key", str(police_dir), "--wait", "-o", str(out),
        "--timeout", "120s", "--host", mosquitto.host, "--port", str(mosquitto.port),
    ])))
    client = mosquitto.client()
    heads = mosquitto.client()
    heads.subscribe(f"doorbell/{DEVICE}/audit/head")
    topic = f"doorbell/{DEVICE}/receipts"
    store = RequestStore.open(state)
    try:
        sender.start()
        wait_for(lambda: store.list_requests(["pending"]), "a pending request", daemon)
        jti = store.list_requests(["pending"])[0].jti
        assert agent_main(["--config", str(cfg_path), "approve", jti]) == 0
        sender.join(120)
        assert codes == [0]
        # 1. the real requester tool's receipt acknowledges the delivery
        wait_for(lambda: store.get_request(jti).status == "acknowledged", "acknowledged", daemon)
        sent = (out / "receipt.jws").read_bytes()
        claims = json.loads(b64url_decode(sent.decode().split(".")[1]))
        acked = [json.loads(x) for x in (state / "audit.jsonl").read_text().splitlines()]
        (ack,) = [e for e in acked if e["event"] == "delivery_acknowledged"]
        assert ack["receipt"] == sent.decode() and ack["attempt"] == 1 and ack["jti"] == jti
        assert ack["manifest_sha256"] == hashlib.sha256(
            (out / "manifest.jws").read_bytes()).hexdigest()
        # its audit head verifies and audit.jsonl holds it: kept as witnessed
        assert (state / WITNESSED_FILE).read_text().strip() == claims["audit_head"]
        witnessed = (state / WITNESSED_FILE).read_bytes()

        # 2. duplicate: changes nothing
        log_before = (state / "audit.jsonl").read_bytes()
        client.publish(topic, sent)

        # 3. the owner sends it again: attempt 2, delivered until a receipt for ITS manifest
        assert agent_main(["--config", str(cfg_path), "redeliver", jti]) == 0
        wait_for(lambda: (store.get_request(jti).status == "delivered"
                          and (m := store.newest_manifest(jti)) is not None and m.attempt == 2),
                 "the redelivery", daemon)
        newest = store.newest_manifest(jti)
        assert newest is not None and newest.manifest_sha256 is not None
        second = newest.manifest_sha256
        first = ack["manifest_sha256"]
        assert second != first
        head = heads.get(timeout=10).payload.decode()  # the device's own (retained) head
        log_before = (state / "audit.jsonl").read_bytes()
        strangers_key = Ed25519PrivateKey.generate()
        forged_head = build_head_jws(strangers_key, DEVICE, 1, "0" * 64, utcnow())
        refusals = [
            receipt(police.signing_key, POLICE, jti, first, head),  # late: attempt 1's manifest
            receipt(police.signing_key, POLICE, jti, "ab" * 32, head),  # wrong manifest hash
            receipt(strangers_key, POLICE, jti, second, head, kid=police.kid),  # forged
            receipt(neighbor.signing_key, NEIGHBOR, jti, second, head),  # another requester
            receipt(police.signing_key, POLICE, jti, second, forged_head),  # forged head
        ]
        for payload in refusals:
            client.publish(topic, payload)
        # then a genuine one for attempt 2: it, and only it, acknowledges
        good = receipt(police.signing_key, POLICE, jti, second, head)
        client.publish(topic, good)
        wait_for(lambda: store.get_request(jti).status == "acknowledged", "attempt 2 acked",
                 daemon)
        lines = (state / "audit.jsonl").read_bytes()
        assert lines.startswith(log_before)
        added = [json.loads(x) for x in lines[len(log_before):].splitlines()]
        # exactly one entry: the genuine receipt's (the refused ones wrote nothing)
        assert [(e["event"], e["receipt"]) for e in added] == [
            ("delivery_acknowledged", good.decode())
        ]
        assert added[0]["attempt"] == 2
        # 4. revoked: refused, nothing written
        assert agent_main(["--config", str(cfg_path), "requesters", "revoke", POLICE]) == 0
        log_before = (state / "audit.jsonl").read_bytes()
        witnessed = (state / WITNESSED_FILE).read_bytes()
        client.publish(topic, good)
        client.publish(topic, receipt(police.signing_key, POLICE, jti, second, head))
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
    finally:
        client.close()
        heads.close()
        store.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    stats = receipt_stats(state)
    assert stats["acknowledged"] == 2
    assert stats["unverifiable_bad_signature"] == 1
    assert stats["forged_head"] == 1
    assert stats["refused_revoked"] == 2
    assert stats["not_acknowledged"] == 4  # duplicate, late, wrong hash, other requester
    # after the revocation: only the agent's stop entry was added; the witnessed head is the same
    after = (state / "audit.jsonl").read_bytes()[len(log_before):]
    assert [json.loads(x)["event"] for x in after.splitlines()] == ["agent_stopped"]
    assert (state / WITNESSED_FILE).read_bytes() == witnessed
    with RequestStore.open(state) as store:
        assert store.get_request(jti).status == "acknowledged"
    assert verify_file(state / "audit.jsonl", device_key.public_key()).ok


def test_a_head_the_log_does_not_hold_is_not_kept(tmp_path: Path) -> None:
    """A receipt whose head the device signed but audit.jsonl does not hold (a log cut short
    since, say) still acknowledges its delivery; only a head the log holds is kept."""
    h = open_harness(tmp_path)
    try:
        log = h.audit.log
        desk = ReceiptDesk(store=h.store, audit=log, policy=RequestPolicy(device_id=HDEVICE),
                           device_key=h.key.public_key(), state_dir=tmp_path)
        for jti in (JTI, JTI2):
            h.add_request(jti)
            h.store.set_status(jti, ["pending"], "approved")
            h.store.set_status(jti, ["approved"], "delivered")
            h.store.record_manifest(jti, h.store.begin_attempt(jti), "cd" * 32)
        log.append("agent_started")
        unknown = build_head_jws(h.key, HDEVICE, 99, "1" * 64, utcnow())
        sent = sign_jws(h.requester_key, RECEIPT_TYP, {
            "iss": REQUESTER, "aud": HDEVICE, "iat": to_epoch(utcnow()), "req": JTI,
            "manifest": "cd" * 32, "audit_head": unknown,
        })
        assert desk.handle(sent.encode()) is True
        assert h.status(JTI) == "acknowledged"
        assert not (tmp_path / WITNESSED_FILE).exists()
        last = log.last_entry()
        assert last is not None
        held = build_head_jws(h.key, HDEVICE, last.seq, last.hash, utcnow())
        sent = sign_jws(h.requester_key, RECEIPT_TYP, {
            "iss": REQUESTER, "aud": HDEVICE, "iat": to_epoch(utcnow()), "req": JTI2,
            "manifest": "cd" * 32, "audit_head": held,
        })
        assert desk.handle(sent.encode()) is True
        assert (tmp_path / WITNESSED_FILE).read_text().strip() == held
        assert desk.stats["witnessed"] == 1 and desk.stats["acknowledged"] == 2
    finally:
        close_harness(h)


def test_a_flood_of_receipts_never_crowds_out_a_request(tmp_path: Path) -> None:
    """Receipts have their own bounded lane: acknowledged at once (never holding one of the
    broker's in-flight slots), the overflow dropped and counted, and a request sent in the
    middle of the flood is answered."""
    key = Ed25519PrivateKey.generate()
    alice_key = Ed25519PrivateKey.generate()
    with RequestStore(tmp_path / "requests.db") as store:
        audit = AuditLog(tmp_path / "audit.jsonl", key)
        store.add_requester("alice", "Alice", "neighbor", alice_key.public_key())
        policy = RequestPolicy(device_id="front-door")
        desk = ReceiptDesk(store=store, audit=audit, policy=policy,
                           device_key=key.public_key(), state_dir=tmp_path, queue_size=8, rate=5)
        svc = RequestService(topics=Topics("doorbell", "front-door"), policy=policy, store=store,
                             audit=audit, signing_key=key, receipts=desk)
        client = FakeClient()
        svc.attach(client)
        svc.start()
        try:
            forged = receipt(Ed25519PrivateKey.generate(), "alice", "req-0123456789abcdef",
                             "ab" * 32, None, kid=kid_for(alice_key.public_key()))
            receipts_topic = "doorbell/front-door/receipts"
            for mid in range(1, 501):
                svc.on_message(InboundMessage(receipts_topic, forged, 1, False, False, None,
                                              mid, 0))
                if mid == 250:
                    alice = Requester("alice", alice_key, kid_for(alice_key.public_key()),
                                      str(x25519.Identity.generate().to_public()))
                    token, jti = request(alice)
                    svc.on_message(InboundMessage(TOPIC_REQUESTS, token.encode(), 1, False,
                                                  False, b"cd", 10_000, 0))
            # every receipt was acknowledged at once, on the network thread
            assert set(range(1, 501)) <= set(client.acked)
            eventually(lambda: 10_000 in client.acked)
            eventually(lambda: store.get_request(jti).status == "pending")
            assert desk.stats["received"] == 500
            # the lane holds 8 (and its thread one more in hand); what was neither queued nor
            # handled was dropped
            handled = desk.stats["unverifiable_bad_signature"]
            assert desk.stats["dropped"] >= 500 - 8 - 1 - handled > 0
            assert not any(e.event == "delivery_acknowledged" for e in read_entries(audit.path))
        finally:
            svc.close()


@pytest.mark.parametrize(
    ("change", "outcome"),
    [
        ({}, "verified"),
        ({"aud": "another-door"}, "wrong_audience"),
        ({"iss": "someone-else"}, "bad_claims"),
        ({"iat": "now"}, "bad_claims"),
        ({"iat_offset": 301}, "not_yet_valid"),
        ({"iat_offset": 299}, "verified"),
        ({"iat_offset": -7 * 86400 - 1}, "expired"),
        ({"req": "short"}, "bad_claims"),
        ({"manifest": "AB" * 32}, "bad_claims"),
        ({"audit_head": 5}, "bad_claims"),
        ({"typ": "doorbell-request+jwt"}, "typ"),
    ],
)
def test_receipt_claim_rules(change: dict[str, Any], outcome: str) -> None:
    """§5.2: a request's header rules with typ doorbell-receipt+jwt, then iss, aud and iat (not
    beyond requests.clock_skew in the future, not older than requests.max_lifetime)."""
    key = Ed25519PrivateKey.generate()
    kid = kid_for(key.public_key())
    now = utcnow().replace(microsecond=0)

    class Trust:
        def key_for_kid(self, asked: str) -> TrustedKey | None:
            if asked != kid:
                return None
            return TrustedKey("alice", "neighbor", kid, key.public_key(), False)

    claims: dict[str, Any] = {
        "iss": "alice", "aud": "front-door", "iat": to_epoch(now) + change.pop("iat_offset", 0),
        "req": "req-0123456789abcdef", "manifest": "ab" * 32,
    }
    typ = change.pop("typ", RECEIPT_TYP)
    claims.update(change)
    token = sign_jws(key, typ, claims).encode()
    result = verify_receipt(token, Trust(), RequestPolicy(device_id="front-door"), now)
    if outcome == "verified":
        assert isinstance(result, VerifiedReceipt) and result.requester_id == "alice"
    elif outcome == "typ":
        assert isinstance(result, Unverifiable) and result.reason == "typ"
    else:
        assert isinstance(result, RefusedReceipt) and result.reason == outcome, result


def test_a_receipt_faster_than_the_delivered_status_waits_for_it(tmp_path: Path) -> None:
    """The requester may verify and answer before the device has recorded ``delivered`` (its
    manifest is out, the status follows): the receipt waits and then acknowledges. One whose
    delivery ends otherwise, or that waits too long, changes nothing."""
    h = open_harness(tmp_path)
    clock = [0.0]
    try:
        desk = ReceiptDesk(store=h.store, audit=h.audit.log,
                           policy=RequestPolicy(device_id=HDEVICE),
                           device_key=h.key.public_key(), state_dir=tmp_path,
                           clock=lambda: clock[0])
        for jti in (JTI, JTI2, "req-cccccccccccccccc"):
            h.add_request(jti)
            h.store.set_status(jti, ["pending"], "approved")
            h.store.record_manifest(jti, h.store.begin_attempt(jti), "cd" * 32)

        def send(jti: str) -> None:
            desk.offer(sign_jws(h.requester_key, RECEIPT_TYP, {
                "iss": REQUESTER, "aud": HDEVICE, "iat": to_epoch(utcnow()), "req": jti,
                "manifest": "cd" * 32,
            }).encode())

        desk.start()
        for jti in (JTI, JTI2, "req-cccccccccccccccc"):
            send(jti)
        eventually(lambda: desk.stats["early"] == 3)
        assert h.status(JTI) == "approved" and "delivery_acknowledged" not in h.events()
        h.store.set_status(JTI, ["approved"], "delivered")
        eventually(lambda: h.status(JTI) == "acknowledged")
        h.store.set_status(JTI2, ["approved"], "failed", error="delivery_error")
        eventually(lambda: desk.stats["not_acknowledged"] == 1)
        clock[0] += 61  # past EARLY_WAIT: the last one gives up
        eventually(lambda: desk.stats["not_acknowledged"] == 2)
        h.store.set_status("req-cccccccccccccccc", ["approved"], "delivered")
        desk.close()
        assert desk.stats["acknowledged"] == 1
        assert h.status("req-cccccccccccccccc") == "delivered"
        assert [e["jti"] for e in h.entries("delivery_acknowledged")] == [JTI]
    finally:
        close_harness(h)
