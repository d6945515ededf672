"""The whole agent as the owner and a requester meet it: ``doorbell-agent run`` in a subprocess
over a real mosquitto, with a file camera that records a real clip, the local app served by the
daemon's own app worker over HTTPS, and ``doorbell-request send`` subprocesses as requesters.

- :func:`running_agent` (context manager): initialises a device like ``doorbell-agent init``
  (keys, argon2 app password, TLS certificate), makes a requester key pair with
  ``doorbell-request keygen`` and enrols it with ``doorbell-agent requesters add``, writes the
  config, starts the daemon and yields a :class:`RunningAgent` once the app accepts HTTPS
  connections; on exit it stops the daemon with SIGTERM and checks it exited 0.
- :meth:`RunningAgent.wait_for_clip` waits until the camera has finished recording a clip.
- :meth:`RunningAgent.send` starts ``doorbell-request send`` (a :class:`RequesterProcess`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import yaml

from agent.camera.synthetic import scenarios
from agent.cli import main as agent_main
from agent.keys import load_storage_key
from agent.provision import initialise
from agent.requester.cli import main as requester_main
from agent.requester.keyfiles import PUBLIC_JWK
from agent.timeutil import rfc3339, utcnow
from agent.vault import ClipInfo, Vault
from tests.camera.legacy_mkv import MatroskaMuxer
from tests.mosquitto import Mosquitto

DEVICE = "front-door"
REQUESTER = "city-police"
REQUESTER_NAME = "City Police Dept."
CAMERA_FPS = 20.0
AGENT = "from agent.cli import entry; entry()"
REQUEST = "from agent.requester.cli import entry; entry()"
SENT = re.compile(r"^sent request (\S+) to ", re.MULTILINE)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_camera_file(path: Path, fps: float = CAMERA_FPS) -> None:
    """The 'subject enters' ground-truth scene (320x240, 120 frames, motion in frames 40-79)
    as an MJPEG Matroska file: the daemon's camera."""
    scene = next(s for s in scenarios() if s.name == "subject enters")
    muxer = MatroskaMuxer(scene.scene.width, scene.scene.height, fps=fps)
    parts = [muxer.start()]
    for n in range(scene.frames):
        ok, jpeg = cv2.imencode(".jpg", scene.scene.render(n), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        parts.append(muxer.add(jpeg.tobytes(), round(n * 1000 / fps)))
    path.write_bytes(b"".join(parts))


def clean_env() -> dict[str, str]:
    """The test's environment without systemd's notify socket (the daemon would use it)."""
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}


