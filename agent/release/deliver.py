"""Delivery of an approved request: every released file, encrypted, chunked, then the manifest.

For each stored clip overlapping the request's window (in start order) a :class:`~agent.release.
cut_api.Cutter` makes the released file; each is encrypted with age to the request's recipient
and published as QoS 1 chunks on ``P/D/deliveries/R/J/CLIP/SEQ``; then the signed manifest goes to
``P/D/deliveries/R/J/manifest`` and we wait until the broker has acknowledged everything. If the
connection drops, the whole delivery starts again once the publisher is reconnected (age files are
not resumable: a new attempt has a new file key), at most ``retries`` times.

Every attempt (first delivery, retry, re-delivery) is numbered by the :class:`DeliveryLedger` and
gets fresh opaque file ids (``CLIP``), so chunks of two attempts can never be spliced; the
manifest carries ``attempt`` and, per file, the salted ``source`` commitment to the stored clip
(§5.1). Ordering with the audit log (§7): the ledger's ``started`` (``release_started``) is
durable before the first chunk and its ``delivered`` (``request_delivered``) before the manifest
is published; either failing ends the delivery with DeliveryError and no manifest.

Revocation wins: every chunk and the manifest are handed to the MQTT client inside the job's
``gate`` (the request store's :meth:`~agent.requests.store.RequestStore.release_gate`), which
holds the store's write lock and refuses once the requester is revoked. A revocation therefore
commits either before a message is handed over (and the delivery stops with
:class:`~agent.errors.DeliveryRevokedError`, never retried) or after it. The wait for room in the
in-flight window happens before the gate, so the lock is never held while the broker is slow.
Everything published carries an MQTT Message Expiry Interval: the request's remaining lifetime.

This module knows nothing of request states or responses; the approval coordinator runs a
:class:`Deliverer` with a ledger backed by the request store and the audit log, and records the
outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.age.x25519 import parse_recipient
from agent.errors import AuditWriteError, DeliveryError, MQTTError, VaultError
from agent.mqtt import message_expiry
from agent.release.cut_api import ClipVault, CutFile, Cutter, StoredClip, WholeClipCutter
from agent.release.encrypt import encrypt_to_chunks
from agent.release.manifest import NAME_RE, ManifestClip, manifest_claims, sign_manifest
from agent.timeutil import rfc3339, utcnow
from agent.topics import Topics

log = logging.getLogger(__name__)

QOS = 1
SALT_BYTES = 32


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


def new_salt() -> bytes:
    """A random per-request salt for the ``source`` commitments (§5.1)."""
    return os.urandom(SALT_BYTES)


def source_commitment(salt: bytes, clip_id: str, plaintext_sha256: str) -> str:
    """Hex HMAC-SHA-256 keyed with ``salt`` over ``clip_id``, a newline and the stored clip's
    hex plaintext SHA-256: binds a released file to its stored clip; opened with the salt."""
    message = f"{clip_id}\n{plaintext_sha256}".encode()
    return hmac.new(salt, message, hashlib.sha256).hexdigest()


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
    salt: bytes = field(default_factory=new_salt, repr=False)
    """The request's commitment salt (kept by the store, so every attempt commits alike)."""

    @property
    def window(self) -> dict[str, str]:
        """The requested window as the manifest carries it."""
        return {"start": rfc3339(self.window_start), "end": rfc3339(self.window_end)}


@dataclass(frozen=True)
class PlannedFile:
    """One file of an attempt, as cut, before it is encrypted."""

    id: str
    """Opaque, fresh for this attempt: the ``CLIP`` topic level and the manifest's ``id``."""
    clip_id: str
    start: datetime
    end: datetime
    frames: int
    source_sha256: str
    commitment: str

    def span(self) -> dict[str, object]:
        """The file's id and span as ``release_started`` records them."""
        return {"id": self.id, "start": rfc3339(self.start), "end": rfc3339(self.end)}


class DeliveryLedger(Protocol):
    """Numbers the attempts and records them durably (the request store and the audit log).

    ``started`` must be durable before the attempt's first chunk and ``delivered`` before its
    manifest is published; either raises :class:`agent.errors.AuditWriteError` when it cannot
    be recorded (the delivery then ends with DeliveryError and no manifest).
    """

    def begin_attempt(self) -> int: ...

    def started(self, attempt: int, files: Sequence[PlannedFile]) -> None: ...

    def delivered(
        self,
        attempt: int,
        files: Sequence[PlannedFile],
        entries: Sequence[ManifestClip],
        manifest_sha256: str,
    ) -> None: ...


