"""The encrypted clip vault: STREAM-encrypted files plus an SQLite index of wrapped keys.

Layout under ``root`` (the state directory in production)::

    vault/<id>.part   a clip being written (its row says 'writing')
    vault/<id>.clip   a published clip
    vault/.lock       serialises clip creation against crash recovery
    vault.db          SQLite (WAL, synchronous=FULL, secure_delete=ON): clips, holds

Every clip has a fresh random 32-byte key. It is stored only in ``vault.db``, wrapped with an
AEAD under a key derived from the storage master key, with the clip id as associated data, so
a wrapped key moved to another row does not open. Deleting a clip destroys that row first
(crypto-shredding: ``secure_delete`` zeroes the bytes and a WAL checkpoint drops old page
copies), then the file.

A clip file is a :mod:`agent.stream` stream whose header holds a magic, the cipher, the chunk
size and the clip id; the header is authenticated, so a file swapped in from another clip, or
with a changed cipher or chunk size, is named as such.

Disk space: the vault keeps a reserve of free space on its filesystem (10 % of it, at most
64 MiB, unless given) for the index, the audit log and ``status.json``. :meth:`Vault.create_clip`
refuses to start a clip while free space is below it, and :meth:`Vault.enforce_retention` deletes
the oldest unheld clips early (reason ``space``) until it is met again.

Crash safety: the row and wrapped key are committed as 'writing' before any ciphertext exists,
the writer holds an ``flock`` on its file for its whole life and fsyncs every ``sync_bytes``,
and publishing is rename + directory fsync + one UPDATE. :meth:`Vault.recover` (run by the
daemon at start) turns a dead writer's file into a final clip ending at its last authenticated
chunk, or discards it when nothing authenticates, and audits either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent import stream
from agent.audit import AuditSink
from agent.errors import ClipNotFoundError, HoldRefusedError, TamperError, VaultError
from agent.files import fsync_dir
from agent.keys import load_storage_key
from agent.lifecycle import Closing
from agent.paths import StatePaths
from agent.timeutil import format_size, rfc3339, utcnow

if TYPE_CHECKING:
    from agent.config import Config

log = logging.getLogger(__name__)

CLIP_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAGIC: Final = b"DBACLIP\x01"
DeleteReason = Literal["retention", "quota", "space", "owner"]
DELETE_REASONS: Final[tuple[str, ...]] = ("retention", "quota", "space", "owner")
MAX_THUMBNAIL_BYTES: Final = 1024 * 1024
DEFAULT_CHUNK_SIZE: Final = 64 * 1024
DEFAULT_SYNC_BYTES: Final = 1024 * 1024
SCHEMA_VERSION: Final = 2
RESERVE_FRACTION: Final = 0.10
RESERVE_MAX: Final = 64 * 1024 * 1024

_CIPHER_CODES: Final = {stream.AES_256_GCM: 1, stream.CHACHA20_POLY1305: 2}
_WRAP_INFO: Final = b"doorbell-agent vault v1 clip key wrap"
_THUMB_INFO: Final = b"doorbell-agent vault v1 thumbnail"
_WRAP_VERSION: Final = 1
_WRAPPED_SIZE: Final = 1 + stream.NONCE_SIZE + stream.KEY_SIZE + stream.TAG_SIZE
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_CPUINFO: Final = Path("/proc/cpuinfo")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS clips (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('writing', 'final')),
    start_us INTEGER NOT NULL,
    end_us INTEGER,
    size INTEGER NOT NULL DEFAULT 0,
    frames INTEGER NOT NULL DEFAULT 0,
    content_type TEXT NOT NULL,
    sha256 TEXT,
    cipher TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    wrapped_key BLOB NOT NULL,
    thumbnail BLOB,
    duration_us INTEGER,
    codec TEXT
);
CREATE INDEX IF NOT EXISTS clips_by_start ON clips (start_us);
CREATE VIEW IF NOT EXISTS clip_info AS
    SELECT id, state, start_us, end_us, size, frames, content_type, sha256, cipher, chunk_size,
           stored_bytes, thumbnail IS NOT NULL AS has_thumbnail, wrapped_key, duration_us, codec
    FROM clips;
CREATE TABLE IF NOT EXISTS holds (
    holder TEXT PRIMARY KEY,
    start_us INTEGER NOT NULL,
    end_us INTEGER NOT NULL
);
"""


def _to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    return (moment - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def held_cap(max_bytes: int, share: float) -> int:
    """The most stored bytes retention holds may keep: ``share`` of ``storage.max_bytes``."""
    return int(max_bytes * share)


def default_reserve(total_bytes: int) -> int:
    """Free space the vault leaves for the index, audit log and status on a filesystem of
    ``total_bytes``: 10 % of it, at most 64 MiB."""
    return min(int(total_bytes * RESERVE_FRACTION), RESERVE_MAX)


@dataclass(frozen=True)
class Space:
    """Free space on the vault's filesystem against the reserve it keeps."""

    free: int
    total: int
    reserve: int

    @property
    def low(self) -> bool:
        """Below the reserve: no new clip starts and retention deletes unheld clips early."""
        return self.free < self.reserve

    @property
    def state(self) -> Literal["ok", "full"]:
        """``full`` while below the reserve, else ``ok``."""
        return "full" if self.low else "ok"

    def describe(self) -> str:
        """What an owner reads in ``status``."""
        return f"{format_size(self.free)} free, reserve {format_size(self.reserve)}"


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=stream.KEY_SIZE, salt=None, info=info).derive(key)


def build_header(clip_id: str, cipher: str, chunk_size: int) -> bytes:
    """The clip file header: magic, cipher code, chunk size (u32 BE), id length, id."""
    raw = clip_id.encode("ascii")
    return (
        MAGIC
        + bytes([_CIPHER_CODES[cipher]])
        + chunk_size.to_bytes(4, "big")
        + bytes([len(raw)])
        + raw
    )


