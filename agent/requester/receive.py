"""The requester's side of a delivery: reassemble, decrypt as it arrives, verify, write.

:class:`DeliveryAssembler` is the core: feed it every ``(topic, payload)`` of
``P/D/deliveries/R/J/#`` in any order (duplicates welcome: QoS 1 may redeliver, and the last copy
of a chunk wins). Chunks are spooled, still age-encrypted, to a private directory next to the
output, and the part of each age file that has arrived in order is decrypted at once with the
requester's age identity into a temporary file in the output directory, both files being hashed
on the way. Nothing takes a clip's final name until the signed manifest is in, every chunk it
lists has arrived, the age file matches the manifest's ``sha256``, it decrypted to the end and
the plaintext matches ``plaintext_sha256``: only then does :meth:`DeliveryAssembler.finish`
rename the temporary file into place, with the age file as received beside it (``CLIP.age``,
part of the requester's evidence). On any failure the temporary file is deleted.

:func:`receive_delivery` is the loop that feeds it from any message source (the MQTT client's
inbox in ``doorbell-request receive``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mimetypes
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Never

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pyrage import x25519
from tqdm import tqdm

from agent.age import AgeDecryptor
from agent.age.x25519 import identity_key
from agent.errors import ReceiveError
from agent.lifecycle import Closing
from agent.release.manifest import (
    NAME_RE,
    RESPONSE_TYP,
    Manifest,
    ManifestClip,
    verify_device_jws,
    verify_manifest,
)
from agent.topics import Topics
from agent.vocabulary import Status

log = logging.getLogger(__name__)

_SEQ_RE = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_READ_BYTES = 256 * 1024
_EXTENSIONS = {"video/x-msvideo": ".avi", "video/mp4": ".mp4", "video/x-matroska": ".mkv"}
_SYNC_BYTES = 8 * 1024 * 1024
"""Decrypted bytes between background syncs, so the final fsync has little left to write."""


@dataclass(frozen=True)
class ReceivedClip:
    """A clip written to the output directory after every check passed."""

    id: str
    path: Path
    content_type: str
    bytes: int
    plaintext_sha256: str


def extension_for(content_type: str) -> str:
    """A file extension for a clip's media type (``.bin`` when unknown)."""
    return _EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ".bin"


def _sync_quietly(fd: int) -> None:
    # A failing disk is reported by the fsync before the rename.
    with contextlib.suppress(OSError):
        os.fdatasync(fd)