class MemoryLedger:
    """A ledger that numbers attempts from 1 and keeps what they released in memory.

    For callers that release without a request store (tests, ``bench/release.py``); the daemon
    uses the coordinator's audited ledger.
    """

    def __init__(self) -> None:
        self.attempts = 0
        self.started_files: dict[int, tuple[PlannedFile, ...]] = {}
        self.manifests: dict[int, str] = {}

    def begin_attempt(self) -> int:
        """The next attempt number."""
        self.attempts += 1
        return self.attempts

    def started(self, attempt: int, files: Sequence[PlannedFile]) -> None:
        """Remember the attempt's files."""
        self.started_files[attempt] = tuple(files)

    def delivered(
        self,
        attempt: int,
        files: Sequence[PlannedFile],
        entries: Sequence[ManifestClip],
        manifest_sha256: str,
    ) -> None:
        """Remember the attempt's manifest hash."""
        self.manifests[attempt] = manifest_sha256


Gate = Callable[[], AbstractContextManager[object]]
"""Entered around each hand-over of a message to the client; raises DeliveryRevokedError once
the delivery must stop (see the module docstring)."""


def new_file_id() -> str:
    """A fresh opaque id for one released file (22 characters of base64url, 128 bits).

    Never one starting with ``-``: the requester types it as a file name (``ffprobe ID.mkv``),
    where it would be read as an option.
    """
    while True:
        file_id = secrets.token_urlsafe(16)
        if not file_id.startswith("-"):
            return file_id


