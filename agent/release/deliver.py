"""Delivery of an approved request: every overlapping clip, encrypted, chunked, then the manifest.

For each clip overlapping the request's window (in start order) the clip is streamed out of the
vault, encrypted with age to the request's recipient and published as QoS 1 chunks on
``P/D/deliveries/R/J/CLIP/SEQ``; then the signed manifest goes to ``P/D/deliveries/R/J/manifest``
and we wait until the broker has acknowledged everything. If the connection drops, the whole
delivery starts again once the publisher is reconnected (age files are not resumable: a new
attempt has a new file key), at most ``retries`` times.

Revocation wins: every chunk and the manifest are handed to the MQTT client inside the job's
``gate`` (the request store's :meth:`~agent.requests.store.RequestStore.release_gate`), which
holds the store's write lock and refuses once the requester is revoked. A revocation therefore
commits either before a message is handed over (and the delivery stops with
:class:`~agent.errors.DeliveryRevokedError`, never retried) or after it. The wait for room in the
in-flight window happens before the gate, so the lock is never held while the broker is slow.
Everything published carries an MQTT Message Expiry Interval: the request's remaining lifetime.

This module knows nothing of request states, audit or responses; the approval coordinator runs a
:class:`Deliverer` and records the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.errors import DeliveryError, MQTTError, VaultError
from agent.mqtt import message_expiry
from agent.release.encrypt import ClipReader, encrypt_to_chunks, parse_recipient
from agent.release.manifest import NAME_RE, ManifestClip, manifest_claims, sign_manifest
from agent.timeutil import utcnow

log = logging.getLogger(__name__)

QOS = 1


class Publisher(Protocol):
    """What delivery needs from the MQTT connection.

    ``make_room`` blocks while too many QoS 1 messages await their PUBACK and raises
    :class:`agent.errors.MQTTError` when the connection is (or goes) down; ``publish`` hands one
    message to the client (waiting for room first if there is none) with an MQTT Message Expiry
    Interval of ``expiry`` seconds. ``drain`` blocks until
    every message published so far is acknowledged, raising MQTTError if the connection drops
    first. ``wait_connected`` blocks until the client is connected again, up to ``timeout``
    seconds, and says whether it is.
    """

    def make_room(self) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int, *, expiry: int | None = None) -> None:
        ...

    def drain(self) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...


class ClipMeta(Protocol):
    """The vault's description of a stored clip (fields delivery reads)."""

    @property
    def id(self) -> str: ...

    @property
    def start(self) -> datetime: ...

    @property
    def end(self) -> datetime: ...

    @property
    def content_type(self) -> str: ...


class ClipSource(Protocol):
    """The part of the vault delivery reads from."""

    def clips_overlapping(self, start: datetime, end: datetime) -> Sequence[ClipMeta]: ...

    def open_clip(self, clip_id: str) -> ClipReader: ...


@dataclass(frozen=True)
class DeliveryJob:
    """One approved request to deliver."""

    device_id: str
    requester_id: str
    jti: str
    window_start: datetime
    window_end: datetime
    recipient: str
    exp: datetime | None = None
    """The request's ``exp``: what is published about it expires at the broker then."""


Gate = Callable[[], AbstractContextManager[object]]
"""Entered around each hand-over of a message to the client; raises DeliveryRevokedError once
the delivery must stop (see the module docstring)."""


def delivery_topic(prefix: str, job: DeliveryJob, leaf: str) -> str:
    """``P/D/deliveries/R/J/<leaf>`` where leaf is ``CLIP/SEQ`` or ``manifest``."""
    return f"{prefix}/{job.device_id}/deliveries/{job.requester_id}/{job.jti}/{leaf}"


