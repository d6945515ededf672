"""One agent per state directory (contract §8): a second ``run`` on the same state directory
is refused before it touches the broker, the camera, the app or the audit log."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.errors import StateLockedError
from agent.paths import LOCK_FILE
from agent.provision import initialise
from agent.statelock import StateLock
from agent.timeutil import utcnow
from agent.wiring import run_daemon
from tests.mosquitto import Mosquitto
from tests.reliability.harness import AgentProcess, Requester, wait_until


def test_state_lock_is_exclusive_names_the_holder_and_is_released(tmp_path: Path) -> None:
    holder = StateLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(StateLockedError, match=rf"pid {os.getpid()}") as info:
            StateLock(tmp_path).acquire()
        assert info.value.exit_code == 1
        assert (tmp_path / LOCK_FILE).read_text().strip().isdigit()  # the refusal truncated nothing
    finally:
        holder.release()
    with StateLock(tmp_path):  # free again once released
        pass


def test_run_daemon_refuses_a_locked_state_before_touching_anything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    initialise(state, "front-door", now=utcnow())
    cfg = config_mod.parse(
        {"device_id": "front-door", "state_dir": str(state), "app": {"enabled": False}}
    )
    built: list[str] = []

    def factory(_ctx: object) -> None:
        built.append("worker")

    with StateLock(state):
        before = sorted(p.name for p in state.iterdir())
        with pytest.raises(StateLockedError):
            run_daemon(cfg, factories=(factory,), stop=threading.Event(), handle_signals=False)
        assert sorted(p.name for p in state.iterdir()) == before  # no audit log, no status.json
    assert built == []


@pytest.mark.slow
def test_second_run_exits_1_naming_the_live_daemon_which_stays_undisturbed(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with AgentProcess(tmp_path / "agent", mosquitto) as agent:
        requester = Requester(tmp_path / "police", agent)
        agent.start()
        audit_before = agent.audit_entries()
        status_before = agent.status()
        assert status_before is not None
        log_before = agent.log_text()
        mark = agent.watch.mark()

        second = agent.cli_subprocess("run", timeout=120)

        assert second.code == 1, second
        assert second.out == ""
        lines = second.err.splitlines()
        assert lines[0] == (
            f"doorbell-agent: error: another doorbell-agent run (pid {agent.pid}) is using the "
            f"state directory {agent.state_dir}"
        ), second.err
        assert lines[1].startswith("hint: ") and len(lines) == 2, second.err
        assert "Traceback" not in second.err
        # Nothing written: not the audit log, not status.json, not the live agent's log.
        assert agent.audit_entries() == audit_before
        assert (agent.state_dir / LOCK_FILE).read_text().strip() == str(agent.pid)
        status_now = agent.status()
        assert status_now is not None and status_now["pid"] == agent.pid
        assert agent.log_text() == log_before
        # The live daemon is still connected and was never knocked off the broker.
        start = utcnow()
        jti = requester.send(start - timedelta(minutes=10), start - timedelta(minutes=5))
        requester.wait_status(jti, "pending")
        assert [m for m in agent.watch.since(mark) if b'"online":false' in m.payload] == []
        fresh = wait_until(
            lambda: (s := agent.status()) is not None
            and s["updated"] > status_before["updated"]
            and s,
            "a newer status.json",
            agent=agent,
        )
        mqtt = fresh["workers"]["requests"]["stats"]
        assert (mqtt["connects"], mqtt["disconnects"], mqtt["connected"]) == (1, 0, True)
        assert "already connected" not in mosquitto.log_text()

        # A crashed agent leaves no stale lock: the kernel dropped it with the process.
        agent.kill9()
        agent.start()
        assert (agent.state_dir / LOCK_FILE).read_text().strip() == str(agent.pid)
        assert agent.stop() == 0
        requester.close()
