"""``doorbell-request send``: sign a request, publish it, and with ``--wait`` follow the answers.

The request gets its own persistent MQTT session (CONTRACT §5.2, :mod:`agent.requester.session`)
subscribed to the device's responses and the request's delivery topics *before* it is
published, so nothing the device sends can be missed: without ``--wait`` the command returns
once the broker acknowledged the request, and ``doorbell-request receive J`` later collects
whatever the device sent meanwhile. With ``--wait`` it prints each response whose signature
verifies with the device key (``--device-key FILE``, else the key pinned for the device, else
the retained ``P/D/status``, pinned on first use), and writes the evidence directory (``-o DIR``,
default ``./J``): the request, every response, the manifest, the age files as received, the
decrypted videos and the receipt it then signs and publishes. It exits 0 once the request is
``delivered`` and verified (1 when it is ``rejected``, ``denied``, ``expired`` or ``failed``).
Responses that do not verify, or that answer another request, are reported on stderr and
ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import MQTTConfig, MQTTTLSConfig
from agent.errors import (
    AgentError,
    KeyFileError,
    MQTTError,
    ReceiveError,
    RequestError,
    UsageError,
)
from agent.keys import b64url_decode, kid_for, parse_public_key
from agent.mqtt import InboundMessage, MQTTClient
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requester.build import build_request
from agent.requester.evidence import EvidenceDir
from agent.requester.keyfiles import (
    RequesterKeys,
    SentRequest,
    load_keys,
    pin_device_key,
    record_request,
)
from agent.requester.receive import DeliveryAssembler
from agent.requester.session import (
    RequestEvidence,
    evidence_path,
    known_device_key,
    request_session,
)
from agent.timeutil import from_epoch, parse_duration, parse_rfc3339, rfc3339, to_epoch, utcnow
from agent.topics import Topics
from agent.vocabulary import Status

TERMINAL_EXIT = {
    Status.DELIVERED: 0, Status.ACKNOWLEDGED: 0,
    Status.REJECTED: 1, Status.DENIED: 1, Status.EXPIRED: 1, Status.FAILED: 1,
}
CONNECT_TIMEOUT = 30.0
STATUS_TIMEOUT = 10.0
DELIVERY_GRACE = 10.0
KEY_DIR_ENV = "DOORBELL_REQUEST_KEYS"
SILENCE_NOTICE = 30.0
NO_ANSWER_HINT = (
    "a device answers every request it can verify within seconds (at least 'pending'); "
    "silence means it is offline, --device or --topic-prefix is wrong, or it cannot verify "
    "the request: your key is not enrolled there (ask the homeowner to enrol your "
    "public-key.jwk) or it signs with another key"
)


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
        "--wait, print each signed response as it arrives (verified against the device key), "
        "and after approval receive, verify and decrypt the footage into an evidence "
        "directory and send the device a signed receipt. Exit status: 0 "
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
                   help="with --wait: the evidence directory (default ./J); never overwritten")
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
    now = utcnow()
    try:
        token = build_request(
            keys.signing_key, keys.kid, keys.requester_id, args.device, start, end, args.reason,
            args.legal_basis, args.legal_ref, args.case, keys.recipient, now, lifetime,
        )
    except RequestError as exc:
        # Every value checked here came from the command line: a usage error (CONTRACT §8).
        raise UsageError(exc.message, hint=exc.hint) from None
    jti = str(json.loads(b64url_decode(token.split(".")[1]))["jti"])
    topics = Topics(settings.topic_prefix, args.device)
    device_key = known_device_key(keys, args.device, args.device_key)
    # Refuse an existing evidence set before anything is published.
    evidence = EvidenceDir.create(evidence_path(args.output, jti)) if args.wait else None
    with device_session(settings, keys, topics, jti, lifetime, device_key=device_key) as (
        client, inbox, device_key
    ):
        record_request(
            keys.directory,
            SentRequest(jti, args.device, topics.prefix, to_epoch(now + lifetime), token),
        )
        exchange = Exchange(topics, keys.requester_id, jti, device_key, secrets.token_bytes(16))
        _publish(client, topics, token, exchange.correlation)
        if evidence is None:
            print(f"sent request {jti} to {args.device}")
            print(f"collect the answer and footage later with: doorbell-request receive {jti}")
            return 0
        evidence.add_request(token)
        evidence.add_device_key(device_key)
        with delivery_assembler(evidence.path, keys, topics, jti, device_key) as assembler:
            collector = RequestEvidence(
                evidence, assembler, keys=keys, topics=topics, jti=jti, device_key=device_key
            )
            print(f"sent request {jti} to {args.device}; waiting for responses", flush=True)
            code = follow(
                exchange, inbox.get, timeout=timeout, collector=collector, client=client
            )
    if code == 0:
        print(f"evidence of request {jti} written to {evidence.path}")
    return code


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
    collector: RequestEvidence | None = None,
    client: MQTTClient | None = None,
    grace: float = DELIVERY_GRACE,
    out: Callable[[str], None] = say,
    silence: float = SILENCE_NOTICE,
) -> int:
    """Print each verified response to ``exchange`` until a final one; return the exit status.

    ``next_message(block, timeout)`` is ``queue.Queue.get``: it raises ``queue.Empty`` on
    timeout. With a ``collector``, each verified response is kept as evidence, delivery
    messages go to its assembler, and after ``delivered`` the assembler gets ``grace`` seconds
    to have every chunk before the evidence is completed and the receipt published through
    ``client``. Raises MQTTError when ``timeout`` passes first, saying whether the device
    answered at all. With no answer after ``silence`` seconds, says once on stderr why a device
    stays silent (it answers every request it can verify at once).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    responses = exchange.topics.responses(exchange.requester_id)
    silence_deadline: float | None = time.monotonic() + silence
    answered = False
    while True:
        wait = _remaining(deadline)
        if silence_deadline is not None:
            wait = min(wait, _remaining(silence_deadline) or 0.0) if wait is not None else (
                _remaining(silence_deadline))
        try:
            message = next_message(True, wait)
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise _no_final_answer(exchange.jti, timeout, answered) from None
            if silence_deadline is not None and time.monotonic() >= silence_deadline:
                silence_deadline = None
                print(f"no answer yet after {silence:g} s: {NO_ANSWER_HINT}; still waiting",
                      file=sys.stderr, flush=True)
            continue
        if message.topic != responses:
            if collector is not None:
                _route(collector, exchange.topics, message)
            continue
        claims = verify_response(message.payload, exchange)
        if claims is None:
            continue
        answered = True
        silence_deadline = None
        if collector is not None:
            collector.keep_response(message.payload, claims)
        out(describe(claims))
        status = claims["status"]
        if status == Status.DELIVERED and collector is not None and client is not None:
            _complete(collector.assembler, next_message, grace)
            clips = collector.assembler.finish()
            collector.acknowledge(client)
            out(f"footage of request {exchange.jti} verified ({len(clips)} files); receipt sent")
        if status in TERMINAL_EXIT:
            return TERMINAL_EXIT[status]


