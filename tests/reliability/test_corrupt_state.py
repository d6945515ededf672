"""Damaged files in the state directory: a clear error or a clear, audited recovery; never a
traceback, never data silently dropped.

One *golden* state is made once with the real agent (two clips, an enrolled requester, a
pending request sent over MQTT, a clean stop). Each case copies it, damages one file, and runs
the real ``doorbell-agent`` (``run`` always as its own process): the exit status follows the
contract (2 for config/usage errors, 1 otherwise), stderr is one ``doorbell-agent: error:``
naming the file, no ``Traceback``; and what the damage did not touch is still there afterwards
(clip files, audit log, request store byte for byte where the agent refused to start).

Recoveries (``run`` starts): a torn audit tail is moved aside and ``audit_repaired`` is
audited; a garbage ``status.json`` is replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.audit import AuditLog
from agent.cli import main as agent_main
from agent.keys import load_device_key, load_storage_key
from agent.timeutil import utcnow
from agent.vault import Vault
from tests.camera.camera_helpers import encode_jpeg
from tests.camera.legacy_mkv import MatroskaMuxer
from tests.mosquitto import Mosquitto
from tests.reliability.harness import AGENT, REPO, AgentProcess, Requester, wait_until

pytestmark = pytest.mark.timeout(180)

ERROR_PREFIX = "doorbell-agent: error: "


@dataclass(frozen=True)
class Golden:
    """The prepared state: its directory, the clips' ids and the pending request's jti."""

    root: Path
    clips: tuple[str, ...]
    jti: str


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One mosquitto for the module (the golden run and every ``run`` that starts)."""
    with Mosquitto(tmp_path_factory.mktemp("broker")) as mosquitto:
        yield mosquitto


def noise_clip(rng: random.Random, frames: int) -> bytes:
    """A real (MJPEG Matroska) clip of noise frames, about 20 kB."""
    muxer = MatroskaMuxer(64, 48, fps=2)
    data = muxer.start()
    for n in range(frames):
        image = np.frombuffer(rng.randbytes(64 * 48 * 3), np.uint8).reshape(48, 64, 3)
        data += muxer.add(encode_jpeg(image), n * 500)
    return data


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto) -> Golden:
    """Two clips, a requester, a pending request, a clean stop: real agent, real MQTT."""
    root = tmp_path_factory.mktemp("golden")
    with AgentProcess(root / "agent", broker) as agent:
        state = agent.state_dir
        rng = random.Random(3)
        start = utcnow() - timedelta(minutes=30)
        ids = []
        with (
            AuditLog(state / "audit.jsonl", load_device_key(state)) as audit,
            Vault(state, load_storage_key(state), audit=audit, chunk_size=4096) as vault,
        ):
            for n in range(2):
                writer = vault.create_clip(start + timedelta(minutes=n), "video/x-matroska")
                writer.write(noise_clip(rng, 40))
                ids.append(writer.finish(start + timedelta(minutes=n, seconds=20), 40).id)
        requester = Requester(root / "requester", agent)
        try:
            agent.start()
            jti = requester.send(start, start + timedelta(minutes=10))
            agent.wait_request(jti, ["pending"])
            assert agent.stop() == 0, agent.log_tail()
        finally:
            requester.close()
    return Golden(root / "agent", tuple(ids), jti)


class Case:
    """A private copy of the golden state, and the agent's command line over it."""

    def __init__(self, golden: Golden, root: Path) -> None:
        shutil.copytree(golden.root, root, symlinks=True)
        self.root = root
        self.state = root / "state"
        self.config_path = root / "agent.yaml"
        cfg = yaml.safe_load(self.config_path.read_text())
        cfg["state_dir"] = str(self.state)
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.golden = golden

    def cli(self, *args: str) -> tuple[int, str, str]:
        """``doorbell-agent --config CFG ARGS`` in this process: (status, stdout, stderr).

        An exception escaping main() (what a user would see as a traceback) fails the test.
        """
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = agent_main(["--config", str(self.config_path), *args])
        return code, out.getvalue(), err.getvalue()

    def run_refused(self, timeout: float = 60.0) -> tuple[int, str]:
        """``doorbell-agent run`` as its own process, expected to refuse at once."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        done = subprocess.run(
            [sys.executable, "-c", AGENT, "--config", str(self.config_path), "run"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        return done.returncode, done.stderr

    def run_briefly(self) -> str:
        """``doorbell-agent run`` as its own process until it wrote status.json, then SIGTERM;
        asserts a clean exit and returns its log."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
        log = self.root / "run.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-c", AGENT, "--config", str(self.config_path), "run"],
                cwd=REPO, env=env, stdout=sink, stderr=sink,
            )
        try:
            def running() -> bool:
                assert proc.poll() is None, log.read_text()
                with contextlib.suppress(FileNotFoundError, ValueError):
                    doc = json.loads((self.state / "status.json").read_text())
                    return bool(doc.get("pid") == proc.pid and doc.get("state") == "running")
                return False

            wait_until(running, "the agent to run")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert "Traceback" not in text, text
        return text

    def fingerprint(self, *names: str) -> dict[str, str]:
        """SHA-256 of state files (relative names; vault/ files included with ``vault``)."""
        out = {}
        for name in names:
            path = self.state / name
            files = sorted(path.iterdir()) if path.is_dir() else [path]
            for f in files:
                if f.is_file() and not f.name.startswith("."):
                    out[str(f.relative_to(self.state))] = hashlib.sha256(f.read_bytes()).hexdigest()
        return out

    def clip_path(self, n: int) -> Path:
        """The file of the n-th golden clip."""
        return self.state / "vault" / f"{self.golden.clips[n]}.clip"


