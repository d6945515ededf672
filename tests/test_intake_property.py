"""Property: nothing an enrolled requester can sign stops the running daemon (issue 10, item 1).

Hypothesis makes requests whose every claim may be replaced by arbitrary JSON (huge and
negative integers, floats, NaN and Infinity, booleans, nesting, strings where numbers belong),
signs them with an enrolled key and publishes them to a real ``doorbell-agent run`` over a real
mosquitto, each with its own MQTT Correlation Data. Then, across a restart (with a stored
record an older agent could have written from such a request):

- every message gets at most one response, signed by the device, carrying its Correlation Data,
  ``pending`` or ``rejected`` with a contract error code (CONTRACT §3-§4);
- every message is accounted for: answered, or counted by the agent as unverifiable or as a
  suppressed rejection (the flood budget) — none is lost, none is stuck unacknowledged;
- the request worker stays alive and a valid request sent after each batch is answered
  ``pending``; ``requests list --json`` works on what was stored.
"""

from __future__ import annotations

import base64
import json
import queue
import sqlite3
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requests.verify import REQUEST_TYP
from agent.timeutil import rfc3339, utcnow
from agent.vocabulary import REJECTION_CODES
from tests.mosquitto import Collector, Mosquitto
from tests.reliability.harness import AgentProcess, Requester, wait_until

EXAMPLES = 100
"""Examples per phase (two phases, before and after the restart): about a minute in all."""

CLAIMS = (
    "iss", "aud", "iat", "exp", "jti", "window", "reason", "legal_basis", "legal_ref", "case",
    "recipient",
)
EDGE_INTS = [
    2**70, -(2**62), 99999999999999, 2**63, -(2**63) - 1, 2**53 + 1, 0, -1,
    946684799, 946684800, 253402300799, 253402300800, 10**300, -(10**300),
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.sampled_from(EDGE_INTS)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "10000-01-01T00:00:00Z",
                       "1700000000", "NaN", "\n\x1b[31m\u202e"])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
windows = st.fixed_dictionaries({"start": json_values, "end": json_values})
anything = st.tuples(
    st.dictionaries(st.sampled_from(CLAIMS), json_values, max_size=4),
    st.none() | windows,
).map(lambda pair: pair[0] if pair[1] is None else {**pair[0], "window": pair[1]})
# Only the times wrong, the rest valid: what gets furthest (stored, converted) on weak code.
times_only = st.dictionaries(
    st.sampled_from(["iat", "exp"]),
    st.sampled_from(EDGE_INTS) | st.integers() | st.floats() | st.booleans() | st.text(max_size=12),
    min_size=1,
)
overrides = times_only | anything


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed(requester: Requester, device_id: str, changes: dict[str, Any], n: int) -> bytes:
    """A request by ``requester`` whose claims ``changes`` replaces, signed as it is
    (``allow_nan``: NaN and Infinity go out as the bare words a sloppy signer writes)."""
    now = utcnow()
    claims: dict[str, Any] = {
        "iss": requester.id, "aud": device_id,
        "iat": int(now.timestamp()), "exp": int(now.timestamp()) + 3600,
        "jti": f"prop-{n:06d}-{now.timestamp():.0f}-x",
        "window": {"start": rfc3339(now - timedelta(minutes=30)),
                   "end": rfc3339(now - timedelta(minutes=10))},
        "reason": "property test", "legal_basis": "consent", "recipient": requester.keys.recipient,
    }
    claims.update(changes)
    header = {"alg": "EdDSA", "kid": requester.keys.kid, "typ": REQUEST_TYP}
    payload = json.dumps(claims, allow_nan=True, separators=(",", ":")).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}".encode()
    return signing_input + b"." + b64(requester.keys.signing_key.sign(signing_input)).encode()


class Inbox:
    """Every response to the requester, keyed by Correlation Data, verified."""

    def __init__(self, broker: Mosquitto, agent: AgentProcess, requester: Requester) -> None:
        self.agent = agent
        self.collector: Collector = broker.client()
        assert self.collector.subscribe(f"{agent.topic}/responses/{requester.id}") == [1]
        self.by_correlation: dict[bytes, list[dict[str, Any]]] = {}

    def drain(self) -> dict[bytes, list[dict[str, Any]]]:
        """Take in what has arrived; returns the responses by Correlation Data."""
        while True:
            try:
                msg = self.collector.messages.get_nowait()
            except queue.Empty:
                return self.by_correlation
            claims = verify_device_jws(bytes(msg.payload), self.agent.public_key, RESPONSE_TYP)
            props = getattr(msg, "properties", None)
            corr = getattr(props, "CorrelationData", None)
            assert corr is not None, f"a response without Correlation Data: {claims}"
            self.by_correlation.setdefault(bytes(corr), []).append(claims)


