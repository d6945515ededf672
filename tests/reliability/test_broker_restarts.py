"""Broker restarts while the agent handles requests and while it delivers footage.

The agent runs against a real mosquitto (persistence on, as any broker that keeps sessions) and
the broker is restarted at seeded random moments, each observed before acting:

- request handling: just after the request's PUBACK, or once ``request_received`` is audited;
- delivery: as the k-th chunk (k random) of an approved request's delivery reaches the
  requester (the test thread restarts the broker the moment the MQTT thread sees it).

Every request must then be answered exactly once per status: one ``pending``, one ``approved``
and one ``delivered`` (the one final answer), no ``rejected`` for a redelivered copy. "Once"
means one signed response: the contract's QoS 1 is at-least-once, so a response the broker
took but could not acknowledge before it went down is sent again by the MQTT session and may
reach the requester twice, byte for byte the same message (counted and printed); every
delivery checks out end to end (signed manifest, chunk hashes, age decryption, plaintext hash)
and is byte for byte the cut of the request's window made again from the device's vault;
``request_pending`` is audited once per jti, and the audit log verifies.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from agent.timeutil import utcnow
from tests.mosquitto import Mosquitto
from tests.realclips import record_clip
from tests.reliability.harness import AgentProcess, Received, Requester, replay_rng, wait_until

RESTARTS_PER_PHASE = 3
CLIP_FRAMES = 96
"""Ten seconds of real footage (~300 KiB of MJPEG, ~75 chunks of 4 KiB: a delivery is long
enough for the broker to go down in the middle of it)."""


def wait_reconnected(agent: AgentProcess, requester: Requester, mark: int) -> None:
    """After a broker restart: the agent announced itself online again (its subscription is
    back), and the requester's client is connected."""
    agent.watch.wait(
        lambda m: not m.retain and b'"online":true' in m.payload.replace(b" ", b""),
        "the agent to reconnect to the restarted broker",
        mark=mark,
        agent=agent,
    )
    requester.log.wait_connected()


def restart_while_handling(
    agent: AgentProcess, requester: Requester, broker: Mosquitto, rng: random.Random,
    window: tuple[timedelta, timedelta], moments: Counter[str],
) -> str:
    """Publish a request and restart the broker while the agent handles it."""
    now = utcnow()
    mark = agent.watch.mark()
    jti = requester.send(now - window[0], now - window[1])
    moment = rng.choice(["published", "received"])
    if moment == "received":
        agent.wait_audit("request_received", jti=jti)
    broker.restart()
    moments[f"request: {moment}"] += 1
    wait_reconnected(agent, requester, mark)
    return jti


def restart_while_delivering(
    agent: AgentProcess, requester: Requester, broker: Mosquitto, rng: random.Random,
    window: tuple[timedelta, timedelta], moments: Counter[str],
) -> str:
    """Approve a request and restart the broker as its k-th chunk arrives."""
    now = utcnow()
    jti = requester.send(now - window[0], now - window[1])
    requester.wait_status(jti, "pending")
    k = rng.randint(1, 30)
    prefix = f"{requester.deliveries_prefix}{jti}/"
    seen = [0]

    def kth_chunk(m: Received) -> bool:
        if m.topic.startswith(prefix) and not m.topic.endswith("/manifest"):
            seen[0] += 1
        return seen[0] >= k

    fired = requester.log.arm(kth_chunk, lambda: None)
    mark = agent.watch.mark()
    assert agent.approve(jti).code == 0
    wait_until(
        lambda: fired.is_set() or "delivered" in requester.statuses(jti),
        f"chunk {k} of {jti}",
        agent=agent,
    )
    broker.restart()
    requester.log.disarm()
    if "delivered" not in requester.statuses(jti) and agent.request(jti) is not None:
        moments["delivery: mid-stream"] += 1
    wait_reconnected(agent, requester, mark)
    return jti


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_restarts_answer_every_request_once(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = replay_rng("broker-restarts")
    moments: Counter[str] = Counter()
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        # One clip of real footage, ten minutes ago; every request asks for it (the release
        # is the cut of each request's window).
        now = utcnow()
        with agent.open_vault() as vault:
            clip = record_clip(vault, now - timedelta(minutes=10), frames=CLIP_FRAMES)
        window = (timedelta(minutes=11), timedelta(minutes=8))
        requester = Requester(tmp_path / "requester", agent)
        try:
            agent.start()
            plan = ["request"] * RESTARTS_PER_PHASE + ["delivery"] * RESTARTS_PER_PHASE
            rng.shuffle(plan)
            sent: list[str] = []
            for phase in plan:
                if phase == "request":
                    sent.append(
                        restart_while_handling(agent, requester, mosquitto, rng, window, moments)
                    )
                else:
                    sent.append(
                        restart_while_delivering(agent, requester, mosquitto, rng, window, moments)
                    )
            print(f"broker restarts: {dict(moments)}")
            for jti in sent:
                record = agent.wait_request(jti, {"pending", "approved", "delivered"})
                if record.status == "pending":
                    assert agent.approve(jti).code == 0
            for jti in sent:
                requester.wait_status(jti, "delivered")
                agent.wait_request(jti, {"delivered"})
            # A late duplicate would be queued ahead of the answer to one more request.
            now = utcnow()
            barrier = requester.send(now - window[0], now - window[1])
            requester.wait_status(barrier, "pending")
            redelivered = 0
            for jti in sent:
                responses = requester.responses(jti)
                distinct = Counter(r.status for r in {r.payload: r for r in responses}.values())
                assert distinct == {"pending": 1, "approved": 1, "delivered": 1}, (jti, distinct)
                redelivered += len(responses) - len({r.payload for r in responses})
                clips = requester.check_delivery(jti)
                assert list(clips) == [clip.id]
                assert clips == agent.expected_release(jti), f"{jti}: not the window's cut"
                # The window holds the whole clip: every recorded frame is released.
                assert [c.frames for c in requester.manifests(jti)[-1].clips] == [clip.frames]
                assert len(agent.audit_events("request_pending", jti=jti)) == 1
            print(f"responses redelivered by MQTT (same signed message): {redelivered}")
            assert agent.stop() == 0, agent.log_tail()
            agent.verify_audit()
            agent.verify_clips()
        finally:
            requester.close()
