"""The clip vault: publishing, metadata, tampering, shredding, retention, holds, recovery."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sqlite3
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent.errors import AuditWriteError, ClipNotFoundError, TamperError, VaultError
from agent.keys import create_device_keys
from agent.stream import (
    AES_256_GCM,
    CHACHA20_POLY1305,
    TAG_SIZE,
    resolve_cipher,
    sealed_header_size,
)
from agent.vault import ClipInfo, Vault, _FdSink, build_header, header_clip_id

CS = 64  # small chunks keep the tests fast
MASTER = bytes(range(32))
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class RecordingAudit:
    """Collects events; ``before`` runs first so a test can look at the world at that moment."""

    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    before: Callable[[str, dict[str, object]], None] | None = None
    fail_on: str | None = None

    def append(self, event: str, **fields: object) -> None:
        if self.before is not None:
            self.before(event, fields)
        if event == self.fail_on:
            raise AuditWriteError("audit log is not writable")
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, object]]:
        return [f for e, f in self.events if e == event]


class KeyRecordingRng:
    """os.urandom that remembers every 32-byte value (the clip keys)."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = os.urandom(n)
        if n == 32:
            self.keys.append(value)
        return value


@pytest.fixture
def audit() -> RecordingAudit:
    return RecordingAudit()


@pytest.fixture
def make_vault(tmp_path: Path, audit: RecordingAudit) -> Iterator[Callable[..., Vault]]:
    opened: list[Vault] = []

    def make(**kw: object) -> Vault:
        options: dict[str, object] = {"audit": audit, "chunk_size": CS, "now": lambda: T0}
        options.update(kw)
        master = options.pop("master_key", MASTER)
        assert isinstance(master, bytes)
        v = Vault(tmp_path, master, **options)  # type: ignore[arg-type]
        opened.append(v)
        return v

    yield make
    for v in opened:
        v.close()


@pytest.fixture
def vault(make_vault: Callable[..., Vault]) -> Vault:
    return make_vault()


def content(n: int, seed: str = "a") -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def record(
    vault: Vault,
    data: bytes,
    start: datetime = T0,
    *,
    seconds: float = 10,
    frames: int = 100,
    write_size: int = 50,
    thumbnail: bytes | None = None,
) -> ClipInfo:
    with vault.create_clip(start, "video/x-msvideo") as writer:
        for i in range(0, len(data), write_size):
            writer.write(data[i : i + write_size])
        if thumbnail is not None:
            writer.set_thumbnail(thumbnail)
        return writer.finish(start + timedelta(seconds=seconds), frames)


def read_all(vault: Vault, clip_id: str) -> bytes:
    with vault.open_clip(clip_id) as reader:
        return reader.read()


def clip_path(vault: Vault, info: ClipInfo) -> Path:
    return vault.dir / f"{info.id}.clip"


def chunk_offset(info: ClipInfo, index: int) -> int:
    header = build_header(info.id, info.cipher, info.chunk_size)
    return sealed_header_size(header) + index * (info.chunk_size + TAG_SIZE)


def tamper_message(vault: Vault, info: ClipInfo, original: bytes) -> str:
    """Read the clip in small pieces; only authentic plaintext may come out before the error."""
    got = bytearray()
    with pytest.raises(TamperError) as excinfo, vault.open_clip(info.id) as reader:
        while piece := reader.read(10):
            got += piece
    assert original.startswith(bytes(got)), "unauthenticated plaintext was returned"
    message = str(excinfo.value)
    report = vault.verify()
    assert report.failures == ((info.id, message),)
    assert vault.verify(info.id).failures == ((info.id, message),)
    return message


