"""The tamper-evident audit logs (contract §7).

Two logs share this format, each its own chain: ``audit.jsonl``, the request log (the public
audit head covers it alone), and ``activity.jsonl``, the camera and owner log, for which the
request log records a ``checkpoint`` every ``audit.head_interval`` (:class:`Checkpointer`). A log
holds one canonical JSON object per line. Every entry carries ``seq`` (from 1),
``ts``, ``event``, its event fields, ``prev`` (hex SHA-256 of the previous line's exact bytes
without the newline, 64 zeros for the first) and ``sig``: the base64url (unpadded) Ed25519
signature by the device key over the entry's canonical JSON without ``sig``. Canonical JSON is
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8;
each line is written in that same form, so ``prev`` and a verifier's re-serialisation agree. Anyone
with a copy of the file and the device's public key can check the chain with a SHA-256 and an
Ed25519 implementation; :func:`verify_lines` is this program's version of that check.

The chain logic (:func:`make_entry`, :func:`verify_lines`, :func:`build_head_jws`,
:func:`parse_head_jws`) is pure. :class:`AuditLog` is the file adapter: it appends under an
exclusive ``flock`` on ``audit.lock`` beside the log, so the daemon and CLI commands can append
at the same time, and it returns only once the entry is fsync'd.

Torn tails. Each entry is written as ``line + "\\n"`` with one ``write`` to an ``O_APPEND``
descriptor while holding the lock; a failed or short write is rolled back by truncating to the
size before the write. Only a crash (power loss) in the middle of a write can therefore leave a
final line without its newline. The next append, holding the lock (so no writer is active),
inspects that unterminated tail:

* if it is a complete entry that follows the chain and carries a valid signature, only the
  newline was lost: the newline is added and the entry kept (a complete entry is never dropped);
* otherwise it is an incomplete write that was never acknowledged to anyone (``append`` had not
  returned, so the action it describes did not happen). Its bytes are saved, fsync'd, to
  ``audit.jsonl.torn-<timestamp>`` beside the log, the log is truncated to its last complete
  line, and an ``audit_repaired`` entry (``torn_bytes``, ``torn_sha256``, ``saved_as``) is
  appended first, so the repair itself is on the signed record.

An unreadable last *complete* line is not a crash artefact but damage or tampering; appends then
fail with :class:`AuditWriteError` (fail closed) until a human has looked at it.

Readers (:func:`iter_log_lines`, so ``audit verify`` and ``audit show``) take the same lock in
shared mode only to measure the file, then read that much: they never see half of a line being
written and never hold the daemon up. ``ts`` is not required to increase (a Raspberry Pi without
a clock battery can step its clock back at boot); order is what ``seq`` and ``prev`` prove.
Numbers in fields are best kept to integers: floats are written as Python's shortest ``repr``,
which an independent verifier in another language must reproduce to recompute the signed bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import AuditError, AuditWriteError
from agent.files import fsync_dir, replace_file, write_all
from agent.keys import b64url, b64url_decode, kid_for, sign_jws
from agent.lifecycle import Closing
from agent.paths import StatePaths
from agent.timeutil import from_epoch, parse_rfc3339, rfc3339, to_epoch, utcnow

log = logging.getLogger(__name__)

GENESIS_PREV = "0" * 64
"""``prev`` of the first entry."""

HEAD_TYP = "doorbell-audit-head+jwt"
"""``typ`` header of the signed audit head published on ``P/D/audit/head``."""

RESERVED_KEYS = frozenset({"seq", "ts", "event", "prev", "sig"})
"""Entry keys the log sets itself; they cannot be passed as event fields."""

REPAIRED_EVENT = "audit_repaired"
"""Event recorded when a torn (incomplete) last line from a crash was moved aside."""


INITIALIZED_EVENT = "device_initialized"
"""Entry 1 of a revision-2 request log: the device ``kid`` and ``public_jwk``."""
CHECKPOINT_EVENT = "checkpoint"
"""A request-log entry vouching for the activity log's newest ``activity_seq`` and
``activity_hash``."""
DISCONTINUITY_EVENT = "audit_discontinuity"
"""A request-log entry recording that the log no longer held the head it had published."""

_EVENT_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_SIG_RE = re.compile(r"^[A-Za-z0-9_-]{86}$")  # 64 bytes, base64url without padding
_TAIL_BLOCK = 8192


# --------------------------------------------------------------------------- pure helpers


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding: keys sorted, no spaces, UTF-8, non-ASCII kept, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def line_hash(line: bytes) -> str:
    """Hex SHA-256 of a log line's exact bytes (without its trailing newline)."""
    return hashlib.sha256(line).hexdigest()


