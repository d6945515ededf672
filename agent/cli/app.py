"""``doorbell-agent app set-password``: change the local app's password.

The new password's argon2id hash replaces ``state_dir/app-password`` atomically (a temporary
0600 file, fsync, rename, directory fsync), so a crash leaves either the old or the new hash.
The running app re-reads the file on every request and drops every session made under the old
password: changing the password logs every browser out.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from agent.cli.common import load_config, require_initialised
from agent.errors import UsageError
from agent.files import replace_file
from agent.paths import StatePaths
from agent.provision import hash_password

MIN_PASSWORD = 12
MAX_PASSWORD = 1024


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``app`` command group."""
    p = sub.add_parser("app", help="the local web app")
    app_sub = p.add_subparsers(dest="app_command", metavar="SUBCOMMAND", required=True)
    sp = app_sub.add_parser(
        "set-password",
        help="set a new local app password (logs every app session out)",
        description="Set a new password for the local web app. Without --password-file it is "
        "asked for twice on the terminal. Every logged-in browser is logged out.",
    )
    sp.add_argument(
        "--password-file",
        metavar="FILE",
        help="read the new password from the first line of FILE ('-' for stdin), for scripts",
    )
    sp.set_defaults(func=set_password_handler)


def check_password(password: str) -> str:
    """Return the password if acceptable, else raise UsageError saying what is required."""
    if len(password) < MIN_PASSWORD:
        raise UsageError(
            f"the password is too short ({len(password)} characters)",
            hint=f"use at least {MIN_PASSWORD} characters; a few random words are easy to type",
        )
    if len(password) > MAX_PASSWORD:
        raise UsageError(f"the password is longer than {MAX_PASSWORD} characters")
    if not password.isprintable():
        raise UsageError("the password contains control characters")
    return password


def read_password(source: str | None) -> str:
    """The new password: from a file / stdin (first line), or typed twice at the terminal."""
    if source is not None:
        try:
            if source == "-":
                line = sys.stdin.readline()
            else:
                with open(source, encoding="utf-8") as fh:
                    line = fh.readline()
        except OSError as exc:
            raise UsageError(f"cannot read the password file {source}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"the password file {source} is not UTF-8 text") from exc
        return check_password(line.rstrip("\r\n"))
    first = getpass.getpass("New app password: ")
    check_password(first)
    if getpass.getpass("Repeat the new app password: ") != first:
        raise UsageError("the two passwords differ; nothing was changed")
    return first


def replace_password_hash(state_dir: Path, password: str) -> Path:
    """Atomically replace ``state_dir/app-password`` with the argon2id hash of ``password``."""
    target = StatePaths(state_dir).app_password
    replace_file(target, hash_password(password).encode("ascii"))
    return target


def set_password_handler(args: argparse.Namespace) -> int:
    """``app set-password``: hash and store the new password; sessions end on next use."""
    cfg = load_config(args)
    require_initialised(cfg)
    password = read_password(args.password_file)
    path = replace_password_hash(cfg.state_dir, password)
    print(f"local app password changed ({path}); every app session is logged out")
    return 0
