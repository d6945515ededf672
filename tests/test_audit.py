"""The tamper-evident audit log: chain, signatures, tampering, concurrency, durability, heads."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import OKPKey

from agent import audit as audit_mod
from agent.audit import (
    GENESIS_PREV,
    HEAD_TYP,
    AuditHead,
    AuditLog,
    build_head_jws,
    canonical_json,
    line_hash,
    make_entry,
    parse_head_jws,
    verify_file,
    verify_lines,
)
from agent.errors import AuditError, AuditWriteError
from agent.keys import kid_for, public_jwk, sign_jws

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)


def _clock() -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: T0 + timedelta(seconds=next(ticks))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state / "audit.jsonl"


@pytest.fixture
def audit(log_path: Path, key: Ed25519PrivateKey) -> Iterator[AuditLog]:
    with AuditLog(log_path, key, now=_clock()) as log:
        yield log


def _fill(audit: AuditLog, n: int) -> None:
    for i in range(n):
        audit.append("clip_recorded", clip=f"c{i}", bytes=1000 + i, start=T0 + timedelta(minutes=i))


def _lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


# ------------------------------------------------------------------ an independent verifier


def independent_verify(data: bytes, public_raw: bytes) -> int:
    """Check a log with only hashlib, json, base64 and cryptography: no agent code.

    Returns the number of entries; raises AssertionError/InvalidSignature at the first bad one.
    """
    public_key = Ed25519PublicKey.from_public_bytes(public_raw)
    prev = "0" * 64
    lines = data.split(b"\n")
    assert lines[-1] == b"", "the log must end with a newline"
    for number, line in enumerate(lines[:-1], start=1):
        entry = json.loads(line.decode("utf-8"))
        assert entry["seq"] == number, f"seq {number}"
        assert entry["prev"] == prev, f"prev at seq {number}"
        datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
        sig = base64.urlsafe_b64decode(entry.pop("sig") + "==")
        message = json.dumps(
            entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        public_key.verify(sig, message)
        prev = hashlib.sha256(line).hexdigest()
    return len(lines) - 1


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return base64.urlsafe_b64decode(public_jwk(key.public_key())["x"] + "=")


def test_independent_verifier_accepts_our_log_and_rejects_a_forgery(
    audit: AuditLog, key: Ed25519PrivateKey, log_path: Path
) -> None:
    _fill(audit, 4)
    audit.append("request_received", reason="Paket gestohlen \u2028 ü \n 📦", legal_basis="consent")
    assert independent_verify(log_path.read_bytes(), _raw_public(key)) == 5
    lines = _lines(log_path)
    forged = json.loads(lines[2])
    forged["bytes"] = 1
    lines[2] = canonical_json(forged)
    with pytest.raises(InvalidSignature):
        independent_verify(b"".join(line + b"\n" for line in lines), _raw_public(key))


# --------------------------------------------------------------------------- append and verify


def test_append_then_verify(audit: AuditLog, key: Ed25519PrivateKey, log_path: Path) -> None:
    first = audit.append("agent_started", version="0.1.0")
    assert first.seq == 1 and first.prev == GENESIS_PREV and first.ts == "2026-01-31T12:00:00Z"
    _fill(audit, 3)
    last = audit.append("agent_stopped")
    lines = _lines(log_path)
    assert len(lines) == 5
    for line in lines:  # each line is itself canonical, so its hash is stable
        assert canonical_json(json.loads(line)) == line
    objs = [json.loads(line) for line in lines]
    assert [o["seq"] for o in objs] == [1, 2, 3, 4, 5]
    for before, after in itertools.pairwise(lines):
        assert json.loads(after)["prev"] == hashlib.sha256(before).hexdigest()
    assert objs[1]["start"] == "2026-01-31T12:00:00Z"
    assert last.hash == hashlib.sha256(lines[-1]).hexdigest() == line_hash(lines[-1])
    result = audit.verify()
    assert result.ok and result.count == 5 and result.first_bad_seq is None
    assert result.head_hash == last.hash
    assert result.summary() == f"audit log OK: 5 entries, head seq 5 hash {last.hash}"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert (log_path.parent / "audit.lock").exists()
    assert audit.last_entry() == last


def test_entry_fields_are_converted(audit: AuditLog) -> None:
    plus_two = timezone(timedelta(hours=2))
    entry = audit.append(
        "request_pending",
        window={"start": datetime(2026, 1, 31, 14, 0, tzinfo=plus_two), "end": T0},
        clips=("a", "b"),
        count=2,
        ratio=0.5,
        ok=True,
        case=None,
    )
    assert entry.fields == {
        "window": {"start": "2026-01-31T12:00:00Z", "end": "2026-01-31T12:00:00Z"},
        "clips": ["a", "b"],
        "count": 2,
        "ratio": 0.5,
        "ok": True,
        "case": None,
    }
    assert audit.verify().ok


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"seq": 5}, ValueError, "reserved"),
        ({"sig": "x"}, ValueError, "reserved"),
        ({"prev": "0" * 64, "ts": "x"}, ValueError, "prev, ts are reserved"),
        ({"blob": b"raw"}, TypeError, "blob has type bytes"),
        ({"tags": {"a"}}, TypeError, "tags has type set"),
        ({"nested": {"p": Path("/x")}}, TypeError, "nested.p has type PosixPath"),
        ({"at": datetime(2026, 1, 1)}, TypeError, "naive datetime"),
        ({"m": {1: "x"}}, TypeError, "non-string key"),
        ({"x": float("nan")}, ValueError, "NaN"),
        ({"d": timedelta(seconds=1)}, TypeError, "timedelta"),
    ],
)
def test_bad_fields_rejected_and_nothing_written(
    audit: AuditLog, log_path: Path, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    audit.append("agent_started")
    before = log_path.read_bytes()
    with pytest.raises(error, match=message):
        audit.append("request_received", **fields)
    assert log_path.read_bytes() == before


@pytest.mark.parametrize("event", ["", "Agent", "has space", "x" * 65, "1abc", "a-b"])
def test_bad_event_names_rejected(audit: AuditLog, log_path: Path, event: str) -> None:
    with pytest.raises(ValueError, match="event name"):
        audit.append(event)
    assert not log_path.exists()


def test_make_entry_is_pure_and_checks_its_inputs(key: Ed25519PrivateKey) -> None:
    one = make_entry(None, 1, "agent_started", {"v": 1}, key, T0)
    # Ed25519 signatures are deterministic, so the same inputs give the same line.
    assert one == make_entry(None, 1, "agent_started", {"v": 1}, key, T0)
    two = make_entry(one, 2, "agent_stopped", {}, key, T0 + timedelta(seconds=1))
    assert json.loads(two)["prev"] == hashlib.sha256(one).hexdigest()
    assert verify_lines([one, two], key.public_key()).ok
    assert verify_lines([one.decode(), two.decode()], key.public_key()).ok
    with pytest.raises(ValueError, match="no previous line"):
        make_entry(one, 1, "agent_started", {}, key, T0)
    with pytest.raises(ValueError, match="no previous line"):
        make_entry(None, 2, "agent_started", {}, key, T0)
    with pytest.raises(ValueError, match=">= 1"):
        make_entry(None, 0, "agent_started", {}, key, T0)
    with pytest.raises(ValueError, match="aware"):
        make_entry(None, 1, "agent_started", {}, key, datetime(2026, 1, 1))


def test_empty_log_verifies_as_empty(key: Ed25519PrivateKey, log_path: Path) -> None:
    log_path.write_bytes(b"")
    result = verify_file(log_path, key.public_key())
    assert result.ok and result.count == 0 and result.head_hash is None
    assert "0 entries" in result.summary()
    with pytest.raises(AuditError, match="no audit log"):
        verify_file(log_path.parent / "missing.jsonl", key.public_key())


def test_on_append_hook_sees_each_entry_and_cannot_break_append(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    seen: list[int] = []

    def hook(entry: audit_mod.AuditEntry) -> None:
        seen.append(entry.seq)
        if entry.seq == 2:
            raise RuntimeError("publisher down")

    with AuditLog(log_path, key, now=_clock(), on_append=hook) as log:
        log.append("agent_started")
        assert log.append("clip_recorded", clip="a").seq == 2  # hook failure is logged, not raised
        log.append("agent_stopped")
        assert log.verify().count == 3
    assert seen == [1, 2, 3]


def test_close_is_idempotent_and_refuses_appends(log_path: Path, key: Ed25519PrivateKey) -> None:
    log = AuditLog(log_path, key)
    assert log.last_entry() is None
    log.append("agent_started")
    log.close()
    log.close()
    with pytest.raises(AuditWriteError, match="closed"):
        log.append("agent_stopped")
    assert verify_file(log_path, key.public_key()).count == 1


def test_long_entries_cross_tail_read_blocks(audit: AuditLog, log_path: Path) -> None:
    audit.append("request_received", reason="r" * 20000)
    audit.append("request_received", reason="s" * 9000)
    audit.append("agent_stopped")
    assert audit.verify().count == 3
    assert audit.last_entry() is not None


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=8), st.binary())
def test_read_tail_matches_a_plain_split(parts: list[bytes], tail: bytes) -> None:
    tail = tail.replace(b"\n", b"")
    data = b"".join(p + b"\n" for p in parts) + tail
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        last, start, fragment = audit_mod._read_tail(fh.fileno(), len(data))
    assert fragment == tail and data[start:] == tail
    assert last == (parts[-1] if parts else None)


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def six(audit: AuditLog, log_path: Path) -> list[bytes]:
    """A log of six good entries; returns its lines."""
    _fill(audit, 6)
    return _lines(log_path)


def _check(log_path: Path, key: Ed25519PrivateKey, lines: list[bytes]) -> audit_mod.VerifyResult:
    _write_lines(log_path, lines)
    return verify_file(log_path, key.public_key())


def _edited(line: bytes, **changes: Any) -> bytes:
    obj = json.loads(line)
    obj.update(changes)
    return canonical_json(obj)


def test_edited_field_detected_at_its_seq(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    six[2] = _edited(six[2], bytes=1)
    result = _check(log_path, key, six)
    assert (result.ok, result.first_bad_seq, result.count) == (False, 3, 2)
    assert result.reason == "signature does not verify"
    assert result.summary() == "audit log broken at seq 3: signature does not verify"


def test_edit_of_raw_bytes_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    six[3] = six[3].replace(b'"c3"', b'"c9"')
    result = _check(log_path, key, six)
    assert (result.first_bad_seq, result.reason) == (4, "signature does not verify")


def test_deleted_middle_line_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    del six[2]
    result = _check(log_path, key, six)
    assert result.first_bad_seq == 3
    assert result.reason is not None and result.reason.startswith("found seq 4 where seq 3 belongs")


def test_renumbered_deletion_detected_by_the_prev_hash(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    """Deleting seq 3 and renumbering the rest still breaks: the chain and signatures hold seq."""
    del six[2]
    six[2:] = [_edited(line, seq=json.loads(line)["seq"] - 1) for line in six[2:]]
    result = _check(log_path, key, six)
    assert result.first_bad_seq == 3
    assert result.reason is not None and result.reason.startswith("prev does not match")


def test_reordered_lines_detected(six: list[bytes], log_path: Path, key: Ed25519PrivateKey) -> None:
    six[3], six[4] = six[4], six[3]
    result = _check(log_path, key, six)
    assert result.first_bad_seq == 4 and result.count == 3
    assert result.reason is not None and "found seq 5 where seq 4 belongs" in result.reason


def test_forged_append_signed_by_another_key_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    mallory = Ed25519PrivateKey.generate()
    forged = make_entry(six[-1], 7, "request_approved", {"requester": "evil"}, mallory, T0)
    result = _check(log_path, key, [*six, forged])
    assert (result.first_bad_seq, result.reason) == (7, "signature does not verify")
    assert result.count == 6 and result.head_hash == hashlib.sha256(six[-1]).hexdigest()


def test_forged_append_with_correct_prev_but_borrowed_signature_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    forged = json.loads(six[-1])
    forged.update(seq=7, prev=hashlib.sha256(six[-1]).digest().hex(), event="request_approved")
    result = _check(log_path, key, [*six, canonical_json(forged)])
    assert (result.first_bad_seq, result.reason) == (7, "signature does not verify")


@pytest.mark.parametrize("bad_sig", ["", "AA", "A" * 86, "!" * 86, "x" * 200])
def test_malformed_signatures_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey, bad_sig: str
) -> None:
    six[5] = _edited(six[5], sig=bad_sig)
    result = _check(log_path, key, six)
    assert (result.first_bad_seq, result.reason) == (6, "signature does not verify")


def test_truncated_last_line_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    log_path.write_bytes(log_path.read_bytes()[:-15])
    result = verify_file(log_path, key.public_key())
    assert (result.first_bad_seq, result.count) == (6, 5)
    assert result.reason == "line is not valid JSON"


def test_removed_last_line_detected_with_the_signed_head(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    head = parse_head_jws(
        build_head_jws(key, "dev1", 6, hashlib.sha256(six[-1]).hexdigest(), T0), key.public_key()
    )
    assert verify_file(log_path, key.public_key(), head=head).ok
    older = AuditHead(iss="dev1", seq=4, hash=hashlib.sha256(six[3]).hexdigest(), iat=0)
    assert verify_file(log_path, key.public_key(), head=older).ok  # head published before 5 and 6
    result = _check(log_path, key, six[:-1])
    assert result.ok  # without the head a clean cut at a line boundary is undetectable...
    result = verify_file(log_path, key.public_key(), head=head)
    assert not result.ok and result.first_bad_seq == 6  # ...with it, it is
    assert result.reason is not None and "entries were removed from the end" in result.reason


def test_head_hash_mismatch_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    head = AuditHead(iss="dev1", seq=3, hash="ab" * 32, iat=0)
    result = verify_file(log_path, key.public_key(), head=head)
    assert (result.ok, result.first_bad_seq, result.count) == (False, 3, 2)
    assert result.reason == "entry does not match the signed audit head"


def test_duplicated_line_detected(six: list[bytes], log_path: Path, key: Ed25519PrivateKey) -> None:
    six.insert(4, six[3])
    result = _check(log_path, key, six)
    assert result.first_bad_seq == 5
    assert result.reason is not None and "found seq 4 where seq 5 belongs" in result.reason


def test_whole_chain_rewritten_with_another_key_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    mallory = Ed25519PrivateKey.generate()
    prev: bytes | None = None
    rewritten = []
    for seq, line in enumerate(six, start=1):
        obj = json.loads(line)
        fields = {k: v for k, v in obj.items() if k not in audit_mod.RESERVED_KEYS}
        prev = make_entry(prev, seq, obj["event"], fields, mallory, T0)
        rewritten.append(prev)
    assert verify_lines(rewritten, mallory.public_key()).ok
    result = _check(log_path, key, rewritten)
    assert (result.first_bad_seq, result.reason) == (1, "signature does not verify")


def test_non_canonical_line_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    six[5] = json.dumps(json.loads(six[5]), indent=1).replace("\n", "").encode()
    result = _check(log_path, key, six)
    assert result.first_bad_seq == 6
    assert result.reason is not None and "canonical" in result.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "line is not valid JSON"),
        (b"\xff\xfe", "line is not valid JSON"),
        (b"[1,2]", "line is not a JSON object"),
        (b'{"seq":true}', "entry has no integer seq"),
        (b'{"seq":1,"ts":"yesterday"}', "entry ts is not an RFC 3339 timestamp"),
        (b'{"seq":1,"ts":"2026-01-31T12:00:00Z","event":"X"}', "entry has no valid event name"),
    ],
)
def test_garbage_lines_detected(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey, line: bytes, reason: str
) -> None:
    result = _check(log_path, key, [*six[:2], line, *six[3:]])
    assert (result.first_bad_seq, result.reason) == (3, reason)


def test_append_refuses_to_extend_a_damaged_last_entry(
    six: list[bytes], log_path: Path, audit: AuditLog
) -> None:
    _write_lines(log_path, [*six[:-1], b"{garbage"])
    before = log_path.read_bytes()
    with pytest.raises(AuditWriteError, match="unreadable"):
        audit.append("agent_started")
    assert log_path.read_bytes() == before


# ------------------------------------------------------------ torn tails (crash mid-write)


def test_torn_tail_is_moved_aside_and_recorded(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey, audit: AuditLog
) -> None:
    whole = make_entry(six[-1], 7, "request_approved", {"jti": "j" * 20}, key, T0)
    fragment = whole[: len(whole) // 2]
    with open(log_path, "ab") as fh:
        fh.write(fragment)
    assert verify_file(log_path, key.public_key()).first_bad_seq == 7  # a reader sees it too

    seen: list[str] = []
    audit.on_append = lambda entry: seen.append(entry.event)
    entry = audit.append("agent_started")

    assert entry.seq == 8 and seen == ["audit_repaired", "agent_started"]
    lines = _lines(log_path)
    assert lines[:6] == six  # every complete entry kept
    repaired = json.loads(lines[6])
    assert repaired["event"] == "audit_repaired" and repaired["seq"] == 7
    assert repaired["torn_bytes"] == len(fragment)
    assert repaired["torn_sha256"] == hashlib.sha256(fragment).hexdigest()
    saved = log_path.parent / repaired["saved_as"]
    assert saved.name.startswith("audit.jsonl.torn-") and saved.read_bytes() == fragment
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert verify_file(log_path, key.public_key()).count == 8
    assert independent_verify(log_path.read_bytes(), _raw_public(key)) == 8


def test_complete_entry_missing_only_its_newline_is_kept(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey, audit: AuditLog
) -> None:
    whole = make_entry(six[-1], 7, "request_approved", {"jti": "j" * 20}, key, T0)
    with open(log_path, "ab") as fh:
        fh.write(whole)
    assert verify_file(log_path, key.public_key()).count == 7
    assert audit.append("agent_started").seq == 8
    assert _lines(log_path)[6] == whole
    assert not list(log_path.parent.glob("*.torn-*"))
    assert verify_file(log_path, key.public_key()).count == 8


def test_unterminated_entry_signed_by_another_key_is_not_adopted(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey, audit: AuditLog
) -> None:
    forged = make_entry(six[-1], 7, "request_approved", {}, Ed25519PrivateKey.generate(), T0)
    with open(log_path, "ab") as fh:
        fh.write(forged)
    audit.append("agent_started")
    repaired = json.loads(_lines(log_path)[6])
    assert repaired["event"] == "audit_repaired"
    assert (log_path.parent / repaired["saved_as"]).read_bytes() == forged
    assert verify_file(log_path, key.public_key()).count == 8


def test_torn_first_line_repaired(log_path: Path, key: Ed25519PrivateKey, audit: AuditLog) -> None:
    log_path.write_bytes(b'{"event":"agent_sta')
    assert audit.append("agent_started").seq == 2
    assert json.loads(_lines(log_path)[0])["event"] == "audit_repaired"
    assert verify_file(log_path, key.public_key()).count == 2


# --------------------------------------------------------------------------- write failures


def _fail_os_write(monkeypatch: pytest.MonkeyPatch, *, after_bytes: int | None = None) -> None:
    """Make os.write raise ENOSPC, optionally after letting ``after_bytes`` through first."""
    real_write = os.write
    budget = [after_bytes]

    def write(fd: int, data: Any) -> int:
        if budget[0]:
            n = real_write(fd, bytes(data)[: budget[0]])
            budget[0] = 0
            return n
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("after_bytes", [None, 40])
def test_disk_full_raises_and_leaves_no_partial_line(
    six: list[bytes],
    log_path: Path,
    key: Ed25519PrivateKey,
    audit: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
    after_bytes: int | None,
) -> None:
    before = log_path.read_bytes()
    with monkeypatch.context() as patch:
        _fail_os_write(patch, after_bytes=after_bytes)
        with pytest.raises(AuditWriteError) as info:
            audit.append("request_approved", jti="j" * 20)
    assert "No space left on device" in str(info.value)
    assert info.value.hint is not None and "disk is full" in info.value.hint
    assert log_path.read_bytes() == before  # the partial write was rolled back
    assert verify_file(log_path, key.public_key()).count == 6
    assert audit.append("request_approved", jti="j" * 20).seq == 7  # and the chain goes on
    assert verify_file(log_path, key.public_key()).count == 7


def test_failed_fsync_rolls_the_entry_back(
    six: list[bytes],
    log_path: Path,
    key: Ed25519PrivateKey,
    audit: AuditLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = log_path.read_bytes()
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:  # the fsync of the appended entry; the rollback's fsync works
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        with pytest.raises(AuditWriteError, match="Input/output error"):
            audit.append("request_delivered", jti="j" * 20)
    assert log_path.read_bytes() == before
    assert verify_file(log_path, key.public_key()).count == 6


def _as_unprivileged(action: Callable[[], str]) -> str:
    """Run ``action`` without root's power to ignore file modes (in a child when we are root)."""
    if os.geteuid() != 0:
        return action()
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def child() -> None:
        os.setgid(65534)
        os.setuid(65534)
        sender.send(action())

    proc = ctx.Process(target=child)
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    result: str = receiver.recv()
    return result