def accounted(agent: AgentProcess) -> int:
    """Messages the running agent has answered, counted unverifiable or suppressed."""
    status = agent.status() or {}
    stats = (status.get("workers", {}).get("requests") or {}).get("stats") or {}
    return int(
        sum((stats.get("unverifiable") or {}).values())
        + sum((stats.get("rejected") or {}).values())
        + stats.get("admitted", 0) + stats.get("suppressed", 0)
    )


def test_arbitrary_signed_claims_never_stop_the_running_daemon(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    check_property(tmp_path, mosquitto, EXAMPLES)


@pytest.mark.slow
def test_more_arbitrary_signed_claims(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """The same property with ten times the examples (``-m slow``)."""
    check_property(tmp_path, mosquitto, EXAMPLES * 10)


def check_property(tmp_path: Path, mosquitto: Mosquitto, examples: int) -> None:
    """Two batches of ``examples`` messages each, with a restart between them."""
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        requester = Requester(tmp_path / "req", agent)
        agent.start()
        inbox = Inbox(mosquitto, agent, requester)
        topic = f"{agent.topic}/requests"
        counter = iter(range(10**6))
        sent: list[bytes] = []

        @settings(
            max_examples=examples, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(changes=overrides)
        def send(changes: dict[str, Any]) -> None:
            n = next(counter)
            correlation = f"p{n}".encode()
            inbox.collector.publish(topic, signed(requester, agent.device_id, changes, n),
                                    correlation_data=correlation)
            sent.append(correlation)

        def phase(name: str) -> None:
            base = accounted(agent)
            before = len(sent)
            send()
            # A valid request after the batch: answered once everything before it was handled
            # (one requester's messages are handled in order).
            sentinel = f"sentinel-{name}".encode()
            now = utcnow()
            _, token = requester.token(now - timedelta(minutes=20), now - timedelta(minutes=5))
            inbox.collector.publish(topic, token, correlation_data=sentinel)
            wait_until(lambda: inbox.drain().get(sentinel),
                       f"the {name} sentinel's response", timeout=60, agent=agent)
            assert [c["status"] for c in inbox.by_correlation[sentinel]] == ["pending"]
            batch = len(sent) - before + 1
            wait_until(lambda: accounted(agent) - base >= batch,
                       f"status.json accounting for the {name} batch", timeout=30, agent=agent)
            assert accounted(agent) - base == batch
            assert agent.running

        phase("first")
        agent.stop()
        # A record an older agent stored from such a request: the restart must live with it.
        db = agent.state_dir / "requests.db"
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(
                "INSERT INTO requests (jti, requester, kid, iat, exp, received_at, status, error,"
                " responded, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'rejected', 'bad_claims',"
                " 'rejected', ?)",
                ("poisoned-by-an-old-agent", requester.id, requester.keys.kid, 99999999999999,
                 2**62, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z"),
            )
        conn.close()
        agent.start()
        phase("second")
        inbox.drain()

        listed = agent.cli("requests", "list", "--json")
        assert listed.code == 0, listed.err
        assert "poisoned-by-an-old-agent" in listed.out

        statuses: Counter[str] = Counter()
        for correlation in sent:
            answers = inbox.by_correlation.get(correlation, [])
            assert len(answers) <= 1, (correlation, answers)
            for claims in answers:
                statuses[claims["status"]] += 1
                assert claims["status"] in ("pending", "rejected"), claims
                if claims["status"] == "rejected":
                    assert claims["error"] in REJECTION_CODES, claims
        assert agent.running
        assert "Traceback" not in agent.log_text()
        code = agent.stop()
        assert code == 0, agent.log_tail()
        inbox.collector.close()
        requester.close()
        print(f"{len(sent)} messages, responses {dict(statuses)}")
        agent.verify_audit()

