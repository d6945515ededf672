"""``doorbell-request send``: sign a request, publish it, and with ``--wait`` follow the answers.

Without ``--wait`` the command returns once the broker has acknowledged the request (QoS 1).
With ``--wait`` it subscribes to ``P/D/responses/R`` (and, with ``-o DIR``, to the request's
delivery topics) *before* publishing, so nothing the device sends can be missed; it then prints
each response whose signature verifies with the device key (from ``--device-key FILE``, else
from the retained ``P/D/status``), and exits 0 once the request is ``delivered`` (1 when it is
``rejected``, ``denied``, ``expired`` or ``failed``). Responses that do not verify, or that
answer another request, are reported on stderr and ignored.

After ``approved`` a :class:`DeliveryStep` (the requester's delivery assembler, with ``-o DIR``)
is fed every delivery message; when ``delivered`` arrives it gets ``grace`` seconds for chunks
still in flight and then writes the verified, decrypted clips.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import MQTTConfig, MQTTTLSConfig
from agent.errors import AgentError, KeyFileError, MQTTError, ReceiveError, UsageError
from agent.keys import b64url_decode, kid_for, parse_public_key
from agent.mqtt import InboundMessage, MQTTClient, Topics
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requester.build import build_request
from agent.requester.keyfiles import RequesterKeys, load_keys
from agent.requester.receive import DeliveryAssembler
from agent.timeutil import from_epoch, parse_duration, parse_rfc3339, rfc3339, utcnow

TERMINAL_EXIT = {"delivered": 0, "rejected": 1, "denied": 1, "expired": 1, "failed": 1}
CONNECT_TIMEOUT = 30.0
STATUS_TIMEOUT = 10.0
DELIVERY_GRACE = 10.0
KEY_DIR_ENV = "DOORBELL_REQUEST_KEYS"


class DeliveryStep(Protocol):
    """Receives one delivery (``agent.requester.receive.DeliveryAssembler`` fits)."""

    @property
    def topic_filter(self) -> str:
        """The subscription carrying the delivery (``P/D/deliveries/R/J/#``)."""
        ...

    def feed(self, topic: str, payload: bytes) -> object:
        """Take one delivery message; raises ReceiveError for one that does not verify."""
        ...

    def ready(self) -> bool:
        """Whether the manifest and every chunk it lists have arrived."""
        ...

    def finish(self) -> object:
        """Verify, decrypt and write the clips; raises ReceiveError naming what is wrong."""
        ...

    def close(self) -> None:
        """Remove temporary files."""
        ...


@dataclass(frozen=True)
class Exchange:
    """One sent request whose responses we follow."""

    topics: Topics
    requester_id: str
    jti: str
    device_key: Ed25519PublicKey
    correlation: bytes


def add_broker_options(parser: argparse.ArgumentParser) -> None:
    """The contract's broker options (shared by every subcommand that talks MQTT)."""
    g = parser.add_argument_group("broker")
    g.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="broker port (default 1883, 8883 with --tls)")
    g.add_argument("--tls", action="store_true", help="connect with TLS")
    g.add_argument("--cafile", type=Path, help="CA bundle that signed the broker certificate")
    g.add_argument("--cert", type=Path, help="client certificate (PEM) for TLS")
    g.add_argument("--keyfile", type=Path, help="client certificate key (PEM)")
    g.add_argument("--username", help="broker user name (your requester id under the example ACL)")
    g.add_argument("--password-file", type=Path, help="file holding the broker password (0600)")
    g.add_argument("--topic-prefix", default="doorbell", metavar="P", help="default doorbell")


