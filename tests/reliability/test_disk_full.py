"""A full disk under the running agent: a small tmpfs mounted as its state directory.

- **evicts**: the disk is filled with older clips (one of them held); the agent deletes the
  oldest unheld ones early (``clip_deleted`` reason ``space``, audited, oldest first), keeps the
  held one and goes on recording new clips.
- **pauses**: everything on the disk is held, so nothing may be evicted: recording pauses, and
  ``status.json`` and ``doorbell-agent status`` (text and JSON) say why (disk ``full``, the
  recorder's last error). Once the owner releases the hold, space is reclaimed and clips resume.
- **ENOSPC**: something else fills the disk to the last byte while a clip is being written:
  whichever write meets the full disk first, the clip in progress is closed or discarded (no
  file or row left, the failure counted), the agent stays up, no audit line is torn and no
  earlier clip is lost; once the space is back, status is current again and recording resumes.

Each ends with ``audit verify`` and ``clips verify`` passing and no ``.part`` file left. The
tmpfs needs root (``mount -t tmpfs``); without it the tests are skipped, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.audit import AuditLog
from agent.keys import load_device_key, load_storage_key
from agent.timeutil import utcnow
from agent.vault import ClipInfo, Vault
from tests.mosquitto import Mosquitto
from tests.reliability.harness import AgentProcess, wait_until

TMPFS_SIZE = "16m"
CLIP_BYTES = 512 * 1024
HOLDER = "owner-review"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def tmpfs_root(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/agent`` whose ``state`` directory is a fresh tmpfs of TMPFS_SIZE (mode 0700)."""
    root = tmp_path / "agent"
    state = root / "state"
    state.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the state directory: {done.stderr.strip()}")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(state)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], check=False)


def fill_with_clips(agent: AgentProcess, rng: random.Random) -> list[ClipInfo]:
    """Record older clips (audited, as the agent would) until free space is below the reserve."""
    start = utcnow() - timedelta(hours=3)
    clips: list[ClipInfo] = []
    with (
        AuditLog(agent.state_dir / "activity.jsonl", load_device_key(agent.state_dir)) as audit,
        Vault(agent.state_dir, load_storage_key(agent.state_dir), audit=audit) as vault,
    ):
        while not vault.space().low:
            begins = start + timedelta(minutes=len(clips))
            writer = vault.create_clip(begins, "video/x-matroska")
            writer.write(rng.randbytes(CLIP_BYTES))
            clips.append(writer.finish(begins + timedelta(seconds=30), frames=50))
    assert len(clips) >= 10, "the tmpfs should hold a good number of clips"
    return clips


def worker_stats(agent: AgentProcess, worker: str) -> dict[str, Any]:
    """``status.json``'s stats of one worker of the running agent ({} until written)."""
    status = agent.status() or {}
    if status.get("pid") != (agent.proc.pid if agent.proc else None):
        return {}
    stats = status.get("workers", {}).get(worker, {}).get("stats")
    return stats if isinstance(stats, dict) else {}


def recorder_stats(agent: AgentProcess) -> dict[str, Any]:
    """The camera worker's recorder stats from ``status.json``."""
    recorder = worker_stats(agent, "camera").get("recorder")
    return recorder if isinstance(recorder, dict) else {}


def recorded_after(agent: AgentProcess, seq: int) -> list[dict[str, Any]]:
    """``clip_recorded`` entries after activity-log seq ``seq``."""
    return [e for e in agent.audit_events("clip_recorded") if e["seq"] > seq]


def head_seq(agent: AgentProcess) -> int:
    """The activity log's last seq (clip entries live there: contract §7)."""
    entries = agent.audit_entries(("activity.jsonl",))
    return entries[-1]["seq"] if entries else 0


def finish_checks(agent: AgentProcess) -> None:
    """Clean stop, intact audit chain, every clip verifies, nothing half-written left."""
    assert agent.stop() == 0, agent.log_tail()
    assert (agent.state_dir / "audit.jsonl").read_bytes().endswith(b"\n")
    agent.verify_audit()
    agent.verify_clips()
    assert not list((agent.state_dir / "vault").glob("*.part"))
    assert "Traceback" not in agent.log_text()


def test_low_space_evicts_oldest_unheld_clips_and_recording_goes_on(
    tmpfs_root: Path, mosquitto: Mosquitto, motion_video: Path
) -> None:
    rng = random.Random(7)
    with AgentProcess(tmpfs_root, mosquitto, camera=motion_video) as agent:
        clips = fill_with_clips(agent, rng)
        held = clips[0]
        with agent.open_vault() as vault:
            vault.hold(HOLDER, held.start, held.end)
        mark = head_seq(agent)
        agent.start()
        # Two new clips recorded while the disk was at its limit: recording went on.
        wait_until(lambda: len(recorded_after(agent, mark)) >= 2, "two new clips", agent=agent,
                   timeout=90)
        evicted = [e["clip"] for e in agent.audit_events("clip_deleted", reason="space")]
        assert evicted, "nothing was evicted although free space was below the reserve"
        # Oldest first, never the held clip, and every eviction was audited before the clip went.
        by_age = [c.id for c in clips[1:]]
        assert evicted == by_age[: len(evicted)]
        remaining = {c.id for c in agent.clips()}
        assert held.id in remaining
        assert not remaining.intersection(evicted)
        assert set(by_age[len(evicted):]) <= remaining
        assert agent.running
        finish_checks(agent)


