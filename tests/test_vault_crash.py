"""kill -9 of a vault writer at random points, then reopen: consistent, recovered or discarded.

A child process records clips of random sizes in random write sizes, printing what it has
handed to the vault; the parent SIGKILLs it after a random number of steps, reopens the vault,
runs recovery and checks every clip against what the child wrote.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.stream import AES_256_GCM, sealed_header_size
from agent.vault import Vault, build_header

CS = 256
MASTER = bytes(range(100, 132))
ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import random, sys
from datetime import datetime, timedelta, UTC
from pathlib import Path
from agent.vault import Vault

root, seed, cs, mode = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
vault = Vault(root, bytes(range(100, 132)), chunk_size=cs, sync_bytes=3 * cs)
t0 = datetime(2026, 3, 1, tzinfo=UTC)

def data_for(clip_no, total):
    return random.Random(f"{seed}-{clip_no}").randbytes(total)

if mode == "pause":
    total = int(sys.argv[5])
    w = vault.create_clip(t0, "application/octet-stream")
    print(f"start 0 {w.id} {total}", flush=True)
    w.write(data_for(0, total))
    print(f"wrote {total}", flush=True)
    sys.stdin.readline()
    sys.exit(3)

steps = random.Random(seed)
clip_no = 0
while True:
    start = t0 + timedelta(minutes=clip_no)
    total = steps.randrange(0, 30 * cs)
    data = data_for(clip_no, total)
    w = vault.create_clip(start, "application/octet-stream")
    print(f"start {clip_no} {w.id} {total}", flush=True)
    pos = 0
    while pos < total:
        n = steps.randrange(1, 3 * cs)
        w.write(data[pos : pos + n])
        pos = min(total, pos + n)
        print(f"wrote {pos}", flush=True)
    w.finish(start + timedelta(seconds=5), clip_no)
    print(f"finished {w.id}", flush=True)
    clip_no += 1
"""


def expected_data(seed: int, clip_no: int, total: int) -> bytes:
    return random.Random(f"{seed}-{clip_no}").randbytes(total)


@dataclass
class Audit:
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def append(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))


@dataclass
class ChildLog:
    clips: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (clip_no, total)
    finished: set[str] = field(default_factory=set)
    current: str | None = None
    handed_over: int = 0  # plaintext bytes the current clip's writer had accepted


def spawn(root: Path, seed: int, mode: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(seed), str(CS), mode, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def follow(child: subprocess.Popen[str], log: ChildLog, lines: int) -> None:
    """Read ``lines`` progress lines (or until the child dies) into ``log``."""
    assert child.stdout is not None
    for _ in range(lines):
        line = child.stdout.readline()
        if not line:
            break
        kind, *rest = line.split()
        if kind == "start":
            log.clips[rest[1]] = (int(rest[0]), int(rest[2]))
            log.current, log.handed_over = rest[1], 0
        elif kind == "wrote":
            log.handed_over = int(rest[0])
        elif kind == "finished":
            log.finished.add(rest[0])


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()
    for pipe in (child.stdin, child.stdout):
        if pipe is not None:
            pipe.close()


def sealed_floor(handed_over: int) -> int:
    """Plaintext bytes certainly sealed into full chunks once ``handed_over`` were written."""
    return 0 if handed_over == 0 else (handed_over - 1) // CS * CS


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_kill_9_at_a_random_point(tmp_path: Path, seed: int) -> None:
    child = spawn(tmp_path, seed, "loop")
    log = ChildLog()
    follow(child, log, random.Random(seed).randrange(1, 160))
    kill(child)

    audit = Audit()
    with Vault(tmp_path, MASTER, chunk_size=CS, audit=audit) as vault:
        report = vault.recover()
        clips = {c.id: c for c in vault.list_clips()}
        assert all(c.state == "final" for c in clips.values())
        assert not list(vault.dir.glob("*.part"))
        assert sorted(p.stem for p in vault.dir.glob("*.clip")) == sorted(clips)
        verify = vault.verify()
        assert verify.ok, verify.failures
        assert verify.checked == len(clips)

        recovered = {c.id: c for c in report.recovered}
        discarded = dict(report.discarded)
        assert report.unrecoverable == ()
        for clip_id in set(recovered) | set(discarded):
            if clip_id != log.current and clip_id not in log.clips:
                # Killed inside create_clip, before it returned: no plaintext was written.
                header = sealed_header_size(build_header(clip_id, AES_256_GCM, CS))
                assert discarded.get(clip_id) in (
                    "its file was never created",
                    "no header authenticates (0 bytes on disk)",
                    f"no chunk authenticates ({header} bytes on disk)",
                )
            else:
                assert clip_id == log.current
        for clip_id, (clip_no, total) in log.clips.items():
            want = expected_data(seed, clip_no, total)
            if clip_id in log.finished:
                assert clip_id not in recovered and clip_id not in discarded
                with vault.open_clip(clip_id, verify_sha256=True) as reader:
                    assert reader.read() == want
                continue
            assert clip_id == log.current
            if clip_id in discarded:
                # Nothing was sealed yet: a discard must not have thrown footage away.
                assert sealed_floor(log.handed_over) == 0
                assert clip_id not in clips
            elif clip_id in clips:
                with vault.open_clip(clip_id, verify_sha256=True) as reader:
                    got = reader.read()
                assert want.startswith(got), "recovered bytes differ from what was written"
                assert len(got) >= sealed_floor(log.handed_over)
                assert len(got) % CS == 0 or len(got) == total
            else:
                # Killed before the clip's row was committed: nothing to recover.
                assert log.handed_over == 0

        assert [f["clip"] for e, f in audit.events if e == "clip_recovered"] == list(recovered)
        assert [f["clip"] for e, f in audit.events if e == "clip_discarded"] == list(discarded)
        for event, fields in audit.events:
            if event == "clip_recovered":
                clip = recovered[str(fields["clip"])]
                assert (fields["bytes"], fields["sha256"]) == (clip.size, clip.sha256)

    with Vault(tmp_path, MASTER, chunk_size=CS) as again:
        assert again.recover() == type(report)()
        assert again.verify().ok


@pytest.mark.parametrize("total", [0, CS - 1, CS, CS + 1, 7 * CS + 5])
def test_live_writer_in_another_process_is_left_alone(tmp_path: Path, total: int) -> None:
    child = spawn(tmp_path, 99, "pause", str(total))
    log = ChildLog()
    follow(child, log, 2)
    assert log.handed_over == total and log.current is not None
    try:
        with Vault(tmp_path, MASTER, chunk_size=CS) as vault:
            assert vault.recover() == type(vault.recover())()
            (listed,) = vault.list_clips()
            assert (listed.id, listed.state) == (log.current, "writing")
            assert (vault.dir / f"{log.current}.part").exists()
    finally:
        kill(child)

    audit = Audit()
    with Vault(tmp_path, MASTER, chunk_size=CS, audit=audit) as vault:
        report = vault.recover()
        sealed = sealed_floor(total)
        if sealed == 0:
            assert [i for i, _ in report.discarded] == [log.current]
            assert vault.list_clips() == []
        else:
            (clip,) = report.recovered
            assert clip.size == sealed
            with vault.open_clip(clip.id, verify_sha256=True) as reader:
                assert reader.read() == expected_data(99, 0, total)[:sealed]
            assert [e for e, _ in audit.events] == ["clip_recovered"]
