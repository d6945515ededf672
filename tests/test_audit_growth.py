"""Audit growth per requester (issue 10, item 7): over a simulated day (injected clocks), a
revoked requester, an enrolled one sending malformed and replayed requests and an anonymous
forger, each as fast as they like with the largest messages the intake takes, add at most
1 MiB each to the audit log, which still verifies, and every message is accounted for."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.audit import AuditLog, iter_log_lines, verify_file
from agent.keys import kid_for
from agent.mqtt import InboundMessage
from agent.requests.service import RequestService
from agent.requests.store import RequestStore
from agent.requests.verify import RequestPolicy
from agent.topics import Topics
from tests.test_mqtt_service import TOPIC_REQUESTS, Requester, sign
from tests.test_mqtt_units import FakeClient

T0 = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
DAY = 86400.0
STEP = 10.0
"""Simulated seconds between two rounds; every sender sends one message a round. The budgets
are time-based, so a faster sender only adds to the counted (suppressed) messages."""
MIB = 1024 * 1024
MAX_BYTES = 8192


def party(requester_id: str) -> Requester:
    key = Ed25519PrivateKey.generate()
    return Requester(requester_id, key, kid_for(key.public_key()),
                     str(x25519.Identity.generate().to_public()))


def biggest(requester: Requester, now: datetime, n: int, **overrides: Any) -> str:
    """A signed request with every free-text claim as large (in log bytes) as it can be while
    the token stays within ``requests.max_bytes``: control characters, which the log writes as
    six-byte escapes."""
    fill = "\x01"
    claims: dict[str, Any] = {
        "iss": requester.id, "aud": "front-door",
        "iat": int(now.timestamp()), "exp": int(now.timestamp()) + 3600,
        "jti": f"j{n:015d}".ljust(128, "x"),
        "window": {"start": fill * 64, "end": fill * 64},
        "reason": fill * 1000, "legal_basis": "warrant", "legal_ref": fill * 256,
        "case": fill * 128, "recipient": requester.recipient,
    }
    claims.update(overrides)
    token = sign(requester, claims)
    while len(token) > MAX_BYTES:  # trim the reason until it fits
        claims["reason"] = claims["reason"][: len(claims["reason"]) - 50]
        token = sign(requester, claims)
    return token


def test_one_day_of_floods_adds_at_most_1_mib_per_requester(tmp_path: Path) -> None:
    clock = [0.0]

    def now() -> datetime:
        return T0 + timedelta(seconds=clock[0])

    device_key = Ed25519PrivateKey.generate()
    mallory, alice, stranger = party("mallory"), party("alice"), party("stranger")
    store = RequestStore(tmp_path / "requests.db", now=now)
    audit = AuditLog(tmp_path / "audit.jsonl", device_key)
    store.add_requester("mallory", "Mallory", "other", mallory.key.public_key())
    store.add_requester("alice", "Alice", "neighbor", alice.key.public_key())
    store.revoke_requester("mallory")
    svc = RequestService(
        topics=Topics("doorbell", "front-door"),
        policy=RequestPolicy(device_id="front-door", max_bytes=MAX_BYTES),
        store=store, audit=audit, signing_key=device_key,
        now=now, clock=lambda: clock[0],
    )
    client = FakeClient()
    svc.attach(client)

    revoked = biggest(mallory, now(), 0)
    replayed = biggest(alice, now(), 0, exp=int(T0.timestamp()) + 2 * 86400 - 1,
                       iat=int(T0.timestamp()) + 86400)
    forged = revoked[: revoked.rindex(".") + 1] + "A" * 86  # mallory's kid, a bad signature
    unknown = biggest(stranger, now(), 0)
    sent: Counter[str] = Counter()
    mid = 0

    def deliver(token: str, who: str) -> None:
        nonlocal mid
        mid += 1
        sent[who] += 1
        message = InboundMessage(TOPIC_REQUESTS, token.encode(), 1, False, False, b"c", mid, 0)
        svc._handle(message, clock[0])

    n = 0
    while clock[0] < DAY:
        n += 1
        deliver(revoked, "mallory")
        deliver(forged, "unverifiable")
        deliver(unknown, "unverifiable")
        # alice: a fresh malformed (recordable bad_claims: legal_ref too long) request, then
        # a replay of an earlier one.
        deliver(biggest(alice, now(), n, legal_ref="r" * 300), "alice")
        deliver(replayed, "alice")
        svc._write_summaries(force=False)
        clock[0] += STEP
    svc._write_summaries(force=True)
    store.close()
    audit.close()

    per: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    for line in iter_log_lines(tmp_path / "audit.jsonl"):
        entry = json.loads(line)
        who = entry.get("requester", "unverifiable")
        per[who] += len(line) + 1
        if entry["event"] == "request_unverifiable":
            counted["unverifiable"] += entry["count"]
        elif "suppressed" in entry:
            counted[who] += entry["suppressed"]
        elif entry["event"] == "request_received":
            answered[who] += 1
    # Nothing else wrote to the log (the requesters were enrolled without auditing).
    assert sum(per.values()) == (tmp_path / "audit.jsonl").stat().st_size
    for who in ("mallory", "alice"):
        # What one requester can cause: its own entries plus every unverifiable summary.
        assert per[who] + per["unverifiable"] <= MIB, (who, per)
        # Every message is accounted for: audited one by one, or counted in a summary.
        assert answered[who] + counted[who] == sent[who], (who, answered, counted, sent)
        assert counted[who] > 0.9 * sent[who]  # the flood really was over the budget
    assert counted["unverifiable"] == sent["unverifiable"]
    assert sorted(client.acked) == list(range(1, mid + 1))  # each message acked exactly once
    assert verify_file(tmp_path / "audit.jsonl", device_key.public_key()).ok
    print(f"simulated day: sent {dict(sent)}, audit bytes {dict(per)}")