def _try_append(path: Path, key: Ed25519PrivateKey) -> Callable[[], str]:
    def action() -> str:
        try:
            AuditLog(path, key).append("agent_started")
        except AuditWriteError as exc:
            return f"AuditWriteError: {exc} | {exc.hint}"
        return "appended"

    return action


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged child can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="audit-ro-"))
    path.chmod(0o755)
    yield path
    path.chmod(0o755)
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def test_read_only_log_file_raises_and_changes_nothing(
    open_dir: Path, key: Ed25519PrivateKey
) -> None:
    log_path = open_dir / "audit.jsonl"
    with AuditLog(log_path, key, now=_clock()) as log:
        _fill(log, 2)
    log_path.chmod(0o444)
    (open_dir / "audit.lock").chmod(0o666)
    open_dir.chmod(0o555)
    before = log_path.read_bytes()
    outcome = _as_unprivileged(_try_append(log_path, key))
    assert outcome.startswith("AuditWriteError: cannot write the audit log")
    assert "Permission denied" in outcome and "writable by this user" in outcome
    assert log_path.read_bytes() == before
    assert sorted(p.name for p in open_dir.iterdir()) == ["audit.jsonl", "audit.lock"]
    assert verify_file(log_path, key.public_key()).count == 2


def test_read_only_directory_raises_and_creates_nothing(
    open_dir: Path, key: Ed25519PrivateKey
) -> None:
    open_dir.chmod(0o555)
    outcome = _as_unprivileged(_try_append(open_dir / "audit.jsonl", key))
    assert outcome.startswith("AuditWriteError: cannot write the audit log")
    assert "lock file" in outcome and "Permission denied" in outcome
    assert list(open_dir.iterdir()) == []