@pytest.fixture
def case(golden: Golden, tmp_path: Path) -> Case:
    """A fresh copy of the golden state."""
    return Case(golden, tmp_path / "agent")


def one_error(stderr: str, *needles: str) -> str:
    """The ``doorbell-agent: error:`` line of ``stderr``, checked to mention every needle."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return lines[0]


# --- the clip index -----------------------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an SQLite database\n" * 200)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _deleted(path: Path) -> None:
    path.unlink()
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        side.unlink(missing_ok=True)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage": _garbage, "truncated": _truncated, "empty": _empty,
}


@pytest.mark.parametrize("damage", [*DAMAGE, "deleted"])
def test_damaged_clip_index_is_refused_and_no_clip_file_is_touched(
    case: Case, damage: str
) -> None:
    (DAMAGE.get(damage) or _deleted)(case.state / "vault.db")
    before = case.fingerprint("vault", "audit.jsonl", "requests.db")
    code, _, err = case.cli("clips", "list")
    assert code == 1
    one_error(err, "vault.db")
    code, err = case.run_refused()
    assert code == 1
    line = one_error(err, "vault.db")
    if damage in ("empty", "deleted"):
        # A new empty index would orphan the clips, and recovery would delete them.
        assert "holds 2 clip file(s)" in line
    # Refused before anything: every clip file and the audit log are as they were.
    assert case.fingerprint("vault", "audit.jsonl", "requests.db") == before
    assert {p.stem for p in (case.state / "vault").glob("*.clip")} == set(case.golden.clips)


# --- the request store --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_request_store_is_refused_never_recreated(case: Case, damage: str) -> None:
    db = case.state / "requests.db"
    DAMAGE[damage](db)
    damaged = db.read_bytes()
    before = case.fingerprint("vault", "audit.jsonl")
    for command in (("requests", "list"), ("pending",), ("requesters", "list"), ("status",)):
        code, _, err = case.cli(*command)
        assert code == 1, (command, err)
        one_error(err, "requests.db", "restore requests.db from a backup")
    code, err = case.run_refused()
    assert code == 1
    one_error(err, "requests.db")
    # Still refused on a second try: the first did not quietly start an empty store.
    assert case.cli("requests", "list")[0] == 1
    if damage != "empty":
        assert db.read_bytes() == damaged
    assert case.fingerprint("vault", "audit.jsonl") == before


# --- the audit log ------------------------------------------------------------------------------


def _audit(case: Case) -> list[dict[str, object]]:
    data = (case.state / "audit.jsonl").read_bytes()
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def test_torn_audit_tail_is_reported_then_repaired_on_the_record(case: Case) -> None:
    log = case.state / "audit.jsonl"
    data = log.read_bytes()
    lines = data.split(b"\n")[:-1]
    torn = lines[-1][: len(lines[-1]) // 2]  # a crash in the middle of the last write
    log.write_bytes(b"\n".join(lines[:-1]) + b"\n" + torn)
    code, _, err = case.cli("audit", "verify")
    assert code == 1
    one_error(err, f"seq {len(lines)}")
    case.run_briefly()
    # The fragment was moved aside (not dropped) and the repair itself is signed and chained.
    saved = list(case.state.glob("audit.jsonl.torn-*"))
    assert len(saved) == 1 and saved[0].read_bytes() == torn
    repaired = [e for e in _audit(case) if e["event"] == "audit_repaired"]
    assert len(repaired) == 1
    assert repaired[0]["torn_bytes"] == len(torn)
    assert repaired[0]["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert case.cli("audit", "verify")[0] == 0


@pytest.mark.parametrize("where", ["end", "middle"])
def test_garbage_audit_line_is_named_and_never_extended(case: Case, where: str) -> None:
    log = case.state / "audit.jsonl"
    lines = log.read_bytes().split(b"\n")[:-1]
    bad = len(lines) + 1 if where == "end" else 2
    if where == "end":
        lines.append(b"\x00garbage, not an audit entry")
    else:
        lines[1] = lines[1].replace(b'"seq":2', b'"seq":7')  # an edited entry
    log.write_bytes(b"\n".join(lines) + b"\n")
    before = log.read_bytes()
    code, _, err = case.cli("audit", "verify")
    assert code == 1
    one_error(err, f"seq {bad}")
    code, _, err = case.cli("audit", "show")
    if where == "end":
        assert code == 1
        one_error(err, f"line {bad}")
    if where == "end":
        # The damaged last entry cannot be chained onto: the agent refuses rather than guess.
        code, err = case.run_refused()
        assert code == 1
        one_error(err, "audit", "refusing to extend a damaged chain")
        assert log.read_bytes() == before
    else:
        # Damage earlier in the log: the agent runs (its appends chain onto the intact last
        # entry) and verify keeps naming the damaged seq; nothing before it is rewritten.
        case.run_briefly()
        assert log.read_bytes().startswith(before)
        code, _, err = case.cli("audit", "verify")
        assert code == 1
        one_error(err, f"seq {bad}")


# --- clip files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "bitflip"])
def test_damaged_clip_file_is_named_and_kept(case: Case, damage: str) -> None:
    path = case.clip_path(0)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[len(data) - 1000 :]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    clip = case.golden.clips[0]
    code, out, err = case.cli("clips", "verify")
    assert code == 1, out + err
    assert clip in out + err and case.golden.clips[1] not in err
    export = case.root / "export.mkv"
    code, _, err = case.cli("clips", "export", clip, "-o", str(export))
    assert code == 1
    one_error(err, clip)
    assert not export.exists(), "no partial plaintext may be left behind"
    # The good clip still exports; the agent runs; the damaged clip is kept as evidence.
    assert case.cli("clips", "export", case.golden.clips[1], "-o", str(export))[0] == 0
    case.run_briefly()
    assert path.read_bytes() == bytes(data)
    assert {c["id"] for c in json.loads(case.cli("clips", "list", "--json")[1])} == set(
        case.golden.clips
    )


# --- status.json, keys, config ------------------------------------------------------------------


def test_garbage_status_json_is_reported_and_replaced(case: Case) -> None:
    (case.state / "status.json").write_text("{{{ not json")
    code, out, err = case.cli("status")
    assert code == 0, err
    assert "agent: not running" in out or "agent: unknown" in out
    code, out, _ = case.cli("status", "--json")
    assert code == 0 and json.loads(out)["agent"]["state"] != "running"
    case.run_briefly()
    assert json.loads((case.state / "status.json").read_text())["state"] == "stopped"


def _ec_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("device.key", b"not a key at all\n", "is not a PEM private key"),
        ("device.key", b"", "is not a PEM private key"),
        ("device.key", None, "not an Ed25519 key"),
        ("storage.key", b"short", "not a 32-byte key"),
    ],
    ids=["device-garbage", "device-empty", "device-ec", "storage-short"],
)
def test_bad_key_file_is_a_clear_error(
    case: Case, name: str, content: bytes | None, needle: str
) -> None:
    path = case.state / name
    path.write_bytes(_ec_key_pem() if content is None else content)
    before = case.fingerprint("vault", "audit.jsonl", "requests.db", name)
    code, _, err = case.cli("status")
    assert code == 1
    one_error(err, name, needle)
    code, err = case.run_refused()
    assert code == 1
    one_error(err, name, needle)
    # Nothing was rewritten (no new key made, nothing audited, no clip touched).
    assert case.fingerprint("vault", "audit.jsonl", "requests.db", name) == before


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("::: [garbage\n\x00", "not valid YAML"),
        ("- just\n- a list\n", "agent.yaml"),
        ("device_id: front-door\nstate_dir: /nonexistent\nbogus_key: 1\n", "bogus_key"),
        ("device_id: front-door\ncamera: {fps: fast}\n", "camera.fps"),
    ],
    ids=["garbage", "not-a-mapping", "unknown-key", "bad-value"],
)
def test_config_garbage_exits_2(case: Case, text: str, needle: str) -> None:
    case.config_path.write_text(text)
    for command in (("status",), ("clips", "list"), ("audit", "verify")):
        code, _, err = case.cli(*command)
        assert code == 2, (command, err)
        one_error(err, needle)
    code, err = case.run_refused()
    assert code == 2
    one_error(err, needle)
