"""``doorbell-agent config check``: validate the configuration file."""

from __future__ import annotations

import argparse

from agent import config as config_mod
from agent.timeutil import format_duration, format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``config`` command group."""
    p = sub.add_parser("config", help="check the configuration file")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = csub.add_parser("check", help="validate the config; print every problem, exit 2 if any")
    check.set_defaults(func=check_handler)


def check_handler(args: argparse.Namespace) -> int:
    """Validate and summarise the config (a ConfigError exits 2 with every problem listed)."""
    path = config_mod.resolve_path(args.config)
    cfg = config_mod.load(path)
    print(
        f"{path}: OK (device {cfg.device_id}, camera {cfg.camera.source}, "
        f"retention {format_duration(cfg.storage.retention)}, "
        f"quota {format_size(cfg.storage.max_bytes)}, broker {cfg.mqtt.host}:{cfg.mqtt.port})"
    )
    return 0
