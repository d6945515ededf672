"""The agent's wall clock jumps forward and back while it runs; monotonic time runs on, as when
NTP steps the clock of a Raspberry Pi that booted without a real-time clock.

The agent reads wall time only through ``agent.timeutil.utcnow`` (checked below by
:func:`test_clock_source_is_single`); :class:`tests.reliability.harness.FakeClock` shifts that
clock in the agent process alone; the requester and the test keep real time.

Proves, with footage thirty to fifty minutes old and ``storage.retention: 1h``:

- forward jump (+2 h): a pending request whose ``exp`` has now passed is expired (audited, one
  ``expired`` answer, its approval refused, nothing delivered); a new request signed at real
  time is now past its ``exp`` and rejected ``expired``; retention shreds the clips nobody
  holds and the one whose request expired, but NOT the clip a still-pending request holds;
- backward jump (to real time - 1 h): the pending request is still pending, a request signed at
  real time is rejected ``not_yet_valid``; approving the pending request then delivers exactly
  the held clip, intact: every frame of it, byte for byte the cut of the request's window made
  again from the device's vault;
- nothing is released without approval, and the audit chain verifies although its timestamps
  go backwards (``seq``/``prev`` prove the order).
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent.timeutil import parse_rfc3339, utcnow
from tests.mosquitto import Mosquitto
from tests.realclips import record_clip
from tests.reliability.harness import (
    AgentProcess,
    FakeClock,
    Requester,
    wait_until,
)

AGENT_SOURCES = Path(__file__).resolve().parents[2] / "agent"
WALL_CLOCK_READS = re.compile(
    r"datetime\.(now|utcnow|today)\(|\bdate\.today\(|\btime\.(time|time_ns|gmtime|localtime|ctime)"
    r"\(|\bfrom time import\b"
)


def test_clock_source_is_single() -> None:
    """Every wall-clock read of the agent goes through ``agent.timeutil.utcnow``: that is what
    :class:`FakeClock` shifts, so a second source would silently escape the jumps below."""
    offenders = [
        f"{path.relative_to(AGENT_SOURCES.parent)}:{number}: {line.strip()}"
        for path in sorted(AGENT_SOURCES.rglob("*.py"))
        if path.name != "timeutil.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if WALL_CLOCK_READS.search(line)
    ]
    assert offenders == [], "read the wall clock through agent.timeutil.utcnow:\n" + "\n".join(
        offenders
    )


def holders(agent: AgentProcess) -> set[str]:
    """The requests holding clips in the vault now."""
    with agent.open_vault() as vault:
        return {h.holder for h in vault.holds()}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_clock_jumps_forward_and_back(tmp_path: Path, mosquitto: Mosquitto) -> None:
    clock = FakeClock(tmp_path / "faketime")
    agent = AgentProcess(
        tmp_path / "agent",
        mosquitto,
        env=clock.env(),
        config={"storage": {"retention": "1h"}, "approval": {"timeout": "1d"}},
    )
    now = utcnow()
    footage = {}
    with agent.open_vault() as vault:
        for name, minutes_ago in (("held", 50), ("expiring", 40), ("unheld", 30)):
            footage[name] = record_clip(vault, now - timedelta(minutes=minutes_ago), frames=20)
    held = footage["held"]

    def window(name: str) -> tuple[datetime, datetime]:
        minutes_ago = {"held": 50, "expiring": 40}[name]
        return now - timedelta(minutes=minutes_ago + 1), now - timedelta(minutes=minutes_ago - 2)

    with agent:
        requester = Requester(tmp_path / "requester", agent)
        try:
            agent.start()
            keeper = requester.send(*window("held"), lifetime=timedelta(days=1))
            short = requester.send(*window("expiring"), lifetime=timedelta(minutes=30))
            for jti in (keeper, short):
                requester.wait_status(jti, "pending")
            wait_until(
                lambda: holders(agent) >= {keeper, short},
                "retention holds on both pending requests",
                agent=agent,
            )

            # -- forward: +2 h ------------------------------------------------------------
            clock.jump(timedelta(hours=2))
            agent.wait_request(short, {"expired"})
            requester.wait_status(short, "expired")
            expired = agent.wait_audit("request_expired", jti=short)
            assert expired["cause"] == "exp"
            assert agent.approve(short).code != 0, "an expired request was approved"
            late = requester.send(utcnow() - timedelta(minutes=20), utcnow())
            answer = requester.wait_status(late, "rejected")
            assert answer.claims["error"] == "expired"
            assert agent.request(keeper).status == "pending"  # type: ignore[union-attr]
            # Retention runs at start (then every 10 min of monotonic time): restart to see it
            # act on the new wall time.
            assert agent.stop() == 0, agent.log_tail()
            agent.start()
            shredded = {footage["unheld"].id, footage["expiring"].id}
            wait_until(
                lambda: shredded <= {e["clip"] for e in agent.audit_events("clip_deleted")},
                "retention to shred the unheld clips",
                agent=agent,
            )
            clips = {c.id for c in agent.clips()}
            assert held.id in clips, "retention shredded a clip held by a pending request"
            assert not shredded & clips
            assert {e["reason"] for e in agent.audit_events("clip_deleted")} == {"retention"}

            # -- backward: to real time - 1 h (3 h back) ----------------------------------
            clock.jump(timedelta(hours=-1))
            early = requester.send(utcnow() - timedelta(minutes=20), utcnow())
            answer = requester.wait_status(early, "rejected")
            assert answer.claims["error"] == "not_yet_valid"
            assert agent.request(keeper).status == "pending"  # type: ignore[union-attr]
            assert requester.delivery_messages(keeper) == [], "footage left before approval"
            mark = requester.log.mark()
            assert agent.approve(keeper).code == 0
            requester.wait_status(keeper, "delivered")
            # Exactly the held clip, intact: its window's cut, every recorded frame of it.
            delivered = requester.check_delivery(keeper)
            assert list(delivered) == [held.id]
            assert delivered == agent.expected_release(keeper)
            assert [c.frames for c in requester.manifests(keeper)[-1].clips] == [held.frames]
            assert min(m.index for m in requester.delivery_messages(keeper)) >= mark
            for jti in (short, late, early):
                assert requester.delivery_messages(jti) == []
            assert sorted(requester.statuses(short)) == ["expired", "pending"]
            assert agent.stop() == 0, agent.log_tail()
        finally:
            requester.close()
        # The clock went backwards inside the log, and the chain still verifies.
        logs = [
            [parse_rfc3339(e["ts"]) for e in agent.audit_entries((name,))]
            for name in ("audit.jsonl", "activity.jsonl")
        ]
        assert any(b < a for stamps in logs for a, b in itertools.pairwise(stamps))
        stamps = [t for ts in logs for t in ts]
        assert max(stamps) - min(stamps) > timedelta(hours=1)
        agent.verify_audit(subprocess_=True)
        agent.verify_clips()
