"""``doorbell-request``: the requester's command line.

Like ``doorbell-agent``, each subcommand lives in its own module under ``agent.requester`` with a
``register(subparsers)`` function; this module assembles them and reports
:class:`agent.errors.AgentError` as ``doorbell-request: error: ...`` plus a hint line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.program import run_program

PROG = "doorbell-request"

# Modules under agent.requester that contribute subcommands, in --help order.
COMMAND_MODULES: tuple[str, ...] = ("keygen", "send", "receive_cli", "verify_cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a doorbell-agent device for footage with a signed, narrow request.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"agent.requester.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``doorbell-request``; returns the process exit status."""
    return run_program(build_parser(), PROG, argv, quiet_level=logging.WARNING)


def entry() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
