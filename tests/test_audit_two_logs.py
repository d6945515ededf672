"""Contract §7 revision 2: ``device_initialized`` at init, two logs with checkpoints, gaps.

Pure and file-level checks (no broker): the start-up check against a real broker is in
``test_audit_startup.py``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import config
from agent.approval.coordinator import ApprovalCoordinator, Deliverer
from agent.approval.machine import Policy
from agent.audit import (
    GENESIS_PREV,
    AuditHead,
    AuditLog,
    Checkpointer,
    HeadGap,
    audit_state,
    build_head_jws,
    compare_with_head,
    iter_log_lines,
    line_hash,
    make_entry,
    next_checkpoint,
    parse_entry,
    read_entries,
    verify_checkpoints,
    verify_file,
)
from agent.cli import main
from agent.daemon import CheckpointWorker, RetentionWorker
from agent.errors import ConfigError, StateError
from agent.headcheck import StartupCheck
from agent.keys import create_device_keys, kid_for, load_device_key, public_jwk
from agent.mqtt import InboundMessage
from agent.paths import ACTIVITY_FILE, AUDIT_FILE, BROKEN_FILE, WITNESSED_FILE
from agent.provision import initialise
from agent.requests.store import RequestStore
from agent.vault import Vault
from tests.web.harness import PASSWORD, close_harness, make_harness

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)
DEVICE = "dev1"


def _clock() -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: T0 + timedelta(seconds=next(ticks))


def _config(root: Path, state: Path) -> Path:
    path = root / "agent.yaml"
    path.write_text(f"device_id: {DEVICE}\nstate_dir: {state}\n")
    return path


def _fill(log: AuditLog, n: int, event: str = "request_received") -> None:
    for i in range(n):
        log.append(event, n=i)


# --- init -------------------------------------------------------------------------------------


def test_init_writes_device_initialized_so_a_new_device_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    result = initialise(state, DEVICE, now=T0)
    entries = list(read_entries(state / AUDIT_FILE))
    assert len(entries) == 1
    first = entries[0]
    key = load_device_key(state)
    assert (first.seq, first.event, first.prev) == (1, "device_initialized", GENESIS_PREV)
    assert first.fields == {"kid": result.kid, "public_jwk": public_jwk(key.public_key())}
    assert first.fields["kid"] == kid_for(key.public_key())
    cfg = _config(tmp_path, state)
    assert main(["--config", str(cfg), "audit", "verify"]) == 0
    assert capsys.readouterr().out.startswith("audit log OK: 1 entries, head seq 1")


def test_init_refuses_a_state_that_already_has_a_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / AUDIT_FILE).write_bytes(b"")
    with pytest.raises(StateError, match="already exists"):
        initialise(state, DEVICE, now=T0)
    assert (state / AUDIT_FILE).read_bytes() == b""


# --- config -----------------------------------------------------------------------------------


def test_head_interval_defaults_to_an_hour_and_is_bounded() -> None:
    cfg = config.parse({"device_id": "d"})
    assert cfg.audit.head_interval == timedelta(hours=1)
    assert cfg.audit.head_wait == timedelta(seconds=5)
    assert config.parse({"device_id": "d", "audit": {"head_interval": "10m"}}).audit.head_interval \
        == timedelta(minutes=10)
    for bad in ("10s", "2d"):
        with pytest.raises(ConfigError) as info:
            config.parse({"device_id": "d", "audit": {"head_interval": bad}})
        assert "audit.head_interval" in str(info.value.problems)
    with pytest.raises(ConfigError):
        config.parse({"device_id": "d", "audit": {"surprise": 1}})


# --- discontinuity entries and verification ---------------------------------------------------


def _gap(seq: int, hsh: str = "a" * 64, found: tuple[int | None, str | None] = (None, None)) \
        -> HeadGap:
    return HeadGap(AuditHead(DEVICE, seq, hsh, 1_800_000_000), "retained", *found)


def test_discontinuity_seq_skips_past_the_expected_head_and_chains_on_the_last_line(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    with AuditLog(tmp_path / AUDIT_FILE, key, now=_clock()) as log:
        _fill(log, 5)
        fifth = (tmp_path / AUDIT_FILE).read_bytes().splitlines()[-1]
        entry = log.append_discontinuity(_gap(9, found=(5, line_hash(fifth))))
        assert (entry.seq, entry.prev) == (10, line_hash(fifth))
        assert entry.fields["expected_seq"] == 9 and entry.fields["found_seq"] == 5
        after = log.append("agent_started")
        assert after.seq == 11
        # A longer log whose entry at the head's seq differs: max(own, expected) + 1.
        assert log.append_discontinuity(_gap(3)).seq == 12


def test_discontinuity_in_an_empty_log_starts_with_64_zeros(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with AuditLog(tmp_path / AUDIT_FILE, key, now=_clock()) as log:
        entry = log.append_discontinuity(_gap(7))
    assert (entry.seq, entry.prev) == (8, GENESIS_PREV)
    result = verify_file(tmp_path / AUDIT_FILE, key.public_key())
    assert not result.ok and result.first_bad_seq == 1
    assert "cut short or replaced from seq 1" in (result.reason or "")


def test_verify_names_the_gap_yet_checks_every_entry_after_it(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, key, now=_clock()) as log:
        _fill(log, 5)
        log.append_discontinuity(_gap(9, found=(5, "b" * 64)))
        _fill(log, 3)
    result = verify_file(path, key.public_key())
    assert not result.ok
    assert result.first_bad_seq == 6 and result.count == 9 and result.last_seq == 13
    assert [g.seq for g in result.gaps] == [10]
    assert "gap before seq 10" in result.summary() and "expected the head at seq 9" in (
        result.reason or ""
    )
    # An entry after the gap that is altered still breaks the chain, and both are named.
    lines = path.read_bytes().splitlines()
    lines[-1] = lines[-1].replace(b'"n":2', b'"n":7')
    path.write_bytes(b"\n".join(lines) + b"\n")
    broken = verify_file(path, key.public_key())
    assert not broken.ok and "gap before seq 10" in (broken.reason or "")
    assert "at seq 13" in (broken.reason or "")


def test_only_a_signed_discontinuity_may_skip_seq_numbers(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, key, now=_clock()) as log:
        _fill(log, 3)
    other = Ed25519PrivateKey.generate()
    # Entry 3 replaced by a discontinuity signed with another key: not a gap, a forgery.
    forged_path = tmp_path / "copy.jsonl"
    lines = path.read_bytes().splitlines()
    forged_path.write_bytes(b"\n".join(lines[:2]) + b"\n")
    with AuditLog(forged_path, other, now=_clock()) as forger:
        forger.append_discontinuity(_gap(9))
    result = verify_file(forged_path, key.public_key())
    assert not result.ok and result.first_bad_seq == 3 and not result.gaps
    with pytest.raises(ValueError, match="only audit_discontinuity"):
        make_entry(lines[0], 9, "request_received", {}, key, T0, allow_gap=True)


def test_compare_with_head_finds_short_replaced_and_empty_logs(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, key, now=_clock()) as log:
        _fill(log, 4)
    lines = list(iter_log_lines(path))
    third = AuditHead(DEVICE, 3, line_hash(lines[2]), 0)
    assert compare_with_head(lines, third, "retained") is None
    longer = compare_with_head(lines, AuditHead(DEVICE, 9, "c" * 64, 0), "retained")
    assert longer is not None and (longer.found_seq, longer.found_hash) == (4, line_hash(lines[3]))
    replaced = compare_with_head(lines, AuditHead(DEVICE, 2, "c" * 64, 0), "witnessed")
    assert replaced is not None and (replaced.found_seq, replaced.source) == (2, "witnessed")
    empty = compare_with_head([], third, "retained")
    assert empty is not None and (empty.found_seq, empty.found_hash) == (None, None)


def test_a_gap_already_recorded_is_not_found_again(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, key, now=_clock()) as log:
        _fill(log, 6)
        lines = list(iter_log_lines(path))
        old_head = AuditHead(DEVICE, 6, line_hash(lines[5]), 0)
        older = AuditHead(DEVICE, 5, line_hash(lines[4]), 0)
        path.write_bytes(b"\n".join(lines[:3]) + b"\n")  # cut 4-6
        gap = compare_with_head(iter_log_lines(path), old_head, "retained")
        assert gap is not None
        log.append_discontinuity(gap)
        _fill(log, 2)
        # The broker (or a requester) still shows the lost head, or an older one from the cut.
        assert compare_with_head(iter_log_lines(path), old_head, "retained") is None
        assert compare_with_head(iter_log_lines(path), older, "witnessed") is None
        # A head replaced in place (same length, other hash) is recorded once, too.
        lines = list(iter_log_lines(path))
        third = parse_entry(lines[2])
        stale = AuditHead(DEVICE, 3, "e" * 64, 0)
        replaced = compare_with_head(lines, stale, "retained")
        assert replaced is not None and replaced.found_hash == third.hash
        log.append_discontinuity(replaced)
        assert compare_with_head(iter_log_lines(path), stale, "retained") is None


# --- the start-up judgement (broker replaced by a recorded token) ------------------------------


class NoBroker:
    """judge() never touches the client; run() is exercised against mosquitto elsewhere."""

    def wait_connected(self, timeout: float) -> bool:
        raise AssertionError("not used")

    def subscribe(self, topic: str, handler: Callable[[InboundMessage], None]) -> Future[bool]:
        raise AssertionError("not used")

    def unsubscribe(self, topic: str) -> None:
        raise AssertionError("not used")


def _check(state: Path, key: Ed25519PrivateKey, log: AuditLog) -> StartupCheck:
    return StartupCheck(
        client=NoBroker(), topic="p/dev1/audit/head", device_id=DEVICE,
        public_key=key.public_key(), audit=log, state_dir=state, now=lambda: T0,
    )


def test_heads_of_another_key_or_device_are_ignored_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = Ed25519PrivateKey.generate()
    with AuditLog(tmp_path / AUDIT_FILE, key, now=_clock()) as log:
        _fill(log, 2)
        stranger = build_head_jws(Ed25519PrivateKey.generate(), DEVICE, 50, "d" * 64, T0)
        other_device = build_head_jws(key, "dev2", 50, "d" * 64, T0)
        outcome = _check(tmp_path, key, log).judge(
            [stranger.encode(), other_device.encode(), b""]
        )
    assert outcome.expected is None and outcome.gap is None
    assert audit_state(tmp_path) == "ok"
    assert "different key" in caplog.text and "dev2" in caplog.text
    assert [e.event for e in read_entries(tmp_path / AUDIT_FILE)] == ["request_received"] * 2


def test_a_witnessed_head_newer_than_the_retained_one_is_the_one_compared(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_FILE
    with AuditLog(path, key, now=_clock()) as log:
        _fill(log, 6)
        lines = list(iter_log_lines(path))
        retained = build_head_jws(key, DEVICE, 3, line_hash(lines[2]), T0)
        witnessed = build_head_jws(key, DEVICE, 6, line_hash(lines[5]), T0)
        (tmp_path / WITNESSED_FILE).write_text(f"not a jws\n{witnessed}\n")
        assert _check(tmp_path, key, log).judge([retained.encode()]).gap is None
        # Cut the last two entries: the retained head (seq 3) still matches, the witnessed one
        # (seq 6) does not.
        path.write_bytes(b"\n".join(lines[:4]) + b"\n")
        outcome = _check(tmp_path, key, log).judge([retained.encode()])
    assert outcome.gap is not None and outcome.source == "witnessed"
    assert outcome.discontinuity is not None
    assert (outcome.discontinuity.seq, outcome.discontinuity.prev) == (7, line_hash(lines[3]))
    assert audit_state(tmp_path) == "broken"
    marker = json.loads((tmp_path / BROKEN_FILE).read_text())
    assert marker["expected_seq"] == 6 and marker["expected_from"] == "witnessed"


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoints_fall_on_the_interval_whatever_happened(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path / AUDIT_FILE, key, now=_clock())
    activity = AuditLog(tmp_path / ACTIVITY_FILE, key, now=_clock())
    cp = Checkpointer(audit, activity, 3600)
    start = T0 + timedelta(minutes=10)
    assert cp.due(start) == T0 + timedelta(hours=1)
    assert next_checkpoint(T0, 3600) == T0 + timedelta(hours=1)
    assert cp.tick(start) is None
    empty = cp.tick(T0 + timedelta(hours=1))
    assert empty is not None and empty.fields == {"activity_seq": 0, "activity_hash": GENESIS_PREV}
    _fill(activity, 3, "clip_recorded")
    assert cp.tick(T0 + timedelta(hours=1, minutes=59)) is None
    # Down for three intervals: one checkpoint, not three.
    late = cp.tick(T0 + timedelta(hours=5, seconds=1))
    last_activity = activity.last_entry()
    assert late is not None and last_activity is not None
    assert late.fields == {"activity_seq": 3, "activity_hash": last_activity.hash}
    assert cp.tick(T0 + timedelta(hours=5, minutes=30)) is None
    assert cp.written == 2
    result, checks = verify_checkpoints(tmp_path / AUDIT_FILE, tmp_path / ACTIVITY_FILE,
                                        key.public_key())
    assert result is not None and result.ok and checks.ok and checks.checked == 1


def _device_with_two_logs(tmp_path: Path) -> tuple[Path, Path, Ed25519PrivateKey]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = create_device_keys(state)
    audit = AuditLog(state / AUDIT_FILE, key, now=_clock())
    activity = AuditLog(state / ACTIVITY_FILE, key, now=_clock())
    audit.append("agent_started")
    _fill(activity, 4, "clip_recorded")
    cp = Checkpointer(audit, activity, 60)
    assert cp.tick(T0) is None  # the first look only sets the schedule
    assert cp.tick(T0 + timedelta(days=1)) is not None
    _fill(activity, 2, "clip_deleted")
    audit.append("agent_stopped")
    return state, _config(tmp_path, state), key


def test_verify_checks_both_logs_and_each_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, cfg, _ = _device_with_two_logs(tmp_path)
    assert main(["--config", str(cfg), "audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("audit log OK: 3 entries, head seq 3")
    assert "activity log OK: 6 entries" in out and "1 checkpoint(s) match" in out
    # The activity log cut below what the checkpoint vouches for: exit 1 naming the checkpoint.
    lines = (state / ACTIVITY_FILE).read_bytes().splitlines()
    (state / ACTIVITY_FILE).write_bytes(b"\n".join(lines[:3]) + b"\n")
    assert main(["--config", str(cfg), "audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint at seq 2" in err and "seq 4" in err


def test_verify_fails_when_the_activity_log_is_edited_or_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, cfg, _ = _device_with_two_logs(tmp_path)
    path = state / ACTIVITY_FILE
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"n":1', b'"n":9'))
    assert main(["--config", str(cfg), "audit", "verify"]) == 1
    assert "activity log broken at seq 2" in capsys.readouterr().err
    path.unlink()
    assert main(["--config", str(cfg), "audit", "verify"]) == 1
    assert "activity.jsonl is missing" in capsys.readouterr().err


def test_a_pre_revision_2_single_log_still_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = create_device_keys(state)
    with AuditLog(state / AUDIT_FILE, key, now=_clock()) as log:
        log.append("agent_started", version="0.1.0")
        log.append("clip_recorded", clip="c1", bytes=10)
        log.append("request_received", jti="j" * 16)
        log.append("clip_deleted", clip="c1", reason="retention")
    cfg = _config(tmp_path, state)
    assert main(["--config", str(cfg), "audit", "verify"]) == 0
    assert capsys.readouterr().out.startswith("audit log OK: 4 entries, head seq 4")
    assert main(["--config", str(cfg), "audit", "show", "--json"]) == 0
    assert [e["event"] for e in json.loads(capsys.readouterr().out)][1] == "clip_recorded"


def test_show_covers_both_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg, _ = _device_with_two_logs(tmp_path)
    assert main(["--config", str(cfg), "audit", "show"]) == 0
    out = capsys.readouterr().out
    assert "audit.jsonl:" in out and "activity.jsonl:" in out
    assert out.index("checkpoint") < out.index("activity.jsonl:") < out.index("clip_recorded")
    assert main(["--config", str(cfg), "audit", "show", "--json"]) == 0
    events = [e["event"] for e in json.loads(capsys.readouterr().out)]
    assert events == ["agent_started", "checkpoint", "agent_stopped"] + ["clip_recorded"] * 4 \
        + ["clip_deleted"] * 2
    assert main(["--config", str(cfg), "audit", "show", "--json", "--log", "activity",
                 "--since", "5"]) == 0
    assert [e["seq"] for e in json.loads(capsys.readouterr().out)] == [5, 6]


# --- routing: storage warnings are camera activity ----------------------------------------------


def test_storage_full_and_recovered_go_to_the_activity_log_once_each(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    master = os.urandom(32)
    activity = AuditLog(tmp_path / ACTIVITY_FILE, key, now=_clock())
    with (
        Vault(tmp_path, master, reserve_bytes=2**62) as full,
        Vault(tmp_path, master, reserve_bytes=0) as roomy,
    ):
        worker = RetentionWorker(roomy, activity=activity)
        assert not worker.check_space()  # fine at start: nothing to say
        worker.vault = full
        assert worker.check_space() and worker.check_space()
        worker.vault = roomy
        assert not worker.check_space()
    events = [(e.event, e.fields["reserve_bytes"]) for e in read_entries(activity.path)]
    assert events == [("storage_full", 2**62), ("storage_ok", 0)]
    assert not (tmp_path / AUDIT_FILE).exists()


def test_the_checkpoint_worker_follows_its_injected_clock(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path / AUDIT_FILE, key, now=_clock())
    activity = AuditLog(tmp_path / ACTIVITY_FILE, key, now=_clock())
    now = [T0 + timedelta(minutes=59)]
    worker = CheckpointWorker(Checkpointer(audit, activity, 3600), now=lambda: now[0])
    assert worker.tick() == 60.0  # due on the hour
    now[0] = T0 + timedelta(hours=1)
    assert worker.tick() == 3600.0
    assert worker.stats() == {"written": 1, "last_error": None}
    assert [e.event for e in read_entries(audit.path)] == ["checkpoint"]


def test_a_button_press_with_nothing_pending_is_camera_activity(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    audit = AuditLog(tmp_path / AUDIT_FILE, key, now=_clock())
    activity = AuditLog(tmp_path / ACTIVITY_FILE, key, now=_clock())

    def no_delivery() -> Deliverer:
        raise AssertionError("nothing is delivered")

    with RequestStore(tmp_path / "requests.db") as store, Vault(tmp_path, os.urandom(32)) as vault:
        coordinator = ApprovalCoordinator(
            store=store, audit=audit, activity=activity,
            policy=Policy.from_settings(("button",), "any", timedelta(hours=1), timedelta(1)),
            vault=vault, respond=lambda *_a, **_k: None, deliverer_factory=no_delivery,
            device_id=DEVICE,
        )
        assert coordinator.button_press() is None
        assert coordinator.button_hold() is None
    assert [e.event for e in read_entries(activity.path)] == ["button_ignored"] * 2
    assert not audit.path.exists()


def test_owner_logins_and_failures_go_to_the_activity_log_before_the_session(
    tmp_path: Path,
) -> None:
    web = make_harness(tmp_path)
    try:
        activity = AuditLog(web.state / ACTIVITY_FILE, web.key, now=web.clock)
        web.web.services.activity = activity
        before = web.audit_events()
        assert web.try_login(web.client, "wrong password").status_code == 401
        web.login()
        assert [e.event for e in read_entries(activity.path)] == ["app_login_failed", "app_login"]
        assert web.audit_events() == before  # the request log never hears of the owner
        # A login that cannot be recorded does not happen.
        activity.close()
        web.client.cookies.clear()
        refused = web.try_login(web.client, PASSWORD)
        assert refused.status_code == 503
        assert web.client.get("/api/session").status_code != 200
    finally:
        close_harness(web)
