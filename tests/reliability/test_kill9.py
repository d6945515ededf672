"""kill -9 of the whole agent at random moments inside recording, request handling and delivery.

One agent (file camera recording a clip every loop, real mosquitto, one enrolled requester) is
SIGKILLed at least :data:`KILLS_PER_PHASE` times in each phase, in a seeded random order, and
restarted each time. A kill counts as *landed* in its phase only when the phase was observed at
the moment of the kill:

- recording: a ``vault/*.part`` clip file with data existed before the kill and still exists
  after it (its writer had not published it);
- request handling: the request was published and not yet decided; the exact moment is one of
  "just published" (PUBACK back), "``request_received`` audited", or "the ``pending`` response
  arriving" (SIGKILL sent from the MQTT network thread as that message arrives);
- delivery: SIGKILL sent from the network thread as the k-th chunk (k random) of the request's
  delivery arrives, and no ``delivered`` response had come.

After every kill, while the agent is down, ``clips verify`` and ``audit verify`` pass. After the
last restart: every request sent was recorded exactly once (the broker redelivers what the agent
had not acknowledged), undecided requests are still pending, requests approved before a crash
end ``delivered`` or ``failed``, every delivered request checks out end to end (signed manifest,
chunk hashes, age decryption, plaintext hash; each file byte for byte the cut of the request's
window made again from the device's vault), no delivery chunk went out
before its approval, ``request_pending`` is audited once per jti, replays of old tokens are
rejected ``replayed``, no retention hold is left, and the final ``clips verify`` / ``audit
verify`` (real subprocesses) pass.

Replay a failure with the printed seed: ``DOORBELL_RELIABILITY_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from agent import config
from agent.audit import AuditLog
from agent.errors import RequestNotFoundError
from agent.keys import load_device_key
from agent.mqtt import InboundMessage
from agent.provision import initialise
from agent.requester.build import build_request, new_jti
from agent.requester.keyfiles import generate_keys
from agent.requests.service import RequestService, admission_audited
from agent.requests.store import RequestRecord, RequestStore
from agent.requests.verify import RequestPolicy, VerifiedRequest, verify_request
from agent.timeutil import utcnow
from agent.topics import Topics
from agent.vault import ClipInfo
from tests.mosquitto import Mosquitto
from tests.reliability.harness import (
    DEVICE,
    REQUESTER,
    AgentProcess,
    Received,
    Requester,
    replay_rng,
    wait_until,
)

PHASES = ("recording", "request", "delivery")
KILLS_PER_PHASE = 7
MAX_ATTEMPTS = 40
"""Kill attempts in all (a kill that misses its phase is tried again, up to this many)."""
RANK = {"pending": 0, "approved": 1, "delivered": 2, "failed": 2}


@dataclass
class Ledger:
    """What the test did, to check the agent against at the end."""

    sent: list[str] = field(default_factory=list)
    approval_marks: dict[str, int] = field(default_factory=dict)
    """jti -> the requester's message count when its (first) approval was issued."""
    landed: Counter[str] = field(default_factory=Counter)
    moments: Counter[str] = field(default_factory=Counter)
    parts: list[str] = field(default_factory=list)
    """Clip ids that were being written at a kill."""