class Deliverer:
    """Publishes approved footage through a :class:`Publisher`, restarting after disconnects."""

    def __init__(
        self,
        *,
        vault: ClipSource,
        publisher: Publisher,
        signing_key: Ed25519PrivateKey,
        topic_prefix: str,
        chunk_bytes: int,
        retries: int,
        reconnect_timeout: float = 60.0,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self._vault = vault
        self._publisher = publisher
        self._key = signing_key
        self._prefix = topic_prefix
        self._chunk_bytes = chunk_bytes
        self._retries = retries
        self._reconnect_timeout = reconnect_timeout
        self._now = now
        self._gate: Gate = nullcontext

    def clips_for(self, job: DeliveryJob) -> list[ClipMeta]:
        """The clips a delivery of ``job`` releases, oldest first."""
        clips = list(self._vault.clips_overlapping(job.window_start, job.window_end))
        clips.sort(key=lambda c: (c.start, c.id))
        return clips

    def deliver(self, job: DeliveryJob, gate: Gate | None = None) -> tuple[ManifestClip, ...]:
        """Deliver ``job``; returns the manifest entries once the broker acknowledged all of it.

        Raises DeliveryError when the recipient is unusable, a clip cannot be read from the
        vault (retrying would not help), or the connection failed ``retries + 1`` times, and
        DeliveryRevokedError (not retried) as soon as ``gate`` refuses a message.
        """
        self._gate = gate or nullcontext
        for name in (job.device_id, job.requester_id, job.jti):
            if not NAME_RE.match(name):
                raise DeliveryError(f"{name!r} is not usable as a topic level")
        recipient = parse_recipient(job.recipient)
        clips = self.clips_for(job)
        attempts = self._retries + 1
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            if not self._publisher.wait_connected(self._reconnect_timeout):
                last = MQTTError(f"not reconnected within {self._reconnect_timeout:g}s")
                log.warning("delivery of %s: attempt %d/%d: %s", job.jti, attempt, attempts, last)
                continue
            try:
                return self._attempt(job, recipient, clips)
            except (MQTTError, ConnectionError) as exc:
                last = exc
                log.warning(
                    "delivery of %s: attempt %d/%d interrupted: %s", job.jti, attempt, attempts, exc
                )
        raise DeliveryError(
            f"delivery of request {job.jti} failed after {attempts} attempts: {last}"
        )

    def _attempt(
        self, job: DeliveryJob, recipient: x25519.Recipient, clips: Sequence[ClipMeta]
    ) -> tuple[ManifestClip, ...]:
        entries: list[ManifestClip] = []
        for clip in clips:
            if not NAME_RE.match(clip.id):
                raise DeliveryError(f"clip id {clip.id!r} is not usable as a topic level")
            entries.append(self._send_clip(job, recipient, clip))
        claims = manifest_claims(
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
            clips=entries,
            now=self._now(),
        )
        token = sign_manifest(self._key, claims)
        self._send(job, delivery_topic(self._prefix, job, "manifest"), token.encode())
        self._publisher.drain()
        return tuple(entries)

    def _send(self, job: DeliveryJob, topic: str, payload: bytes) -> None:
        self._publisher.make_room()
        with self._gate():
            expiry = None if job.exp is None else message_expiry(job.exp, self._now())
            self._publisher.publish(topic, payload, QOS, expiry=expiry)

    def _send_clip(
        self, job: DeliveryJob, recipient: x25519.Recipient, clip: ClipMeta
    ) -> ManifestClip:
        def sink(seq: int, chunk: bytes) -> None:
            self._send(job, delivery_topic(self._prefix, job, f"{clip.id}/{seq}"), chunk)

        try:
            reader = self._vault.open_clip(clip.id)
        except VaultError as exc:
            raise DeliveryError(f"clip {clip.id} cannot be opened in the vault: {exc}") from exc
        try:
            encrypted = encrypt_to_chunks(reader, recipient, self._chunk_bytes, sink)
        except VaultError as exc:
            raise DeliveryError(f"clip {clip.id} cannot be read from the vault: {exc}") from exc
        finally:
            close = getattr(reader, "close", None)
            if callable(close):
                close()
        recorded = getattr(clip, "sha256", None)
        if recorded is not None and recorded != encrypted.plaintext_sha256:
            # The vault's chunks all authenticated, yet the whole differs from what was
            # recorded: the index was altered. No manifest goes out for it.
            raise DeliveryError(
                f"clip {clip.id} does not match the SHA-256 recorded when it was made: "
                "the vault was tampered with"
            )
        return ManifestClip(
            id=clip.id,
            start=clip.start,
            end=clip.end,
            content_type=clip.content_type,
            chunks=encrypted.chunks,
            bytes=encrypted.bytes,
            sha256=encrypted.sha256,
            plaintext_sha256=encrypted.plaintext_sha256,
        )
