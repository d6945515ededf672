"""Poison, then restart: the real daemon under a systemd-like restart policy.

The unit (``systemd/doorbell-agent.service``) says ``Restart=on-failure``, ``RestartSec=5s``,
``StartLimitBurst=5`` in ``StartLimitIntervalSec=10min``: :class:`Supervisor` does the same
(with a short RestartSec) and fails the test when systemd would give up. Each round an enrolled
requester sends the requests that used to kill the agent for good (``iat`` 99999999999999 and
-2**62, ``exp`` 2**70 a hundred and fifty times — more than the broker's in-flight window, which
unacknowledged messages used to fill — NaN, year-1 windows, nesting, a ``jti`` with a newline),
a record an older agent could have stored from such a request is planted in ``requests.db``,
and at a seeded random moment the agent is killed (-9) and restarted by the supervisor.

Throughout: the agent never exits by itself, a valid request after each round is answered
``pending``, ``requests list`` works; at the end a clean stop exits 0 and the log verifies.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.timeutil import utcnow
from tests.mosquitto import Mosquitto
from tests.reliability.harness import AgentProcess, Requester, replay_rng, wait_until
from tests.test_intake_property import signed

pytestmark = pytest.mark.timeout(300)

ROUNDS = 4
FLOOD = 150
POISONS: list[dict[str, Any]] = [
    {"iat": 99999999999999},
    {"iat": -(2**62)},
    {"exp": float("nan")},
    {"exp": True},
    {"window": {"start": "0001-01-01T00:00:00Z", "end": "0001-01-01T00:10:00Z"}},
    {"window": {"start": "9999-12-31T23:00:00Z", "end": "9999-12-31T23:59:59Z"}},
    {"reason": [[[[{"a": [1]}]]]]},
    {"jti": "forged\n2026-01-01 00:00:00,000 ERROR agent: owner approved everything"},
]


class Supervisor:
    """``Restart=on-failure`` with a start limit, for an :class:`AgentProcess`."""

    def __init__(
        self, agent: AgentProcess, *, burst: int = 5, interval: float = 600.0,
        restart_sec: float = 0.2,
    ) -> None:
        self.agent = agent
        self.burst = burst
        self.interval = interval
        self.restart_sec = restart_sec
        self.starts: list[float] = []
        self.killed = 0
        self.own_exits: list[int | None] = []

    def start(self) -> None:
        now = time.monotonic()
        self.starts = [t for t in self.starts if now - t < self.interval] + [now]
        if len(self.starts) > self.burst:
            raise AssertionError(
                f"start limit hit ({self.burst} starts in {self.interval:g} s): systemd would "
                f"give up\n{self.agent.log_tail()}"
            )
        self.agent.start()

    def kill9(self) -> None:
        """A crash from outside (power, OOM killer); systemd restarts it."""
        self.killed += 1
        self.agent.kill9()
        time.sleep(self.restart_sec)
        self.start()

    def check(self) -> None:
        """Restart the agent if it exited on its own (and remember that it did)."""
        if self.agent.exited:
            code = self.agent.returncode
            self.own_exits.append(code)
            if code == 0:
                raise AssertionError("the agent stopped by itself with status 0")
            time.sleep(self.restart_sec)
            self.start()


def plant(agent: AgentProcess, requester: Requester, n: int) -> None:
    """A record an older agent stored from a poisonous request (not yet answered)."""
    conn = sqlite3.connect(agent.state_dir / "requests.db", timeout=30)
    with conn:
        conn.execute(
            "INSERT INTO requests (jti, requester, kid, iat, exp, received_at, status, error,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, 'rejected', 'not_yet_valid', ?)",
            (f"planted-poison-{n:04d}", requester.id, requester.keys.kid, 99999999999999,
             2**70 // 2**10, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z"),
        )
    conn.close()


def answered(supervisor: Supervisor, requester: Requester, jti: str) -> list[str]:
    """The statuses answered to ``jti`` so far, restarting the agent if it exited."""
    supervisor.check()
    return requester.statuses(jti)


def test_poison_then_restart_loop(tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = replay_rng("poison-restart")
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        requester = Requester(tmp_path / "requester", agent)
        supervisor = Supervisor(agent)
        supervisor.start()
        n = 0
        try:
            for round_ in range(ROUNDS):
                batch: list[dict[str, Any]] = [*POISONS, *([{"exp": 2**70}] * FLOOD)]
                rng.shuffle(batch)
                kill_at = rng.randrange(len(batch))
                for i, changes in enumerate(batch):
                    n += 1
                    requester.publish(
                        signed(requester, agent.device_id, changes, n).decode(),
                        correlation=f"poison-{n}".encode(),
                    )
                    if i == kill_at:
                        plant(agent, requester, round_)
                        supervisor.kill9()
                    supervisor.check()
                now = utcnow()
                jti = requester.send(now - timedelta(minutes=20), now - timedelta(minutes=5))
                wait_until(
                    functools.partial(answered, supervisor, requester, jti),
                    f"an answer to the valid request of round {round_}", timeout=90,
                )
                assert requester.statuses(jti) == ["pending"]
                supervisor.check()
            listed = agent.cli("requests", "list", "--json")
            assert listed.code == 0, listed.err
            assert "planted-poison-0000" in listed.out
            assert supervisor.own_exits == [], agent.log_tail()
            assert agent.stop() == 0, agent.log_tail()
        finally:
            requester.close()
        print(f"poison-restart: {n} poisonous requests, {supervisor.killed} kills, "
              f"{len(supervisor.starts)} starts")
        log = agent.log_text()
        assert "Traceback" not in log
        assert "\n2026-01-01 00:00:00,000 ERROR agent: owner approved" not in log
        agent.verify_audit()