def raw_files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def db_rows(vault: Vault, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(vault.db_path) as db:
        rows = list(db.execute(sql))
    db.close()
    return rows


# -- writing and reading -------------------------------------------------------------------


@pytest.mark.parametrize("cipher", [AES_256_GCM, CHACHA20_POLY1305])
@pytest.mark.parametrize("length", [0, CS - 1, CS, CS + 1, 5 * CS + 7])
def test_round_trip_and_metadata(
    make_vault: Callable[..., Vault], audit: RecordingAudit, cipher: str, length: int
) -> None:
    vault = make_vault(cipher=cipher)
    data = content(length)
    info = record(vault, data, frames=42, thumbnail=b"\xff\xd8jpeg")
    assert re.fullmatch(r"20260301T120000Z-[0-9a-f]{12}", info.id)
    assert info.state == "final"
    assert (info.start, info.end) == (T0, T0 + timedelta(seconds=10))
    assert (info.size, info.frames, info.content_type) == (length, 42, "video/x-msvideo")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.cipher == cipher and info.chunk_size == CS and info.has_thumbnail
    assert info.stored_bytes == clip_path(vault, info).stat().st_size
    assert vault.get_clip(info.id) == info
    assert vault.list_clips() == [info]
    assert read_all(vault, info.id) == data
    assert vault.read_thumbnail(info.id) == b"\xff\xd8jpeg"
    assert sorted(p.name for p in vault.dir.iterdir()) == [".lock", f"{info.id}.clip"]
    assert audit.events == [
        (
            "clip_recorded",
            {
                "clip": info.id,
                "start": "2026-03-01T12:00:00Z",
                "end": "2026-03-01T12:00:10Z",
                "bytes": length,
                "sha256": info.sha256,
            },
        )
    ]
    assert info.to_json()["bytes"] == length
    report = vault.verify()
    assert report.ok and report.checked == 1 and report.bytes == length


def test_files_and_index_hold_no_plaintext_and_no_clip_key(
    make_vault: Callable[..., Vault],
) -> None:
    rng = KeyRecordingRng()
    vault = make_vault(rng=rng)
    marker = b"PLAINTEXT-MARKER-" * 20
    thumb = b"THUMBNAIL-MARKER-" * 5
    info = record(vault, marker, thumbnail=thumb)
    vault.close()
    everything = raw_files(vault.root)
    assert b"PLAINTEXT-MARKER" not in everything and b"THUMBNAIL-MARKER" not in everything
    assert rng.keys, "the vault drew no clip key from its rng"
    for key in rng.keys:
        assert key not in everything
    assert info.id.encode() in clip_path(vault, info).read_bytes()  # the header names the clip
    assert (vault.db_path.stat().st_mode & 0o777) == 0o600
    assert (vault.dir.stat().st_mode & 0o777) == 0o700
    assert (clip_path(vault, info).stat().st_mode & 0o777) == 0o600


def test_index_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    Vault(tmp_path, MASTER).close()
    with sqlite3.connect(tmp_path / "vault.db") as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(VaultError, match="newer doorbell-agent"):
        Vault(tmp_path, MASTER)


def test_index_pragmas(vault: Vault) -> None:
    with vault._lock:
        db = vault._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA secure_delete").fetchone()[0] == 1


def test_auto_cipher_follows_proc_cpuinfo(make_vault: Callable[..., Vault]) -> None:
    vault = make_vault(cipher="auto")
    assert vault.cipher == resolve_cipher("auto", Path("/proc/cpuinfo").read_text())


def test_clips_keep_their_cipher_when_the_setting_changes(
    make_vault: Callable[..., Vault],
) -> None:
    first = make_vault(cipher=AES_256_GCM)
    a = record(first, content(300, "a"))
    first.close()
    second = make_vault(cipher=CHACHA20_POLY1305, chunk_size=128)
    b = record(second, content(300, "b"), T0 + timedelta(minutes=1))
    assert (second.get_clip(a.id).cipher, b.cipher) == (AES_256_GCM, CHACHA20_POLY1305)
    assert (second.get_clip(a.id).chunk_size, b.chunk_size) == (CS, 128)
    assert read_all(second, a.id) == content(300, "a")
    assert read_all(second, b.id) == content(300, "b")


def test_writer_streams_to_disk_as_it_goes(vault: Vault) -> None:
    writer = vault.create_clip(T0, "video/x-msvideo")
    part = vault.dir / f"{writer.id}.part"
    assert part.exists() and not (vault.dir / f"{writer.id}.clip").exists()
    assert vault.get_clip(writer.id).state == "writing"
    writer.write(content(10 * CS))
    header = sealed_header_size(build_header(writer.id, vault.cipher, CS))
    assert part.stat().st_size == header + 9 * (CS + TAG_SIZE)  # all but the maybe-last chunk
    assert writer.bytes_written == 10 * CS
    writer.finish(T0 + timedelta(seconds=1), 1)
    assert not part.exists()


def test_memory_does_not_grow_with_clip_size(make_vault: Callable[..., Vault]) -> None:
    vault = make_vault(chunk_size=64 * 1024)
    block = os.urandom(64 * 1024)
    tracemalloc.start()
    try:
        with vault.create_clip(T0, "video/x-msvideo") as writer:
            for _ in range(256):  # 16 MiB
                writer.write(block)
            info = writer.finish(T0 + timedelta(seconds=1), 1)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with vault.open_clip(info.id, verify_sha256=True) as reader:
            while reader.read(64 * 1024):
                pass
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == 16 * 1024 * 1024
    assert write_peak < 1024 * 1024, write_peak
    assert read_peak < 1024 * 1024, read_peak


def test_abort_and_exceptions_leave_nothing(vault: Vault, audit: RecordingAudit) -> None:
    writer = vault.create_clip(T0, "video/x-msvideo")
    writer.write(content(500))
    writer.set_thumbnail(b"jpeg")
    writer.abort()
    writer.abort()
    with pytest.raises(VaultError, match="already finished or aborted"):
        writer.write(b"x")
    with pytest.raises(RuntimeError), vault.create_clip(T0, "video/x-msvideo") as w2:
        w2.write(content(500))
        raise RuntimeError("camera died")
    assert vault.list_clips() == []
    assert [p.name for p in vault.dir.iterdir()] == [".lock"]
    assert audit.events == []


def test_finish_rejects_bad_arguments(vault: Vault) -> None:
    with vault.create_clip(T0, "video/x-msvideo") as writer:
        with pytest.raises(ValueError, match="before it starts"):
            writer.finish(T0 - timedelta(seconds=1), 1)
        with pytest.raises(ValueError, match="frames"):
            writer.finish(T0, -1)
        with pytest.raises(ValueError, match="thumbnail"):
            writer.set_thumbnail(b"")
    with pytest.raises(ValueError, match="timezone-aware"):
        vault.create_clip(datetime(2026, 1, 1), "video/x-msvideo")
    with pytest.raises(ValueError, match="content_type"):
        vault.create_clip(T0, "")


def test_a_failed_write_allows_only_abort(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = vault.create_clip(T0, "video/x-msvideo")
    writer.write(content(3 * CS))

    def disk_full(self: object, data: object, /) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_FdSink, "write", disk_full)
    with pytest.raises(VaultError, match=r"writing failed: .*No space left on device"):
        writer.write(content(3 * CS))
    monkeypatch.undo()
    with pytest.raises(VaultError, match="cannot continue after a failed write"):
        writer.write(b"more")
    with pytest.raises(VaultError, match="cannot continue after a failed write"):
        writer.finish(T0 + timedelta(seconds=1), 1)
    writer.abort()
    assert vault.list_clips() == [] and [p.name for p in vault.dir.iterdir()] == [".lock"]


def test_failed_audit_keeps_a_clip_from_being_published(
    vault: Vault, audit: RecordingAudit
) -> None:
    audit.fail_on = "clip_recorded"
    with pytest.raises(AuditWriteError):
        record(vault, content(300))
    assert vault.list_clips() == []
    assert [p.name for p in vault.dir.iterdir()] == [".lock"]


def test_writing_clips_are_listed_but_not_readable(vault: Vault) -> None:
    with vault.create_clip(T0, "video/x-msvideo") as writer:
        writer.write(content(100))
        (listed,) = vault.list_clips()
        assert listed.state == "writing" and listed.to_json()["end"] is None
        with pytest.raises(VaultError, match="still being written"):
            vault.open_clip(writer.id)
        with pytest.raises(VaultError, match="still being written"):
            vault.delete_clip(writer.id, "owner")
        assert vault.verify().skipped == (writer.id,)
        assert vault.clips_overlapping(T0 - timedelta(hours=1), T0 + timedelta(hours=1)) == []
        writer.finish(T0 + timedelta(seconds=5), 5)


def test_unknown_clip(vault: Vault) -> None:
    for call in (vault.open_clip, vault.get_clip, vault.read_thumbnail, vault.verify):
        with pytest.raises(ClipNotFoundError, match="no clip 'nope'"):
            call("nope")
    with pytest.raises(ClipNotFoundError):
        vault.delete_clip("nope", "owner")


def test_clips_overlapping(vault: Vault) -> None:
    a = record(vault, b"a", T0, seconds=10)  # [0, 10]
    b = record(vault, b"b", T0 + timedelta(seconds=20), seconds=10)  # [20, 30]

    def ids(lo: int, hi: int) -> list[str]:
        window = (T0 + timedelta(seconds=lo), T0 + timedelta(seconds=hi))
        return [c.id for c in vault.clips_overlapping(*window)]

    assert ids(-5, 100) == [a.id, b.id]
    assert ids(5, 6) == [a.id]
    assert ids(10, 20) == []  # touching ends carry no footage inside the window
    assert ids(9, 21) == [a.id, b.id]
    assert ids(29, 40) == [b.id]


def test_thumbnail_absent_and_replaced(vault: Vault) -> None:
    info = record(vault, b"x")
    assert vault.read_thumbnail(info.id) is None and not info.has_thumbnail
    with vault.create_clip(T0, "video/x-msvideo") as writer:
        writer.set_thumbnail(b"first")
        writer.set_thumbnail(b"second")
        second = writer.finish(T0, 1)
    assert vault.read_thumbnail(second.id) == b"second"


def test_reader_thread_while_writing(vault: Vault) -> None:
    first = record(vault, content(1000))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                vault.list_clips()
                assert read_all(vault, first.id) == content(1000)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(10):
            record(vault, content(700, str(i)), T0 + timedelta(minutes=i + 1))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert vault.verify().checked == 11


def test_from_config(tmp_path: Path, audit: RecordingAudit) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    create_device_keys(state)
    cfg = config_mod.parse(
        {
            "device_id": "front",
            "state_dir": str(state),
            "storage": {"retention": "2d", "max_bytes": "64MiB", "cipher": "chacha20-poly1305"},
        }
    )
    with Vault.from_config(cfg, audit=audit) as vault:
        assert vault.dir == state / "vault" and vault.db_path == state / "vault.db"
        assert vault.cipher == CHACHA20_POLY1305
        info = record(vault, b"hello")
        assert read_all(vault, info.id) == b"hello"
    with Vault.from_config(cfg) as again:
        assert read_all(again, info.id) == b"hello"
    with pytest.raises(VaultError, match="closed"):
        vault.list_clips()


# -- tampering -----------------------------------------------------------------------------


@pytest.fixture
def two_clips(vault: Vault) -> tuple[ClipInfo, bytes, ClipInfo, bytes]:
    da, db = content(5 * CS + 10, "a"), content(5 * CS + 10, "b")
    a = record(vault, da)
    b = record(vault, db, T0 + timedelta(minutes=1))
    return a, da, b, db


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [0, 8, 12, 13, 20, 40])
def test_header_bit_flip(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes], offset: int
) -> None:
    a, da, _, _ = two_clips
    flip(clip_path(vault, a), offset)
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} header failed authentication: file corrupted or tampered with"
    )


