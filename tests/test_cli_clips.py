"""`doorbell-agent clips list|export|delete|verify`: output, exit codes, atomic export, audit."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import keys
from agent.audit import read_entries, verify_file
from agent.cli import main
from agent.stream import TAG_SIZE, sealed_header_size
from agent.vault import ClipInfo, Vault, build_header

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Device:
    """A config file, an initialised state directory and a vault with clips in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        keys.create_device_keys(self.state)
        self.config = root / "agent.yaml"
        self.config.write_text(f"device_id: front-door\nstate_dir: {self.state}\n")

    def vault(self) -> Vault:
        return Vault(self.state, keys.load_storage_key(self.state), chunk_size=256)

    def record(self, data: bytes, start: datetime = T0) -> ClipInfo:
        with self.vault() as vault, vault.create_clip(start, "video/x-msvideo") as writer:
            writer.write(data)
            return writer.finish(start + timedelta(seconds=8), 80)

    def run(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def events(self) -> list[tuple[str, dict[str, object]]]:
        path = self.state / "audit.jsonl"
        if not path.exists():
            return []
        return [(e.event, e.fields) for e in read_entries(path)]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def video(n: int, seed: str = "v") -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def flip_chunk(device: Device, info: ClipInfo, index: int) -> None:
    path = device.state / "vault" / f"{info.id}.clip"
    data = bytearray(path.read_bytes())
    header = sealed_header_size(build_header(info.id, info.cipher, info.chunk_size))
    data[header + index * (info.chunk_size + TAG_SIZE) + 3] ^= 0x10
    path.write_bytes(bytes(data))


# -- list ------------------------------------------------------------------------------------


def test_list_empty(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("clips", "list") == 0
    assert capsys.readouterr().out == "no clips recorded\n"
    assert device.run("clips", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_list_table_and_json(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    a = device.record(video(1000, "a"))
    b = device.record(video(3000, "b"), T0 + timedelta(minutes=5))
    with device.vault() as vault:
        writing = vault.create_clip(T0 + timedelta(minutes=9), "video/x-msvideo")
        writing.write(b"in progress")
        assert device.run("clips", "list") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["ID", "START", "END", "BYTES", "STATE"]
        assert out[1].split() == [
            a.id,
            "2026-03-01T12:00:00Z",
            "2026-03-01T12:00:08Z",
            "1000",
            "final",
        ]
        assert out[2].split() == [
            b.id,
            "2026-03-01T12:05:00Z",
            "2026-03-01T12:05:08Z",
            "3000",
            "final",
        ]
        assert out[3].split() == [writing.id, "2026-03-01T12:09:00Z", "-", "0", "writing"]
        assert out[4] == "3 clip(s), 3.9 KiB"
        assert device.run("clips", "list", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        writing.abort()
    assert [(c["id"], c["start"], c["end"], c["bytes"], c["state"]) for c in doc] == [
        (a.id, "2026-03-01T12:00:00Z", "2026-03-01T12:00:08Z", 1000, "final"),
        (b.id, "2026-03-01T12:05:00Z", "2026-03-01T12:05:08Z", 3000, "final"),
        (writing.id, "2026-03-01T12:09:00Z", None, 0, "writing"),
    ]
    assert doc[0]["sha256"] == hashlib.sha256(video(1000, "a")).hexdigest()


# -- export ----------------------------------------------------------------------------------


def test_export(device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = video(5000)
    info = device.record(data)
    out = tmp_path / "copy.avi"
    assert device.run("clips", "export", info.id, "-o", str(out)) == 0
    assert out.read_bytes() == data
    assert (out.stat().st_mode & 0o777) == 0o600
    assert f"exported clip {info.id} (5000 bytes, sha256 {info.sha256})" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.yaml", "copy.avi", "state"]


def test_export_refuses_to_overwrite_without_force(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = device.record(video(700))
    out = tmp_path / "copy.avi"
    out.write_bytes(b"precious")
    assert device.run("clips", "export", info.id, "-o", str(out)) == 1
    err = capsys.readouterr().err
    assert f"doorbell-agent: error: {out} exists; refusing to overwrite it" in err
    assert "hint: pass --force to replace it" in err
    assert out.read_bytes() == b"precious"
    assert device.run("clips", "export", info.id, "-o", str(out), "--force") == 0
    assert out.read_bytes() == video(700)


def test_export_of_a_tampered_clip_leaves_nothing(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = device.record(video(2000))
    flip_chunk(device, info, 4)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert device.run("clips", "export", info.id, "-o", str(out_dir / "copy.avi")) == 1
    err = capsys.readouterr().err
    assert (
        f"doorbell-agent: error: clip {info.id} chunk 4 failed authentication: "
        "file corrupted or tampered with"
    ) in err
    assert list(out_dir.iterdir()) == []


def test_export_with_a_sha256_mismatch_deletes_the_partial_output(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = device.record(video(2000))
    with sqlite3.connect(device.state / "vault.db") as db:
        db.execute("UPDATE clips SET sha256 = ? WHERE id = ?", ("ab" * 32, info.id))
    db.close()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "copy.avi"
    existing.write_bytes(b"old copy")
    assert device.run("clips", "export", info.id, "-o", str(existing), "--force") == 1
    assert "does not match the index" in capsys.readouterr().err
    assert [p.name for p in out_dir.iterdir()] == ["copy.avi"]
    assert existing.read_bytes() == b"old copy"  # --force replaces only with a verified copy


def test_export_errors(device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = device.record(video(100))
    assert device.run("clips", "export", "no-such-clip", "-o", str(tmp_path / "x")) == 1
    assert "no clip 'no-such-clip' in the vault" in capsys.readouterr().err
    assert device.run("clips", "export", info.id, "-o", str(tmp_path)) == 2
    assert "is a directory" in capsys.readouterr().err
    assert device.run("clips", "export", info.id, "-o", str(tmp_path / "missing" / "x")) == 1
    assert "cannot write to" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- delete ----------------------------------------------------------------------------------


def test_delete_is_audited_and_shreds(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    info = device.record(video(900))
    keep = device.record(video(900, "k"), T0 + timedelta(minutes=1))
    with sqlite3.connect(device.state / "vault.db") as db:
        (wrapped,) = db.execute("SELECT wrapped_key FROM clips WHERE id = ?", (info.id,)).fetchone()
    db.close()
    assert device.run("clips", "delete", info.id) == 0
    assert f"deleted clip {info.id}" in capsys.readouterr().out
    assert device.events() == [("clip_deleted", {"clip": info.id, "reason": "owner"})]
    verify_file(device.state / "audit.jsonl", keys.load_device_key(device.state).public_key())
    assert not (device.state / "vault" / f"{info.id}.clip").exists()
    wal = device.state / "vault.db-wal"
    raw = (device.state / "vault.db").read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert wrapped not in raw
    with device.vault() as vault:
        assert [c.id for c in vault.list_clips()] == [keep.id]


def test_delete_unknown_clip(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    assert device.run("clips", "delete", "nope") == 1
    assert "doorbell-agent: error: no clip 'nope' in the vault" in capsys.readouterr().err
    assert device.events() == []


# -- verify ----------------------------------------------------------------------------------


def test_verify_all_good(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    a = device.record(video(2048))
    device.record(video(1024), T0 + timedelta(minutes=1))
    assert device.run("clips", "verify") == 0
    assert capsys.readouterr().out == "2 clip(s) verified, 3.0 KiB\n"
    assert device.run("clips", "verify", a.id) == 0
    assert capsys.readouterr().out == "1 clip(s) verified, 2.0 KiB\n"


def test_verify_names_the_bad_clip(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    good = device.record(video(2048))
    bad = device.record(video(2048, "b"), T0 + timedelta(minutes=1))
    flip_chunk(device, bad, 3)
    assert device.run("clips", "verify") == 1
    captured = capsys.readouterr()
    assert captured.err == (
        f"doorbell-agent: error: clip {bad.id} chunk 3 failed authentication: "
        "file corrupted or tampered with\n"
    )
    assert captured.out == f"1 of 2 clip(s) failed verification: {bad.id}\n"
    assert device.run("clips", "verify", good.id) == 0
    assert device.run("clips", "verify", bad.id) == 1
    os.truncate(device.state / "vault" / f"{good.id}.clip", 100)
    assert device.run("clips", "verify", good.id) == 1
    assert f"clip {good.id} is truncated" in capsys.readouterr().err


# -- usage and configuration -----------------------------------------------------------------


def test_usage_errors_exit_2(device: Device, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["clips"], ["clips", "export", "x"], ["clips", "frobnicate"], ["clips", "delete"]):
        with pytest.raises(SystemExit) as exc:
            device.run(*argv)
        assert exc.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("action", "phrase"),
    [
        ("list", "oldest first"),
        ("export", "renamed into place"),
        ("delete", "crypto-shredding"),
        ("verify", "Exit 0 with a summary"),
    ],
)
def test_help(device: Device, capsys: pytest.CaptureFixture[str], action: str, phrase: str) -> None:
    with pytest.raises(SystemExit) as exc:
        device.run("clips", action, "--help")
    assert exc.value.code == 0
    assert phrase in " ".join(capsys.readouterr().out.split())


def test_bad_config_and_uninitialised_state_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: front\nstorage:\n  cipher: rot13\n")
    assert main(["--config", str(config), "clips", "list"]) == 2
    assert "storage.cipher" in capsys.readouterr().err
    state = tmp_path / "empty"
    state.mkdir(mode=0o700)
    config.write_text(f"device_id: front\nstate_dir: {state}\n")
    assert main(["--config", str(config), "clips", "list"]) == 2
    assert "not initialised" in capsys.readouterr().err
