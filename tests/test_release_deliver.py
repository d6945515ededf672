"""Release: streaming age encryption, chunking, the signed manifest and restartable delivery.

Clips go through the real age encryption and an in-process publisher; the requester's side is
the real DeliveryAssembler, and the age files are also decrypted with the stock ``age`` CLI.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import itertools
import json
import random
import secrets
import shutil
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.errors import AuditWriteError, DeliveryError, MQTTError, ReceiveError, TamperError
from agent.keys import b64url_decode, kid_for
from agent.release.cut_api import CutFile
from agent.release.deliver import Deliverer, DeliveryJob, MemoryLedger, PlannedFile
from agent.release.encrypt import encrypt_to_chunks
from agent.release.manifest import MANIFEST_TYP, verify_manifest
from agent.requester.receive import DeliveryAssembler

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PREFIX = "doorbell"
AGE = shutil.which("age")


@dataclass
class FakeClip:
    """Stands in for the vault's clip info."""

    id: str
    start: datetime
    end: datetime
    content_type: str
    data: bytes
    sha256: str | None = None
    frames: int = 30

    def __post_init__(self) -> None:
        if self.sha256 is None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()


class TamperingReader(io.BytesIO):
    """A vault reader whose stored ciphertext fails authentication halfway through."""

    def read(self, n: int | None = -1) -> bytes:
        if self.tell() > 10_000:
            raise TamperError("chunk 3 failed authentication: file corrupted or tampered with")
        return super().read(n)


@dataclass
class FakeVault:
    """The two vault calls delivery makes, over in-memory clips."""

    clips: list[FakeClip]
    tampered: set[str] = field(default_factory=set)
    opened: list[str] = field(default_factory=list)

    def clips_overlapping(self, start: datetime, end: datetime) -> list[FakeClip]:
        return [c for c in self.clips if c.start < end and c.end > start]

    def open_clip(self, clip_id: str) -> io.BytesIO:
        self.opened.append(clip_id)
        clip = next(c for c in self.clips if c.id == clip_id)
        return TamperingReader(clip.data) if clip_id in self.tampered else io.BytesIO(clip.data)


class LoopbackPublisher:
    """Records what is published; can drop the "connection" at chosen publish numbers."""

    def __init__(self, fail_at: Sequence[int] = (), reconnects: bool = True) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.expiries: list[int | None] = []
        self.fail_at = set(fail_at)
        self.reconnects = reconnects
        self.calls = 0
        self.waits = 0
        self.drains = 0

    def make_room(self) -> None:
        return None

    def publish(self, topic: str, payload: bytes, qos: int, *, expiry: int | None = None) -> None:
        assert qos == 1
        assert isinstance(payload, bytes)
        self.calls += 1
        if self.calls in self.fail_at:
            raise MQTTError("connection lost")
        self.messages.append((topic, payload))
        self.expiries.append(expiry)

    def drain(self) -> None:
        self.drains += 1

    def wait_connected(self, timeout: float) -> bool:
        self.waits += 1
        return self.reconnects


@pytest.fixture
def device_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def identity() -> x25519.Identity:
    return x25519.Identity.generate()


def clip_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_clips() -> list[FakeClip]:
    sizes = [(0, 50_000), (1, 4096 * 3), (2, 1)]
    return [
        FakeClip(
            id=f"clip-{i}",
            start=T0 + timedelta(minutes=i),
            end=T0 + timedelta(minutes=i, seconds=30),
            content_type="video/x-msvideo",
            data=clip_bytes(n, i),
        )
        for i, n in sizes
    ]


def make_job(recipient: str, jti: str = "req-0123456789abcdef") -> DeliveryJob:
    return DeliveryJob(
        device_id="door-1",
        requester_id="police-7",
        jti=jti,
        window_start=T0 - timedelta(minutes=5),
        window_end=T0 + timedelta(minutes=10),
        recipient=recipient,
    )


def sequential_ids(prefix: str = "clip-") -> Callable[[], str]:
    """File ids ``clip-0``, ``clip-1``, ... for tests that name files (the device's are random)."""
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter)}"