def header_clip_id(prefix: bytes) -> str | None:
    """The clip id a file's first bytes claim, or None if they are not a clip header.

    Unauthenticated: only used to word an error when a file's header fails authentication.
    """
    fixed = len(MAGIC) + 1 + 4
    if len(prefix) <= fixed or not prefix.startswith(MAGIC):
        return None
    raw = prefix[fixed + 1 : fixed + 1 + prefix[fixed]]
    if len(raw) != prefix[fixed]:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if CLIP_ID_RE.match(text) else None


@dataclass(frozen=True)
class ClipInfo:
    """The index entry of one clip."""

    id: str
    state: Literal["writing", "final"]
    start: datetime
    end: datetime
    """End of the footage; for a clip still being written, its start."""
    size: int
    """Plaintext bytes (0 until the clip is final)."""
    frames: int
    content_type: str
    sha256: str | None
    """Hex SHA-256 of the plaintext (None until final)."""
    cipher: str
    chunk_size: int
    stored_bytes: int
    """Ciphertext bytes on disk (0 until final)."""
    has_thumbnail: bool
    duration: float | None = None
    """Seconds from the first frame's presentation time to the end of the last frame (None
    for clips recorded before schema 2, and for recovered ones)."""
    codec: str | None = None
    """The stored video codec (FFmpeg's name: ``h264``, ``hevc``, ``mpeg4``, ``mjpeg``);
    None for clips recorded before schema 2 (all MJPEG)."""

    def to_json(self) -> dict[str, object]:
        """The clip as the CLI's JSON shows it (``bytes`` is the plaintext size)."""
        final = self.state == "final"
        return {
            "id": self.id,
            "state": self.state,
            "start": rfc3339(self.start),
            "end": rfc3339(self.end) if final else None,
            "bytes": self.size,
            "frames": self.frames,
            "content_type": self.content_type,
            "sha256": self.sha256,
            "cipher": self.cipher,
            "stored_bytes": self.stored_bytes,
            "thumbnail": self.has_thumbnail,
            "duration": self.duration,
            "codec": self.codec,
        }


