"""The shell both command-line programs share (``doorbell-agent`` on the device,
``doorbell-request`` on the requester's machine): parse, log, run one handler, and turn
:class:`agent.errors.AgentError` into the contract's ``PROG: error: ...`` plus ``hint: ...``.

Apart from :mod:`agent.cli`, so the requester's tool imports nothing of the device's commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent.errors import AgentError
from agent.logtext import OneLineFormatter


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
