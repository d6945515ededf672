"""The control socket (agent.sock) and ``doorbell-agent approve|deny``, with the daemon's
coordinator running (decision applied at once, channel cli) and stopped (stored in requests.db,
applied at the next start)."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.approval.control import (
    ControlServer,
    DaemonUnavailableError,
    send_decision,
    socket_path,
)
from agent.approval.coordinator import ApprovalCoordinator
from agent.approval.decisions import Action
from agent.cli import main
from agent.errors import ApprovalError, RequestNotFoundError, StateError
from agent.timeutil import utcnow
from agent.vocabulary import Channel
from tests.test_approval_coordinator import JTI, JTI2, Harness, close_harness, open_harness


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    tmp_path.chmod(0o700)
    harness = open_harness(tmp_path)
    # the CLI judges deadlines by the real clock: live in the present
    harness.clock.now = utcnow()
    yield harness
    close_harness(harness)


def add_request(h: Harness, jti: str) -> None:
    h.add_request(jti, received=h.clock.now - timedelta(minutes=1))


@pytest.fixture
def config(h: Harness) -> Path:
    (h.tmp / "device.key").write_text("not read by approve/deny\n")
    (h.tmp / "device.key").chmod(0o600)
    path = h.tmp / "agent.yaml"
    path.write_text(f"device_id: door-1\nstate_dir: {h.tmp}\n")
    return path


def serve(h: Harness, coordinator: ApprovalCoordinator) -> ControlServer:
    def decide(jti: str, action: Action, channel: Channel) -> dict[str, object]:
        return coordinator.decide(jti, action, channel).to_json()

    server = ControlServer(socket_path(h.tmp), decide)
    server.start()
    return server


def test_socket_is_owner_only_and_decisions_apply_at_once(h: Harness) -> None:
    add_request(h, JTI)
    with h.coordinator() as c, serve(h, c) as server:
        mode = stat.S_IMODE(server.path.stat().st_mode)
        assert mode == 0o600
        result = send_decision(server.path, JTI, "approve")
        assert result == {"id": JTI, "status": "approved", "awaiting_confirmation": False}
        assert c.wait_idle(30)
        with pytest.raises(ApprovalError, match="is not pending"):
            send_decision(server.path, JTI, "deny")
        with pytest.raises(RequestNotFoundError, match="no request"):
            send_decision(server.path, "unknown-000000000000", "deny")
    assert h.entries("request_approved")[0]["channel"] == "cli"
    assert not server.path.exists()  # removed at close


def test_malformed_requests_get_a_bad_request_answer(h: Harness) -> None:
    with h.coordinator() as c, serve(h, c) as server:
        for line in (b"not json\n", b'{"op": "shutdown"}\n', b'{"op": "decide", "jti": 5}\n'):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(server.path))
                s.sendall(line)
                reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"] == "bad_request"
    assert h.events() == []


def test_stale_socket_is_replaced_but_a_live_one_is_refused(h: Harness) -> None:
    path = socket_path(h.tmp)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed daemon's leftover
    c = h.coordinator()
    with serve(h, c), pytest.raises(StateError, match="another doorbell-agent is running"):
        ControlServer(path, lambda *_a: {}).start()
    with pytest.raises(DaemonUnavailableError):
        send_decision(path, JTI, "approve")


def test_cli_approve_with_the_daemon_running(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_request(h, JTI)
    with h.coordinator() as c, serve(h, c):
        assert main(["--config", str(config), "approve", JTI]) == 0
        assert c.wait_idle(30)
    out = capsys.readouterr().out
    assert f"Request {JTI} approved" in out
    assert h.status(JTI) == "delivered"
    assert h.responses[0] == (JTI, "approved", {"channel": "cli", "clips": 0})


def test_cli_errors_exit_1_with_a_clear_message(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_request(h, JTI)
    with h.coordinator() as c, serve(h, c):
        assert main(["--config", str(config), "deny", JTI]) == 0
        assert main(["--config", str(config), "approve", JTI]) == 1
        assert main(["--config", str(config), "approve", "nope-00000000000000"]) == 1
    err = capsys.readouterr().err
    assert f"doorbell-agent: error: request {JTI} is not pending (it is denied)" in err
    assert "doorbell-agent: error: no request 'nope-00000000000000' is known" in err
    assert h.status(JTI) == "denied"


def test_cli_with_the_daemon_stopped_stores_the_decision_for_the_next_start(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_request(h, JTI)
    add_request(h, JTI2)
    assert main(["--config", str(config), "approve", JTI]) == 0
    assert main(["--config", str(config), "deny", JTI2, "--json"]) == 0
    captured = capsys.readouterr().out
    assert "is stored and will be applied when it starts" in captured
    assert json.loads(captured[captured.index("{") :])["queued"] == "deny"
    # a second decision on the same request while one waits is refused
    assert main(["--config", str(config), "deny", JTI]) == 1
    assert "already waiting" in capsys.readouterr().err
    # unknown and not-pending requests fail at once, nothing is stored
    assert main(["--config", str(config), "approve", "nope-00000000000000"]) == 1
    assert h.status(JTI) == "pending" and h.status(JTI2) == "pending"
    assert h.responses == []
    # the daemon starts and acts on them
    with h.coordinator() as c:
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered" and h.status(JTI2) == "denied"
    assert h.entries("request_approved")[0]["channel"] == "cli"
    assert main(["--config", str(config), "approve", JTI2]) == 1
    assert "is not pending (it is denied)" in capsys.readouterr().err


def test_cli_offline_approval_under_require_all_is_refused(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_request(h, JTI)
    config.write_text(config.read_text() + "approval:\n  require: all\n  channels: [button, cli]\n")
    assert main(["--config", str(config), "approve", JTI]) == 1
    assert "must be confirmed on the button" in capsys.readouterr().err
    assert main(["--config", str(config), "deny", JTI]) == 0


def test_cli_redeliver_through_the_socket_and_its_refusals(
    h: Harness, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """§5.2, §8: ``redeliver J`` works while ``run`` runs; refused (exit 1, saying why) for a
    request that was never delivered, for a revoked requester, and when the agent is down."""
    add_request(h, JTI)
    add_request(h, JTI2)

    def redeliver(jti: str, channel: Channel) -> dict[str, object]:
        return c.redeliver(jti, channel).to_json()

    with h.coordinator() as c:
        server = ControlServer(
            socket_path(h.tmp),
            lambda jti, action, channel: c.decide(jti, action, channel).to_json(),
            redeliver=redeliver,
        )
        with server:
            assert main(["--config", str(config), "approve", JTI]) == 0
            assert main(["--config", str(config), "deny", JTI2]) == 0
            assert c.wait_idle(30)
            capsys.readouterr()
            assert main(["--config", str(config), "redeliver", JTI]) == 0
            assert c.wait_idle(30)
            assert "its footage is being cut, encrypted and sent again" in capsys.readouterr().out
            assert h.entries("request_redelivered")[0]["attempt"] == 2
            assert main(["--config", str(config), "redeliver", JTI2]) == 1
            assert (
                f"doorbell-agent: error: request {JTI2} cannot be redelivered: it is denied"
                in capsys.readouterr().err
            )
            h.store.revoke_requester("police-7")
            assert main(["--config", str(config), "redeliver", JTI]) == 1
            assert "its requester police-7 was revoked" in capsys.readouterr().err
    assert main(["--config", str(config), "redeliver", JTI]) == 1
    assert "the agent is not running" in capsys.readouterr().err
    assert h.status(JTI) == "delivered" and h.status(JTI2) == "denied"
    assert len(h.entries("request_redelivered")) == 1
