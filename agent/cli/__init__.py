"""``doorbell-agent``: the owner's command line on the device.

Each command group lives in its own module with a ``register(subparsers)`` function; this module
only assembles them and turns :class:`agent.errors.AgentError` into the contract's error format.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError
from agent.logtext import OneLineFormatter

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


def report_error(prog: str, exc: AgentError) -> int:
    """Print an AgentError as ``prog: error: ...`` plus ``hint: ...``; return its exit status."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def run_program(
    parser: argparse.ArgumentParser,
    prog: str,
    argv: Sequence[str] | None,
    *,
    quiet_level: int = logging.INFO,
) -> int:
    """Parse ``argv``, set up logging and run the chosen handler, turning AgentError into the
    contract's error output; shared by ``doorbell-agent`` and ``doorbell-request``.

    Logs at ``quiet_level`` and above, everything with ``-v``: the daemon's operator wants its
    INFO lines, a requester's successful run wants none.
    """
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    # One printable line per message: requester text in a message cannot forge log lines.
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet_level, handlers=[handler]
    )
    try:
        result: int = args.func(args)
        # Flush here, not at exit, so a reader that closed the pipe is handled below.
        sys.stdout.flush()
    except AgentError as exc:
        return report_error(prog, exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_left()
    return result


def _reader_left() -> int:
    """The reader of stdout went away (``doorbell-agent status | head``): stop quietly.

    stdout is pointed at /dev/null so the interpreter's final flush cannot fail again and
    print a traceback; exit 1 like any other unfinished command.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``doorbell-agent``; returns the process exit status."""
    return run_program(build_parser(), PROG, argv)


def entry() -> None:
    """Console-script wrapper around :func:`main`."""
    sys.exit(main())