class Deliverer:
    """Publishes approved footage through a :class:`Publisher`, restarting after disconnects."""

    def __init__(
        self,
        *,
        vault: ClipVault,
        publisher: Publisher,
        signing_key: Ed25519PrivateKey,
        topic_prefix: str,
        chunk_bytes: int,
        retries: int,
        reconnect_timeout: float = 60.0,
        now: Callable[[], datetime] = utcnow,
        cutter: Cutter | None = None,
        new_id: Callable[[], str] = new_file_id,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self._vault = vault
        self._cutter: Cutter = cutter if cutter is not None else WholeClipCutter(vault)
        self._publisher = publisher
        self._key = signing_key
        self._prefix = topic_prefix
        self._chunk_bytes = chunk_bytes
        self._retries = retries
        self._reconnect_timeout = reconnect_timeout
        self._now = now
        self._new_id = new_id
        self._gate: Gate = nullcontext

    def clips_for(self, job: DeliveryJob) -> list[StoredClip]:
        """The stored clips a delivery of ``job`` releases footage of, oldest first."""
        clips = list(self._vault.clips_overlapping(job.window_start, job.window_end))
        clips.sort(key=lambda c: (c.start, c.id))
        return clips

    def deliver(
        self, job: DeliveryJob, gate: Gate | None = None, *, ledger: DeliveryLedger | None = None
    ) -> tuple[ManifestClip, ...]:
        """Deliver ``job``; returns the manifest entries once the broker acknowledged all of it.

        Raises DeliveryError when the recipient is unusable, a clip cannot be read from the
        vault, the ledger cannot record the release (retrying would not help), or the
        connection failed ``retries + 1`` times, and DeliveryRevokedError (not retried) as soon
        as ``gate`` refuses a message.
        """
        self._gate = gate or nullcontext
        book: DeliveryLedger = ledger if ledger is not None else MemoryLedger()
        for name in (job.device_id, job.requester_id, job.jti):
            if not NAME_RE.match(name):
                raise DeliveryError(f"{name!r} is not usable as a topic level")
        recipient = parse_recipient(job.recipient)
        clips = self.clips_for(job)
        attempts = self._retries + 1
        last: BaseException | None = None
        for tried in range(1, attempts + 1):
            if not self._publisher.wait_connected(self._reconnect_timeout):
                last = MQTTError(f"not reconnected within {self._reconnect_timeout:g}s")
                log.warning("delivery of %s: try %d/%d: %s", job.jti, tried, attempts, last)
                continue
            try:
                return self._attempt(job, recipient, clips, book)
            except (MQTTError, ConnectionError) as exc:
                last = exc
                log.warning(
                    "delivery of %s: try %d/%d interrupted: %s", job.jti, tried, attempts, exc
                )
        raise DeliveryError(
            f"delivery of request {job.jti} failed after {attempts} attempts: {last}"
        )

    def _cut_all(
        self, job: DeliveryJob, clips: Sequence[StoredClip]
    ) -> list[tuple[StoredClip, CutFile]]:
        """Every clip's released file, in order (clips with no frame in the window left out)."""
        cuts: list[tuple[StoredClip, CutFile]] = []
        try:
            for clip in clips:
                try:
                    cut = self._cutter.cut(clip.id, job.window_start, job.window_end)
                except VaultError as exc:
                    raise DeliveryError(
                        f"clip {clip.id} cannot be read from the vault: {exc}"
                    ) from exc
                if cut is not None:
                    cuts.append((clip, cut))
        except BaseException:
            for _, cut in cuts:
                cut.close()
            raise
        return cuts

    def _attempt(
        self,
        job: DeliveryJob,
        recipient: x25519.Recipient,
        clips: Sequence[StoredClip],
        ledger: DeliveryLedger,
    ) -> tuple[ManifestClip, ...]:
        cuts = self._cut_all(job, clips)
        try:
            attempt = ledger.begin_attempt()
            planned = [
                PlannedFile(
                    id=self._new_id(),
                    clip_id=clip.id,
                    start=cut.start,
                    end=cut.end,
                    frames=cut.frames,
                    source_sha256=cut.source_sha256,
                    commitment=source_commitment(job.salt, clip.id, cut.source_sha256),
                )
                for clip, cut in cuts
            ]
            for plan in planned:
                if not NAME_RE.match(plan.id):
                    raise DeliveryError(f"file id {plan.id!r} is not usable as a topic level")
            try:
                ledger.started(attempt, planned)
            except AuditWriteError as exc:
                raise DeliveryError(f"release_started cannot be audited: {exc}") from exc
            entries = [
                self._send_file(job, recipient, plan, cut)
                for plan, (_, cut) in zip(planned, cuts, strict=True)
            ]
        finally:
            for _, cut in cuts:
                cut.close()
        claims = manifest_claims(
            device_id=job.device_id,
            requester_id=job.requester_id,
            jti=job.jti,
            window=job.window,
            attempt=attempt,
            clips=entries,
            now=self._now(),
        )
        token = sign_manifest(self._key, claims)
        try:
            ledger.delivered(attempt, planned, entries, hashlib.sha256(token.encode()).hexdigest())
        except AuditWriteError as exc:
            raise DeliveryError(f"request_delivered cannot be audited: {exc}") from exc
        manifest_topic = Topics(self._prefix, job.device_id).manifest(job.requester_id, job.jti)
        self._send(job, manifest_topic, token.encode())
        self._publisher.drain()
        return tuple(entries)

    def _send(self, job: DeliveryJob, topic: str, payload: bytes) -> None:
        self._publisher.make_room()
        with self._gate():
            expiry = None if job.exp is None else message_expiry(job.exp, self._now())
            self._publisher.publish(topic, payload, QOS, expiry=expiry)

    def _send_file(
        self, job: DeliveryJob, recipient: x25519.Recipient, plan: PlannedFile, cut: CutFile
    ) -> ManifestClip:
        topics = Topics(self._prefix, job.device_id)

        def sink(seq: int, chunk: bytes) -> None:
            self._send(job, topics.delivery_chunk(job.requester_id, job.jti, plan.id, seq), chunk)

        try:
            encrypted = encrypt_to_chunks(cut.stream, recipient, self._chunk_bytes, sink)
        except VaultError as exc:
            raise DeliveryError(
                f"clip {plan.clip_id} cannot be read from the vault: {exc}"
            ) from exc
        if cut.whole and encrypted.plaintext_sha256 != cut.source_sha256:
            # The vault's chunks all authenticated, yet the whole differs from what was
            # recorded: the index was altered. No manifest goes out for it.
            raise DeliveryError(
                f"clip {plan.clip_id} does not match the SHA-256 recorded when it was made: "
                "the vault was tampered with"
            )
        return ManifestClip(
            id=plan.id,
            start=plan.start,
            end=plan.end,
            content_type=cut.content_type,
            chunks=encrypted.chunks,
            bytes=encrypted.bytes,
            sha256=encrypted.sha256,
            plaintext_sha256=encrypted.plaintext_sha256,
            frames=plan.frames,
            clock_synchronized=cut.clock_synchronized,
            source=plan.commitment,
        )