def to_jsonable(value: object, *, where: str = "value") -> Any:
    """Convert an event field value to plain JSON types.

    Aware datetimes become RFC 3339 UTC strings; tuples become lists. Raises TypeError for any
    other type (and for non-string mapping keys or naive datetimes) and ValueError for NaN or
    infinite floats, naming ``where`` the value sits.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {where} is {value!r}; JSON has no NaN or infinity")
        return float(value)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise TypeError(f"audit field {where} is a naive datetime; pass an aware UTC one")
        return rfc3339(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"audit field {where} has a non-string key {key!r}")
            out[key] = to_jsonable(item, where=f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [to_jsonable(item, where=f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"audit field {where} has type {type(value).__name__}; only JSON types "
        "(str, int, float, bool, None, list, dict) and aware datetimes are allowed"
    )


def _check_event(event: str) -> None:
    if not isinstance(event, str) or not _EVENT_RE.match(event):
        raise ValueError(
            f"audit event name {event!r} is invalid; "
            "use 1-64 chars of [a-z0-9_] starting with a letter"
        )


def _prepare_fields(fields: Mapping[str, object]) -> dict[str, Any]:
    reserved = sorted(RESERVED_KEYS.intersection(fields))
    if reserved:
        raise ValueError(
            f"audit field name(s) {', '.join(reserved)} are reserved for the log itself"
        )
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"audit field names must be non-empty strings, not {key!r}")
        out[key] = to_jsonable(value, where=key)
    return out


def make_entry(  # noqa: PLR0917 - positional signature shared with the other helpers
    prev_line: bytes | None,
    seq: int,
    event: str,
    fields: Mapping[str, object],
    key: Ed25519PrivateKey,
    now: datetime,
    *,
    allow_gap: bool = False,
) -> bytes:
    """Build and sign the canonical line (without newline) of entry ``seq``.

    ``prev_line`` is the previous entry's exact line, or None for the first entry (``seq`` 1).
    ``allow_gap`` (an ``audit_discontinuity`` only) lets ``seq`` skip past the previous entry's.
    Raises ValueError for a bad seq/event/reserved field name or a naive ``now``, and TypeError
    for field values that are not JSON-able.
    """
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"audit seq must be an integer >= 1, not {seq!r}")
    if allow_gap and event != DISCONTINUITY_EVENT:
        raise ValueError(f"only {DISCONTINUITY_EVENT} entries may skip seq numbers")
    if not allow_gap and (seq == 1) != (prev_line is None):
        raise ValueError("entry 1 has no previous line and every later entry needs one")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("audit timestamps need an aware datetime")
    _check_event(event)
    body = _prepare_fields(fields)
    body.update(
        seq=seq,
        ts=rfc3339(now),
        event=event,
        prev=GENESIS_PREV if prev_line is None else line_hash(prev_line),
    )
    body["sig"] = b64url(key.sign(canonical_json(body)))
    return canonical_json(body)


@dataclass(frozen=True)
class AuditEntry:
    """One parsed entry: the reserved keys, the event fields and the exact line."""

    seq: int
    ts: str
    event: str
    fields: dict[str, Any]
    prev: str
    sig: str
    line: bytes

    @property
    def hash(self) -> str:
        """Hex SHA-256 of this entry's line: the next entry's ``prev``, the head's ``hash``."""
        return line_hash(self.line)

    @property
    def timestamp(self) -> datetime:
        """``ts`` as an aware UTC datetime."""
        return parse_rfc3339(self.ts)

    def to_dict(self) -> dict[str, Any]:
        """The entry as the JSON object stored on its line."""
        obj: dict[str, Any] = json.loads(self.line)
        return obj


