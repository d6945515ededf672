"""``doorbell-request receive J``: collect the answer and delivery of a request already sent.

``send`` opened the request's persistent session at the broker before publishing it (CONTRACT
§5.2), so everything the device sent meanwhile (responses, chunks, the manifest) waits there;
``receive J`` resumes that session, reassembles, verifies and decrypts the delivery into the
evidence directory (``-o DIR``, default ``./J``; an interrupted ``send --wait`` set of the same
request is continued, a complete one is never overwritten), then sends the signed receipt.
"""

from __future__ import annotations

import argparse
import os
import queue
import time
from datetime import timedelta
from pathlib import Path

from agent.errors import UsageError
from agent.requester.evidence import DEVICE_KEY_FILE, REQUEST_FILE, EvidenceDir
from agent.requester.keyfiles import load_keys, load_request
from agent.requester.receive import receive_delivery
from agent.requester.send import (
    DELIVERY_GRACE,
    KEY_DIR_ENV,
    add_broker_options,
    broker_settings,
    delivery_assembler,
    device_session,
)
from agent.requester.session import (
    RequestEvidence,
    evidence_path,
    known_device_key,
)
from agent.timeutil import from_epoch, parse_duration, utcnow
from agent.topics import Topics
from agent.vocabulary import Status

DEFAULT_TIMEOUT = "1d"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``receive`` command."""
    p = sub.add_parser(
        "receive",
        help="collect the delivery of a request already sent",
        description="Resume request J's session at the broker, wait for its delivery, verify "
        "the signed manifest and every file's hash, decrypt the footage with your age identity "
        "and write the evidence directory, then send the device a signed receipt. Exit "
        "status 0 when everything verified, 1 when the delivery failed, is incomplete or "
        "does not verify.",
    )
    p.add_argument("jti", nargs="?", metavar="J", help="the request id (printed by send)")
    p.add_argument("--request", dest="request_opt", metavar="J", help=argparse.SUPPRESS)
    p.add_argument(
        "--device",
        metavar="D",
        help="the device id (default: the one this key directory sent J to)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help="the evidence directory (default ./J)",
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
        help="the device's public key (JWK/PEM); default: the key pinned when J was sent",
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
    jti = args.jti or args.request_opt
    if not jti:
        raise UsageError("name the request: doorbell-request receive J")
    try:
        timeout = parse_duration(args.timeout).total_seconds()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = broker_settings(args)
    keys = load_keys(args.key or Path(os.environ.get(KEY_DIR_ENV, ".")))
    sent = load_request(keys.directory, jti)
    device_id = args.device or (sent.device_id if sent else None)
    if device_id is None:
        raise UsageError(
            f"request {jti} was not sent from {keys.directory}, so its device is unknown",
            hint="pass --device D",
        )
    topics = Topics(settings.topic_prefix, device_id)
    remaining = (
        from_epoch(sent.exp) - utcnow() if sent is not None else timedelta(seconds=timeout)
    )
    device_key = known_device_key(keys, device_id, args.device_key)
    evidence = EvidenceDir.open(evidence_path(args.output, jti), jti)
    with device_session(settings, keys, topics, jti, remaining, device_key=device_key) as (
        client, inbox, device_key
    ):
        if sent is not None and not (evidence.path / REQUEST_FILE).exists():
            evidence.add_request(sent.token)
        if not (evidence.path / DEVICE_KEY_FILE).exists():
            evidence.add_device_key(device_key)
        with delivery_assembler(evidence.path, keys, topics, jti, device_key) as assembler:
            collector = RequestEvidence(
                evidence, assembler, keys=keys, topics=topics, jti=jti, device_key=device_key
            )

            def next_message(wait: float) -> tuple[str, bytes] | None:
                try:
                    message = inbox.get(timeout=wait)
                except queue.Empty:
                    return None
                if message.topic == topics.audit_head:
                    collector.offer_head(message.payload.decode("ascii", "replace"))
                    return None
                if message.topic == assembler.responses_topic:
                    collector.offer_response(message.payload)
                return message.topic, message.payload

            print(f"waiting for the delivery of request {jti}", flush=True)
            clips = receive_delivery(assembler, next_message, timeout=timeout, grace=DELIVERY_GRACE)
            # The device publishes `delivered` after the manifest, on another topic: keep it
            # in the evidence too when it is on its way.
            deadline = time.monotonic() + DELIVERY_GRACE
            while Status.DELIVERED not in collector.statuses and time.monotonic() < deadline:
                next_message(max(0.0, deadline - time.monotonic()))
            collector.acknowledge(client)
    for clip in clips:
        print(f"{clip.path}  {clip.bytes} bytes  sha256 {clip.plaintext_sha256}")
    print(f"footage of request {jti} verified ({len(clips)} files); receipt sent")
    print(f"evidence written to {evidence.path}")
    return 0