@pytest.mark.parametrize("index", [0, 3, 5])
def test_chunk_bit_flip(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes], index: int
) -> None:
    a, da, b, db = two_clips
    flip(clip_path(vault, a), chunk_offset(a, index) + 7)
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} chunk {index} failed authentication: file corrupted or tampered with"
    )
    assert read_all(vault, b.id) == db  # the other clip is untouched


@pytest.mark.parametrize("cut", ["chunk-boundary", "mid-chunk", "header-only", "empty"])
def test_truncation(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes], cut: str
) -> None:
    a, da, _, _ = two_clips
    path = clip_path(vault, a)
    size = {
        "chunk-boundary": chunk_offset(a, 3),
        "mid-chunk": chunk_offset(a, 3) + 20,
        "header-only": chunk_offset(a, 0),
        "empty": 0,
    }[cut]
    os.truncate(path, size)
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} is truncated: {size} of {a.stored_bytes} bytes on disk"
    )


def test_truncation_with_a_lying_index_is_still_caught(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    # Cut the file at a chunk boundary AND shrink the recorded size to match.
    a, da, _, _ = two_clips
    os.truncate(clip_path(vault, a), chunk_offset(a, 3))
    with sqlite3.connect(vault.db_path) as db:
        db.execute("UPDATE clips SET size = ? WHERE id = ?", (3 * CS, a.id))
    db.close()
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} is truncated: it ends after chunk 2 without a final chunk"
    )