# --------------------------------------------------------------------------- concurrency


def _worker(path: str, key: Ed25519PrivateKey, name: str, count: int) -> None:
    log = AuditLog(path, key)
    for i in range(count):
        log.append("request_received", worker=name, n=i)


def test_concurrent_processes_produce_one_valid_chain(
    log_path: Path, key: Ed25519PrivateKey
) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(str(log_path), key, f"p{w}", 25)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    result = verify_file(log_path, key.public_key())
    assert result.ok and result.count == 100
    seen = sorted((o["worker"], o["n"]) for o in map(json.loads, _lines(log_path)))
    assert seen == sorted((f"p{w}", i) for w in range(4) for i in range(25))
    assert independent_verify(log_path.read_bytes(), _raw_public(key)) == 100


def test_concurrent_threads_produce_one_valid_chain(log_path: Path, key: Ed25519PrivateKey) -> None:
    log = AuditLog(log_path, key)  # one object shared by every thread

    def run(name: str) -> None:
        for i in range(20):
            log.append("request_received", worker=name, n=i)

    threads = [threading.Thread(target=run, args=(f"t{w}",)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify_file(log_path, key.public_key()).count == 60


# --------------------------------------------------------------------------- the audit head


def test_head_jws_verifies_with_joserfc(key: Ed25519PrivateKey) -> None:
    digest = "ab" * 32
    token = build_head_jws(key, "dev1", 42, digest, T0)
    jwk: dict[str, str | list[str]] = {**public_jwk(key.public_key())}
    verifier = OKPKey.import_key(jwk)
    obj = jws.deserialize_compact(token, verifier, algorithms=["EdDSA"])
    assert obj.protected == {"alg": "EdDSA", "typ": HEAD_TYP, "kid": kid_for(key.public_key())}
    assert json.loads(obj.payload) == {
        "iss": "dev1",
        "seq": 42,
        "hash": digest,
        "iat": int(T0.timestamp()),
    }
    assert parse_head_jws(token, key.public_key()) == AuditHead(
        "dev1", 42, digest, int(T0.timestamp())
    )
    with pytest.raises(ValueError, match="64 lowercase hex"):
        build_head_jws(key, "dev1", 1, "AB" * 32, T0)


def test_head_jws_rejections(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    good = build_head_jws(key, "dev1", 1, "ab" * 32, T0)
    with pytest.raises(AuditError, match="different key"):
        parse_head_jws(good, other.public_key())
    header, payload, sig = good.split(".")
    wrong_sig = ".".join([header, payload, sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")])
    with pytest.raises(AuditError, match="signature does not verify"):
        parse_head_jws(wrong_sig, key.public_key())
    response = sign_jws(key, "doorbell-response+jwt", {"iss": "dev1", "seq": 1})
    with pytest.raises(AuditError, match="not an audit head"):
        parse_head_jws(response, key.public_key())
    bad_claims = sign_jws(key, HEAD_TYP, {"iss": "dev1", "seq": "1", "hash": "ab" * 32, "iat": 0})
    with pytest.raises(AuditError, match="malformed"):
        parse_head_jws(bad_claims, key.public_key())
    for junk in ("", "a.b", "a.b.c", "!!!.???.###"):
        with pytest.raises(AuditError):
            parse_head_jws(junk, key.public_key())


def test_readers_never_see_a_line_being_written(
    six: list[bytes], log_path: Path, key: Ed25519PrivateKey
) -> None:
    """A verifier running during an append waits for the line to be whole (shared lock)."""
    whole = make_entry(six[-1], 7, "request_approved", {}, key, T0) + b"\n"
    results: list[audit_mod.VerifyResult] = []
    lock_fd = os.open(log_path.parent / "audit.lock", os.O_RDWR)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # act as a writer in the middle of its append
        with open(log_path, "ab") as fh:
            fh.write(whole[:50])
            fh.flush()
            reader = threading.Thread(
                target=lambda: results.append(verify_file(log_path, key.public_key()))
            )
            reader.start()
            fh.write(whole[50:])
    finally:
        os.close(lock_fd)
    reader.join()
    assert results[0].ok and results[0].count == 7