def broker_settings(args: argparse.Namespace) -> MQTTConfig:
    """An :class:`MQTTConfig` from the broker options; raises UsageError for bad combinations."""
    if (args.cert is None) != (args.keyfile is None):
        raise UsageError("--cert and --keyfile go together")
    if (args.cafile or args.cert) and not args.tls:
        raise UsageError("--cafile/--cert/--keyfile need --tls")
    try:
        return MQTTConfig(
            host=args.host,
            port=args.port if args.port is not None else (8883 if args.tls else 1883),
            tls=MQTTTLSConfig(
                enabled=args.tls, cafile=args.cafile, certfile=args.cert, keyfile=args.keyfile
            ),
            username=args.username,
            password_file=args.password_file,
            topic_prefix=args.topic_prefix,
        )
    except ValueError as exc:
        raise UsageError(f"invalid broker options: {exc}") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``send`` command."""
    p = sub.add_parser(
        "send",
        help="sign and publish a footage request",
        description="Sign a footage request with your key and publish it to the device. With "
        "--wait, print each signed response as it arrives (verified against the device key) "
        "and, with -o DIR, receive and decrypt the footage after approval. Exit status: 0 "
        "when delivered (or, without --wait, when the broker took the request), 1 when "
        "rejected, denied, expired or failed.",
    )
    p.add_argument("--device", required=True, metavar="D", help="the device id")
    p.add_argument("--from", dest="start", required=True, metavar="T",
                   help="window start, RFC 3339 UTC (2026-01-31T12:00:00Z)")
    p.add_argument("--to", dest="end", required=True, metavar="T", help="window end, RFC 3339 UTC")
    p.add_argument("--reason", required=True, help="why you ask (shown to the homeowner)")
    p.add_argument("--legal-basis", required=True,
                   choices=("consent", "warrant", "subpoena", "emergency"))
    p.add_argument("--legal-ref", help="warrant or subpoena number (required for those)")
    p.add_argument("--case", help="your case reference")
    p.add_argument("--key", type=Path, metavar="DIR",
                   help=f"your key directory from keygen (default ${KEY_DIR_ENV} or .)")
    p.add_argument("--lifetime", default="1d",
                   help="how long the request stays valid (default 1d, at most what the "
                   "device accepts, normally 7d)")
    p.add_argument("--wait", action="store_true", help="follow the responses until a final one")
    p.add_argument("--device-key", metavar="FILE",
                   help="the device's public key (JWK/PEM); default: from the retained status")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="with --wait: receive the footage into DIR after approval")
    p.add_argument("--timeout", metavar="DURATION",
                   help="with --wait: give up after this long (default: wait for a final answer)")
    add_broker_options(p)
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run ``send``."""
    if args.output is not None and not args.wait:
        raise UsageError("-o DIR receives footage, which needs --wait")
    try:
        start, end = parse_rfc3339(args.start), parse_rfc3339(args.end)
        lifetime = parse_duration(args.lifetime)
        timeout = parse_duration(args.timeout).total_seconds() if args.timeout else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = broker_settings(args)
    keys = load_keys(args.key or Path(os.environ.get(KEY_DIR_ENV, ".")))
    token = build_request(
        keys.signing_key, keys.kid, keys.requester_id, args.device, start, end, args.reason,
        args.legal_basis, args.legal_ref, args.case, keys.recipient, utcnow(), lifetime,
    )
    jti = str(json.loads(b64url_decode(token.split(".")[1]))["jti"])
    topics = Topics(settings.topic_prefix, args.device)
    device_key = parse_public_key(args.device_key) if args.device_key else None
    if not args.wait:
        with _client(settings, keys, []) as client:
            client.wait_ready(CONNECT_TIMEOUT)
            _publish(client, topics, token, secrets.token_bytes(16))
        print(f"sent request {jti} to {args.device}")
        return 0

    inbox: queue.Queue[InboundMessage] = queue.Queue()
    # Subscribe to everything the device may send before publishing, so nothing is missed.
    subscriptions = [topics.responses(keys.requester_id)]
    if device_key is None:
        subscriptions.append(topics.status)
    if args.output is not None:
        subscriptions.append(topics.deliveries(keys.requester_id, jti) + "/#")
    step: DeliveryStep | None = None
    try:
        with _client(settings, keys, subscriptions, inbox.put) as client:
            client.wait_ready(CONNECT_TIMEOUT)
            if device_key is None:
                device_key = device_key_from_status(inbox, topics)
            if args.output is not None:
                step = _delivery_step(args.output, keys, topics, jti, device_key)
            exchange = Exchange(topics, keys.requester_id, jti, device_key, secrets.token_bytes(16))
            _publish(client, topics, token, exchange.correlation)
            print(f"sent request {jti} to {args.device}; waiting for responses", flush=True)
            return follow(exchange, inbox.get, timeout=timeout, step=step)
    finally:
        if step is not None:
            step.close()


def say(line: str) -> None:
    """Print one progress line and flush it at once: scripts (and tests) follow these lines on
    a pipe, where stdout is block-buffered, and act on each (revoke, approve...) as it comes;
    buffered, a ``pending`` line would only appear when the command gives up."""
    print(line, flush=True)