def make_deliverer(
    vault: FakeVault,
    publisher: LoopbackPublisher,
    key: Ed25519PrivateKey,
    *,
    chunk_bytes: int = 4096,
    retries: int = 2,
    new_id: Callable[[], str] | None = None,
) -> Deliverer:
    return Deliverer(
        vault=vault,
        publisher=publisher,
        signing_key=key,
        topic_prefix=PREFIX,
        chunk_bytes=chunk_bytes,
        retries=retries,
        reconnect_timeout=1.0,
        now=lambda: T0 + timedelta(hours=1),
        new_id=new_id or (lambda: secrets.token_urlsafe(16)),
    )


def make_assembler(
    out: Path, key: Ed25519PrivateKey, identity: x25519.Identity, job: DeliveryJob
) -> DeliveryAssembler:
    return DeliveryAssembler(
        out,
        identity=identity,
        device_public_key=key.public_key(),
        device_id=job.device_id,
        requester_id=job.requester_id,
        jti=job.jti,
        topic_prefix=PREFIX,
    )


def age_files(messages: Sequence[tuple[str, bytes]], job: DeliveryJob) -> dict[str, bytes]:
    """Each clip's age file, reassembled from the last copy of each chunk."""
    base = f"{PREFIX}/{job.device_id}/deliveries/{job.requester_id}/{job.jti}/"
    chunks: dict[str, dict[int, bytes]] = {}
    for topic, payload in messages:
        assert topic.startswith(base), topic
        leaf = topic[len(base) :]
        if leaf != "manifest":
            clip, seq = leaf.split("/")
            chunks.setdefault(clip, {})[int(seq)] = payload
    return {c: b"".join(parts[i] for i in sorted(parts)) for c, parts in chunks.items()}


def age_decrypt_cli(tmp_path: Path, identity: x25519.Identity, blob: bytes) -> bytes:
    """Decrypt with the stock age tool in a subprocess."""
    assert AGE is not None, "the age CLI is needed for this test"
    id_file = tmp_path / "identity.txt"
    id_file.write_text(str(identity) + "\n")
    id_file.chmod(0o600)
    src = tmp_path / "clip.age"
    src.write_bytes(blob)
    done = subprocess.run(
        [AGE, "-d", "-i", str(id_file), str(src)], capture_output=True, check=True, timeout=60
    )
    return done.stdout


def test_delivery_round_trip_through_assembler_and_stock_age(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    entries = make_deliverer(vault, pub, device_key).deliver(job)

    # released files have opaque ids, never the stored clips'
    ids = [e.id for e in entries]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert not {c.id for c in vault.clips} & set(ids)
    # the manifest comes last, after every chunk
    assert pub.messages[-1][0] == f"{PREFIX}/door-1/deliveries/police-7/{job.jti}/manifest"
    assert pub.drains == 1
    files = age_files(pub.messages, job)
    assert set(files) == set(ids)
    for clip, entry in zip(vault.clips, entries, strict=True):
        blob = files[entry.id]
        assert entry.bytes == len(blob)
        assert entry.sha256 == hashlib.sha256(blob).hexdigest()
        assert entry.plaintext_sha256 == hashlib.sha256(clip.data).hexdigest()
        if len(clip.data) >= 64:
            assert clip.data[:64] not in blob
        # the stock age CLI decrypts what we published
        assert age_decrypt_cli(tmp_path, identity, blob) == clip.data

    # the requester side, fed in a random order with duplicates, gets the same bytes
    msgs = list(pub.messages) + pub.messages[:3]
    random.Random(7).shuffle(msgs)
    out = tmp_path / "out"
    with make_assembler(out, device_key, identity, job) as asm:
        for topic, payload in msgs:
            assert asm.feed(topic, payload)
        assert asm.ready()
        received = asm.finish()
    assert [r.id for r in received] == ids
    for clip, rec in zip(vault.clips, received, strict=True):
        assert rec.path == out / f"{rec.id}.avi"
        assert rec.path.read_bytes() == clip.data
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{i}.avi" for i in ids] + [f"{i}.age" for i in ids]
    )


