"""``doorbell-agent run``: the daemon (see :mod:`agent.wiring` and :mod:`agent.daemon`)."""

from __future__ import annotations

import argparse

from agent.cli.common import load_config, require_initialised
from agent.diagnostics import guard_exit
from agent.wiring import run_daemon

EXIT_GRACE = 10.0
"""Seconds the process may take to exit once the agent has stopped (see ``guard_exit``)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` command."""
    p = sub.add_parser(
        "run",
        help="run the agent: camera, motion recording into the vault, requests and approvals",
        description="Run the agent until SIGTERM or SIGINT (Ctrl-C); the open clip is finished "
        "cleanly. Supports systemd Type=notify (READY=1, STOPPING=1, watchdog). Writes a "
        "status snapshot to status.json in the state directory every few seconds. Refuses to "
        "start (exit 1, naming the other process) while another run holds the state directory.",
    )
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Load the config, check the state directory, run until stopped."""
    cfg = load_config(args)
    require_initialised(cfg)
    code = run_daemon(cfg)
    guard_exit(EXIT_GRACE)
    return code