def parse_entry(line: bytes) -> AuditEntry:
    """Parse a line into an :class:`AuditEntry` WITHOUT checking chain or signature.

    Raises ValueError naming what is wrong with the line's shape.
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ValueError("line is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    seq, ts, event, prev, sig = (obj.get(k) for k in ("seq", "ts", "event", "prev", "sig"))
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError("entry has no integer seq")
    if not isinstance(ts, str):
        raise ValueError("entry has no ts")
    try:
        parse_rfc3339(ts)
    except ValueError as exc:
        raise ValueError("entry ts is not an RFC 3339 timestamp") from exc
    if not isinstance(event, str) or not _EVENT_RE.match(event):
        raise ValueError("entry has no valid event name")
    if not isinstance(prev, str) or not _HEX64_RE.match(prev):
        raise ValueError("entry prev is not a 64-digit lowercase hex SHA-256")
    if not isinstance(sig, str):
        raise ValueError("entry has no sig")
    fields = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    return AuditEntry(seq=seq, ts=ts, event=event, fields=fields, prev=prev, sig=sig, line=line)


def _signature_ok(entry: AuditEntry, public_key: Ed25519PublicKey) -> bool:
    if not _SIG_RE.match(entry.sig):
        return False
    raw = b64url_decode(entry.sig)  # cannot fail: _SIG_RE admits only base64url characters
    if b64url(raw) != entry.sig:  # non-zero padding bits: not the one canonical encoding
        return False
    unsigned = entry.to_dict()
    del unsigned["sig"]
    try:
        public_key.verify(raw, canonical_json(unsigned))
    except InvalidSignature:
        return False
    return True


def check_line(
    line: bytes, expected_seq: int, expected_prev: str, public_key: Ed25519PublicKey
) -> tuple[AuditEntry | None, str | None]:
    """Check one line as entry ``expected_seq`` following a line hashing to ``expected_prev``.

    Returns ``(entry, None)`` when it holds, else ``(None, reason)`` with a human reason.
    """
    try:
        entry = parse_entry(line)
    except ValueError as exc:
        return None, str(exc)
    try:
        canonical = canonical_json(entry.to_dict())
    except ValueError:
        canonical = b""
    if canonical != line:
        return None, "line is not in canonical form (sorted keys, no spaces, UTF-8)"
    if entry.seq != expected_seq:
        return None, (
            f"found seq {entry.seq} where seq {expected_seq} belongs: "
            "entries missing, duplicated or out of order"
        )
    if entry.prev != expected_prev:
        what = "previous entry" if expected_seq > 1 else "start of the log (64 zeros)"
        return None, (
            f"prev does not match the hash of the {what}: entries edited, removed or reordered"
        )
    if not _signature_ok(entry, public_key):
        return None, "signature does not verify"
    return entry, None


@dataclass(frozen=True)
class AuditHead:
    """The claims of a verified audit-head JWS."""

    iss: str
    seq: int
    hash: str
    iat: int


@dataclass(frozen=True)
class Gap:
    """An ``audit_discontinuity`` entry: the log was found cut short or replaced at start.

    ``first_missing`` is the first seq the log can no longer vouch for; ``seq`` is the
    discontinuity entry's own seq.
    """

    seq: int
    first_missing: int
    expected_seq: int | None
    expected_hash: str | None
    found_seq: int | None
    found_hash: str | None

    def describe(self) -> str:
        """One human sentence naming the gap."""
        found = (
            "no entry"
            if self.found_seq is None
            else f"seq {self.found_seq} hash {self.found_hash or '(none)'}"
        )
        return (
            f"gap before seq {self.seq}: the log was cut short or replaced from seq "
            f"{self.first_missing} on (expected the head at seq {self.expected_seq} hash "
            f"{self.expected_hash}, found {found}; audit_discontinuity at seq {self.seq})"
        )


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a log.

    ``count`` entries verified from the start; when ``ok`` is false ``first_bad_seq`` is the seq
    that should have come next and ``reason`` says why it did not. ``head_hash`` is the hash of
    the last verified line (None when none verified), ``last_seq`` its seq (0 when none).
    ``gaps`` lists the ``audit_discontinuity`` entries met: every entry is signed and chained,
    yet entries before each gap are missing or were replaced, so the log is not ``ok``.
    """

    ok: bool
    count: int
    first_bad_seq: int | None
    reason: str | None
    head_hash: str | None
    last_seq: int = 0
    gaps: tuple[Gap, ...] = ()

    def summary(self, name: str = "audit log") -> str:
        """The one-line summary ``audit verify`` prints."""
        if not self.ok:
            return f"{name} broken at seq {self.first_bad_seq}: {self.reason}"
        if self.count == 0:
            return f"{name} OK: 0 entries (the log is empty)"
        return f"{name} OK: {self.count} entries, head seq {self.last_seq} hash {self.head_hash}"


def verify_lines(
    lines: Iterable[bytes | str],
    public_key: Ed25519PublicKey,
    *,
    head: AuditHead | None = None,
) -> VerifyResult:
    """Check a sequence of log lines (each without its newline) against the device key.

    Stops at the first bad entry. With ``head`` (a verified signed head, see
    :func:`parse_head_jws`) it also checks that the entry at ``head.seq`` exists and hashes to
    ``head.hash``, which detects entries cut from the end of the log.
    """
    count = last_seq = 0
    prev = GENESIS_PREV
    head_hash: str | None = None
    gaps: list[Gap] = []

    def broken(first_bad: int, reason: str | None) -> VerifyResult:
        if gaps:
            reason = f"{gaps[0].describe()}; and at seq {first_bad}: {reason}"
            first_bad = gaps[0].first_missing
        return VerifyResult(False, count, first_bad, reason, head_hash, last_seq, tuple(gaps))

    for raw in lines:
        line = raw.encode("utf-8") if isinstance(raw, str) else raw
        entry, reason = check_line(line, last_seq + 1, prev, public_key)
        if entry is None:
            gap = _as_gap(line, last_seq, prev, public_key)
            if gap is None:
                return broken(last_seq + 1, reason)
            entry = parse_entry(line)
            gaps.append(gap)
        count += 1
        last_seq = entry.seq
        prev = head_hash = entry.hash
        if head is not None and head.seq == last_seq and head.hash != head_hash:
            count -= 1
            return broken(last_seq, "entry does not match the signed audit head")
    if head is not None and head.seq > last_seq:
        return broken(
            last_seq + 1,
            f"the log ends at seq {last_seq} but the signed audit head is at seq {head.seq}: "
            "entries were removed from the end",
        )
    if gaps:
        first = gaps[0]
        return VerifyResult(
            False, count, first.first_missing, first.describe(), head_hash, last_seq, tuple(gaps)
        )
    return VerifyResult(True, count, None, None, head_hash, last_seq)