def swap_chunks(path: Path, info: ClipInfo, i: int, j: int) -> None:
    data = bytearray(path.read_bytes())
    n = info.chunk_size + TAG_SIZE
    oi, oj = chunk_offset(info, i), chunk_offset(info, j)
    data[oi : oi + n], data[oj : oj + n] = data[oj : oj + n], data[oi : oi + n]
    path.write_bytes(bytes(data))


def test_reordered_chunks(vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]) -> None:
    a, da, _, _ = two_clips
    swap_chunks(clip_path(vault, a), a, 1, 2)
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} chunk 1 failed authentication: file corrupted or tampered with"
    )


def test_duplicated_chunk_in_place(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, _, _ = two_clips
    path = clip_path(vault, a)
    data = bytearray(path.read_bytes())
    n = CS + TAG_SIZE
    data[chunk_offset(a, 3) : chunk_offset(a, 3) + n] = data[
        chunk_offset(a, 2) : chunk_offset(a, 2) + n
    ]
    path.write_bytes(bytes(data))
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} chunk 3 failed authentication: file corrupted or tampered with"
    )


def test_inserted_duplicate_chunk(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, _, _ = two_clips
    path = clip_path(vault, a)
    data = path.read_bytes()
    n = CS + TAG_SIZE
    o = chunk_offset(a, 2)
    path.write_bytes(data[: o + n] + data[o : o + n] + data[o + n :])
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} has {n} bytes more than recorded: file corrupted or tampered with"
    )