def follow(
    exchange: Exchange,
    next_message: Callable[[bool, float | None], InboundMessage],
    *,
    timeout: float | None,
    step: DeliveryStep | None = None,
    grace: float = DELIVERY_GRACE,
    out: Callable[[str], None] = say,
) -> int:
    """Print each verified response to ``exchange`` until a final one; return the exit status.

    ``next_message(block, timeout)`` is ``queue.Queue.get``: it raises ``queue.Empty`` on
    timeout. Delivery messages go to ``step``; after ``delivered`` it gets ``grace`` seconds to
    have every chunk before ``finish``. Raises MQTTError when ``timeout`` passes first.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    responses = exchange.topics.responses(exchange.requester_id)
    while True:
        try:
            message = next_message(True, _remaining(deadline))
        except queue.Empty:
            raise MQTTError(
                f"no final answer to request {exchange.jti} within {timeout:g} s",
                hint="the owner may not have decided yet; the request stays pending on the device",
            ) from None
        if message.topic != responses:
            if step is not None and message.topic != exchange.topics.status:
                _feed(step, message)
            continue
        claims = verify_response(message.payload, exchange)
        if claims is None:
            continue
        out(describe(claims))
        status = claims["status"]
        if status == "delivered" and step is not None:
            _complete(step, next_message, grace)
            out(f"footage of request {exchange.jti} verified and written")
        if status in TERMINAL_EXIT:
            return TERMINAL_EXIT[status]


def verify_response(payload: bytes, exchange: Exchange) -> dict[str, Any] | None:
    """The claims of a response to ``exchange`` signed by the device, else None (reported)."""
    try:
        claims = verify_device_jws(payload, exchange.device_key, RESPONSE_TYP)
    except ReceiveError as exc:
        print(f"ignoring a response that does not verify: {exc}", file=sys.stderr)
        return None
    expected = {
        "iss": exchange.topics.device_id, "aud": exchange.requester_id, "req": exchange.jti
    }
    wrong = [k for k, v in expected.items() if claims.get(k) != v]
    if wrong:
        if claims.get("req") != exchange.jti:
            return None  # an answer to another request of ours: not this command's business
        print(f"ignoring a response with wrong {', '.join(wrong)}", file=sys.stderr)
        return None
    if not isinstance(claims.get("status"), str):
        print("ignoring a response without a status", file=sys.stderr)
        return None
    return claims


def describe(claims: dict[str, Any]) -> str:
    """One line for a verified response: time, request, status and the status's claims."""
    iat = claims.get("iat")
    when = rfc3339(from_epoch(iat)) if isinstance(iat, int) else "?"
    parts = [when, str(claims.get("req")), str(claims["status"])]
    if "error" in claims:
        parts.append(f"error={claims['error']}")
    if "detail" in claims:
        parts.append(f"({claims['detail']})")
    for name in ("clips", "channel"):
        if name in claims:
            parts.append(f"{name}={claims[name]}")
    return " ".join(parts)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _feed(step: DeliveryStep, message: InboundMessage) -> None:
    try:
        step.feed(message.topic, message.payload)
    except ReceiveError as exc:
        print(f"ignoring a delivery message: {exc}", file=sys.stderr)


def _complete(
    step: DeliveryStep,
    next_message: Callable[[bool, float | None], InboundMessage],
    grace: float,
) -> None:
    # MQTT orders messages per topic only: chunks may still trail the delivered response.
    deadline = time.monotonic() + grace
    while not step.ready():
        try:
            message = next_message(True, _remaining(deadline))
        except queue.Empty:
            break
        if message.topic.startswith(step.topic_filter.rstrip("#")):
            _feed(step, message)
    step.finish()


def _client(
    settings: MQTTConfig,
    keys: RequesterKeys,
    subscriptions: list[str],
    on_message: Callable[[InboundMessage], None] | None = None,
) -> MQTTClient:
    return MQTTClient(
        settings,
        client_id=f"doorbell-request-{keys.requester_id}-{secrets.token_hex(4)}",
        subscriptions=subscriptions,
        on_message=on_message,
        persistent=False,
    )


def _publish(client: MQTTClient, topics: Topics, token: str, correlation: bytes) -> None:
    future = client.publish(topics.requests, token, correlation_data=correlation)
    try:
        future.result(CONNECT_TIMEOUT)
    except TimeoutError:
        raise MQTTError(
            f"the broker did not acknowledge the request within {CONNECT_TIMEOUT:g} s"
        ) from None


def device_key_from_status(
    inbox: queue.Queue[InboundMessage], topics: Topics
) -> Ed25519PublicKey:
    """The device key from the retained status message (its ``public_jwk``), waiting briefly."""
    deadline = time.monotonic() + STATUS_TIMEOUT
    skipped: list[InboundMessage] = []
    try:
        while True:
            try:
                message = inbox.get(timeout=_remaining(deadline))
            except queue.Empty:
                raise KeyFileError(
                    f"no retained status on {topics.status} within {STATUS_TIMEOUT:g} s, so the "
                    "device key is unknown",
                    hint="pass --device-key FILE with the device's public key",
                ) from None
            if message.topic != topics.status:
                skipped.append(message)
                continue
            return _key_from_status(message.payload, topics.device_id)
    finally:
        for message in skipped:
            inbox.put(message)


def _key_from_status(payload: bytes, device_id: str) -> Ed25519PublicKey:
    try:
        status = json.loads(payload)
        jwk = status["public_jwk"]
        key = parse_public_key(json.dumps(jwk))
    except (ValueError, KeyError, TypeError, AgentError) as exc:
        raise KeyFileError(
            f"the retained status of {device_id} has no usable public_jwk: {exc}",
            hint="pass --device-key FILE with the device's public key",
        ) from None
    if status.get("device_id") != device_id or status.get("kid") != kid_for(key):
        raise KeyFileError(
            f"the retained status of {device_id} is inconsistent (device_id or kid mismatch)",
            hint="pass --device-key FILE with the device's public key",
        )
    return key


def _delivery_step(
    output: Path,
    keys: RequesterKeys,
    topics: Topics,
    jti: str,
    device_key: Ed25519PublicKey,
) -> DeliveryStep:
    return DeliveryAssembler(
        output,
        identity=keys.age_identity(),
        device_public_key=device_key,
        device_id=topics.device_id,
        requester_id=keys.requester_id,
        jti=jti,
        topic_prefix=topics.prefix,
        progress=True,
    )