def _as_gap(
    line: bytes, last_seq: int, prev: str, public_key: Ed25519PublicKey
) -> Gap | None:
    """The gap an ``audit_discontinuity`` line records, if ``line`` is one that follows the
    chain (``prev``) with a seq past ``last_seq`` and a valid signature; else None."""
    try:
        entry = parse_entry(line)
    except ValueError:
        return None
    if entry.event != DISCONTINUITY_EVENT or entry.seq <= last_seq:
        return None
    # Checked as if its seq were the expected one: chain, canonical form and signature.
    checked, _ = check_line(line, entry.seq, prev, public_key)
    if checked is None:
        return None
    fields = entry.fields

    def num(key: str) -> int | None:
        value = fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def text(key: str) -> str | None:
        value = fields.get(key)
        return value if isinstance(value, str) else None

    expected_seq = num("expected_seq")
    first_missing = last_seq + 1
    if expected_seq is not None and 0 < expected_seq <= last_seq:
        # Same length or longer, but the entry at the head's seq differs: replaced from there.
        first_missing = expected_seq
    return Gap(
        seq=entry.seq,
        first_missing=first_missing,
        expected_seq=expected_seq,
        expected_hash=text("expected_hash"),
        found_seq=num("found_seq"),
        found_hash=text("found_hash"),
    )


def build_head_jws(
    private_key: Ed25519PrivateKey, device_id: str, seq: int, hash: str, now: datetime
) -> str:
    """The audit head: a device-signed compact JWS (typ ``doorbell-audit-head+jwt``).

    Claims ``iss`` (device id), ``seq`` and ``hash`` of the last entry, and ``iat``.
    """
    if not _HEX64_RE.match(hash):
        raise ValueError("audit head hash must be 64 lowercase hex digits")
    claims = {"iss": device_id, "seq": seq, "hash": hash, "iat": to_epoch(now)}
    return sign_jws(private_key, HEAD_TYP, claims)


def parse_head_jws(token: str, public_key: Ed25519PublicKey) -> AuditHead:
    """Verify an audit-head JWS against the device public key and return its claims.

    Raises AuditError saying what is wrong (shape, alg, typ, kid, signature, claims).
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise AuditError("the audit head is not a compact JWS (three dot-separated parts)")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
    except ValueError as exc:
        raise AuditError("the audit head is not a well-formed JWS") from exc
    if not isinstance(header, dict) or header.get("alg") not in ("EdDSA", "Ed25519"):
        raise AuditError("the audit head is not signed with EdDSA")
    if header.get("typ") != HEAD_TYP:
        raise AuditError(f"the JWS is not an audit head (typ is not {HEAD_TYP})")
    if "kid" in header and header["kid"] != kid_for(public_key):
        raise AuditError("the audit head was signed by a different key (kid does not match)")
    try:
        public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except (InvalidSignature, UnicodeEncodeError) as exc:
        raise AuditError("the audit head signature does not verify with the device key") from exc
    if not isinstance(claims, dict):
        raise AuditError("the audit head claims are not a JSON object")
    iss, seq, hsh, iat = (claims.get(k) for k in ("iss", "seq", "hash", "iat"))
    if (
        not isinstance(iss, str)
        or isinstance(seq, bool)
        or not isinstance(seq, int)
        or seq < 0
        or not isinstance(hsh, str)
        or not _HEX64_RE.match(hsh)
        or isinstance(iat, bool)
        or not isinstance(iat, int)
    ):
        raise AuditError("the audit head claims iss, seq, hash and iat are missing or malformed")
    return AuditHead(iss=iss, seq=seq, hash=hsh, iat=iat)


# --------------------------------------------------------------------------- file reading


def lock_path_for(path: Path) -> Path:
    """The lock file that serialises appends to the log at ``path`` (``audit.lock``)."""
    return path.with_name(path.stem + ".lock")


def _settled_size(path: Path, fd: int) -> int:
    """The log's size at a moment when no append is in progress.

    Takes the append lock in shared mode just for the ``fstat``, so a reader never sees half of
    a line being written, yet never holds writers up for a long read. A copy without a lock
    file (or one we may not open) has no writers, and is measured as it is.
    """
    try:
        lock_fd = os.open(lock_path_for(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.fstat(fd).st_size
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        return os.fstat(fd).st_size
    finally:
        os.close(lock_fd)


def iter_log_lines(path: Path) -> Iterator[bytes]:
    """Yield the lines of a log file without their newlines, streaming.

    Reads the log as it was when reading began (appends made meanwhile are not seen). A final
    unterminated fragment is yielded as-is, so a torn or truncated tail is checked like any
    other line. Raises AuditError when the file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            remaining = _settled_size(path, fh.fileno())
            for raw in fh:
                line = raw[:remaining]
                remaining -= len(line)
                if line:
                    yield line[:-1] if line.endswith(b"\n") else line
                if remaining == 0:
                    break
    except FileNotFoundError as exc:
        raise AuditError(f"no audit log at {path}") from exc
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from exc