def _route(collector: RequestEvidence, topics: Topics, message: InboundMessage) -> None:
    """A non-response message: an audit head to remember, or part of the delivery."""
    if message.topic == topics.audit_head:
        collector.offer_head(message.payload.decode("ascii", "replace"))
    elif message.topic != topics.status:
        _feed(collector.assembler, message)


def _no_final_answer(jti: str, timeout: float | None, answered: bool) -> MQTTError:
    if answered:
        return MQTTError(
            f"no final answer to request {jti} within {timeout:g} s",
            hint="the owner has not decided yet; the request stays on the device until it is "
            f"decided or expires: collect the answer later with `doorbell-request receive {jti}`",
        )
    return MQTTError(f"the device did not answer request {jti} within {timeout:g} s",
                     hint=NO_ANSWER_HINT)


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


def _publish(client: MQTTClient, topics: Topics, token: str, correlation: bytes) -> None:
    future = client.publish(topics.requests, token, correlation_data=correlation)
    try:
        future.result(CONNECT_TIMEOUT)
    except TimeoutError:
        raise MQTTError(
            f"the broker did not acknowledge the request within {CONNECT_TIMEOUT:g} s"
        ) from None


@contextlib.contextmanager
def device_session(
    settings: MQTTConfig,
    keys: RequesterKeys,
    topics: Topics,
    jti: str,
    lifetime: timedelta,
    *,
    device_key: Ed25519PublicKey | None,
) -> Iterator[tuple[MQTTClient, queue.Queue[InboundMessage], Ed25519PublicKey]]:
    """Request ``jti``'s session, connected, with its inbox and the device key to trust.

    Without a known ``device_key`` (see :func:`known_device_key`) the session also subscribes to
    the device's retained status and pins the key it names (trust on first use).
    """
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    extra = [topics.status] if device_key is None else []
    with request_session(
        settings, keys, topics, jti, lifetime, extra=extra, on_message=inbox.put
    ) as client:
        client.wait_ready(CONNECT_TIMEOUT)
        if device_key is None:
            device_key = pin_device_key(
                keys.directory, topics.device_id, device_key_from_status(inbox, topics)
            )
        yield client, inbox, device_key


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


def delivery_assembler(
    output: Path,
    keys: RequesterKeys,
    topics: Topics,
    jti: str,
    device_key: Ed25519PublicKey,
) -> DeliveryAssembler:
    """The assembler of request ``jti``'s delivery into ``output``, with a progress bar."""
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
