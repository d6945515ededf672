"""``doorbell-agent init``: create the state directory and every key, once."""

from __future__ import annotations

import argparse

from agent.cli.common import load_config
from agent.provision import configured_client_id, initialise
from agent.timeutil import utcnow


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``init`` command."""
    p = sub.add_parser(
        "init",
        help="create the state directory, device key, storage key, app password and certificate",
    )
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Initialise the state directory named by the config; refuses to overwrite keys."""
    cfg = load_config(args)
    result = initialise(cfg.state_dir, cfg.device_id, now=utcnow())
    print(f"initialised {result.state_dir} for device {cfg.device_id}")
    print(f"device key id (kid): {result.kid}")
    print(f"local app password (shown once, write it down): {result.app_password}")
    print(f"local app TLS certificate SHA-256 fingerprint: {result.tls_fingerprint}")
    client_id = configured_client_id(cfg.state_dir, cfg.device_id, cfg.mqtt.client_id)
    print(f"MQTT client id: {client_id} (bind it to the device's broker account)")
    return 0