@dataclass(frozen=True)
class Hold:
    """A time window whose clips retention must keep (e.g. covered by a pending request)."""

    holder: str
    start: datetime
    end: datetime

    def covers(self, clip: ClipInfo) -> bool:
        """Whether the clip touches the window (closed ends: keep rather than lose)."""
        return clip.start <= self.end and clip.end >= self.start


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Vault.recover` did with clips whose writer died."""

    recovered: tuple[ClipInfo, ...] = ()
    discarded: tuple[tuple[str, str], ...] = ()
    """(clip id, reason) of clips removed because nothing of them authenticates."""
    unrecoverable: tuple[tuple[str, str], ...] = ()
    """(clip id, reason) of clips left as they are (their key does not unwrap)."""
    removed_files: tuple[str, ...] = ()
    """Leftover files that had no index entry (an interrupted creation or deletion)."""


@dataclass(frozen=True)
class RetentionReport:
    """What :meth:`Vault.enforce_retention` deleted and kept."""

    deleted: tuple[tuple[str, str], ...]
    """(clip id, reason) with reason 'retention' (too old), 'quota' (over max_bytes) or 'space'
    (free space below the reserve)."""
    held: tuple[str, ...]
    """Clips retention would have deleted but a hold keeps."""
    stored_bytes: int
    """Ciphertext bytes of the final clips left."""


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :meth:`Vault.verify`."""

    checked: int
    bytes: int
    failures: tuple[tuple[str, str], ...]
    """(clip id, what is wrong) for every clip that does not verify."""
    skipped: tuple[str, ...]
    """Clips still being written."""

    @property
    def ok(self) -> bool:
        """True when every checked clip verified."""
        return not self.failures


class _FdSink:
    """Writes everything it is given to a file descriptor (raw writes may be short)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(data)


class ClipWriter(Closing):
    """Streams one clip into the vault. Use as a context manager: an exception aborts it.

    Not thread-safe: one recording thread writes a clip.
    """

    def __init__(
        self,
        vault: Vault,
        *,
        clip_id: str,
        start: datetime,
        content_type: str,
        key: bytes,
        cipher: str,
        chunk_size: int,
        fd: int,
        sync_bytes: int,
    ) -> None:
        self._vault = vault
        self._id = clip_id
        self._start = start
        self._content_type = content_type
        self._key = key
        self._cipher = cipher
        self._fd = fd
        self._sync_bytes = sync_bytes
        self._digest = hashlib.sha256()
        self._stream = stream.StreamWriter(
            _FdSink(fd),
            key,
            build_header(clip_id, cipher, chunk_size),
            cipher=cipher,
            chunk_size=chunk_size,
        )
        self._chunk_size = chunk_size
        self._synced = 0
        self._open = True
        self._failure: str | None = None

    @property
    def id(self) -> str:
        """The clip id."""
        return self._id

    @property
    def bytes_written(self) -> int:
        """Plaintext bytes accepted so far."""
        return self._stream.plaintext_bytes

    def _check_open(self) -> None:
        if not self._open:
            raise VaultError(f"clip {self._id} is already finished or aborted")
        if self._failure is not None:
            # A failed write may have left part of a chunk on disk: only abort() is safe now.
            raise VaultError(
                f"clip {self._id} cannot continue after a failed write: {self._failure}"
            )

    def _fail(self, exc: OSError) -> VaultError:
        self._failure = str(exc)
        return VaultError(f"clip {self._id}: writing failed: {exc}")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append plaintext; sealed chunks reach the disk (fsync'd every ``sync_bytes``).

        After a failed write (e.g. disk full) the clip can only be aborted.
        """
        self._check_open()
        try:
            self._stream.write(data)
            self._digest.update(data)
            if self._stream.ciphertext_bytes - self._synced >= self._sync_bytes:
                os.fsync(self._fd)
                self._synced = self._stream.ciphertext_bytes
        except OSError as exc:
            raise self._fail(exc) from exc

    def set_thumbnail(self, jpeg: bytes) -> None:
        """Store (or replace) the clip's thumbnail, encrypted with the clip's key."""
        self._check_open()
        self._vault._store_thumbnail(self._id, self._key, self._cipher, jpeg)

    def finish(
        self,
        end: datetime,
        frames: int,
        *,
        duration: float | None = None,
        codec: str | None = None,
    ) -> ClipInfo:
        """Seal the last chunk, make the file durable, audit and publish the clip; the index
        keeps ``frames``, ``duration`` (seconds) and ``codec`` (a live-written container cannot
        carry them, so export and playback take them from here)."""
        self._check_open()
        if end < self._start:
            raise ValueError(f"clip {self._id} cannot end ({end}) before it starts")
        if frames < 0:
            raise ValueError("frames must be >= 0")
        try:
            size = self._stream.finish()
            os.fsync(self._fd)
        except OSError as exc:
            raise self._fail(exc) from exc
        info = ClipInfo(
            id=self._id,
            state="final",
            start=self._start,
            end=end,
            size=size,
            frames=frames,
            content_type=self._content_type,
            sha256=self._digest.hexdigest(),
            cipher=self._cipher,
            chunk_size=self._chunk_size,
            stored_bytes=self._stream.ciphertext_bytes,
            has_thumbnail=False,
            duration=duration,
            codec=codec,
        )
        try:
            info = self._vault._publish(info)
        except BaseException:
            self.abort()
            raise
        self._release()
        return info

    def abort(self) -> None:
        """Throw the unfinished clip away: file and index entry. Idempotent."""
        if not self._open:
            return
        try:
            self._vault._drop_unpublished(self._id)
        finally:
            self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            os.close(self._fd)  # also releases the writer's flock

    def close(self) -> None:
        """Abort unless finished. Idempotent."""
        self.abort()


class ClipReader(Closing):
    """Streams a clip's authenticated plaintext; memory stays at about two chunks.

    Raises :class:`TamperError` naming the clip on any damage. With ``verify_sha256`` the
    plaintext is also hashed and checked against the index at the end.
    """

    def __init__(
        self,
        info: ClipInfo,
        reader: stream.StreamReader,
        closer: Callable[[], None],
        *,
        verify_sha256: bool,
    ) -> None:
        self.info = info
        self._reader = reader
        self._closer = closer
        self._digest = hashlib.sha256() if verify_sha256 else None
        self._ended = False

    def _account(self, data: bytes | memoryview) -> None:
        if self._digest is not None:
            self._digest.update(data)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        got = self._reader.plaintext_bytes
        if got != self.info.size:
            raise TamperError(
                f"clip {self.info.id} holds {got} bytes but the index records {self.info.size}: "
                "file or index tampered with"
            )
        if self._digest is not None and self._digest.hexdigest() != self.info.sha256:
            raise TamperError(
                f"clip {self.info.id} plaintext SHA-256 {self._digest.hexdigest()} does not match "
                f"the index ({self.info.sha256})"
            )

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` plaintext bytes (all remaining if negative); b"" at the end."""
        data = self._reader.read(n)
        self._account(data)
        if n < 0 or (not data and n != 0):
            self._end()
        return data

    def chunks(self) -> Iterator[memoryview]:
        """Yield the remaining plaintext chunk by chunk (each valid until the next)."""
        for chunk in self._reader.chunks():
            self._account(chunk)
            yield chunk
        self._end()

    def close(self) -> None:
        """Close the file. Idempotent."""
        self._closer()


class Vault(Closing):
    """Encrypted clip storage with an SQLite index; see the module docstring.

    ``root`` is the directory holding ``vault/`` and ``vault.db`` (the state directory).
    Safe to share between threads (one connection behind a lock) and processes (WAL, flock).
    """

    def __init__(
        self,
        root: Path,
        master_key: bytes,
        *,
        cipher: str = "auto",
        audit: AuditSink | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        retention: timedelta = timedelta(days=7),
        max_bytes: int | None = None,
        sync_bytes: int = DEFAULT_SYNC_BYTES,
        reserve_bytes: int | None = None,
        max_held_bytes: int | None = None,
        hold_limit: timedelta | None = None,
        now: Callable[[], datetime] = utcnow,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``reserve_bytes``: free space to keep (None: :func:`default_reserve`).
        ``max_held_bytes``: the most stored bytes holds may keep (None: no cap).
        ``hold_limit``: how long past its retention a hold may keep a clip (None: no limit).
        """
        if len(master_key) != stream.KEY_SIZE:
            raise ValueError(
                f"the storage master key is {stream.KEY_SIZE} bytes, got {len(master_key)}"
            )
        if not stream.MIN_CHUNK_SIZE <= chunk_size <= stream.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size {chunk_size} is out of range")
        cpuinfo = ""
        if cipher == "auto":
            with contextlib.suppress(OSError):
                cpuinfo = _CPUINFO.read_text(errors="replace")
        self.cipher = stream.resolve_cipher(cipher, cpuinfo)
        self.root = Path(root)
        self.dir = StatePaths(self.root).vault_dir
        self.db_path = StatePaths(self.root).vault_db
        self._wrapper = ChaCha20Poly1305(_hkdf(master_key, _WRAP_INFO))
        self._audit = audit
        self._chunk_size = chunk_size
        self._retention = retention
        self._max_bytes = max_bytes
        self._sync_bytes = sync_bytes
        self._reserve = reserve_bytes
        self._max_held = max_held_bytes
        self._hold_limit = hold_limit
        self._refused: set[Hold] = set()
        self.hold_sync: Callable[[], None] | None = None
        """Called at the start of every retention pass to bring the holds up to date (the
        approval coordinator sets it), so a request that arrived since its last tick is held
        before retention looks at its window."""
        self._now = now
        self._rng = rng
        self._lock = threading.RLock()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.db_path.exists():
            # Create it 0600 ourselves: SQLite gives -wal and -shm the database file's mode.
            os.close(os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise VaultError(f"cannot open the clip index {self.db_path}: {exc}") from exc
        try:
            self._init_schema(self._db)
        except BaseException:
            self._db.close()
            raise

    def _init_schema(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA secure_delete=ON")
            indexed = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'clips'").fetchone()
        except sqlite3.Error as exc:
            raise VaultError(f"cannot open the clip index {self.db_path}: {exc}") from exc
        if indexed is None:
            self._refuse_lost_index()
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if indexed is not None and version < 2:
                # Schema 2 adds duration and codec; the view is rebuilt to show them.
                db.executescript(
                    "ALTER TABLE clips ADD COLUMN duration_us INTEGER;"
                    "ALTER TABLE clips ADD COLUMN codec TEXT;"
                    "DROP VIEW IF EXISTS clip_info;"
                )
            db.executescript(_SCHEMA)
            if version <= SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise VaultError(f"cannot open the clip index {self.db_path}: {exc}") from exc
        if version > SCHEMA_VERSION:
            raise VaultError(
                f"{self.db_path} was written by a newer doorbell-agent (schema {version}, "
                f"this one knows {SCHEMA_VERSION})",
                hint="upgrade doorbell-agent",
            )

    def _refuse_lost_index(self) -> None:
        """A new (empty) index beside existing clip files means the index was lost: starting
        afresh would leave those clips undecryptable and recovery would delete them as leftovers.
        """
        leftovers = [p for p in self.dir.iterdir() if p.suffix in (".clip", ".part")]
        if leftovers:
            raise VaultError(
                f"the clip index {self.db_path} is missing or empty but {self.dir} holds "
                f"{len(leftovers)} clip file(s): the index was lost or damaged; refusing to "
                "start a new one (the clips' keys are only in the index)",
                hint="restore vault.db from a backup, or move the vault directory aside to "
                "start over with an empty vault",
            )

    @classmethod
    def from_config(cls, cfg: Config, *, audit: AuditSink | None = None) -> Vault:
        """The vault of a configured device: ``state_dir/vault`` and ``state_dir/vault.db``."""
        return cls(
            cfg.state_dir,
            load_storage_key(cfg.state_dir),
            cipher=cfg.storage.cipher,
            audit=audit,
            retention=cfg.storage.retention,
            max_bytes=cfg.storage.max_bytes,
            max_held_bytes=held_cap(cfg.storage.max_bytes, cfg.storage.max_held_share),
            hold_limit=cfg.approval.timeout,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise VaultError("the vault is closed")
        return self._db

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once so that checks and changes are atomic."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (disk full) can leave the transaction open.
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._index_error(exc) from exc

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn().execute(sql, params))
            except sqlite3.Error as exc:
                raise self._index_error(exc) from exc

    def _index_error(self, exc: sqlite3.Error) -> VaultError:
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            return VaultError(
                f"the clip index {self.db_path} cannot be written: {exc}",
                hint="the disk is full: free space in the state directory",
            )
        return VaultError(f"the clip index {self.db_path} failed: {exc}")

    @contextlib.contextmanager
    def _vault_lock(self) -> Iterator[None]:
        """Exclusive lock between clip creation and recovery, across processes."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and empty it, so shredded keys leave the WAL too."""
        busy, _, _ = self._query("PRAGMA wal_checkpoint(TRUNCATE)")[0]
        if busy:
            log.info("WAL checkpoint deferred: another connection is reading the clip index")

    def _audit_event(self, event: str, **fields: object) -> None:
        if self._audit is not None:
            self._audit.append(event, **fields)

    def _path(self, clip_id: str, state: str) -> Path:
        return self.dir / f"{clip_id}{'.clip' if state == 'final' else '.part'}"

    def _wrap(self, clip_id: str, key: bytes) -> bytes:
        nonce = self._rng(stream.NONCE_SIZE)
        aad = b"clip-key:" + clip_id.encode("ascii")
        return bytes([_WRAP_VERSION]) + nonce + self._wrapper.encrypt(nonce, key, aad)

    def _unwrap(self, clip_id: str, wrapped: bytes) -> bytes:
        if len(wrapped) != _WRAPPED_SIZE or wrapped[0] != _WRAP_VERSION:
            raise TamperError(f"clip {clip_id} key is malformed in the index: index tampered with")
        nonce = wrapped[1 : 1 + stream.NONCE_SIZE]
        aad = b"clip-key:" + clip_id.encode("ascii")
        try:
            return self._wrapper.decrypt(nonce, wrapped[1 + stream.NONCE_SIZE :], aad)
        except InvalidTag:
            raise TamperError(
                f"clip {clip_id} key failed authentication: wrong storage key, or the index "
                "was tampered with"
            ) from None

    @staticmethod
    def _info(row: tuple[Any, ...]) -> ClipInfo:
        (cid, state, start_us, end_us, size, frames, ctype, sha, cipher, chunk, stored, thumb) = (
            row[:12]
        )
        duration_us, codec = row[13:15]
        start = _from_us(start_us)
        return ClipInfo(
            id=cid,
            state="final" if state == "final" else "writing",
            start=start,
            end=start if end_us is None else _from_us(end_us),
            size=size,
            frames=frames,
            content_type=ctype,
            sha256=sha,
            cipher=cipher,
            chunk_size=chunk,
            stored_bytes=stored,
            has_thumbnail=bool(thumb),
            duration=None if duration_us is None else duration_us / 1e6,
            codec=codec,
        )

    def _row(self, clip_id: str) -> tuple[ClipInfo, bytes]:
        rows = self._query("SELECT * FROM clip_info WHERE id = ?", (clip_id,))
        if not rows:
            raise ClipNotFoundError(f"no clip {clip_id!r} in the vault", hint="see `clips list`")
        return self._info(rows[0]), bytes(rows[0][12])

    def _exists(self, clip_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM clips WHERE id = ?", (clip_id,)))

    # -- writing ----------------------------------------------------------------------------

    def new_clip_id(self, start: datetime) -> str:
        """A fresh id: the start as UTC ``YYYYmmddTHHMMSSZ`` plus a random suffix."""
        return f"{start.astimezone(UTC):%Y%m%dT%H%M%SZ}-{self._rng(6).hex()}"

    def space(self) -> Space:
        """Free space on the vault's filesystem and the reserve kept (see the module doc)."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        reserve = default_reserve(total) if self._reserve is None else self._reserve
        return Space(free=st.f_bavail * st.f_frsize, total=total, reserve=reserve)

    def create_clip(self, start: datetime, content_type: str) -> ClipWriter:
        """Start a clip: its row and wrapped key are committed before any ciphertext.

        Raises VaultError while free space is below the reserve (see :meth:`space`).
        """
        start_us = _to_us(start)
        if not content_type or len(content_type) > 255:
            raise ValueError("content_type must be 1-255 characters")
        space = self.space()
        if space.low:
            raise VaultError(
                f"storage full ({space.describe()}): no new clip until space is freed",
                hint="delete clips, release holds or free space in the state directory",
            )
        clip_id = self.new_clip_id(start)
        key = self._rng(stream.KEY_SIZE)
        with self._vault_lock():
            path = self._path(clip_id, "writing")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise VaultError(f"cannot create {path}: {exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO clips (id, state, start_us, content_type, cipher, chunk_size,"
                        " wrapped_key) VALUES (?, 'writing', ?, ?, ?, ?, ?)",
                        (
                            clip_id,
                            start_us,
                            content_type,
                            self.cipher,
                            self._chunk_size,
                            self._wrap(clip_id, key),
                        ),
                    )
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            try:
                return ClipWriter(
                    self,
                    clip_id=clip_id,
                    start=start.astimezone(UTC),
                    content_type=content_type,
                    key=key,
                    cipher=self.cipher,
                    chunk_size=self._chunk_size,
                    fd=fd,
                    sync_bytes=self._sync_bytes,
                )
            except BaseException:
                try:
                    self._drop_unpublished(clip_id)
                finally:
                    os.close(fd)
                raise

    def _publish(self, info: ClipInfo) -> ClipInfo:
        """Audit, rename into place, then flip the row to 'final' (the commit publishes)."""
        self._audit_event(
            "clip_recorded",
            clip=info.id,
            start=rfc3339(info.start),
            end=rfc3339(info.end),
            bytes=info.size,
            sha256=info.sha256,
        )
        part, final = self._path(info.id, "writing"), self._path(info.id, "final")
        try:
            os.rename(part, final)
            fsync_dir(self.dir)
        except OSError as exc:
            raise VaultError(f"clip {info.id}: cannot publish: {exc}") from exc
        with self._tx() as db:
            cur = db.execute(
                "UPDATE clips SET state = 'final', end_us = ?, size = ?, frames = ?, sha256 = ?,"
                " stored_bytes = ?, duration_us = ?, codec = ? WHERE id = ? AND state = 'writing'",
                (
                    _to_us(info.end), info.size, info.frames, info.sha256, info.stored_bytes,
                    None if info.duration is None else round(info.duration * 1e6), info.codec,
                    info.id,
                ),
            )
            if cur.rowcount != 1:
                raise VaultError(f"clip {info.id} vanished from the index while being written")
            thumb = db.execute("SELECT thumbnail IS NOT NULL FROM clips WHERE id = ?", (info.id,))
            has_thumb = bool(thumb.fetchone()[0])
        return dataclasses.replace(info, has_thumbnail=has_thumb)

    def _drop_unpublished(self, clip_id: str) -> None:
        # The file goes first: on a full disk its space is what lets the index change commit
        # (a 'writing' row left without a file is discarded by recovery).
        for state in ("writing", "final"):
            self._path(clip_id, state).unlink(missing_ok=True)
        with self._tx() as db:
            db.execute("DELETE FROM clips WHERE id = ? AND state = 'writing'", (clip_id,))
        self._checkpoint()

    def _store_thumbnail(self, clip_id: str, key: bytes, cipher: str, jpeg: bytes) -> None:
        if not jpeg or len(jpeg) > MAX_THUMBNAIL_BYTES:
            raise ValueError(f"a thumbnail is 1..{MAX_THUMBNAIL_BYTES} bytes")
        nonce = self._rng(stream.NONCE_SIZE)
        aead = stream.new_aead(cipher, _hkdf(key, _THUMB_INFO))
        blob = nonce + aead.encrypt(nonce, jpeg, b"thumbnail:" + clip_id.encode("ascii"))
        with self._tx() as db:
            db.execute("UPDATE clips SET thumbnail = ? WHERE id = ?", (blob, clip_id))

    # -- reading ----------------------------------------------------------------------------

    def get_clip(self, clip_id: str) -> ClipInfo:
        """The index entry of one clip; ClipNotFoundError if there is none."""
        return self._row(clip_id)[0]

    def list_clips(self) -> list[ClipInfo]:
        """Every clip, oldest first, including ones still being written."""
        rows = self._query("SELECT * FROM clip_info ORDER BY start_us, id")
        return [self._info(r) for r in rows]

    def clips_overlapping(self, start: datetime, end: datetime) -> list[ClipInfo]:
        """Final clips with footage inside ``[start, end)``, oldest first."""
        rows = self._query(
            "SELECT * FROM clip_info WHERE state = 'final' AND start_us < ?"
            " AND (end_us > ? OR (end_us = start_us AND start_us >= ?)) ORDER BY start_us, id",
            (_to_us(end), _to_us(start), _to_us(start)),
        )
        return [self._info(r) for r in rows]

    def open_clip(self, clip_id: str, *, verify_sha256: bool = False) -> ClipReader:
        """A streaming reader of a final clip's plaintext (a context manager)."""
        info, wrapped = self._row(clip_id)
        if info.state != "final":
            raise VaultError(f"clip {clip_id} is still being written")
        key = self._unwrap(clip_id, wrapped)
        path = self._path(clip_id, "final")
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise TamperError(f"clip {clip_id} file {path.name} is missing") from None
        except OSError as exc:
            raise VaultError(f"clip {clip_id}: cannot open {path}: {exc}") from exc
        try:
            header = build_header(clip_id, info.cipher, info.chunk_size)
            label = f"clip {clip_id}"
            self._check_file(f, header, info, label, self._exists)
            reader = stream.StreamReader(
                f, key, header, cipher=info.cipher, chunk_size=info.chunk_size, label=label
            )
        except BaseException:
            f.close()
            raise
        return ClipReader(info, reader, f.close, verify_sha256=verify_sha256)

    @staticmethod
    def _check_file(
        f: BinaryIO, header: bytes, info: ClipInfo, label: str, known: Callable[[str], bool]
    ) -> None:
        """Name a swapped file or a wrong size before the stream reader authenticates.

        A header naming another indexed clip is called a swap; any other damage to it is left
        to the header's authentication tag.
        """
        prefix = f.read(len(header))
        f.seek(0)
        claimed = header_clip_id(prefix)
        if claimed is not None and claimed != info.id and known(claimed):
            raise TamperError(
                f"{label} file holds clip {claimed}: a file was swapped in from another clip"
            )
        expected = stream.ciphertext_size(header, info.size, info.chunk_size)
        actual = os.fstat(f.fileno()).st_size
        if actual < expected:
            raise TamperError(f"{label} is truncated: {actual} of {expected} bytes on disk")
        if actual > expected:
            raise TamperError(
                f"{label} has {actual - expected} bytes more than recorded: file corrupted or "
                "tampered with"
            )

    def read_thumbnail(self, clip_id: str) -> bytes | None:
        """The clip's decrypted thumbnail (JPEG), or None if it has none."""
        rows = self._query(
            "SELECT wrapped_key, thumbnail, cipher FROM clips WHERE id = ?", (clip_id,)
        )
        if not rows:
            raise ClipNotFoundError(f"no clip {clip_id!r} in the vault", hint="see `clips list`")
        wrapped, blob, cipher = rows[0]
        if blob is None:
            return None
        aead = stream.new_aead(cipher, _hkdf(self._unwrap(clip_id, bytes(wrapped)), _THUMB_INFO))
        try:
            return aead.decrypt(
                blob[: stream.NONCE_SIZE],
                blob[stream.NONCE_SIZE :],
                b"thumbnail:" + clip_id.encode("ascii"),
            )
        except InvalidTag:
            raise TamperError(
                f"clip {clip_id} thumbnail failed authentication: index corrupted or tampered with"
            ) from None

    def verify(self, clip_id: str | None = None) -> VerifyReport:
        """Decrypt and authenticate one clip or all, checking sizes, SHA-256 and thumbnails."""
        infos = [self.get_clip(clip_id)] if clip_id is not None else self.list_clips()
        failures: list[tuple[str, str]] = []
        skipped: list[str] = []
        total = 0
        checked = 0
        for info in infos:
            if info.state != "final":
                skipped.append(info.id)
                continue
            checked += 1
            try:
                with self.open_clip(info.id, verify_sha256=True) as reader:
                    for _chunk in reader.chunks():
                        pass
                self.read_thumbnail(info.id)
            except ClipNotFoundError:
                checked -= 1  # deleted by retention meanwhile: nothing to verify
                continue
            except VaultError as exc:
                failures.append((info.id, exc.message))
                continue
            total += info.size
        return VerifyReport(checked, total, tuple(failures), tuple(skipped))

    # -- deleting ---------------------------------------------------------------------------

    def delete_clip(self, clip_id: str, reason: str) -> None:
        """Audit ``clip_deleted``, shred the wrapped key, then remove the file.

        If the audit entry cannot be written, nothing is deleted.
        """
        if reason not in DELETE_REASONS:
            raise ValueError(f"reason must be one of {', '.join(DELETE_REASONS)}")
        with self._tx() as db:
            row = db.execute("SELECT state FROM clips WHERE id = ?", (clip_id,)).fetchone()
            if row is None:
                raise ClipNotFoundError(
                    f"no clip {clip_id!r} in the vault", hint="see `clips list`"
                )
            if row[0] != "final":
                raise VaultError(f"clip {clip_id} is still being written; it cannot be deleted")
            # Inside the write transaction so two deleters cannot both audit one deletion.
            self._audit_event("clip_deleted", clip=clip_id, reason=reason)
            db.execute("DELETE FROM clips WHERE id = ?", (clip_id,))
        self._checkpoint()
        self._path(clip_id, "final").unlink(missing_ok=True)
        fsync_dir(self.dir)

    # -- holds and retention ----------------------------------------------------------------

    def held_bytes(self, holds: list[Hold] | None = None) -> int:
        """Stored bytes of the final clips that ``holds`` (default: every hold in force) cover,
        each clip counted once however many holds cover it."""
        holds = self.holds() if holds is None else holds
        return sum(
            c.stored_bytes
            for c in self.list_clips()
            if c.state == "final" and any(h.covers(c) for h in holds)
        )

    def hold(self, holder: str, start: datetime, end: datetime) -> None:
        """Keep every clip touching ``[start, end]`` from retention until released.

        One window per holder; holding again replaces it (holding the same window again
        changes nothing). Holds survive restarts. Raises HoldRefusedError (nothing held)
        when the clips all holds would then cover exceed ``max_held_bytes``. Placing a hold is
        audited ``hold_placed`` (with the bytes it covers), a refusal ``hold_refused``.
        """
        if not holder:
            raise ValueError("holder must be a non-empty string")
        if end < start:
            raise ValueError("a hold cannot end before it starts")
        wanted = Hold(holder, start, end)
        with self._tx() as db:
            others = [h for h in self.holds() if h.holder != holder]
            if any(h == wanted for h in self.holds()):
                return
            covered = self.held_bytes([*others, wanted])
            window = {"start": rfc3339(start), "end": rfc3339(end)}
            if self._max_held is not None and covered > self._max_held:
                if wanted not in self._refused:
                    # Once per window: the coordinator asks again every second.
                    self._audit_event(
                        "hold_refused", holder=holder, window=window, held_bytes=covered,
                        max_held_bytes=self._max_held,
                    )
                    self._refused.add(wanted)
                raise HoldRefusedError(
                    f"holding the footage of {holder} would keep {format_size(covered)} from "
                    f"retention, over the cap of {format_size(self._max_held)}",
                    hint="decide on the pending requests (held footage is released when they "
                    "end) or raise storage.max_held_share",
                )
            # Audited inside the transaction: no hold without its entry.
            self._audit_event("hold_placed", holder=holder, window=window, held_bytes=covered)
            self._refused.discard(wanted)
            db.execute(
                "INSERT INTO holds (holder, start_us, end_us) VALUES (?, ?, ?) ON CONFLICT"
                " (holder) DO UPDATE SET start_us = excluded.start_us, end_us = excluded.end_us",
                (holder, _to_us(start), _to_us(end)),
            )

    def release_hold(self, holder: str, reason: str = "ended") -> bool:
        """Drop ``holder``'s hold (audited ``hold_released`` with ``reason``); says whether
        there was one."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM holds WHERE holder = ?", (holder,)).fetchone() is None:
                return False
            self._audit_event("hold_released", holder=holder, reason=reason)
            db.execute("DELETE FROM holds WHERE holder = ?", (holder,))
            return True

    def holds(self) -> list[Hold]:
        """Every hold in force, in the order they were placed."""
        rows = self._query("SELECT holder, start_us, end_us FROM holds ORDER BY rowid")
        return [Hold(h, _from_us(s), _from_us(e)) for h, s, e in rows]

    def _trim_holds(self) -> None:
        """Release the most recently placed holds while held bytes exceed the cap (a clip being
        written when its window was held may have grown since). Their holders find themselves
        unheld at the next :attr:`hold_sync` and are told."""
        if self._max_held is None:
            return
        holds = self.holds()
        while holds and self.held_bytes(holds) > self._max_held:
            last = holds.pop()
            log.warning(
                "held footage is over the cap of %s: releasing the hold of %s",
                format_size(self._max_held), last.holder,
            )
            self.release_hold(last.holder, reason="cap")

    def enforce_retention(self, now: datetime | None = None) -> RetentionReport:
        """Shred clips that ended before ``now - retention``, then the oldest beyond max_bytes,
        then the oldest while free space is below the reserve (reason ``space``).

        First :attr:`hold_sync` (if set) brings the holds up to date and holds over the cap
        are released. Held clips and clips being written are never deleted, except that a
        hold keeps a clip at most ``hold_limit`` past its retention. Quota and space deletions
        take the oldest unheld clips first.
        """
        if self.hold_sync is not None:
            try:
                self.hold_sync()
            except Exception:
                # Retention must go on (the disk fills otherwise); the holds stay as they were.
                log.exception("updating the holds before retention failed")
        self._trim_holds()
        now = now or self._now()
        cutoff = now - self._retention
        hard_cutoff = cutoff - self._hold_limit if self._hold_limit is not None else None
        holds = self.holds()
        clips = [c for c in self.list_clips() if c.state == "final"]
        deleted: list[tuple[str, str]] = []
        held: list[str] = []
        kept: list[ClipInfo] = []
        for clip in clips:
            is_held = any(h.covers(clip) for h in holds)
            if clip.end < cutoff and is_held and hard_cutoff is not None and clip.end < hard_cutoff:
                log.warning(
                    "clip %s is held but past retention plus approval.timeout: shredding it",
                    clip.id,
                )
                is_held = False
            if clip.end < cutoff and not is_held:
                self._delete_for_retention(clip.id, "retention", deleted)
            else:
                if clip.end < cutoff:
                    held.append(clip.id)
                kept.append(clip)
        total = sum(c.stored_bytes for c in kept)
        if self._max_bytes is not None:
            # Oldest first (kept is in start order), skipping held clips.
            for clip in kept:
                if total <= self._max_bytes:
                    break
                if any(h.covers(clip) for h in holds):
                    if clip.id not in held:
                        held.append(clip.id)
                    continue
                if self._delete_for_retention(clip.id, "quota", deleted):
                    total -= clip.stored_bytes
        gone = {cid for cid, _ in deleted}
        for clip in kept:
            if not self.space().low:
                break
            if clip.id in gone:
                continue
            if any(h.covers(clip) for h in holds):
                if clip.id not in held:
                    held.append(clip.id)
                continue
            if self._delete_for_retention(clip.id, "space", deleted):
                total -= clip.stored_bytes
        return RetentionReport(tuple(deleted), tuple(held), total)

    def _delete_for_retention(
        self, clip_id: str, reason: str, deleted: list[tuple[str, str]]
    ) -> bool:
        try:
            self.delete_clip(clip_id, reason)
        except ClipNotFoundError:
            return False  # deleted by someone else meanwhile
        deleted.append((clip_id, reason))
        return True

    # -- crash recovery ---------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Finish or discard clips whose writer died, and remove unindexed leftovers.

        A clip whose writer still holds its lock (in this or another process) is left alone.
        Audits ``clip_recovered`` or ``clip_discarded`` before acting.
        """
        recovered: list[ClipInfo] = []
        discarded: list[tuple[str, str]] = []
        unrecoverable: list[tuple[str, str]] = []
        with self._vault_lock():
            writing = self._query("SELECT id FROM clips WHERE state = 'writing'")
            for (cid,) in writing:
                outcome = self._recover_one(str(cid))
                if isinstance(outcome, ClipInfo):
                    recovered.append(outcome)
                elif outcome is not None:
                    kind, clip_id, reason = outcome
                    (discarded if kind == "discarded" else unrecoverable).append((clip_id, reason))
            removed = self._remove_orphans()
        if recovered or discarded or removed:
            self._checkpoint()
        return RecoveryReport(tuple(recovered), tuple(discarded), tuple(unrecoverable), removed)

    def _recover_one(self, clip_id: str) -> ClipInfo | tuple[str, str, str] | None:
        fd = -1
        for state in ("writing", "final"):  # .part first: a live writer may be renaming it
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self._path(clip_id, state), os.O_RDWR | os.O_CLOEXEC)
                break
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None  # a live writer owns it
            try:
                info, wrapped = self._row(clip_id)
            except ClipNotFoundError:
                return None
            if info.state != "writing":
                return None  # its writer finished between our query and our lock
            if fd < 0:
                return self._discard(clip_id, "its file was never created")
            try:
                key = self._unwrap(clip_id, wrapped)
            except TamperError as exc:
                return ("unrecoverable", clip_id, exc.message)
            return self._reseal(info, key, fd)
        finally:
            if fd >= 0:
                os.close(fd)

    def _discard(self, clip_id: str, reason: str) -> tuple[str, str, str]:
        self._audit_event("clip_discarded", clip=clip_id, reason=reason)
        with self._tx() as db:
            db.execute("DELETE FROM clips WHERE id = ? AND state = 'writing'", (clip_id,))
        for state in ("writing", "final"):
            self._path(clip_id, state).unlink(missing_ok=True)
        fsync_dir(self.dir)
        log.warning("clip %s discarded at recovery: %s", clip_id, reason)
        return ("discarded", clip_id, reason)

    def _reseal(self, info: ClipInfo, key: bytes, fd: int) -> ClipInfo | tuple[str, str, str]:
        header = build_header(info.id, info.cipher, info.chunk_size)
        with os.fdopen(os.dup(fd), "r+b") as f:
            scan = stream.scan_stream(
                f, key, header, cipher=info.cipher, chunk_size=info.chunk_size
            )
            if not scan.header_ok or scan.chunks == 0:
                what = "no chunk authenticates" if scan.header_ok else "no header authenticates"
                return self._discard(info.id, f"{what} ({scan.file_size} bytes on disk)")
            # The last write is the best evidence of when the footage ended.
            end = max(info.start, datetime.fromtimestamp(os.fstat(fd).st_mtime, UTC))
            recovered = dataclasses.replace(
                info,
                state="final",
                end=end,
                size=scan.plaintext_bytes,
                sha256=scan.sha256,
                stored_bytes=scan.end_offset,
            )
            self._audit_event(
                "clip_recovered",
                clip=info.id,
                start=rfc3339(info.start),
                end=rfc3339(end),
                bytes=scan.plaintext_bytes,
                sha256=scan.sha256,
                chunks=scan.chunks,
                lost_bytes=scan.file_size - scan.end_offset,
            )
            stream.seal_recovered(f, key, header, scan, cipher=info.cipher)
            os.fsync(f.fileno())
        part = self._path(info.id, "writing")
        if part.exists():
            os.replace(part, self._path(info.id, "final"))
        fsync_dir(self.dir)
        with self._tx() as db:
            db.execute(
                "UPDATE clips SET state = 'final', end_us = ?, size = ?, frames = 0, sha256 = ?,"
                " stored_bytes = ? WHERE id = ? AND state = 'writing'",
                (_to_us(end), scan.plaintext_bytes, scan.sha256, scan.end_offset, info.id),
            )
        log.warning(
            "clip %s recovered after a crash: %d bytes in %d chunks kept, %d bytes dropped",
            info.id,
            scan.plaintext_bytes,
            scan.chunks,
            scan.file_size - scan.end_offset,
        )
        return recovered

    def _remove_orphans(self) -> tuple[str, ...]:
        indexed = {str(r[0]) for r in self._query("SELECT id FROM clips")}
        removed: list[str] = []
        for path in sorted(self.dir.iterdir()):
            if path.suffix not in (".part", ".clip") or path.stem in indexed:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
            removed.append(path.name)
            log.warning(
                "removed %s: it has no index entry (interrupted creation or deletion)", path
            )
        if removed:
            fsync_dir(self.dir)
        return tuple(removed)

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint and close the index. Idempotent."""
        with self._lock:
            if self._db is None:
                return
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None
