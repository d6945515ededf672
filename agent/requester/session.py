"""One request's persistent MQTT session and evidence, shared by ``send --wait`` and ``receive J``.

CONTRACT §5.2: each request gets its own persistent session (client id ``doorbell-request-``
plus the first 22 characters of the base64url SHA-256 of ``R/J``, clean start off, session
expiry the request's remaining lifetime), subscribed QoS 1 to the device's responses and the
request's delivery topics *before* the request is published. So a delivery sent while the
requester is offline waits at the broker, and ``receive J`` picks it up by resuming the same
session.

:class:`RequestEvidence` follows one request's messages: it keeps every verified response in the
evidence directory, tracks the newest device-signed audit head seen, and once the delivery is
verified writes the manifest, signs and publishes the receipt, and keeps that too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit import parse_head_jws
from agent.config import MQTTConfig
from agent.errors import AgentError, MQTTError, ReceiveError
from agent.keys import b64url, parse_public_key
from agent.mqtt import InboundMessage, MQTTClient
from agent.release.manifest import RESPONSE_TYP, verify_device_jws
from agent.requester.build import build_receipt
from agent.requester.evidence import EvidenceDir
from agent.requester.keyfiles import RequesterKeys, pin_device_key, pinned_device_key
from agent.requester.receive import DeliveryAssembler
from agent.timeutil import utcnow
from agent.topics import Topics

log = logging.getLogger(__name__)

SESSION_PREFIX = "doorbell-request-"
MIN_SESSION = timedelta(minutes=1)
MAX_SESSION = timedelta(days=30)
RECEIPT_TIMEOUT = 30.0


def session_client_id(requester_id: str, jti: str) -> str:
    """The contract's client id for the request ``jti`` of requester ``requester_id``."""
    digest = hashlib.sha256(f"{requester_id}/{jti}".encode()).digest()
    return SESSION_PREFIX + b64url(digest)[:22]


def request_session(
    settings: MQTTConfig,
    keys: RequesterKeys,
    topics: Topics,
    jti: str,
    remaining: timedelta,
    *,
    extra: Sequence[str] = (),
    on_message: Callable[[InboundMessage], None] | None = None,
) -> MQTTClient:
    """The persistent session of request ``jti``, subscribed before anything is published.

    The broker keeps it (and queues the device's QoS 1 messages) for ``remaining``, the
    request's lifetime, clamped to what the broker settings allow.
    """
    expiry = min(max(remaining, MIN_SESSION), MAX_SESSION)
    return MQTTClient(
        settings.model_copy(update={"session_expiry": expiry}),
        client_id=session_client_id(keys.requester_id, jti),
        subscriptions=[
            topics.responses(keys.requester_id),
            topics.deliveries(keys.requester_id, jti) + "/#",
            topics.audit_head,
            *extra,
        ],
        on_message=on_message,
        persistent=True,
        fail_fast=True,
    )


def known_device_key(
    keys: RequesterKeys, device_id: str, given: str | None
) -> Ed25519PublicKey | None:
    """The device key to trust: ``--device-key`` (pinned on first use) or the pinned one.

    None means neither exists yet: the caller learns the key from the retained status and pins
    it with :func:`pin_device_key`. A ``--device-key`` that differs from the pin is refused.
    """
    if given is not None:
        return pin_device_key(keys.directory, device_id, parse_public_key(given))
    return pinned_device_key(keys.directory, device_id)


@dataclass
class _Head:
    seq: int
    token: str


class RequestEvidence:
    """Keeps one request's evidence while its messages arrive, and sends the receipt."""

    def __init__(
        self,
        evidence: EvidenceDir,
        assembler: DeliveryAssembler,
        *,
        keys: RequesterKeys,
        topics: Topics,
        jti: str,
        device_key: Ed25519PublicKey,
    ) -> None:
        self.evidence = evidence
        self.assembler = assembler
        self._keys = keys
        self._topics = topics
        self._jti = jti
        self._device_key = device_key
        self._head: _Head | None = None
        self.statuses: list[str] = []

    def offer_head(self, token: str) -> None:
        """Consider an audit-head JWS (retained topic or a response's ``audit``); keep the newest.

        Heads that do not verify with the device key are ignored: the receipt vouches only for
        what the device really signed.
        """
        try:
            head = parse_head_jws(token, self._device_key)
        except AgentError as exc:
            log.debug("ignoring an audit head that does not verify: %s", exc)
            return
        if head.iss != self._topics.device_id:
            return
        if self._head is None or head.seq > self._head.seq:
            self._head = _Head(head.seq, token.strip())

    def keep_response(self, token: bytes, claims: dict[str, object]) -> None:
        """Keep a verified response to this request, and the audit head it carries."""
        status = str(claims.get("status", "response"))
        self.statuses.append(status)
        self.evidence.add_response(token, status)
        audit = claims.get("audit")
        if isinstance(audit, str):
            self.offer_head(audit)

    def offer_response(self, token: bytes) -> None:
        """Keep ``token`` if it is a device-signed response to this request (else ignore it)."""
        try:
            claims = verify_device_jws(token, self._device_key, RESPONSE_TYP)
        except ReceiveError:
            return
        want = {
            "iss": self._topics.device_id, "aud": self._keys.requester_id, "req": self._jti
        }
        if all(claims.get(k) == v for k, v in want.items()):
            self.keep_response(token, claims)

    def acknowledge(self, client: MQTTClient) -> None:
        """After the assembler's ``finish`` verified and wrote every file: keep the manifest,
        then sign, keep and publish the receipt (§5.2).

        Raises MQTTError if the broker does not take the receipt (the evidence is complete
        anyway).
        """
        token = self.assembler.manifest_token
        if token is None:
            raise ReceiveError(f"no manifest received for request {self._jti}")
        self.evidence.add_manifest(token)
        receipt = build_receipt(
            self._keys.signing_key,
            self._keys.requester_id,
            self._topics.device_id,
            self._jti,
            token,
            self._head.token if self._head else None,
            utcnow(),
        )
        self.evidence.add_receipt(receipt)
        future = client.publish(self._topics.receipts, receipt)
        try:
            future.result(RECEIPT_TIMEOUT)
        except TimeoutError:
            raise MQTTError(
                f"the broker did not acknowledge the receipt within {RECEIPT_TIMEOUT:g} s",
                hint=f"the evidence is complete in {self.evidence.path}; the device will show "
                "the request as delivered but not acknowledged",
            ) from None


def evidence_path(output: Path | None, jti: str) -> Path:
    """``-o DIR``, else ``./J``."""
    return output if output is not None else Path(jti)
