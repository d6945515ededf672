"""``doorbell-agent``: the owner's command line on the device.

Each command group lives in its own module with a ``register(subparsers)`` function; this module
only assembles them; :mod:`agent.program` turns :class:`agent.errors.AgentError` into the
contract's error format.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__
from agent.program import run_program

PROG = "doorbell-agent"

# Modules under agent.cli that contribute subcommands, in --help order.
COMMAND_MODULES: tuple[str, ...] = (
    "init",
    "run",
    "config_cmd",
    "status",
    "audit",
    "requesters",
    "clips",
    "requests",
    "decide",
    "report",
    "app",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Privacy-first doorbell camera agent: footage stays encrypted on the device "
        "and leaves only when you approve one signed request.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $DOORBELL_AGENT_CONFIG, else /etc/doorbell-agent/agent.yaml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"agent.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``doorbell-agent``; returns the process exit status."""
    return run_program(build_parser(), PROG, argv)


def entry() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