def test_everything_held_pauses_recording_and_status_says_why(
    tmpfs_root: Path, mosquitto: Mosquitto, motion_video: Path
) -> None:
    rng = random.Random(8)
    with AgentProcess(tmpfs_root, mosquitto, camera=motion_video) as agent:
        clips = fill_with_clips(agent, rng)
        with agent.open_vault() as vault:
            vault.hold(HOLDER, clips[0].start, clips[-1].end)
            space = vault.space()
        # Closing the vault checkpointed its WAL: take free space well below the reserve again
        # (half of it stays free for the index, audit log and status.json).
        (agent.state_dir / ".ballast").write_bytes(bytes(max(0, space.free - space.reserve // 2)))
        mark = head_seq(agent)
        agent.start()

        def paused() -> bool:
            retention = worker_stats(agent, "retention")
            error = recorder_stats(agent).get("last_error") or ""
            return retention.get("storage") == "full" and "storage full" in error

        wait_until(paused, "status.json to show the disk full and recording paused",
                   agent=agent, timeout=60)
        retention = worker_stats(agent, "retention")
        assert "held" in (retention.get("last_error") or "")
        assert not recorded_after(agent, mark)
        assert not agent.audit_events("clip_deleted")

        text = agent.cli_subprocess("status")
        assert text.code == 0, text.err
        assert "disk: FULL" in text.out
        assert "no new clip is recorded until space is freed" in text.out
        recording = next(line for line in text.out.splitlines() if line.startswith("recording:"))
        assert "storage full" in recording
        doc = json.loads(agent.cli_subprocess("status", "--json").out)
        assert doc["disk"]["state"] == "full"
        assert doc["disk"]["free_bytes"] < doc["disk"]["reserve_bytes"]
        assert doc["agent"]["state"] == "running"
        agent.verify_audit()  # intact while the disk is full

        # The owner releases the hold: retention reclaims space, recording resumes.
        with agent.open_vault() as vault:
            assert vault.release_hold(HOLDER)
        wait_until(lambda: recorded_after(agent, mark), "a clip after the hold was released",
                   agent=agent, timeout=90)
        evicted = [e["clip"] for e in agent.audit_events("clip_deleted", reason="space")]
        assert evicted == [c.id for c in clips[: len(evicted)]]
        wait_until(lambda: worker_stats(agent, "retention").get("storage") == "ok",
                   "the disk to be reported ok again", agent=agent, timeout=30)
        finish_checks(agent)


def fill_to_the_last_byte(path: Path) -> int:
    """Write ``path`` until the filesystem refuses (ENOSPC); returns the bytes written."""
    block = b"\xa5" * 65536
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    written += f.write(block[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return written


def test_enospc_while_writing_a_clip_is_survived(
    tmpfs_root: Path, mosquitto: Mosquitto, motion_video: Path
) -> None:
    with AgentProcess(tmpfs_root, mosquitto, camera=motion_video) as agent:
        agent.start()
        part = wait_until(agent.recording, "a clip being written", agent=agent, timeout=60)
        in_progress = part.stem
        vault_dir = agent.state_dir / "vault"
        ballast = agent.state_dir / ".ballast"
        seq_before = head_seq(agent)
        # Judged by behaviour, never by the wording of an error: which write meets the full
        # disk first (the clip file, the vault index, the audit log) depends on timing.
        kept = {c.id: c.sha256 for c in agent.clips() if c.state == "final"}
        fill_to_the_last_byte(ballast)

        def settled() -> bool:
            # The clip in progress ends either way: discarded (its .part removed) or closed (a
            # published .clip). A .part that stays means a writer stuck on the full disk.
            return not (vault_dir / f"{in_progress}.part").exists()

        wait_until(settled, "the clip in progress to be closed or discarded", agent=agent,
                   timeout=90)
        assert agent.running
        # Nothing half-written in the audit log: every line is complete and the chain holds.
        assert (agent.state_dir / "audit.jsonl").read_bytes().endswith(b"\n")
        agent.verify_audit()

        ballast.unlink()
        freed = head_seq(agent)
        wait_until(lambda: recorded_after(agent, freed), "a clip once space was back",
                   agent=agent, timeout=90)
        assert head_seq(agent) > seq_before

        clips = {c.id: c for c in agent.clips()}
        # Nothing else lost: every clip finished before the disk filled is still there, intact.
        assert {i: clips[i].sha256 for i in kept if i in clips} == kept
        interrupted = clips.get(in_progress)
        if interrupted is not None and interrupted.state == "final":
            # Closed: published with its clip_recorded entry (and checked by clips verify below).
            assert agent.audit_events("clip_recorded", clip=in_progress)
        else:
            # Discarded: its file is gone and the failure is counted. The index row may outlive
            # the file when the full disk refused that change too; recovery drops it (below).
            assert not list(vault_dir.glob(f"{in_progress}.*"))

            def counted() -> dict[str, Any]:
                recorder = recorder_stats(agent)
                return recorder if recorder.get("failures", 0) >= 1 else {}

            recorder = wait_until(counted, "status.json to count the failed clip", agent=agent)
            assert recorder["last_error"]
        with contextlib.suppress(FileNotFoundError):
            ballast.unlink()
        finish_checks(agent)
        with agent.open_vault() as vault:
            vault.recover()
            after = {c.id: c for c in vault.list_clips()}
        assert all(c.state == "final" for c in after.values())
        assert (in_progress in after) == (interrupted is not None and interrupted.state == "final")