def verify_file(
    path: Path, public_key: Ed25519PublicKey, *, head: AuditHead | None = None
) -> VerifyResult:
    """:func:`verify_lines` over a log file, streaming."""
    return verify_lines(iter_log_lines(path), public_key, head=head)


def read_entries(path: Path, *, since: int = 1) -> Iterator[AuditEntry]:
    """Parse the entries of a log file with ``seq >= since``, without verifying them.

    Raises AuditError naming the line number of a line that does not parse.
    """
    for number, line in enumerate(iter_log_lines(path), start=1):
        try:
            entry = parse_entry(line)
        except ValueError as exc:
            raise AuditError(
                f"line {number} of {path} cannot be read: {exc}",
                hint="run `doorbell-agent audit verify` to check the log",
            ) from exc
        if entry.seq >= since:
            yield entry


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_tail(fd: int, size: int) -> tuple[bytes | None, int, bytes]:
    """Read backward from the end: (last complete line, offset of the tail fragment, fragment).

    The fragment is whatever follows the last newline (empty when the file ends with one).
    """
    buf = b""
    pos = size
    while True:
        start = max(0, pos - _TAIL_BLOCK)
        buf = _pread_exact(fd, pos - start, start) + buf
        pos = start
        last_nl = buf.rfind(b"\n")
        if last_nl == -1:
            if pos == 0:
                return None, 0, buf
            continue
        before = buf.rfind(b"\n", 0, last_nl)
        if before != -1 or pos == 0:
            return buf[before + 1 : last_nl], pos + last_nl + 1, buf[last_nl + 1 :]


# --------------------------------------------------------------------------- file adapter


def _write_hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space in the state directory"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check that the state directory and audit.jsonl are writable by this user"
    return "check the state directory's disk"


class AuditSink(Protocol):
    """What a writer of audit entries needs of a log (:class:`AuditLog` fits)."""

    def append(self, event: str, **fields: object) -> object:
        """Append one durable entry or raise :class:`agent.errors.AuditWriteError`."""
        ...


