"""``app set-password``, the HTTPS server worker and the Matroska frame reader."""

from __future__ import annotations

import io
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import httpx
import pytest

from agent.camera.media import MediaError, iter_jpegs
from agent.cli import main
from agent.errors import AgentError
from agent.web.auth import PasswordFile
from agent.web.server import AppServer, snapshot_items
from agent.web.services import StatusItem
from agent.wiring import app_worker
from tests.realclips import jpeg_frame
from tests.web.harness import PASSWORD, WebHarness, close_harness, make_harness

if TYPE_CHECKING:
    from agent.wiring import DaemonContext


def _config(web: WebHarness, tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(f"device_id: front-door\nstate_dir: {web.state}\n")
    return path


def test_set_password_from_file_replaces_the_hash_and_logs_everyone_out(
    web: WebHarness, tmp_path: Path
) -> None:
    web.login()
    secret = tmp_path / "pw"
    secret.write_text("a long new app password\n")
    assert main(["--config", str(_config(web, tmp_path)), "app", "set-password",
                 "--password-file", str(secret)]) == 0
    mode = stat.S_IMODE(web.password_path.stat().st_mode)
    assert mode == 0o600
    assert web.password_path.read_text().startswith("$argon2id$")
    assert not [p for p in web.state.iterdir() if p.name.endswith(".tmp")]
    assert web.client.get("/api/requests").status_code == 401
    assert PasswordFile(web.password_path).verify("a long new app password") is not None
    assert web.try_login(web.client, PASSWORD).status_code == 401


def test_set_password_from_stdin_and_refusals(
    web: WebHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = str(_config(web, tmp_path))
    before = web.password_path.read_bytes()
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["--config", cfg, "app", "set-password", "--password-file", "-"]) == 2
    assert "too short" in capsys.readouterr().err
    answers = iter(["first long password", "second long password"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(answers))
    assert main(["--config", cfg, "app", "set-password"]) == 2
    assert "differ" in capsys.readouterr().err
    assert web.password_path.read_bytes() == before  # nothing changed
    monkeypatch.setattr("sys.stdin", io.StringIO("typed on stdin, long enough\n"))
    assert main(["--config", cfg, "app", "set-password", "--password-file", "-"]) == 0
    assert PasswordFile(web.password_path).verify("typed on stdin, long enough") is not None


def test_server_serves_https_with_the_init_certificate(tmp_path: Path) -> None:
    h = make_harness(tmp_path, with_tls=True)
    cert = h.state / "tls" / "cert.pem"
    server = AppServer(
        h.web, host="127.0.0.1", port=0, certfile=cert, keyfile=h.state / "tls" / "key.pem"
    )
    stop = threading.Event()
    runner = threading.Thread(target=server.run, args=(stop,))
    try:
        runner.start()
        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(600):
            if server.serving:
                break
            stop.wait(0.05)
        r = httpx.get(f"https://localhost:{server.port}/login", verify=context)
        assert r.status_code == 200 and "App password" in r.text
        assert r.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP
            httpx.get(f"http://localhost:{server.port}/login", timeout=5)
    finally:
        stop.set()
        runner.join(30)
        close_harness(h)
    assert not runner.is_alive()
    assert h.web.stopping.is_set() and not server.serving


def test_server_reports_a_port_in_use(tmp_path: Path) -> None:
    h = make_harness(tmp_path, with_tls=True)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        server = AppServer(
            h.web, host="127.0.0.1", port=busy.getsockname()[1],
            certfile=h.state / "tls" / "cert.pem", keyfile=h.state / "tls" / "key.pem",
        )
        with pytest.raises(AgentError, match="cannot listen"):
            server.start()
        server.close()
        server.close()  # idempotent
    finally:
        busy.close()
        close_harness(h)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_reads_frames_of_an_ffmpeg_matroska_file(tmp_path: Path) -> None:
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i in range(6):
        (frames_dir / f"{i:03d}.jpg").write_bytes(jpeg_frame(i))
    out = tmp_path / "clip.mkv"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-framerate", "5", "-i", str(frames_dir / "%03d.jpg"),
         "-c:v", "copy", str(out)],
        check=True,
    )
    with out.open("rb") as f:
        frames = list(iter_jpegs(f))
    assert [jpeg for _, jpeg in frames] == [jpeg_frame(i) for i in range(6)]
    assert [round(t, 2) for t, _ in frames] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_refuses_what_is_not_replayable_matroska(web: WebHarness) -> None:
    with pytest.raises(MediaError, match="not a readable video"):
        list(iter_jpegs(io.BytesIO(b"")))
    with pytest.raises(MediaError, match="not a readable video"):
        list(iter_jpegs(io.BytesIO(jpeg_frame(0))))
    clip = web.record_clip(web.clock())
    with web.vault.open_clip(clip.id) as reader:
        data = reader.read()
    # A clip cut short (a crash before its last chunk) plays up to where it ends.
    assert 0 < len(list(iter_jpegs(io.BytesIO(data[: len(data) - 100])))) < clip.frames
    assert len(list(iter_jpegs(io.BytesIO(data)))) == clip.frames
    assert os.path.exists(web.vault.db_path)


def test_daemon_snapshot_becomes_status_lines() -> None:
    camera = {
        "capture": {"state": "streaming", "source": "file:door.avi", "dropped": 2,
                    "last_error": None},
        "processing": {"fps": 9.84},
        "recorder": {"state": "recording", "clips": 3, "last_error": "disk full"},
    }
    mqtt = {"connected": False, "received": 7, "dropped": 1, "responses": 6, "rejected": {}}
    items = snapshot_items(
        {
            "workers": {
                "camera": {"state": "running", "error": None, "stats": camera},
                "requests": {"state": "running", "error": None, "stats": mqtt},
                "approval": {"state": "failed", "error": "socket in use",
                             "stats": {"require": "any", "button": "off", "x": [1],
                                       "pending_indicator": True}},
                "app": {"state": "running", "error": None, "stats": {}},
                "retention": {"state": "running", "error": None,
                              "stats": {"runs": 3, "deleted": 0, "stored_bytes": 0,
                                        "storage": "ok", "free_bytes": 79365754880,
                                        "reserve_bytes": 1 << 30, "last_error": None}},
            }
        }
    )
    assert items == [
        StatusItem("Camera", "streaming file:door.avi · 9.8 fps · 2 frames dropped · "
                   "recorder recording, 3 clips · disk full", True),
        StatusItem("MQTT", "NOT connected · 7 messages received · 1 dropped · "
                   "6 responses sent", False),
        StatusItem("Button", "failed · socket in use · not in use", False),
        StatusItem("Disk space", "73.9 GiB free", True),
    ]
    # the owner's page shows no raw counters (free bytes, pending counts): words and units
    assert not any("79365754880" in i.value or "pending" in i.value for i in items)
    assert snapshot_items({}) == []


def test_app_worker_needs_the_store_and_the_engine(web: WebHarness) -> None:
    ctx = SimpleNamespace(config=web.cfg, request_store=None, approval=None, vault=web.vault,
                          audit=web.audit, snapshot=dict)
    with pytest.raises(AgentError, match="request store and the approval coordinator"):
        app_worker(cast("DaemonContext", ctx))
    disabled = SimpleNamespace(config=web.cfg.model_copy(update={
        "app": web.cfg.app.model_copy(update={"enabled": False})}), request_store=None,
        approval=None)
    assert app_worker(cast("DaemonContext", disabled)) is None