def test_chunk_swapped_from_another_clip(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, b, db = two_clips
    pa, pb = clip_path(vault, a), clip_path(vault, b)
    data = bytearray(pa.read_bytes())
    n = CS + TAG_SIZE
    o = chunk_offset(a, 4)
    data[o : o + n] = pb.read_bytes()[o : o + n]
    pa.write_bytes(bytes(data))
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} chunk 4 failed authentication: file corrupted or tampered with"
    )
    assert read_all(vault, b.id) == db


def test_whole_file_swapped_from_another_clip(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, b, _ = two_clips
    clip_path(vault, a).write_bytes(clip_path(vault, b).read_bytes())
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} file holds clip {b.id}: a file was swapped in from another clip"
    )


def test_missing_file(vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]) -> None:
    a, da, _, _ = two_clips
    clip_path(vault, a).unlink()
    assert tamper_message(vault, a, da) == f"clip {a.id} file {a.id}.clip is missing"


def test_wrapped_key_moved_between_rows(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, b, _ = two_clips
    with sqlite3.connect(vault.db_path) as db:
        db.execute(
            "UPDATE clips SET wrapped_key = (SELECT wrapped_key FROM clips WHERE id = ?)"
            " WHERE id = ?",
            (b.id, a.id),
        )
    db.close()
    assert tamper_message(vault, a, da) == (
        f"clip {a.id} key failed authentication: wrong storage key, or the index was tampered with"
    )


def test_wrong_master_key(
    make_vault: Callable[..., Vault], two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, _, _, _ = two_clips
    other = make_vault(master_key=os.urandom(32))
    with pytest.raises(TamperError, match=f"clip {a.id} key failed authentication"):
        other.open_clip(a.id)
    assert len(other.verify().failures) == 2


def test_index_sha256_mismatch(
    vault: Vault, two_clips: tuple[ClipInfo, bytes, ClipInfo, bytes]
) -> None:
    a, da, _, _ = two_clips
    with sqlite3.connect(vault.db_path) as db:
        db.execute("UPDATE clips SET sha256 = ? WHERE id = ?", ("0" * 64, a.id))
    db.close()
    assert read_all(vault, a.id) == da  # the ciphertext itself is intact
    report = vault.verify(a.id)
    assert report.failures == (
        (
            a.id,
            f"clip {a.id} plaintext SHA-256 {a.sha256} does not match the index ({'0' * 64})",
        ),
    )


def test_thumbnail_tamper(vault: Vault) -> None:
    info = record(vault, b"x", thumbnail=b"jpeg")
    with sqlite3.connect(vault.db_path) as db:
        (blob,) = db.execute("SELECT thumbnail FROM clips WHERE id = ?", (info.id,)).fetchone()
        bad = bytes([blob[0]]) + bytes([blob[1] ^ 1]) + blob[2:]
        db.execute("UPDATE clips SET thumbnail = ? WHERE id = ?", (bad, info.id))
    db.close()
    message = f"clip {info.id} thumbnail failed authentication: index corrupted or tampered with"
    with pytest.raises(TamperError, match=re.escape(message)):
        vault.read_thumbnail(info.id)
    assert vault.verify().failures == ((info.id, message),)


def test_header_clip_id() -> None:
    header = build_header("abc-123", AES_256_GCM, 64)
    assert header_clip_id(header + b"tagbytes") == "abc-123"
    assert header_clip_id(b"not a header at all") is None
    assert header_clip_id(header[:-3]) is None  # a cut-off id is no id
    assert header_clip_id(header[:-2] + b"\xff!") is None
    assert header_clip_id(header[:10]) is None


# -- deletion and crypto-shredding ---------------------------------------------------------


def wrapped_keys(vault: Vault) -> dict[str, bytes]:
    return {i: bytes(k) for i, k in db_rows(vault, "SELECT id, wrapped_key FROM clips")}


def test_delete_shreds_the_wrapped_key(vault: Vault, audit: RecordingAudit) -> None:
    clips = [record(vault, content(400, str(i)), T0 + timedelta(minutes=i)) for i in range(3)]
    keys = wrapped_keys(vault)
    victim = clips[1]
    seen: list[tuple[bool, bool]] = []

    def before(event: str, fields: dict[str, object]) -> None:
        if event == "clip_deleted":
            seen.append(
                (clip_path(vault, victim).exists(), bool(wrapped_keys(vault).get(victim.id)))
            )

    audit.before = before
    vault.delete_clip(victim.id, "owner")
    assert seen == [(True, True)]  # audited before anything was destroyed
    assert audit.named("clip_deleted") == [{"clip": victim.id, "reason": "owner"}]
    assert not clip_path(vault, victim).exists()
    with pytest.raises(ClipNotFoundError):
        vault.open_clip(victim.id)
    db_bytes = vault.db_path.read_bytes()
    wal = vault.db_path.with_name("vault.db-wal")
    wal_bytes = wal.read_bytes() if wal.exists() else b""
    assert keys[victim.id] not in db_bytes and keys[victim.id] not in wal_bytes
    # The same search finds the keys that were not shredded, so it would have found this one.
    for other in (clips[0], clips[2]):
        assert keys[other.id] in db_bytes + wal_bytes
    assert [c.id for c in vault.list_clips()] == [clips[0].id, clips[2].id]


def test_failed_audit_deletes_nothing(vault: Vault, audit: RecordingAudit) -> None:
    info = record(vault, content(300))
    audit.fail_on = "clip_deleted"
    with pytest.raises(AuditWriteError):
        vault.delete_clip(info.id, "owner")
    assert read_all(vault, info.id) == content(300)
    with pytest.raises(ValueError, match="reason"):
        vault.delete_clip(info.id, "boredom")


# -- retention and holds -------------------------------------------------------------------


def aged_clips(vault: Vault) -> list[ClipInfo]:
    """Clips ending 10, 8, 6 and 1 days before T0."""
    return [
        record(vault, content(600, str(d)), T0 - timedelta(days=d), seconds=60)
        for d in (10, 8, 6, 1)
    ]


def test_retention_by_age(vault: Vault, audit: RecordingAudit) -> None:
    clips = aged_clips(vault)
    keys = wrapped_keys(vault)
    report = vault.enforce_retention(T0)
    assert report.deleted == ((clips[0].id, "retention"), (clips[1].id, "retention"))
    assert report.held == ()
    assert [c.id for c in vault.list_clips()] == [clips[2].id, clips[3].id]
    assert report.stored_bytes == clips[2].stored_bytes + clips[3].stored_bytes
    assert [f["reason"] for f in audit.named("clip_deleted")] == ["retention", "retention"]
    wal = vault.db_path.with_name("vault.db-wal")
    raw = vault.db_path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert keys[clips[0].id] not in raw and keys[clips[1].id] not in raw
    assert keys[clips[2].id] in raw
    assert vault.enforce_retention(T0).deleted == ()


def test_retention_uses_the_clock_by_default(make_vault: Callable[..., Vault]) -> None:
    vault = make_vault(now=lambda: T0 + timedelta(days=30), retention=timedelta(days=7))
    info = record(vault, b"old")
    assert vault.enforce_retention().deleted == ((info.id, "retention"),)


def test_retention_boundary(vault: Vault) -> None:
    info = record(vault, b"edge", T0 - timedelta(days=7, seconds=10), seconds=10)
    assert info.end == T0 - timedelta(days=7)
    assert vault.enforce_retention(T0).deleted == ()  # ends exactly at the cutoff: kept
    assert vault.enforce_retention(T0 + timedelta(microseconds=1)).deleted == (
        (info.id, "retention"),
    )


def test_retention_by_size(make_vault: Callable[..., Vault], audit: RecordingAudit) -> None:
    vault = make_vault(retention=timedelta(days=365))
    clips = aged_clips(vault)
    per_clip = clips[0].stored_bytes
    vault_limited = make_vault(retention=timedelta(days=365), max_bytes=2 * per_clip)
    report = vault_limited.enforce_retention(T0)
    assert report.deleted == ((clips[0].id, "quota"), (clips[1].id, "quota"))
    assert report.stored_bytes == 2 * per_clip
    assert [c.id for c in vault.list_clips()] == [clips[2].id, clips[3].id]
    assert [f["reason"] for f in audit.named("clip_deleted")] == ["quota", "quota"]


def test_holds_protect_clips_from_age_and_size(
    make_vault: Callable[..., Vault], audit: RecordingAudit
) -> None:
    vault = make_vault(max_bytes=1)
    clips = aged_clips(vault)
    vault.hold("req-1", clips[0].start + timedelta(seconds=30), clips[0].start + timedelta(hours=1))
    report = vault.enforce_retention(T0)
    # Clip 0 is too old but held; 1 goes by age; 2 and 3 go by size; held 0 stays even so.
    assert report.held == (clips[0].id,)
    assert report.deleted == (
        (clips[1].id, "retention"),
        (clips[2].id, "quota"),
        (clips[3].id, "quota"),
    )
    assert [c.id for c in vault.list_clips()] == [clips[0].id]
    assert read_all(vault, clips[0].id) == content(600, "10")
    assert vault.release_hold("req-1") is True
    assert vault.release_hold("req-1") is False
    assert vault.enforce_retention(T0).deleted == ((clips[0].id, "retention"),)


def test_holds_replace_and_persist(make_vault: Callable[..., Vault]) -> None:
    vault = make_vault()
    vault.hold("req-1", T0, T0 + timedelta(hours=1))
    vault.hold("req-1", T0 - timedelta(hours=2), T0 - timedelta(hours=1))
    vault.hold("req-2", T0, T0)
    vault.close()
    again = make_vault()
    holds = again.holds()
    assert [(h.holder, h.start, h.end) for h in holds] == [
        ("req-1", T0 - timedelta(hours=2), T0 - timedelta(hours=1)),
        ("req-2", T0, T0),
    ]
    with pytest.raises(ValueError, match="before it starts"):
        again.hold("x", T0, T0 - timedelta(seconds=1))
    with pytest.raises(ValueError, match="holder"):
        again.hold("", T0, T0)


def test_a_hold_touching_a_clip_edge_keeps_it(vault: Vault) -> None:
    info = record(vault, b"x", T0 - timedelta(days=10), seconds=60)
    vault.hold("req", info.end, info.end + timedelta(minutes=5))
    assert vault.enforce_retention(T0).held == (info.id,)


def test_retention_skips_clips_being_written(vault: Vault) -> None:
    with vault.create_clip(T0 - timedelta(days=30), "video/x-msvideo") as writer:
        writer.write(b"still recording")
        assert vault.enforce_retention(T0).deleted == ()
        writer.finish(T0 - timedelta(days=29), 1)


def test_retention_stops_when_audit_fails(vault: Vault, audit: RecordingAudit) -> None:
    clips = aged_clips(vault)
    audit.fail_on = "clip_deleted"
    with pytest.raises(AuditWriteError):
        vault.enforce_retention(T0)
    assert [c.id for c in vault.list_clips()] == [c.id for c in clips]


# -- recovery of states a crash can leave (kill -9 runs are in test_vault_crash.py) ---------


def demote(vault: Vault, info: ClipInfo, *, rename: bool) -> None:
    """Put a published clip back in the state a crash just before publishing leaves."""
    with sqlite3.connect(vault.db_path) as db:
        db.execute(
            "UPDATE clips SET state = 'writing', end_us = NULL, size = 0, sha256 = NULL"
            " WHERE id = ?",
            (info.id,),
        )
    db.close()
    if rename:
        clip_path(vault, info).rename(vault.dir / f"{info.id}.part")


@pytest.mark.parametrize("rename", [True, False])
def test_recover_a_complete_clip_that_was_not_published(
    vault: Vault, audit: RecordingAudit, rename: bool
) -> None:
    data = content(4 * CS + 3)
    info = record(vault, data)
    demote(vault, info, rename=rename)
    report = vault.recover()
    (got,) = report.recovered
    assert (got.id, got.state, got.size, got.sha256) == (info.id, "final", len(data), info.sha256)
    assert vault.get_clip(info.id).state == "final"
    assert read_all(vault, info.id) == data
    (event,) = audit.named("clip_recovered")
    assert event["clip"] == info.id and event["bytes"] == len(data) and event["lost_bytes"] == 0
    assert vault.verify().ok
    assert vault.recover() == type(report)()


def test_recover_discards_a_row_without_file(vault: Vault, audit: RecordingAudit) -> None:
    info = record(vault, content(100))
    demote(vault, info, rename=False)
    clip_path(vault, info).unlink()
    report = vault.recover()
    assert report.discarded == ((info.id, "its file was never created"),)
    assert audit.named("clip_discarded") == [
        {"clip": info.id, "reason": "its file was never created"}
    ]
    assert vault.list_clips() == []


def test_recover_discards_a_file_where_nothing_authenticates(
    vault: Vault, audit: RecordingAudit
) -> None:
    info = record(vault, content(3 * CS))
    demote(vault, info, rename=True)
    os.truncate(vault.dir / f"{info.id}.part", chunk_offset(info, 0) + 10)
    report = vault.recover()
    assert report.discarded == (
        (info.id, f"no chunk authenticates ({chunk_offset(info, 0) + 10} bytes on disk)"),
    )
    assert vault.list_clips() == [] and [p.name for p in vault.dir.iterdir()] == [".lock"]


def test_recover_leaves_live_writers_alone(vault: Vault) -> None:
    writer = vault.create_clip(T0, "video/x-msvideo")
    writer.write(content(5 * CS))
    assert vault.recover() == type(vault.recover())()
    other_process_view = Vault(vault.root, MASTER, chunk_size=CS)
    try:
        assert other_process_view.recover().recovered == ()
    finally:
        other_process_view.close()
    info = writer.finish(T0 + timedelta(seconds=3), 30)
    assert read_all(vault, info.id) == content(5 * CS)


def test_recover_leaves_clips_whose_key_does_not_unwrap(
    vault: Vault, make_vault: Callable[..., Vault], audit: RecordingAudit
) -> None:
    info = record(vault, content(200))
    demote(vault, info, rename=True)
    stranger = make_vault(master_key=os.urandom(32))
    report = stranger.recover()
    assert [i for i, _ in report.unrecoverable] == [info.id]
    assert (vault.dir / f"{info.id}.part").exists()
    assert audit.named("clip_discarded") == []
    assert [c.id for c in vault.recover().recovered] == [info.id]  # the right key still works


def test_recover_stops_when_audit_fails(vault: Vault, audit: RecordingAudit) -> None:
    info = record(vault, content(200))
    demote(vault, info, rename=True)
    audit.fail_on = "clip_recovered"
    with pytest.raises(AuditWriteError):
        vault.recover()
    assert vault.get_clip(info.id).state == "writing"
    audit.fail_on = None
    assert [c.id for c in vault.recover().recovered] == [info.id]


def test_recover_removes_unindexed_files(vault: Vault) -> None:
    info = record(vault, content(100))
    stray = [vault.dir / "20260101T000000Z-deadbeef0000.clip", vault.dir / "x.part"]
    for p in stray:
        p.write_bytes(b"leftover")
    (vault.dir / "README").write_text("not ours")
    report = vault.recover()
    assert sorted(report.removed_files) == sorted(p.name for p in stray)
    assert sorted(p.name for p in vault.dir.iterdir()) == [".lock", f"{info.id}.clip", "README"]