def response_req(message: Received) -> str | None:
    """The ``req`` claim of a response, unverified (only to recognise it on the network
    thread; the test verifies every response's signature later)."""
    try:
        body = message.payload.split(b".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return None
    req = claims.get("req") if isinstance(claims, dict) else None
    return req if isinstance(req, str) else None


def is_response_to(requester: Requester, jti: str, message: Received) -> bool:
    """Whether ``message`` is a response to request ``jti`` of ``requester``."""
    return message.topic == requester.responses_topic and response_req(message) == jti


def latest_clip(agent: AgentProcess) -> ClipInfo:
    """The latest finished clip with footage (waiting for one)."""

    def latest() -> ClipInfo | None:
        done = [c for c in agent.clips() if c.state == "final" and c.size > 0]
        return max(done, key=lambda c: c.start) if done else None

    return wait_until(latest, "a recorded clip", timeout=60, agent=agent)


def kill_while_recording(agent: AgentProcess, rng: random.Random, ledger: Ledger) -> bool:
    """SIGKILL at a random moment while the camera writes a clip."""
    wait_until(agent.recording, "the camera to write a clip", timeout=60, agent=agent)
    deadline = time.monotonic() + rng.uniform(0.0, 1.5)
    while time.monotonic() < deadline and agent.recording() is not None:
        time.sleep(0.02)
    part = agent.recording()
    agent.kill9()
    if part is None or not part.exists():
        return False
    ledger.parts.append(part.stem)
    ledger.moments["recording: clip open"] += 1
    return True


def kill_while_handling_request(
    agent: AgentProcess, requester: Requester, rng: random.Random, ledger: Ledger
) -> bool:
    """Publish a request and SIGKILL while the agent handles it."""
    now = utcnow()
    jti, token = requester.token(now - timedelta(seconds=20), now)
    moment = rng.choice(["published", "received", "answering"])
    armed = None
    if moment == "answering":
        armed = requester.log.arm(
            lambda m: m.topic == requester.responses_topic and response_req(m) == jti,
            lambda: agent.kill9(reap=False),
        )
    requester.tokens[jti] = token
    ledger.sent.append(jti)
    requester.publish(token, correlation=jti.encode())
    if moment == "received":
        wait_until(
            lambda: agent.audit_events("request_received", jti=jti) or agent.exited,
            f"request_received of {jti}",
            timeout=30,
        )
    elif armed is not None:
        wait_until(lambda: armed.is_set() or agent.exited, f"the pending response to {jti}")
    if agent.running:
        agent.kill9()
    else:
        assert agent.proc is not None
        agent.proc.wait(30)
    record = agent.request(jti)
    if record is not None and record.status != "pending":
        return False
    ledger.moments[f"request: {moment}"] += 1
    return True


def kill_while_delivering(
    agent: AgentProcess, requester: Requester, rng: random.Random, ledger: Ledger
) -> bool:
    """Approve a request and SIGKILL as its k-th delivery chunk arrives."""
    clip = latest_clip(agent)
    jti = requester.send(clip.start, clip.end)
    ledger.sent.append(jti)
    requester.wait_status(jti, "pending")
    k = rng.randint(1, 24)
    prefix = f"{requester.deliveries_prefix}{jti}/"
    seen = [0]

    def kth_chunk(m: Received) -> bool:
        if m.topic.startswith(prefix) and not m.topic.endswith("/manifest"):
            seen[0] += 1
        return seen[0] >= k

    fired = requester.log.arm(kth_chunk, lambda: agent.kill9(reap=False))
    ledger.approval_marks[jti] = requester.log.mark()
    agent.approve(jti)
    wait_until(
        lambda: fired.is_set() or "delivered" in requester.statuses(jti) or agent.exited,
        f"chunk {k} of {jti} (or its delivered response)",
    )
    requester.log.disarm()
    if agent.running:
        agent.kill9()
    else:
        assert agent.proc is not None
        agent.proc.wait(30)
    record = agent.request(jti)
    landed = (
        fired.is_set()
        and "delivered" not in requester.statuses(jti)
        and record is not None
        and record.status == "approved"
    )
    if landed:
        ledger.moments["delivery: mid-stream"] += 1
    return landed


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill9_at_random_moments(tmp_path: Path, mosquitto: Mosquitto, motion_video: Path) -> None:
    rng = replay_rng("kill9")
    ledger = Ledger()
    with AgentProcess(tmp_path / "agent", mosquitto, camera=motion_video) as agent:
        requester = Requester(tmp_path / "requester", agent)
        try:
            agent.start()
            attempts = 0
            while any(ledger.landed[p] < KILLS_PER_PHASE for p in PHASES):
                attempts += 1
                assert attempts <= MAX_ATTEMPTS, f"kills landed only {dict(ledger.landed)}"
                phase = rng.choice([p for p in PHASES if ledger.landed[p] < KILLS_PER_PHASE])
                if phase == "recording":
                    landed = kill_while_recording(agent, rng, ledger)
                elif phase == "request":
                    landed = kill_while_handling_request(agent, requester, rng, ledger)
                else:
                    landed = kill_while_delivering(agent, requester, rng, ledger)
                ledger.landed[phase] += landed
                # Dead agent: what it left on disk must verify as it is.
                agent.verify_clips()
                agent.verify_audit()
                agent.start()
            print(f"kills: {attempts} attempts, landed {dict(ledger.landed)}")
            print(f"moments: {dict(ledger.moments)}")
            check_after_crashes(agent, requester, ledger, rng)
        finally:
            requester.close()


def check_after_crashes(
    agent: AgentProcess, requester: Requester, ledger: Ledger, rng: random.Random
) -> None:
    """The end-of-run checks (see the module docstring)."""
    # Every clip open at a kill was recovered or discarded, and audited as such.
    for clip_id in ledger.parts:
        assert agent.audit_events("clip_recovered", clip=clip_id) or agent.audit_events(
            "clip_discarded", clip=clip_id
        ), f"clip {clip_id} open at a kill was neither recovered nor discarded"
    # No request lost: the broker redelivers whatever the agent had not acknowledged.
    for jti in ledger.sent:
        record = wait_until(
            partial(agent.request, jti), f"request {jti} to be recorded", timeout=60,
            agent=agent,
        )
        if jti not in ledger.approval_marks:
            assert record.status == "pending", f"undecided request {jti} is {record.status}"
    # Approve what is still pending; every approved request must end delivered or failed.
    for jti in ledger.sent:
        if jti not in ledger.approval_marks:
            ledger.approval_marks[jti] = requester.log.mark()
            result = agent.approve(jti)
            assert result.code == 0, result.err
    records: dict[str, RequestRecord] = {}
    for jti in ledger.sent:
        agent.wait_request(jti, {"delivered", "failed"}, timeout=120)
        requester.wait_status(jti, "delivered", "failed", timeout=60)
        # The settled record: the requester can read the last answer before the agent records
        # that the broker took it, and the replay check below compares against this one.
        records[jti] = agent.wait_request(jti, {"delivered", "failed"}, timeout=60, answered=True)
    with agent.open_vault() as vault:
        recorded = {c.id for c in vault.list_clips() if c.sha256 is not None}
        assert vault.holds() == [], "a finished request still holds clips"
    cuts_checked = 0
    for jti in ledger.sent:
        record = records[jti]
        assert record.status == "delivered", f"{jti} ended {record.status}: {record.detail}"
        statuses = requester.statuses(jti)
        assert statuses[0] == "pending" and statuses[-1] == "delivered", (jti, statuses)
        ranks = [RANK[s] for s in statuses]
        assert ranks == sorted(ranks), f"{jti} answered out of order: {statuses}"
        # No chunk before approval; the delivery checks out end to end.
        first = min((m.index for m in requester.delivery_messages(jti)), default=None)
        assert first is None or first >= ledger.approval_marks[jti], f"{jti} leaked early"
        clips = requester.check_delivery(jti)
        assert len(clips) == record.clips
        for clip_id, plain in clips.items():
            # A released file is the cut of the window (contract §5.1): byte for byte the
            # same window of the same stored clip cut again here (cuts are deterministic).
            if clip_id in recorded:
                assert plain == agent.expected_cut(jti, clip_id), f"{jti}: not the cut of {clip_id}"
                cuts_checked += 1
        # Accepted once, however often the broker redelivered it.
        assert len(agent.audit_events("request_pending", jti=jti)) == 1, jti
    assert cuts_checked, "no released file was checked against its cut"
    # Replays of old tokens, restarts in between, are refused.
    for jti in rng.sample(ledger.sent, 3):
        mark = requester.log.mark()
        requester.publish(requester.tokens[jti])
        answer = requester.log.wait(
            partial(is_response_to, requester, jti),
            f"the answer to a replay of {jti}",
            mark=mark,
            agent=agent,
        )
        claims = next(r.claims for r in requester.responses(jti) if r.index == answer.index)
        assert (claims["status"], claims.get("error")) == ("rejected", "replayed")
        assert agent.request(jti) == records[jti]
    assert agent.stop() == 0, agent.log_tail()
    agent.verify_clips(subprocess_=True)
    agent.verify_audit(subprocess_=True)


class _Crash(Exception):
    """The process dying at a chosen point."""


class _AckingClient:
    """Stands in for the MQTT client: every publish is acknowledged at once."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.acked: list[int] = []

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
        expiry: int | None = None,
        timeout: float | None = None,
    ) -> Future[None]:
        self.published.append(topic)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def ack(self, message: InboundMessage) -> None:
        self.acked.append(message.mid)


def test_redelivery_after_a_crash_inside_admission_is_audited_once(tmp_path: Path) -> None:
    """The moment the random kills found: the agent dies after ``request_pending`` is written
    but before the request's row is committed. The broker redelivers the message (dup); the
    request is admitted then, once, and the log does not say the jti was accepted twice."""
    state = tmp_path / "state"
    initialise(state, DEVICE, now=utcnow())
    key = load_device_key(state)
    keys = generate_keys(tmp_path / "keys", REQUESTER, now=utcnow())
    cfg = config.parse({"device_id": DEVICE, "state_dir": str(state)})
    policy = RequestPolicy.from_config(cfg)
    now = utcnow()
    token = build_request(
        keys.signing_key, keys.kid, REQUESTER, DEVICE, now - timedelta(minutes=5), now,
        "crash test", "consent", None, None, keys.recipient, now, timedelta(hours=1),
    )
    with AuditLog(state / "audit.jsonl", key) as audit, RequestStore.open(state) as store:
        store.add_requester(
            REQUESTER, "Police", "law-enforcement", keys.signing_key.public_key(), None,
            audit=audit,
        )

        class DiesAfterPending:
            def append(self, event: str, **fields: object) -> object:
                entry = audit.append(event, **fields)
                if event == "request_pending":
                    raise _Crash
                return entry

        first = verify_request(token.encode(), store, store, policy, now)
        assert isinstance(first, VerifiedRequest)
        with pytest.raises(_Crash):
            store.admit(first, policy, now, audit=DiesAfterPending())
        assert not store.jti_seen(first.jti)  # rolled back: only the audit entry survived
        client = _AckingClient()
        service = RequestService(
            topics=Topics("doorbell", DEVICE), policy=policy, store=store, audit=audit,
            signing_key=key,
            admission_audited=lambda event, jti: admission_audited(audit.path, event, jti),
        )
        service.attach(client)
        with service:
            service.on_message(
                InboundMessage(
                    topic=service.topics.requests, payload=token.encode(), qos=1,
                    retain=False, dup=True, correlation_data=None, mid=7, generation=1,
                )
            )
            wait_until(lambda: client.acked, "the redelivered request to be handled")
        assert store.get_request(first.jti).status == "pending"
        pending = [
            e for e in audit_lines(state) if e["event"] == "request_pending"
        ]
        assert [e["jti"] for e in pending] == [first.jti]
        assert client.published == [service.topics.responses(REQUESTER)]


def test_a_replay_answer_does_not_unmark_the_requests_own_answer(tmp_path: Path) -> None:
    """The kill runs found it: the ``rejected``/``replayed`` answer to a replayed token was
    recorded as the request's answer, so the next start sent its real status again."""
    state = tmp_path / "state"
    initialise(state, DEVICE, now=utcnow())
    keys = generate_keys(tmp_path / "keys", REQUESTER, now=utcnow())
    policy = RequestPolicy.from_config(
        config.parse({"device_id": DEVICE, "state_dir": str(state)})
    )
    now = utcnow()
    token = build_request(
        keys.signing_key, keys.kid, REQUESTER, DEVICE, now - timedelta(minutes=5), now,
        "replay test", "consent", None, None, keys.recipient, now, timedelta(hours=1),
    )
    with RequestStore.open(state) as store:
        store.add_requester(
            REQUESTER, "Police", "law-enforcement", keys.signing_key.public_key(), None
        )
        verified = verify_request(token.encode(), store, store, policy, now)
        admitted = store.admit(verified, policy, now)
        assert isinstance(admitted, VerifiedRequest)
        store.mark_responded(admitted.jti, "pending")
        store.mark_responded(admitted.jti, "rejected")  # the answer to a replay
        assert store.get_request(admitted.jti).responded == "pending"
        with pytest.raises(RequestNotFoundError):
            store.mark_responded("no-such-request-jti", "pending")


def test_generated_jtis_never_look_like_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kill runs tripped on it: ``doorbell-agent approve -Xy...`` is an unknown option, so
    ``doorbell-request`` never makes a jti starting with ``-``."""
    drawn = iter(["-" + "a" * 31, "b" * 32])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda _n: next(drawn))
    assert new_jti() == "b" * 32


def audit_lines(state: Path) -> list[dict[str, object]]:
    """Every entry of the state directory's audit log."""
    lines = (state / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