class _ClipSpool:
    """One clip's age file, rebuilt from chunks that may arrive in any order, more than once.

    Chunks that continue the file are appended to ``CLIP.age`` in the private spool directory,
    hashed, and decrypted into a temporary file in the output directory (plaintext hashed too),
    so in the usual in-order case the clip is spooled, decrypted and hashed when its last chunk
    lands. A chunk that arrives early waits in its own file until the gap before it fills. A
    chunk that differs from one already appended (the device restarted the delivery: a new
    attempt is a new age file) cuts the file back to that point and decryption starts over from
    the spooled prefix; the new attempt's chunks then rebuild it. A decryption failure is kept,
    not raised: only the signed manifest can tell a damaged chunk from a superseded attempt.
    """

    def __init__(self, directory: Path, out_dir: Path, clip_id: str, identity: X25519PrivateKey):
        self._dir = directory
        self._id = clip_id
        self._identity = identity
        self.path = directory / f"{clip_id}.age"
        self._file = open(self.path, "w+b")  # noqa: SIM115 - closed by close()
        self._sizes: list[int] = []
        self._offset = 0
        self._digest = hashlib.sha256()
        self._early: dict[int, int] = {}
        fd, name = tempfile.mkstemp(prefix=f".{clip_id}.", suffix=".part", dir=out_dir)
        self.plain_path = Path(name)
        self._plain = os.fdopen(fd, "w+b")
        self._moved = False
        self._syncer: threading.Thread | None = None
        self._synced_at = 0
        self._restart_decryption()

    def _restart_decryption(self) -> None:
        self._wait_sync()
        self._synced_at = 0
        self._plain.seek(0)
        self._plain.truncate()
        self._decryptor = AgeDecryptor(self._identity)
        self._plain_digest = hashlib.sha256()
        self._plain_bytes = 0
        self.decrypt_error: ReceiveError | None = None

    def _decrypt(self, data: bytes) -> None:
        if self.decrypt_error is not None:
            return
        try:
            pieces = self._decryptor.feed(data)
        except ReceiveError as exc:
            self.decrypt_error = exc
            return
        self._write_plain(pieces)

    def _write_plain(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._plain_digest.update(piece)
            self._plain.write(piece)
            self._plain_bytes += len(piece)
        if self._plain_bytes - self._synced_at >= _SYNC_BYTES and self._syncer is None:
            # Write back on a helper thread (fdatasync releases the GIL) while chunks keep
            # arriving, instead of all at once before the rename.
            self._plain.flush()
            self._synced_at = self._plain_bytes
            self._syncer = threading.Thread(
                target=_sync_quietly, args=(self._plain.fileno(),), daemon=True
            )
            self._syncer.start()
        elif self._syncer is not None and not self._syncer.is_alive():
            self._syncer = None

    def _wait_sync(self) -> None:
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None

    def _early_path(self, seq: int) -> Path:
        return self._dir / f"{self._id}.{seq}"

    def add(self, seq: int, payload: bytes) -> int:
        """Take chunk ``seq``; returns how many bytes are new to the spool (for progress)."""
        if seq < len(self._sizes):
            start = sum(self._sizes[:seq])
            self._file.seek(start)
            if self._file.read(self._sizes[seq]) == payload:
                return 0
            self._cut(seq, start)
        if seq > len(self._sizes):
            new = len(payload) - self._early.get(seq, 0)
            self._early_path(seq).write_bytes(payload)
            self._early[seq] = len(payload)
            return new
        self._append(payload)
        while len(self._sizes) in self._early:
            nxt = len(self._sizes)
            self._early.pop(nxt)
            path = self._early_path(nxt)
            self._append(path.read_bytes())
            path.unlink()
        return len(payload)

    def _append(self, payload: bytes) -> None:
        self._file.seek(self._offset)
        self._file.write(payload)
        self._digest.update(payload)
        self._offset += len(payload)
        self._sizes.append(len(payload))
        self._decrypt(payload)

    def _cut(self, seq: int, start: int) -> None:
        self._file.truncate(start)
        self._sizes = self._sizes[:seq]
        self._offset = start
        # Hash and decrypt the kept prefix again from the spool.
        self._digest = hashlib.sha256()
        self._restart_decryption()
        self._file.seek(0)
        left = start
        while left > 0 and (block := self._file.read(min(_READ_BYTES, left))):
            self._digest.update(block)
            self._decrypt(block)
            left -= len(block)

    def missing(self, chunks: int) -> list[int]:
        """The chunk numbers below ``chunks`` not received yet."""
        return [s for s in range(len(self._sizes), chunks) if s not in self._early]

    def seal(self, chunks: int) -> tuple[int, str]:
        """Complete the file as ``chunks`` chunks; returns its length and SHA-256 (hex)."""
        if len(self._sizes) > chunks:
            self._cut(chunks, sum(self._sizes[:chunks]))
        self._file.flush()
        return self._offset, self._digest.hexdigest()

    def finish_plaintext(self) -> tuple[int, str]:
        """End decryption; returns the plaintext's length and SHA-256, synced to disk.

        Raises the ReceiveError that stopped decryption, if any.
        """
        if self.decrypt_error is None:
            try:
                self._write_plain([self._decryptor.finish()])
            except ReceiveError as exc:
                self.decrypt_error = exc
        if self.decrypt_error is not None:
            raise self.decrypt_error
        self._wait_sync()
        self._plain.flush()
        os.fsync(self._plain.fileno())
        return self._plain_bytes, self._plain_digest.hexdigest()

    def move_plaintext(self, final: Path) -> None:
        """Give the verified plaintext its final name."""
        self._wait_sync()
        self._plain.close()
        os.replace(self.plain_path, final)
        self._moved = True

    def keep_age_file(self, final: Path) -> None:
        """Move the verified age file, as received, beside the plaintext (0600)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        os.chmod(self.path, 0o600)
        os.replace(self.path, final)

    def close(self) -> None:
        """Close both files and delete the temporary plaintext unless it was moved away."""
        self._wait_sync()
        self._file.close()
        self._plain.close()
        if not self._moved:
            self.plain_path.unlink(missing_ok=True)


class DeliveryAssembler(Closing):
    """Collects one request's delivery and turns it into verified, decrypted clip files."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        identity: x25519.Identity,
        device_public_key: Ed25519PublicKey,
        device_id: str,
        requester_id: str,
        jti: str,
        topic_prefix: str = "doorbell",
        progress: bool = False,
    ) -> None:
        for name in (device_id, requester_id, jti):
            if not NAME_RE.match(name):
                raise ReceiveError(f"{name!r} is not a valid id")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._identity = identity_key(identity)
        self._device_key = device_public_key
        self._device_id = device_id
        self._requester_id = requester_id
        self.jti = jti
        topics = Topics(topic_prefix, device_id)
        self.prefix = topics.deliveries(requester_id, jti) + "/"
        self.responses_topic = topics.responses(requester_id)
        self._spool = Path(tempfile.mkdtemp(prefix=f".{jti}.", suffix=".partial", dir=self.out_dir))
        self._clips: dict[str, _ClipSpool] = {}
        self.manifest: Manifest | None = None
        self.manifest_token: bytes | None = None
        self._progress = progress
        self._total: int | None = None
        self._bar: tqdm[Never] | None = None
        self._closed = False

    # -- intake ------------------------------------------------------------------------------

    @property
    def topic_filter(self) -> str:
        """The MQTT subscription that carries this delivery."""
        return self.prefix + "#"

    def feed(self, topic: str, payload: bytes) -> bool:
        """Take one message; returns False if it is not part of this delivery.

        Raises ReceiveError for a manifest that does not verify (the caller may keep waiting for
        a genuine one) or a malformed chunk topic.
        """
        if not topic.startswith(self.prefix):
            return False
        rest = topic[len(self.prefix) :]
        if rest == "manifest":
            self.manifest = verify_manifest(
                payload,
                self._device_key,
                device_id=self._device_id,
                requester_id=self._requester_id,
                jti=self.jti,
            )
            self.manifest_token = payload
            self._total = sum(c.bytes for c in self.manifest.clips)
            if self._bar is not None:
                self._bar.total = self._total
                self._bar.refresh()
            return True
        parts = rest.split("/")
        if len(parts) != 2 or not NAME_RE.match(parts[0]) or not _SEQ_RE.match(parts[1]):
            raise ReceiveError(f"unexpected delivery topic {topic!r}")
        clip_id, seq = parts[0], int(parts[1])
        bar = self._bar
        if bar is None:
            # The bar appears with the first chunk, not while the owner was deciding, so its
            # rate is the real throughput.
            bar = self._bar = tqdm(
                total=self._total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"receiving {self.jti}",
                disable=not self._progress,
                file=sys.stderr,
                leave=True,
            )
        spool = self._clips.get(clip_id)
        if spool is None:
            spool = self._clips[clip_id] = _ClipSpool(
                self._spool, self.out_dir, clip_id, self._identity
            )
        bar.update(spool.add(seq, payload))
        return True

    def check_response(self, payload: bytes) -> None:
        """Raise ReceiveError if a device response says this request will not be delivered.

        Responses that do not verify, or that are about another request, are ignored.
        """
        try:
            claims = verify_device_jws(payload, self._device_key, RESPONSE_TYP)
        except ReceiveError as exc:
            log.warning("ignoring a response that does not verify: %s", exc)
            return
        if claims.get("req") != self.jti:
            return
        status = claims.get("status")
        if status == Status.FAILED:
            raise ReceiveError(f"the device reports that delivering request {self.jti} failed")
        if status in (Status.DENIED, Status.EXPIRED, Status.REJECTED):
            raise ReceiveError(f"request {self.jti} was {status}; nothing will be delivered")

    def missing(self) -> dict[str, list[int]]:
        """For each manifest clip, the chunk numbers not received yet (empty lists omitted)."""
        if self.manifest is None:
            return {}
        out: dict[str, list[int]] = {}
        for clip in self.manifest.clips:
            spool = self._clips.get(clip.id)
            gone = spool.missing(clip.chunks) if spool else list(range(clip.chunks))
            if gone:
                out[clip.id] = gone
        return out

    def ready(self) -> bool:
        """Whether the manifest and every chunk it lists have arrived."""
        return self.manifest is not None and not self.missing()

    # -- output ------------------------------------------------------------------------------

    def finish(self) -> list[ReceivedClip]:
        """Verify and write every clip of the manifest; returns them in manifest order.

        Raises ReceiveError naming the clip when chunks are missing, the age file does not match
        the manifest, it does not decrypt with our identity, or the plaintext hash differs.
        Every age file is checked before any clip takes its final name.
        """
        if self.manifest is None:
            raise ReceiveError(f"no manifest received for request {self.jti}")
        for clip in self.manifest.clips:
            self._check_age_file(clip)
        written = [self._write(clip) for clip in self.manifest.clips]
        if self._bar is not None:
            self._bar.close()
        return written

    def _check_age_file(self, clip: ManifestClip) -> None:
        gone = self.missing().get(clip.id)
        if gone:
            listed = ", ".join(str(s) for s in gone[:10]) + (" ..." if len(gone) > 10 else "")
            raise ReceiveError(
                f"clip {clip.id}: {len(gone)} of {clip.chunks} chunks missing ({listed})",
                hint="ask the device owner to deliver the request again",
            )
        spool = self._clips.get(clip.id)
        total, digest = spool.seal(clip.chunks) if spool else (0, hashlib.sha256().hexdigest())
        if total != clip.bytes or digest != clip.sha256:
            self._discard(clip.id)
            raise ReceiveError(
                f"clip {clip.id}: the received age file ({total} bytes) does not match the "
                f"signed manifest ({clip.bytes} bytes, sha256 {clip.sha256[:16]}...): "
                "a chunk was corrupted or tampered with"
            )

    def _discard(self, clip_id: str) -> None:
        """Close a clip's spool, deleting its partial plaintext."""
        spool = self._clips.pop(clip_id, None)
        if spool is not None:
            spool.close()

    def _write(self, clip: ManifestClip) -> ReceivedClip:
        final = self.out_dir / f"{clip.id}{extension_for(clip.content_type)}"
        spool = self._clips.get(clip.id)
        try:
            if spool is None or not clip.chunks:
                raise ReceiveError(f"clip {clip.id}: the manifest lists no chunks for it")
            try:
                size, digest = spool.finish_plaintext()
            except ReceiveError as exc:
                raise ReceiveError(
                    f"clip {clip.id}: cannot decrypt with this age identity: {exc}",
                    hint="use the identity made by `doorbell-request keygen` for this request",
                ) from None
            if digest != clip.plaintext_sha256:
                raise ReceiveError(
                    f"clip {clip.id}: the decrypted video does not match the manifest's "
                    "plaintext_sha256: the device's recording and this file differ"
                )
            spool.move_plaintext(final)
            spool.keep_age_file(self.out_dir / f"{clip.id}.age")
        except BaseException:
            self._discard(clip.id)
            raise
        return ReceivedClip(
            id=clip.id,
            path=final,
            content_type=clip.content_type,
            bytes=size,
            plaintext_sha256=clip.plaintext_sha256,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the chunk spool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        for spool in self._clips.values():
            spool.close()
        shutil.rmtree(self._spool, ignore_errors=True)


NextMessage = Callable[[float], tuple[str, bytes] | None]
"""Returns the next ``(topic, payload)`` received, or None when ``timeout`` seconds pass."""


def receive_delivery(
    assembler: DeliveryAssembler,
    next_message: NextMessage,
    *,
    timeout: float,
    grace: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> list[ReceivedClip]:
    """Feed messages from ``next_message`` to ``assembler`` until the delivery is complete.

    Messages on the delivery topics go to the assembler (one whose manifest does not verify is
    reported and skipped: a genuine one may follow); responses on ``P/D/responses/R`` end the wait
    early when the device says the request will not be delivered. After the manifest arrives,
    missing chunks get ``grace`` seconds to show up (MQTT orders messages per topic only) before
    :meth:`DeliveryAssembler.finish` names them. Raises ReceiveError on failure, or when nothing
    complete arrived within ``timeout`` seconds.
    """
    deadline = clock() + timeout
    bad_manifest: ReceiveError | None = None
    while (remaining := deadline - clock()) > 0:
        message = next_message(remaining)
        if message is None:
            continue
        topic, payload = message
        if topic == assembler.responses_topic:
            assembler.check_response(payload)
            continue
        try:
            assembler.feed(topic, payload)
        except ReceiveError as exc:
            log.warning("ignoring a delivery message: %s", exc)
            bad_manifest = exc
            continue
        if assembler.ready():
            return assembler.finish()
        if assembler.manifest is not None:
            deadline = min(deadline, clock() + grace)
    if assembler.manifest is not None:
        return assembler.finish()
    if bad_manifest is not None:
        raise bad_manifest
    raise ReceiveError(
        f"no complete delivery for request {assembler.jti} within {timeout:g} s",
        hint="the owner may not have approved it yet, or the delivery went out before you "
        "subscribed; ask the owner to approve or deliver it again",
    )