class AuditLog(Closing):
    """Append-only, fsync'd, multi-process-safe writer of ``audit.jsonl``.

    ``append`` returns only after the entry is durable; it raises AuditWriteError when it is
    not, and then nothing of the entry remains in the file. ``on_append`` is called with each
    durable entry after the lock is released (an exception from it is logged, not raised: the
    entry is already committed).
    """

    def __init__(
        self,
        path: Path | str,
        signing_key: Ed25519PrivateKey,
        *,
        now: Callable[[], datetime] = utcnow,
        on_append: Callable[[AuditEntry], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.lock_path = lock_path_for(self.path)
        self.on_append = on_append
        self._key = signing_key
        self._public_key = signing_key.public_key()
        self._now = now
        self._closed = False

    def close(self) -> None:
        """Refuse further appends (idempotent). No descriptor stays open between appends."""
        self._closed = True

    def append(self, event: str, **fields: object) -> AuditEntry:
        """Append one signed entry and return it once it is fsync'd.

        Raises ValueError/TypeError for a bad event name or fields (nothing is written),
        AuditWriteError when the entry cannot be made durable.
        """
        if self._closed:
            raise AuditWriteError("the audit log is closed; nothing can be recorded")
        _check_event(event)
        prepared = _prepare_fields(fields)
        return self._commit(self._append_locked(event, prepared))

    def append_discontinuity(self, gap: HeadGap) -> AuditEntry:
        """Append the ``audit_discontinuity`` entry for ``gap`` (contract §7).

        Its ``seq`` is max(this log's last seq, the expected head's seq) + 1 and its ``prev`` the
        hash of this log's last line (64 zeros when there is none), so the public head moves on
        past the one the log lost instead of going backwards.
        """
        if self._closed:
            raise AuditWriteError("the audit log is closed; nothing can be recorded")
        fields = _prepare_fields(gap.fields())
        return self._commit(
            self._append_locked(DISCONTINUITY_EVENT, fields, min_seq=gap.expected.seq + 1)
        )

    def _commit(self, committed: list[AuditEntry]) -> AuditEntry:
        if self.on_append is not None:
            for entry in committed:
                try:
                    self.on_append(entry)
                except Exception:
                    log.exception("audit on_append hook failed for seq %d", entry.seq)
        return committed[-1]

    def last_entry(self) -> AuditEntry | None:
        """The last complete entry (parsed, not verified), or None for an empty or absent log."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror}") from exc
        try:
            last, _, _ = _read_tail(fd, _settled_size(self.path, fd))
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if last is None:
            return None
        try:
            return parse_entry(last)
        except ValueError as exc:
            raise AuditError(f"the last entry of {self.path} cannot be read: {exc}") from exc

    def verify(self, *, head: AuditHead | None = None) -> VerifyResult:
        """Verify this log with the signing key's public half."""
        return verify_file(self.path, self._public_key, head=head)

    # ------------------------------------------------------------------ internals

    def _fail(self, what: str, exc: OSError) -> AuditWriteError:
        return AuditWriteError(
            f"cannot write the audit log {self.path}: {what}: {exc.strerror or exc}",
            hint=_write_hint(exc),
        )

    def _append_locked(
        self, event: str, fields: dict[str, Any], *, min_seq: int = 1
    ) -> list[AuditEntry]:
        try:
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._fail(f"cannot open the lock file {self.lock_path.name}", exc) from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            fd = self._open_log()
            try:
                committed: list[AuditEntry] = []
                last = self._settle_tail(fd, committed)
                committed.append(self._write_entry(fd, last, event, fields, min_seq=min_seq))
                return committed
            finally:
                os.close(fd)
        finally:
            os.close(lock_fd)  # closing the descriptor releases the flock

    def _open_log(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return os.open(self.path, flags)
        except OSError as exc:
            raise self._fail("cannot open it for appending", exc) from exc
        try:
            # A new file's directory entry must be durable too, or the log can vanish on power loss.
            fsync_dir(self.path.parent)
        except OSError as exc:
            os.close(fd)
            raise self._fail("cannot sync its directory after creating it", exc) from exc
        return fd

    def _last_seq(self, last: bytes | None) -> int:
        if last is None:
            return 0
        try:
            return parse_entry(last).seq
        except ValueError as exc:
            raise AuditWriteError(
                f"the last entry of the audit log {self.path} is unreadable ({exc}); "
                "refusing to extend a damaged chain",
                hint="run `doorbell-agent audit verify` and inspect the log",
            ) from exc

    def _settle_tail(self, fd: int, committed: list[AuditEntry]) -> bytes | None:
        """Return the last complete line, repairing a crash-torn tail first (see module doc)."""
        try:
            last, frag_start, fragment = _read_tail(fd, os.fstat(fd).st_size)
        except OSError as exc:
            raise self._fail("cannot read its last entry", exc) from exc
        if not fragment:
            return last
        prev = GENESIS_PREV if last is None else line_hash(last)
        entry, _ = check_line(fragment, self._last_seq(last) + 1, prev, self._public_key)
        if entry is not None:
            log.warning(
                "audit log %s: restoring the lost newline after seq %d", self.path, entry.seq
            )
            self._write_bytes(fd, b"\n", "cannot complete its last line")
            return fragment
        saved_as = self._save_torn(fragment)
        try:
            os.ftruncate(fd, frag_start)
            os.fsync(fd)
        except OSError as exc:
            raise self._fail("cannot cut off an incomplete last line", exc) from exc
        log.warning(
            "audit log %s: moved an incomplete last line (%d bytes, interrupted write) to %s",
            self.path,
            len(fragment),
            saved_as,
        )
        repaired = self._write_entry(
            fd,
            last,
            REPAIRED_EVENT,
            {
                "torn_bytes": len(fragment),
                "torn_sha256": hashlib.sha256(fragment).hexdigest(),
                "saved_as": saved_as,
            },
        )
        committed.append(repaired)
        return repaired.line

    def _save_torn(self, fragment: bytes) -> str:
        stamp = self._now().strftime("%Y%m%dT%H%M%S%fZ")
        attempt = 0
        while True:
            suffix = f".{attempt}" if attempt else ""
            target = self.path.with_name(f"{self.path.name}.torn-{stamp}{suffix}")
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                attempt += 1
            except OSError as exc:
                raise self._fail("cannot save its incomplete last line aside", exc) from exc
        try:
            try:
                write_all(fd, fragment)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:
            raise self._fail("cannot save its incomplete last line aside", exc) from exc
        return target.name

    def _write_entry(
        self, fd: int, last: bytes | None, event: str, fields: dict[str, Any], *, min_seq: int = 1
    ) -> AuditEntry:
        seq = max(self._last_seq(last) + 1, min_seq)
        line = make_entry(last, seq, event, fields, self._key, self._now(), allow_gap=min_seq > 1)
        self._write_bytes(fd, line + b"\n", f"cannot append the {event} entry")
        return parse_entry(line)

    def _write_bytes(self, fd: int, data: bytes, what: str) -> None:
        """Append ``data`` and fsync; on any failure truncate back so nothing partial remains."""
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise self._fail(what, exc) from exc
        try:
            # One write call normally carries the whole line; the loop only finishes a short one.
            write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                log.exception(
                    "audit log %s: could not roll back a failed write; the next append repairs it",
                    self.path,
                )
            raise self._fail(what, exc) from exc


# --------------------------------------------------------------------------- start-up check


@dataclass(frozen=True)
class HeadGap:
    """What the start-up check found: the log does not hold the newest head the device knows.

    ``found_seq``/``found_hash`` name the entry at the head's seq when the log has one (with
    another hash), else the log's last entry (``found_seq`` None: the log is empty or absent).
    """

    expected: AuditHead
    source: str
    found_seq: int | None
    found_hash: str | None

    def fields(self) -> dict[str, object]:
        """The ``audit_discontinuity`` entry's fields."""
        return {
            "expected_seq": self.expected.seq,
            "expected_hash": self.expected.hash,
            "expected_iat": self.expected.iat,
            "expected_from": self.source,
            "found_seq": self.found_seq,
            "found_hash": self.found_hash,
        }


def compare_with_head(
    lines: Iterable[bytes], head: AuditHead, source: str
) -> HeadGap | None:
    """None when the log (its ``lines``) holds the entry ``head`` names, else the gap.

    Lines are parsed, not verified (``audit verify`` does that); a line that does not parse is
    skipped, so a damaged log is judged by the entries it still has. A gap the log has already
    recorded is not found again: a head named by an ``audit_discontinuity`` entry, or whose seq
    lies in the seqs such an entry skipped (a broker or requester may still show the old head).
    """
    last: AuditEntry | None = None
    mismatch: AuditEntry | None = None
    for line in lines:
        try:
            entry = parse_entry(line)
        except ValueError:
            continue
        if entry.event == DISCONTINUITY_EVENT:
            named = (entry.fields.get("expected_seq"), entry.fields.get("expected_hash"))
            skipped = (last.seq if last is not None else 0) < head.seq < entry.seq
            if named == (head.seq, head.hash) or skipped:
                return None
        if entry.seq == head.seq:
            if entry.hash == head.hash:
                return None
            mismatch = entry
        last = entry
    if mismatch is not None:
        return HeadGap(head, source, mismatch.seq, mismatch.hash)
    if last is None:
        return HeadGap(head, source, None, None)
    return HeadGap(head, source, last.seq, last.hash)


def read_witnessed_heads(
    path: Path, public_key: Ed25519PublicKey, device_id: str
) -> list[AuditHead]:
    """The witnessed heads kept in ``path`` (one JWS a line) that verify with the device key and
    name this device; others are logged and skipped. An absent file holds none."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the witnessed audit heads in %s: %s", path, exc)
        return []
    heads = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            head = parse_head_jws(line, public_key)
        except AuditError as exc:
            log.warning("witnessed audit head on line %d of %s ignored: %s", number, path, exc)
            continue
        if head.iss != device_id:
            log.warning("witnessed audit head on line %d of %s names another device", number, path)
            continue
        heads.append(head)
    return heads


def newest_head(candidates: Iterable[tuple[AuditHead, str]]) -> tuple[AuditHead, str] | None:
    """The candidate with the highest ``seq`` (then ``iat``); the first wins a tie."""
    best: tuple[AuditHead, str] | None = None
    for head, source in candidates:
        if best is None or (head.seq, head.iat) > (best[0].seq, best[0].iat):
            best = (head, source)
    return best


def mark_broken(state_dir: Path, gap: HeadGap, now: datetime) -> None:
    """Record, durably, that the request log was found broken (status says so from then on)."""
    path = StatePaths(state_dir).audit_broken
    record = {"since": rfc3339(now), **gap.fields()}
    if path.exists():
        return  # the first gap found stays the one named; every gap is in the log itself
    replace_file(path, canonical_json(record) + b"\n")


def audit_state(state_dir: Path) -> str:
    """``"broken"`` once a start-up check found a gap in the request log, else ``"ok"``."""
    return "broken" if StatePaths(state_dir).audit_broken.exists() else "ok"


# --------------------------------------------------------------------------- checkpoints


def next_checkpoint(now: datetime, interval_seconds: int) -> datetime:
    """The first checkpoint time after ``now``: checkpoints fall on multiples of the interval
    since the epoch, so their times say nothing about what the device did."""
    epoch = to_epoch(now)
    return from_epoch((epoch // interval_seconds + 1) * interval_seconds)


def checkpoint_fields(activity: AuditLog) -> dict[str, object]:
    """The ``checkpoint`` entry's fields: the activity log's newest seq and line hash (0 and 64
    zeros for an empty or absent activity log)."""
    last = activity.last_entry()
    if last is None:
        return {"activity_seq": 0, "activity_hash": GENESIS_PREV}
    return {"activity_seq": last.seq, "activity_hash": last.hash}


class Checkpointer:
    """Writes one ``checkpoint`` to the request log every ``interval``, whatever happened.

    Pure apart from the two logs: the caller passes the time (``tick(now)``), so tests drive it
    with an injected clock and the daemon's worker with the wall clock.
    """

    def __init__(self, audit: AuditLog, activity: AuditLog, interval_seconds: int) -> None:
        if interval_seconds < 1:
            raise ValueError("the checkpoint interval must be at least one second")
        self.audit = audit
        self.activity = activity
        self.interval = interval_seconds
        self.written = 0
        self._due: datetime | None = None

    def due(self, now: datetime) -> datetime:
        """When the next checkpoint is due (the first boundary after the first look)."""
        if self._due is None:
            self._due = next_checkpoint(now, self.interval)
        return self._due

    def tick(self, now: datetime) -> AuditEntry | None:
        """Write the checkpoint if one is due at ``now`` (one, however many were missed)."""
        if now < self.due(now):
            return None
        entry = self.audit.append(CHECKPOINT_EVENT, **checkpoint_fields(self.activity))
        self.written += 1
        self._due = next_checkpoint(now, self.interval)
        return entry


@dataclass(frozen=True)
class CheckpointResult:
    """Outcome of checking the request log's checkpoints against the activity log."""

    ok: bool
    checked: int
    reason: str | None
    audit_seq: int | None


def verify_checkpoints(
    audit_path: Path, activity_path: Path, public_key: Ed25519PublicKey
) -> tuple[VerifyResult | None, CheckpointResult]:
    """Verify the activity log and every ``checkpoint`` of the request log against it.

    Returns the activity log's own result (None when it does not exist) and the checkpoints'.
    A checkpoint must name an activity entry that exists and hashes as it says; an activity log
    that does not exist can only stand behind checkpoints of ``activity_seq`` 0.
    """
    wanted: dict[int, list[tuple[int, str]]] = {}
    for entry in read_entries(audit_path):
        if entry.event != CHECKPOINT_EVENT:
            continue
        seq, hsh = entry.fields.get("activity_seq"), entry.fields.get("activity_hash")
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(hsh, str):
            return None, CheckpointResult(
                False, 0, f"checkpoint at seq {entry.seq} is malformed", entry.seq
            )
        if seq > 0:
            wanted.setdefault(seq, []).append((entry.seq, hsh))
    checked = sum(len(v) for v in wanted.values())
    if not activity_path.exists():
        if wanted:
            audit_seq = min(s for v in wanted.values() for s, _ in v)
            return None, CheckpointResult(
                False, 0, f"{activity_path.name} is missing but the checkpoint at seq "
                f"{audit_seq} vouches for its entries", audit_seq,
            )
        return None, CheckpointResult(True, 0, None, None)
    found: dict[int, str] = {}
    activity_result = verify_lines(
        _recording(iter_log_lines(activity_path), wanted, found), public_key
    )
    for seq, vouchers in sorted(wanted.items()):
        for audit_seq, hsh in vouchers:
            actual = found.get(seq)
            if actual is None:
                return activity_result, CheckpointResult(
                    False, checked, f"the checkpoint at seq {audit_seq} vouches for "
                    f"{activity_path.name} seq {seq}, which it does not have", audit_seq,
                )
            if actual != hsh:
                return activity_result, CheckpointResult(
                    False, checked, f"the checkpoint at seq {audit_seq} does not match "
                    f"{activity_path.name} seq {seq} (entries edited or replaced)", audit_seq,
                )
    return activity_result, CheckpointResult(True, checked, None, None)


def _recording(
    lines: Iterable[bytes], wanted: Mapping[int, object], found: dict[int, str]
) -> Iterator[bytes]:
    """Pass ``lines`` through, noting the hash of each line whose seq is ``wanted``."""
    for line in lines:
        if wanted:
            with contextlib.suppress(ValueError):
                entry = parse_entry(line)
                if entry.seq in wanted:
                    found[entry.seq] = entry.hash
        yield line
