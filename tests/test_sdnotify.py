"""sd_notify and the watchdog against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from agent.provision import initialise
from agent.sdnotify import Notifier, Watchdog, notify_address, watchdog_interval
from agent.timeutil import utcnow


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def receive(self) -> list[str]:
        """The next datagram, split into its KEY=VALUE lines."""
        data = self.sock.recv(4096)
        return data.decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting for more."""
        out: list[list[str]] = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def systemd_socket() -> Iterator[FakeSystemd]:
    # A short directory of our own: AF_UNIX paths are limited to 108 bytes and pytest's
    # tmp_path can be longer than that.
    directory = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield FakeSystemd(sock, str(path))
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


@pytest.fixture
def abstract_socket() -> Iterator[FakeSystemd]:
    name = f"doorbell-agent-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(10)
    try:
        yield FakeSystemd(sock, "@" + name)
    finally:
        sock.close()


def test_ready_status_stopping_reach_the_socket(systemd_socket: FakeSystemd) -> None:
    with Notifier.from_env(systemd_socket.env) as notifier:
        assert notifier.enabled
        assert notifier.ready("camera, vault and MQTT up")
        assert systemd_socket.receive() == ["READY=1", "STATUS=camera, vault and MQTT up"]
        assert notifier.status("recording")
        assert systemd_socket.receive() == ["STATUS=recording"]
        assert notifier.stopping()
        assert systemd_socket.receive() == ["STOPPING=1"]
        assert notifier.ready()
        assert systemd_socket.receive() == ["READY=1"]
    assert systemd_socket.pending() == []


def test_abstract_socket_name(abstract_socket: FakeSystemd) -> None:
    assert (
        notify_address(abstract_socket.env)
        == b"\0" + abstract_socket.env["NOTIFY_SOCKET"][1:].encode()
    )
    with Notifier.from_env(abstract_socket.env) as notifier:
        assert notifier.ready()
    assert abstract_socket.receive() == ["READY=1"]


def test_status_text_cannot_inject_assignments(systemd_socket: FakeSystemd) -> None:
    with Notifier.from_env(systemd_socket.env) as notifier:
        notifier.status("broker evil\nREADY=1\nWATCHDOG=1")
    assert systemd_socket.receive() == ["STATUS=broker evil READY=1 WATCHDOG=1"]


def test_no_op_without_notify_socket() -> None:
    with Notifier.from_env({}) as notifier:
        assert not notifier.enabled
        assert not notifier.ready("x")
        assert not notifier.status("x")
        assert not notifier.watchdog()
        assert not notifier.stopping()
    stop = threading.Event()
    assert Watchdog.from_env(notifier, lambda: True, stop, {"WATCHDOG_USEC": "30000000"}) is None


def test_unusable_notify_socket_values_are_ignored() -> None:
    assert notify_address({"NOTIFY_SOCKET": "relative/path"}) is None
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify_address({"NOTIFY_SOCKET": "@"}) is None
    assert notify_address({"NOTIFY_SOCKET": ""}) is None


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    # Nobody listens at this path: systemd went away. The doorbell must keep running.
    with Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")}) as notifier:
        assert notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()


def test_close_is_idempotent_and_silences(systemd_socket: FakeSystemd) -> None:
    notifier = Notifier.from_env(systemd_socket.env)
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready()
    assert systemd_socket.pending() == []


def test_watchdog_interval_from_environment() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == timedelta(seconds=30)
    assert watchdog_interval(
        {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(pid)}, pid=pid
    ) == timedelta(seconds=20)
    # A watchdog meant for another process (we inherited the environment) is not ours.
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, pid=pid) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "-5"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}) is None


def test_watchdog_pings_only_while_healthy(systemd_socket: FakeSystemd) -> None:
    health = [True]
    stop = threading.Event()
    with Notifier.from_env(systemd_socket.env) as notifier:
        dog = Watchdog(notifier, timedelta(seconds=30), lambda: health[0], stop)
        assert dog.period == 15
        assert dog.check()
        assert systemd_socket.pending() == [["WATCHDOG=1"]]

        health[0] = False
        assert not dog.check()
        # No ping, and the status line says why systemd is about to restart us.
        sent = systemd_socket.pending()
        assert sent == [["STATUS=unhealthy: a worker stopped responding; awaiting restart"]]
        assert not dog.check()
        assert systemd_socket.pending() == []

        health[0] = True
        assert dog.check()
        assert systemd_socket.pending() == [["WATCHDOG=1"], ["STATUS=running"]]


def test_health_check_that_raises_withholds_the_ping(systemd_socket: FakeSystemd) -> None:
    def broken() -> bool:
        raise RuntimeError("worker table corrupted")

    with Notifier.from_env(systemd_socket.env) as notifier:
        dog = Watchdog(notifier, timedelta(seconds=10), broken, threading.Event())
        assert not dog.check()
    assert all("WATCHDOG=1" not in d for d in systemd_socket.pending())


def test_watchdog_thread_follows_health_until_stop(systemd_socket: FakeSystemd) -> None:
    # Healthy for three rounds, unhealthy for three, then the daemon stops: exactly three pings.
    script = [True, True, True, False, False, False]
    stop = threading.Event()
    calls = 0

    def healthy() -> bool:
        nonlocal calls
        result = script[calls]
        calls += 1
        if calls == len(script):
            stop.set()
        return result

    env = {**systemd_socket.env, "WATCHDOG_USEC": "2000", "WATCHDOG_PID": str(os.getpid())}
    with Notifier.from_env(env) as notifier:
        dog = Watchdog.from_env(notifier, healthy, stop, env)
        assert dog is not None
        thread = dog.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
    sent = systemd_socket.pending()
    assert sent.count(["WATCHDOG=1"]) == 3
    assert sent[:3] == [["WATCHDOG=1"]] * 3
    assert calls == len(script)


def test_watchdog_rejects_non_positive_interval(systemd_socket: FakeSystemd) -> None:
    with Notifier.from_env(systemd_socket.env) as notifier, pytest.raises(ValueError):
        Watchdog(notifier, timedelta(0), lambda: True, threading.Event())


def free_tcp_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_run_is_ready_while_the_broker_is_down(
    systemd_socket: FakeSystemd, tmp_path: Path
) -> None:
    # The unit's Type=notify start must not wait for MQTT: a doorbell records while the
    # broker is down. `run` against a port nobody listens on still says READY=1.
    state = tmp_path / "state"
    initialise(state, "front-door", now=utcnow())
    cfg = {
        "device_id": "front-door",
        "state_dir": str(state),
        "camera": {"source": "synthetic", "fps": 5, "width": 320, "height": 240},
        "mqtt": {"host": "127.0.0.1", "port": free_tcp_port()},
        "approval": {"channels": ["cli"]},
        "app": {"enabled": False},
    }
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **systemd_socket.env}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from agent.cli import entry; entry()",
         "--config", str(cfg_path), "run"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        systemd_socket.sock.settimeout(60)
        messages: list[str] = []
        while "READY=1" not in messages:
            assert proc.poll() is None, proc.communicate()
            messages = systemd_socket.receive()
        # Ready, and still never connected: nothing was waited for. (status.json is written
        # just after READY=1.)
        deadline = time.monotonic() + 30
        while not (state / "status.json").exists():
            assert time.monotonic() < deadline, "no status.json after READY=1"
            time.sleep(0.05)
        status = json.loads((state / "status.json").read_text())
        assert status["state"] == "running"
        requests = status["workers"]["requests"]["stats"]
        assert requests["connected"] is False and requests["connects"] == 0
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
