"""The composition root (``agent.wiring``): what ``run_daemon`` is given is what its workers use.

The daemon takes its clock and its gpiozero pin factory as arguments, so a test drives them
directly instead of patching module globals.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path

from gpiozero.pins.mock import MockFactory

from agent import config as config_mod
from agent.audit import read_entries
from agent.camera.frame import SystemClock
from agent.daemon import Worker
from agent.paths import StatePaths
from agent.provision import initialise
from agent.timeutil import parse_rfc3339, utcnow
from agent.wiring import DaemonContext, approval_worker, requests_worker, run_daemon
from tests.mosquitto import Mosquitto
from tests.reliability.harness import wait_until

AHEAD = timedelta(days=3)
BUTTON_PIN, LED_PIN = 5, 6


class ShiftedClock(SystemClock):
    """The real clock, three days ahead: a wall time no default clock could give."""

    def now(self) -> datetime:
        return super().now() + AHEAD


def test_run_daemon_builds_its_workers_on_the_clock_and_pins_it_is_given(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    state = tmp_path / "state"
    initialise(state, "front-door", now=utcnow())
    cfg = config_mod.parse({
        "device_id": "front-door",
        "state_dir": str(state),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "app": {"enabled": False},
        "approval": {
            "channels": ["button", "cli"],
            "button": {"pin": BUTTON_PIN, "led_pin": LED_PIN},
        },
    })
    factory = MockFactory()
    stop = threading.Event()
    built: list[DaemonContext] = []

    def approval(ctx: DaemonContext) -> Worker | None:
        built.append(ctx)
        return approval_worker(ctx)

    codes: list[int] = []
    daemon = threading.Thread(target=lambda: codes.append(run_daemon(
        cfg, factories=(requests_worker, approval), stop=stop, handle_signals=False,
        status_interval=0.2, clock=ShiftedClock(stop), pin_factory=factory,
    )))
    daemon.start()
    try:
        status_path = StatePaths(state).status

        def running() -> dict[str, object] | None:
            try:
                doc = json.loads(status_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            return doc if isinstance(doc, dict) and doc.get("state") == "running" else None

        status = wait_until(running, "status.json to say running", timeout=60)
        # The status snapshot is stamped by the clock given, not the system's.
        updated = parse_rfc3339(str(status["updated"]))
        assert updated - utcnow() > AHEAD - timedelta(minutes=5)
        # The button and its LED were built on the pin factory given: an input pulled up,
        # an output that is off (nothing is pending).
        button, led = factory.pin(BUTTON_PIN), factory.pin(LED_PIN)
        assert (button.function, button.pull, button.state) == ("input", "up", True)
        assert (led.function, led.state) == ("output", False)
        # Every factory sees the one typed context, filled in start order.
        (ctx,) = built
        assert ctx.pin_factory is factory and ctx.requests is not None
        assert ctx.request_store is not None
    finally:
        stop.set()
        daemon.join(60)
    assert not daemon.is_alive() and codes == [0]
    assert ctx.approval is not None
    events = [e.event for e in read_entries(StatePaths(state).audit_log)]
    assert events[-1] == "agent_stopped" and "agent_started" in events
