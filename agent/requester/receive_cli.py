"""``doorbell-request receive``: collect the delivery of a request already sent.

For when ``send`` ran without ``--wait`` (or was interrupted): subscribe to the request's delivery
topics and responses, then reassemble, verify and decrypt the clips into ``-o DIR`` with a
progress bar. The broker does not keep messages for a subscriber that did not exist yet, so
start this before the owner approves (or ask the owner to deliver again).
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
from pathlib import Path

from agent.errors import UsageError
from agent.keys import parse_public_key
from agent.mqtt import InboundMessage, MQTTClient, Topics
from agent.requester.keyfiles import load_keys
from agent.requester.receive import DeliveryAssembler, receive_delivery
from agent.requester.send import (
    CONNECT_TIMEOUT,
    DELIVERY_GRACE,
    KEY_DIR_ENV,
    add_broker_options,
    broker_settings,
    device_key_from_status,
)
from agent.timeutil import parse_duration

DEFAULT_TIMEOUT = "1d"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``receive`` command."""
    p = sub.add_parser(
        "receive",
        help="receive, verify and decrypt the footage of a request already sent",
        description="Wait for the delivery of request J, verify the signed manifest and every "
        "file's hash, decrypt the clips with your age identity and write them to DIR. Exit "
        "status 0 when every clip is written, 1 when the delivery failed, is incomplete or "
        "does not verify.",
    )
    p.add_argument("--device", required=True, metavar="D", help="the device id")
    p.add_argument("--request", required=True, metavar="J", help="the request id (jti)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="DIR",
        help="where the decrypted clips go",
    )
    p.add_argument(
        "--key",
        type=Path,
        metavar="DIR",
        help=f"your key directory from keygen (default ${KEY_DIR_ENV} or .)",
    )
    p.add_argument(
        "--device-key",
        metavar="FILE",
        help="the device's public key (JWK/PEM); default: from the retained status",
    )
    p.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help=f"give up after this long (default {DEFAULT_TIMEOUT})",
    )
    add_broker_options(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run ``receive``."""
    try:
        timeout = parse_duration(args.timeout).total_seconds()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = broker_settings(args)
    keys = load_keys(args.key or Path(os.environ.get(KEY_DIR_ENV, ".")))
    topics = Topics(settings.topic_prefix, args.device)
    device_key = parse_public_key(args.device_key) if args.device_key else None
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    subscriptions = [
        topics.deliveries(keys.requester_id, args.request) + "/#",
        topics.responses(keys.requester_id),
    ]
    if device_key is None:
        subscriptions.append(topics.status)

    def next_message(wait: float) -> tuple[str, bytes] | None:
        try:
            message = inbox.get(timeout=wait)
        except queue.Empty:
            return None
        return message.topic, message.payload

    with MQTTClient(
        settings,
        client_id=f"doorbell-request-{keys.requester_id}-{secrets.token_hex(4)}",
        subscriptions=subscriptions,
        on_message=inbox.put,
        fail_fast=True,
    ) as client:
        client.wait_ready(CONNECT_TIMEOUT)
        if device_key is None:
            device_key = device_key_from_status(inbox, topics)
        with DeliveryAssembler(
            args.output,
            identity=keys.age_identity(),
            device_public_key=device_key,
            device_id=args.device,
            requester_id=keys.requester_id,
            jti=args.request,
            topic_prefix=topics.prefix,
            progress=True,
        ) as assembler:
            print(f"waiting for the delivery of request {args.request}", flush=True)
            clips = receive_delivery(assembler, next_message, timeout=timeout, grace=DELIVERY_GRACE)
    for clip in clips:
        print(f"{clip.path}  {clip.bytes} bytes  sha256 {clip.plaintext_sha256}")
    print(f"footage of request {args.request} verified and written ({len(clips)} clips)")
    return 0