def wait_until(
    check: Callable[[], object], what: str, alive: Callable[[], None], timeout: float = 30.0
) -> None:
    """Poll ``check`` until true; ``alive`` raises if the process waited on has died."""
    deadline = time.monotonic() + timeout
    while not check():
        alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class RequesterProcess:
    """One ``doorbell-request send`` subprocess, its output kept in files."""

    def __init__(self, argv: Sequence[str], directory: Path) -> None:
        directory.mkdir(parents=True)
        self._stdout = directory / "stdout"
        self._stderr = directory / "stderr"
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", REQUEST, *argv], env=clean_env(), stdout=out, stderr=err
            )

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()

    def jti(self, timeout: float = 30.0) -> str:
        """The request id, once the command has printed that it sent the request."""

        def exited() -> None:
            code = self.process.poll()
            if code is not None and not SENT.search(self.stdout):
                raise AssertionError(
                    f"doorbell-request exited {code} before sending: {self.stdout}{self.stderr}"
                )

        wait_until(lambda: SENT.search(self.stdout), "the request to be sent", exited, timeout)
        match = SENT.search(self.stdout)
        assert match is not None
        return match.group(1)

    def result(self, timeout: float = 60.0) -> int:
        """Wait for the command to exit and return its exit status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"doorbell-request did not exit: {self.stdout}{self.stderr}"
            ) from None

    def kill(self) -> None:
        """Stop the command if it still runs (teardown)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class RunningAgent:
    """A started ``doorbell-agent run`` and what a test needs to talk to it."""

    root: Path
    state: Path
    config_path: Path
    url: str
    password: str
    keys: Path
    broker: Mosquitto
    process: subprocess.Popen[bytes]
    log_path: Path
    requesters: list[RequesterProcess] = field(default_factory=list)

    def alive(self) -> None:
        """Raise (with the daemon's log) if the daemon has exited."""
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"the daemon exited {code}: {self.log_path.read_text()}")

    def wait_for_clip(self, timeout: float = 30.0) -> ClipInfo:
        """The first clip the camera finished recording into the vault."""
        with Vault(self.state, load_storage_key(self.state)) as vault:
            wait_until(
                lambda: any(c.state == "final" for c in vault.list_clips()),
                "the camera to record a clip",
                self.alive,
                timeout,
            )
            return next(c for c in vault.list_clips() if c.state == "final")

    def agent(self, *args: str) -> int:
        """``doorbell-agent --config CFG ARGS...`` (in this process; works while ``run`` runs)."""
        return agent_main(["--config", str(self.config_path), *args])

    def send(
        self,
        name: str,
        reason: str,
        window: tuple[datetime, datetime],
        *,
        legal_basis: str = "warrant",
        legal_ref: str | None = None,
        case: str | None = None,
        output: Path | None = None,
        wait: bool = True,
    ) -> RequesterProcess:
        """Start ``doorbell-request send`` for ``window`` (with ``--wait``, and ``-o output``)."""
        argv = [
            "send", "--device", DEVICE, "--from", rfc3339(window[0]), "--to", rfc3339(window[1]),
            "--reason", reason, "--legal-basis", legal_basis, "--key", str(self.keys),
            "--host", self.broker.host, "--port", str(self.broker.port),
        ]
        if legal_ref is not None:
            argv += ["--legal-ref", legal_ref]
        if case is not None:
            argv += ["--case", case]
        if wait:
            argv += ["--wait", "--timeout", "60s"]
        if output is not None:
            argv += ["-o", str(output)]
        requester = RequesterProcess(argv, self.root / "requesters" / name)
        self.requesters.append(requester)
        return requester

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the daemon and return its exit status (idempotent)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"the daemon ignored SIGTERM: {self.log_path.read_text()}"
                ) from None
        return self.process.returncode


def _serving(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the device's certificate is self-signed
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
            context.wrap_socket(raw),
        ):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_agent(root: Path, broker: Mosquitto) -> Iterator[RunningAgent]:
    """The whole agent in ``root`` on ``broker`` (see the module docstring)."""
    state = root / "state"
    password = initialise(state, DEVICE, now=utcnow()).app_password
    camera = root / "camera.mkv"
    write_camera_file(camera)
    keys = root / "requester-keys"
    assert requester_main(["keygen", "--id", REQUESTER, "-o", str(keys)]) == 0
    port = free_port()
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(state),
        # Played once at its own pace: the visitor walks in about 2 s after the start.
        "camera": {"source": f"file:{camera}", "fps": CAMERA_FPS, "loop": False,
                   "realtime": True},
        "recording": {"pre_roll": "1s", "post_roll": "1s", "privacy_masks": []},
        "storage": {"retention": "7d", "max_bytes": "1GiB"},
        "mqtt": {"host": broker.host, "port": broker.port},
        "approval": {"channels": ["app", "cli"], "timeout": "1h"},
        "app": {"bind": "127.0.0.1", "port": port},
        # Small chunks, so the clip travels as several MQTT messages.
        "delivery": {"chunk_bytes": "16KiB", "max_inflight": 4, "retries": 2},
    }
    config_path = root / "agent.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    assert agent_main([
        "--config", str(config_path), "requesters", "add", "--id", REQUESTER,
        "--name", REQUESTER_NAME, "--kind", "law-enforcement", "--key", str(keys / PUBLIC_JWK),
        "--contact", "Desk sergeant, +1 555 0100",
    ]) == 0
    log_path = root / "daemon.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", AGENT, "--config", str(config_path), "run"],
            env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
        )
    agent = RunningAgent(
        root=root, state=state, config_path=config_path, url=f"https://127.0.0.1:{port}",
        password=password, keys=keys, broker=broker, process=process, log_path=log_path,
    )
    try:
        wait_until(lambda: _serving(port), "the local app to serve HTTPS", agent.alive)
        yield agent
        assert agent.stop() == 0, log_path.read_text()
    finally:
        for requester in agent.requesters:
            requester.kill()
        if process.poll() is None:
            process.kill()
            process.wait()


def recent_window(before: timedelta = timedelta(minutes=30)) -> tuple[datetime, datetime]:
    """A request window from ``before`` ago until now."""
    now = utcnow()
    return now - before, now
