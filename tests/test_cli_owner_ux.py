"""Owner CLI rough edges: a stored offline approval shows in `pending`, `requesters add --key`
says a file is missing or refuses a private key, and a closed stdout never ends in a traceback."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import keys
from agent.approval.control import ControlServer, socket_path
from agent.cli import main
from agent.demo import prepare_state, write_config
from tests.test_approval_control import add_request, config, h  # noqa: F401 - fixtures
from tests.test_approval_coordinator import JTI, Harness
from tests.test_cli_requesters import Device


def test_pending_says_an_offline_approval_is_stored(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    add_request(h, JTI)
    assert main(["--config", str(config), "approve", JTI]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "pending"]) == 0
    out = capsys.readouterr().out
    assert JTI in out
    assert "your approval (made " in out and "is stored; the agent applies it when it starts" in out
    assert main(["--config", str(config), "pending", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["stored_decision"]["action"] == "approve"


def test_pending_without_a_stored_decision_says_nothing_of_one(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    add_request(h, JTI)
    assert main(["--config", str(config), "pending"]) == 0
    assert "decision:" not in capsys.readouterr().out


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def _add(device: Device, key: str) -> int:
    return device.run("requesters", "add", "--id", "city-pd", "--name", "City PD",
                      "--kind", "law-enforcement", f"--key={key}")


def test_missing_key_file_is_named(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "keys" / "public-key.jwk"
    assert _add(device, str(missing)) == 2
    err = capsys.readouterr().err
    assert f"the key file {missing} does not exist" in err
    assert "not an Ed25519 public key" not in err
    assert device.events() == []


@pytest.mark.parametrize("form", ["jwk-file", "jwk-string", "pem-file"])
def test_private_key_is_refused_with_a_hint(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    private = Ed25519PrivateKey.generate()
    jwk = {**keys.public_jwk(private.public_key()),
           "d": keys.b64url(private.private_bytes_raw())}
    if form == "jwk-file":
        (tmp_path / "signing-key.jwk").write_text(json.dumps(jwk))
        value = str(tmp_path / "signing-key.jwk")
    elif form == "jwk-string":
        value = json.dumps(jwk)
    else:
        (tmp_path / "signing-key.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        value = str(tmp_path / "signing-key.pem")
    assert _add(device, value) == 2
    err = capsys.readouterr().err
    assert "this is a private signing key" in err
    assert "hint: use public-key.jwk" in err
    assert device.events() == []


@pytest.mark.parametrize("prog", ["agent.cli", "agent.requester.cli"])
def test_closed_stdout_ends_quietly(device: Device, prog: str) -> None:
    argv = ["--config", str(device.config), "status"] if prog == "agent.cli" else ["--help"]
    code = f"import sys; from {prog} import entry; sys.argv[1:] = {argv!r}; entry()"
    if prog == "agent.requester.cli":
        # --help exits inside argparse; a subcommand's help is long enough to fill the pipe
        code = (f"import sys; from {prog} import main; "
                f"sys.exit(main(['keygen', '--id', 'x', '-o', {str(device.state / 'k')!r}]))")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.close()  # the reader is gone before a byte is written: `... | head -0`
    _, err = child.communicate(timeout=60)
    text = err.decode()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text
    assert child.returncode == 1


def test_a_client_leaving_early_is_not_a_daemon_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tmp_path.chmod(0o700)
    caplog.set_level(logging.DEBUG, logger="agent.approval.control")
    client_gone = threading.Event()

    def decide(*_args: object) -> dict[str, object]:
        client_gone.wait(10)  # answer only once the client has gone
        return {"id": JTI, "status": "denied"}

    with ControlServer(socket_path(tmp_path), decide) as server:
        server.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(server.path))
            s.sendall(b'{"op": "decide", "jti": "%s", "action": "deny"}\n' % JTI.encode())
            # linger 0: close resets the connection, like a killed client
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client_gone.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            "left before the answer" in r.getMessage() for r in caplog.records
        ):
            time.sleep(0.05)
    assert any("left before the answer" in r.getMessage() for r in caplog.records)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_demo_says_when_the_password_was_changed(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    cfg = write_config(demo, "synthetic", 1883, 8443)
    first = prepare_state(cfg, demo)
    assert len(first) >= 12 and "(" not in first
    assert prepare_state(cfg, demo) == first  # unchanged: the same password is still right
    new = tmp_path / "new-password"
    new.write_text("a brand new app password\n")
    assert main(["--config", str(demo / "agent.yaml"), "app", "set-password",
                 "--password-file", str(new)]) == 0
    shown = prepare_state(cfg, demo)
    assert first not in shown
    assert shown == "(changed with doorbell-agent app set-password: use the one you set)"
