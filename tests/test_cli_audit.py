"""`doorbell-agent audit verify|show`: summaries, exit codes, copies checked with a public key."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys
from agent.audit import AuditLog, build_head_jws, canonical_json
from agent.cli import main

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent


def _clock() -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: T0 + timedelta(seconds=next(ticks))


class Device:
    """A config file and an initialised state directory with a three-entry audit log."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        self.key = keys.create_device_keys(self.state)
        self.config = root / "agent.yaml"
        self.config.write_text(f"device_id: dev1\nstate_dir: {self.state}\n")
        self.log = self.state / "audit.jsonl"
        with AuditLog(self.log, self.key, now=_clock()) as audit:
            audit.append("agent_started", version="0.1.0")
            audit.append(
                "request_received",
                requester="police-1",
                reason="Parcel theft on 31 Jan \x1b[31mred\x1b[0m",
                window={"start": T0, "end": T0 + timedelta(minutes=30)},
            )
            self.last = audit.append("agent_stopped")

    def run(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def lines(self) -> list[bytes]:
        return self.log.read_bytes().splitlines()


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_verify_ok(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("audit", "verify") == 0
    out = capsys.readouterr().out
    assert out == f"audit log OK: 3 entries, head seq 3 hash {device.last.hash}\n"


def test_verify_broken_names_first_bad_seq(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = device.lines()
    entry = json.loads(lines[1])
    entry["requester"] = "someone-else"
    lines[1] = canonical_json(entry)
    device.log.write_bytes(b"\n".join(lines) + b"\n")
    assert device.run("audit", "verify") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        "doorbell-agent: error: audit log broken at seq 2: signature does not verify\n"
    )
    assert "hint:" in captured.err


def test_verify_copy_with_only_a_public_key(
    device: Device,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(device.log.read_bytes())
    public = device.key.public_key()
    (tmp_path / "device.jwk").write_text(json.dumps(keys.public_jwk(public)))
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "device.pem").write_bytes(pem)
    # No config anywhere: a copy and the public key are enough.
    monkeypatch.setenv("DOORBELL_AGENT_CONFIG", str(tmp_path / "no-such-config.yaml"))
    for key_arg in (str(tmp_path / "device.jwk"), str(tmp_path / "device.pem")):
        assert main(["audit", "verify", "--file", str(copy), "--public-key", key_arg]) == 0
        assert capsys.readouterr().out.startswith("audit log OK: 3 entries")
    stranger = keys.public_jwk(Ed25519PrivateKey.generate().public_key())
    assert main(["audit", "verify", "--file", str(copy), "--public-key", json.dumps(stranger)]) == 1
    assert "audit log broken at seq 1: signature does not verify" in capsys.readouterr().err


def test_verify_with_signed_head_detects_a_cut_tail(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head = build_head_jws(device.key, "dev1", 3, device.last.hash, T0)
    assert device.run("audit", "verify", "--head", head) == 0
    assert capsys.readouterr().out.endswith("(reaches the signed head at seq 3)\n")
    device.log.write_bytes(b"\n".join(device.lines()[:2]) + b"\n")
    assert device.run("audit", "verify") == 0  # a clean cut needs the head to be seen
    capsys.readouterr()
    (tmp_path / "head.jws").write_text(head + "\n")
    assert device.run("audit", "verify", "--head", str(tmp_path / "head.jws")) == 1
    err = capsys.readouterr().err
    assert "audit log broken at seq 3: the log ends at seq 2" in err
    forged = build_head_jws(Ed25519PrivateKey.generate(), "dev1", 3, device.last.hash, T0)
    assert device.run("audit", "verify", "--head", forged) == 1
    assert "different key" in capsys.readouterr().err


def test_verify_torn_tail_reports_its_seq(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    device.log.write_bytes(device.log.read_bytes()[:-20])
    assert device.run("audit", "verify") == 1
    assert "audit log broken at seq 3: line is not valid JSON" in capsys.readouterr().err


def test_verify_missing_log_fails(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    device.log.unlink()
    assert device.run("audit", "verify") == 1
    assert f"doorbell-agent: error: no audit log at {device.log}" in capsys.readouterr().err


def test_usage_and_config_errors_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DOORBELL_AGENT_CONFIG", str(tmp_path / "missing.yaml"))
    assert main(["audit", "verify"]) == 2
    assert capsys.readouterr().err.startswith("doorbell-agent: error: ")
    uninitialised = tmp_path / "agent.yaml"
    uninitialised.write_text(f"device_id: dev1\nstate_dir: {tmp_path / 'nothing'}\n")
    assert main(["--config", str(uninitialised), "audit", "verify"]) == 2
    assert "run `doorbell-agent init` first" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["audit", "show", "--since", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["audit"])
    assert info.value.code == 2
    for args in (["audit", "--help"], ["audit", "verify", "--help"], ["audit", "show", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 0
    assert "--public-key" in capsys.readouterr().out


def test_show_table_escapes_control_characters(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    assert device.run("audit", "show") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEQ", "TIME", "EVENT", "DETAILS"]
    assert len(out) == 4
    assert out[1].split() == ["1", "2026-01-31T12:00:00Z", "agent_started", "version=0.1.0"]
    assert "requester=police-1" in out[2]
    assert "reason=Parcel theft on 31 Jan \\x1b[31mred\\x1b[0m" in out[2]
    assert '"start":"2026-01-31T12:00:00Z"' in out[2]
    assert "\x1b" not in "\n".join(out)


def test_show_json_and_since(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("audit", "show", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == [json.loads(line) for line in device.lines()]
    assert device.run("audit", "show", "--json", "--since", "2") == 0
    assert [e["seq"] for e in json.loads(capsys.readouterr().out)] == [2, 3]
    assert device.run("audit", "show", "--json", "--since", "9") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert device.run("audit", "show", "--since", "9") == 0
    assert capsys.readouterr().out == "no audit entries\n"


def test_show_copy_and_unreadable_line(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(device.log.read_bytes() + b"{not json\n")
    assert main(["audit", "show", "--file", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"line 4 of {copy} cannot be read: line is not valid JSON" in err
    assert "audit verify" in err


def test_exit_codes_through_a_real_process(device: Device) -> None:
    env = {**os.environ, "DOORBELL_AGENT_CONFIG": str(device.config)}
    command = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "audit", "verify"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = verify()
    assert ok.returncode == 0 and ok.stdout.startswith("audit log OK: 3 entries")
    lines = device.lines()
    device.log.write_bytes(b"\n".join([lines[0], lines[2], lines[1]]) + b"\n")
    broken = verify()
    assert broken.returncode == 1
    assert broken.stderr.startswith("doorbell-agent: error: audit log broken at seq 2: found seq 3")