def test_chunks_are_fixed_size_and_manifest_is_signed_as_contracted(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    entries = make_deliverer(vault, pub, device_key, chunk_bytes=4096).deliver(job)

    by_clip: dict[str, list[tuple[int, int]]] = {}
    for topic, payload in pub.messages[:-1]:
        *_, clip, seq = topic.split("/")
        by_clip.setdefault(clip, []).append((int(seq), len(payload)))
    for entry in entries:
        sizes = by_clip[entry.id]
        assert [s for s, _ in sizes] == list(range(entry.chunks))
        assert all(n == 4096 for _, n in sizes[:-1])
        assert 0 < sizes[-1][1] <= 4096

    token = pub.messages[-1][1].decode()
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": "EdDSA", "typ": MANIFEST_TYP, "kid": kid_for(device_key.public_key())}
    claims = json.loads(b64url_decode(token.split(".")[1]))
    assert set(claims) == {"iss", "aud", "iat", "req", "window", "attempt", "clips"}
    assert (claims["iss"], claims["aud"], claims["req"]) == ("door-1", "police-7", job.jti)
    assert claims["window"] == {"start": "2026-03-01T11:55:00Z", "end": "2026-03-01T12:10:00Z"}
    assert claims["attempt"] == 1
    stored_sha = hashlib.sha256(vault.clips[0].data).hexdigest()
    commitment = hmac.new(
        job.salt, f"clip-0\n{stored_sha}".encode(), hashlib.sha256
    ).hexdigest()
    assert claims["clips"][0] == {
        "id": entries[0].id,
        "start": "2026-03-01T12:00:00Z",
        "end": "2026-03-01T12:00:30Z",
        "content_type": "video/x-msvideo",
        "chunks": entries[0].chunks,
        "bytes": entries[0].bytes,
        "sha256": entries[0].sha256,
        "plaintext_sha256": stored_sha,
        "frames": 30,
        "clock_synchronized": False,
        "source": {"commitment": commitment},
    }
    manifest = verify_manifest(
        token, device_key.public_key(), device_id="door-1", requester_id="police-7", jti=job.jti,
        expected_window=(job.window_start, job.window_end),
    )
    assert manifest.clips == entries
    assert manifest.attempt == 1
    # a manifest for another window than the one asked for is refused
    with pytest.raises(ReceiveError, match="not the window of the request"):
        verify_manifest(
            token, device_key.public_key(), device_id="door-1", requester_id="police-7",
            jti=job.jti, expected_window=(job.window_start, T0),
        )


def test_only_clips_overlapping_the_window_are_released(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    clips = make_clips()
    outside = FakeClip("later", T0 + timedelta(hours=2), T0 + timedelta(hours=3), "video/mp4", b"x")
    vault = FakeVault([*clips, outside])
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    entries = make_deliverer(vault, pub, device_key).deliver(job)
    assert len(entries) == len(clips)
    assert "later" not in vault.opened


def test_no_clips_in_the_window_is_a_valid_empty_delivery(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    assert make_deliverer(FakeVault([]), pub, device_key).deliver(job) == ()
    assert [t.rsplit("/", 1)[1] for t, _ in pub.messages] == ["manifest"]
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        asm.feed(*pub.messages[0])
        assert asm.ready()
        assert asm.finish() == []


def test_disconnect_mid_delivery_restarts_it_and_the_requester_gets_the_new_copy(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher(fail_at=[7])
    job = make_job(str(identity.to_public()))
    ledger = MemoryLedger()
    entries = make_deliverer(vault, pub, device_key, retries=1).deliver(job, ledger=ledger)

    assert pub.waits == 2  # connected check before each of the two attempts
    assert vault.opened.count("clip-0") == 2
    manifests = [m for m in pub.messages if m[0].endswith("/manifest")]
    assert len(manifests) == 1
    # the retry is attempt 2, with fresh file ids: no chunk of attempt 1 can be spliced in
    assert ledger.attempts == 2 and list(ledger.manifests) == [2]
    first = {f.id for f in ledger.started_files[1]}
    second = {f.id for f in ledger.started_files[2]}
    assert first and not first & second and second == {e.id for e in entries}
    assert json.loads(b64url_decode(manifests[0][1].decode().split(".")[1]))["attempt"] == 2
    assert ledger.manifests[2] == hashlib.sha256(manifests[0][1]).hexdigest()
    # the receiver saw the partial first attempt's chunks before the complete second one
    with make_assembler(tmp_path / "out", device_key, identity, job) as asm:
        for topic, payload in pub.messages:
            asm.feed(topic, payload)
        received = asm.finish()
    assert [r.path.read_bytes() for r in received] == [c.data for c in vault.clips]
    assert [r.plaintext_sha256 for r in received] == [e.plaintext_sha256 for e in entries]


def test_delivery_fails_after_bounded_retries(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher(fail_at=range(1, 1000))
    job = make_job(str(identity.to_public()))
    with pytest.raises(DeliveryError, match=r"failed after 3 attempts: connection lost"):
        make_deliverer(vault, pub, device_key, retries=2).deliver(job)
    assert pub.calls == 3
    assert not any(t.endswith("/manifest") for t, _ in pub.messages)


def test_broker_that_never_comes_back_fails_the_delivery(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher(reconnects=False)
    job = make_job(str(identity.to_public()))
    with pytest.raises(DeliveryError, match=r"failed after 2 attempts: not reconnected"):
        make_deliverer(vault, pub, device_key, retries=1).deliver(job)
    assert pub.messages == [] and vault.opened == []


def test_tampered_vault_clip_fails_at_once_naming_the_clip(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    clips = make_clips()
    vault = FakeVault(clips, tampered={"clip-0"})
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    with pytest.raises(DeliveryError, match=r"clip clip-0 cannot be read from the vault: chunk 3"):
        make_deliverer(vault, pub, device_key, retries=3).deliver(job)
    # every file is cut before release_started (it names their spans), once: no retry, the
    # ciphertext will not heal
    assert vault.opened == ["clip-0", "clip-1", "clip-2"]
    assert not any(t.endswith("/manifest") for t, _ in pub.messages)
    # what did get out before the failure is ciphertext only
    assert all(clips[0].data[:64] not in payload for _, payload in pub.messages)


@pytest.mark.parametrize("recipient", ["", "age1notvalid", "ssh-ed25519 AAAA"])
def test_bad_recipient_publishes_nothing(device_key: Ed25519PrivateKey, recipient: str) -> None:
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    with pytest.raises(DeliveryError, match="recipient"):
        make_deliverer(vault, pub, device_key).deliver(make_job(recipient))
    assert pub.messages == [] and vault.opened == []


def test_unsafe_topic_levels_are_refused(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    pub = LoopbackPublisher()
    # A stored clip's id never reaches a topic: the released file gets an opaque one.
    vault = FakeVault([FakeClip("a/#", T0, T0 + timedelta(seconds=5), "video/mp4", b"abc")])
    make_deliverer(vault, pub, device_key).deliver(make_job(str(identity.to_public())))
    assert not any("a/#" in t for t, _ in pub.messages)
    pub = LoopbackPublisher()
    with pytest.raises(DeliveryError, match="topic level"):
        make_deliverer(FakeVault([]), pub, device_key).deliver(
            make_job(str(identity.to_public()), jti="bad/+/jti-000000")
        )
    assert pub.messages == []


class GeneratedClip:
    """A large plaintext produced on the fly so the test itself holds no copy of it."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = clip_bytes(64 * 1024, 99)
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = min(self.left, len(self.block) if n is None or n < 0 else min(n, len(self.block)))
        self.left -= n
        data = self.block[:n]
        self.digest.update(data)
        return data


def test_memory_stays_flat_whatever_the_clip_size(identity: x25519.Identity) -> None:
    peaks = {}
    for size in (4 * 1024**2, 32 * 1024**2):
        source = GeneratedClip(size)
        seen = hashlib.sha256()

        def sink(_seq: int, chunk: bytes, seen: hashlib._Hash = seen) -> None:
            seen.update(chunk)

        tracemalloc.start()
        try:
            result = encrypt_to_chunks(source, identity.to_public(), 256 * 1024, sink)
            peaks[size] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.plaintext_bytes == size
        assert result.plaintext_sha256 == source.digest.hexdigest()
        assert result.sha256 == seen.hexdigest()
    # one chunk in the making plus one being handed over, whatever the clip size
    assert peaks[32 * 1024**2] < 2 * 1024**2
    assert peaks[32 * 1024**2] < peaks[4 * 1024**2] + 512 * 1024


def test_sink_failure_propagates_unchanged(identity: x25519.Identity) -> None:
    def sink(seq: int, chunk: bytes) -> None:
        if seq == 2:
            raise MQTTError("connection lost")

    with pytest.raises(MQTTError, match="connection lost"):
        encrypt_to_chunks(io.BytesIO(clip_bytes(100_000, 1)), identity.to_public(), 4096, sink)

    def last_sink(seq: int, chunk: bytes) -> None:
        if len(chunk) < 4096:
            raise MQTTError("lost at the very end")

    # the final short chunk is emitted after the payload is sealed; its failure must surface too
    with pytest.raises(MQTTError, match="lost at the very end"):
        encrypt_to_chunks(io.BytesIO(clip_bytes(9000, 2)), identity.to_public(), 4096, last_sink)


def test_clip_that_differs_from_its_recorded_hash_is_not_vouched_for(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    clips = make_clips()
    clips[1].sha256 = hashlib.sha256(b"what was really recorded").hexdigest()
    pub = LoopbackPublisher()
    with pytest.raises(DeliveryError, match="clip clip-1 does not match the SHA-256 recorded"):
        make_deliverer(FakeVault(clips), pub, device_key, retries=3).deliver(
            make_job(str(identity.to_public()))
        )
    assert not any(t.endswith("/manifest") for t, _ in pub.messages)
    # with the right recorded hash the same clip goes through
    clips[1].sha256 = hashlib.sha256(clips[1].data).hexdigest()
    make_deliverer(FakeVault(clips), LoopbackPublisher(), device_key).deliver(
        make_job(str(identity.to_public()))
    )


def test_read_ahead_thread_ends_with_the_encryption_whatever_happens(
    identity: x25519.Identity,
) -> None:
    def failing_sink(seq: int, chunk: bytes) -> None:
        if seq == 1:
            raise MQTTError("connection lost")

    source = GeneratedClip(8 * 1024**2)
    with pytest.raises(MQTTError):
        encrypt_to_chunks(source, identity.to_public(), 4096, failing_sink)
    # the reader stopped a few blocks ahead, not at the end of the clip, and may now be closed
    assert source.left > 7 * 1024**2
    with pytest.raises(TamperError):
        encrypt_to_chunks(
            TamperingReader(clip_bytes(50_000, 3)), identity.to_public(), 4096, lambda *_: None
        )
    assert not [t for t in threading.enumerate() if t.name == "age-read-ahead"]


class FailingLedger(MemoryLedger):
    """A ledger whose audit write fails at ``fail`` ("started" or "delivered")."""

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail
        self.published_before: int | None = None

    def started(self, attempt: int, files: Sequence[PlannedFile]) -> None:
        if self.fail == "started":
            raise AuditWriteError("disk full")
        super().started(attempt, files)

    def delivered(self, attempt: int, files: Sequence[PlannedFile], entries: Sequence[object],
                  manifest_sha256: str) -> None:
        if self.fail == "delivered":
            raise AuditWriteError("disk full")
        raise AssertionError("not reached")


@pytest.mark.parametrize("fail", ["started", "delivered"])
def test_an_unrecordable_release_ends_without_manifest_and_is_not_retried(
    device_key: Ed25519PrivateKey, identity: x25519.Identity, fail: str
) -> None:
    """§7: release_started before the first chunk, request_delivered before the manifest;
    either failing ends the delivery (DeliveryError: failed/delivery_error) with no manifest."""
    vault = FakeVault(make_clips())
    pub = LoopbackPublisher()
    ledger = FailingLedger(fail)
    event = "release_started" if fail == "started" else "request_delivered"
    with pytest.raises(DeliveryError, match=f"{event} cannot be audited"):
        make_deliverer(vault, pub, device_key, retries=3).deliver(
            make_job(str(identity.to_public())), ledger=ledger
        )
    assert ledger.attempts == 1  # an audit failure is not retried
    assert not any(t.endswith("/manifest") for t, _ in pub.messages)
    if fail == "started":
        assert pub.messages == []  # not one chunk before release_started
    else:
        assert pub.messages  # the chunks went, the manifest did not


def test_redelivery_has_identical_plaintext_and_commitments_but_fresh_ids(
    device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    vault = FakeVault(make_clips())
    job = make_job(str(identity.to_public()))
    ledger = MemoryLedger()
    first = make_deliverer(vault, LoopbackPublisher(), device_key).deliver(job, ledger=ledger)
    again = make_deliverer(vault, LoopbackPublisher(), device_key).deliver(job, ledger=ledger)
    assert [e.plaintext_sha256 for e in first] == [e.plaintext_sha256 for e in again]
    assert [e.source for e in first] == [e.source for e in again]
    assert not {e.id for e in first} & {e.id for e in again}
    assert ledger.manifests.keys() == {1, 2} and ledger.manifests[1] != ledger.manifests[2]
    # another request (another salt) commits differently to the same clips
    other = make_deliverer(vault, LoopbackPublisher(), device_key).deliver(
        make_job(str(identity.to_public()), jti="req-fedcba9876543210")
    )
    assert not {e.source for e in first} & {e.source for e in other}


class HalfCutter:
    """A cutter that releases the first half of each clip (frames and span halved) and nothing
    of a clip named ``empty``: stands in for the frame-exact cut behind the seam."""

    def __init__(self, vault: FakeVault) -> None:
        self.vault = vault
        self.calls: list[tuple[str, datetime, datetime]] = []

    def cut(self, clip_id: str, window_start: datetime, window_end: datetime) -> CutFile | None:
        self.calls.append((clip_id, window_start, window_end))
        if clip_id == "empty":
            return None
        clip = next(c for c in self.vault.clips if c.id == clip_id)
        assert clip.sha256 is not None
        half = clip.data[: len(clip.data) // 2]
        return CutFile(
            stream=io.BytesIO(half), start=clip.start, end=clip.start + (clip.end - clip.start) / 2,
            frames=clip.frames // 2, content_type="video/x-matroska", source_sha256=clip.sha256,
            clock_synchronized=True,
        )


def test_the_cut_seam_releases_what_the_cutter_makes_and_commits_to_the_stored_clip(
    tmp_path: Path, device_key: Ed25519PrivateKey, identity: x25519.Identity
) -> None:
    clips = [*make_clips(), FakeClip("empty", T0, T0 + timedelta(seconds=5), "video/mp4", b"e")]
    vault = FakeVault(clips)
    cutter = HalfCutter(vault)
    pub = LoopbackPublisher()
    job = make_job(str(identity.to_public()))
    deliverer = Deliverer(
        vault=vault, publisher=pub, signing_key=device_key, topic_prefix=PREFIX,
        chunk_bytes=4096, retries=0, cutter=cutter,
    )
    entries = deliverer.deliver(job)
    assert [c[0] for c in cutter.calls] == [c.id for c in sorted(clips, key=lambda c: c.start)]
    assert all(c[1:] == (job.window_start, job.window_end) for c in cutter.calls)
    assert len(entries) == 3  # the clip with no frame in the window releases nothing
    for clip, entry in zip(make_clips(), entries, strict=True):
        half = clip.data[: len(clip.data) // 2]
        assert entry.plaintext_sha256 == hashlib.sha256(half).hexdigest()
        assert entry.frames == clip.frames // 2 and entry.clock_synchronized is True
        assert entry.content_type == "video/x-matroska"
        stored = hashlib.sha256(clip.data).hexdigest()
        assert entry.source == hmac.new(
            job.salt, f"{clip.id}\n{stored}".encode(), hashlib.sha256
        ).hexdigest()
    files = age_files(pub.messages, job)
    assert age_decrypt_cli(tmp_path, identity, files[entries[0].id]) == clips[0].data[
        : len(clips[0].data) // 2
    ]
