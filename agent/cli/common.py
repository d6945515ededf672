"""Helpers shared by the command modules: config lookup, JSON output, state-dir access."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent import config as config_mod
from agent.config import Config
from agent.errors import StateError
from agent.paths import StatePaths


def load_config(args: argparse.Namespace) -> Config:
    """The configuration named by --config, $DOORBELL_AGENT_CONFIG or the system default."""
    return config_mod.load(config_mod.resolve_path(getattr(args, "config", None)))


def require_initialised(cfg: Config) -> None:
    """Fail with a hint when ``init`` has not been run for this state directory."""
    if not StatePaths(cfg.state_dir).device_key.exists():
        raise StateError(
            f"{cfg.state_dir} is not initialised",
            hint="run `doorbell-agent init` first",
        )


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout (the contract's --json output)."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    sys.stdout.write("\n")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The --json option of listing commands."""
    parser.add_argument("--json", action="store_true", help="print one JSON document")
