"""The one-command local demo: its own mosquitto, a demo state directory, a demo requester, the
agent on a sample-video or synthetic camera with the local app.

Run through ``scripts/demo.sh`` (which installs what is needed first). Ctrl-C stops everything
it started. The demo directory (default ``./demo-state``) is kept, so a second run reuses the
device keys, the vault and the enrolled requester.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent import config as config_mod
from agent.audit import AuditLog
from agent.config import Config
from agent.errors import AgentError, StateError
from agent.keys import load_device_key, parse_public_key
from agent.paths import StatePaths
from agent.provision import certificate_fingerprint, initialise
from agent.requester.keyfiles import AGE_IDENTITY, PUBLIC_JWK, SIGNING_JWK, generate_keys
from agent.requests.store import RequestStore
from agent.timeutil import utcnow
from agent.web.auth import PasswordFile
from agent.wiring import run_daemon

DEVICE_ID = "demo-door"
REQUESTER_ID = "demo-police"
HOST = "127.0.0.1"
SAMPLE_VIDEOS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vtest.avi",
    Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi"),
)
DEMO_PASSWORD_FILE = "demo-app-password.txt"  # noqa: S105 (a file name)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def pick_camera(explicit: str | None) -> str:
    """``--camera`` if given, else the OpenCV sample video when present, else synthetic."""
    if explicit:
        return explicit
    for video in SAMPLE_VIDEOS:
        if video.is_file():
            return f"file:{video}"
    return "synthetic"


@contextlib.contextmanager
def local_broker(directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A mosquitto on ``HOST:port`` with its own config and persistence in ``directory``."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise StateError(
            "mosquitto is not installed", hint="run scripts/demo.sh, which installs it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                # As root, mosquitto would switch to user "mosquitto", who cannot write here.
                f"user {pwd.getpwuid(os.getuid()).pw_name}",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {directory}/",
                f"log_dest file {directory}/mosquitto.log",
                f"listener {port} {HOST}",
                "",
            ]
        )
    )
    # Its own session: Ctrl-C in the terminal reaches the agent, which stops first, then us.
    with (directory / "mosquitto.stderr").open("ab") as err:
        proc = subprocess.Popen(
            [exe, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise StateError(f"mosquitto exited at start; see {directory}/mosquitto.log")
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise StateError(f"mosquitto did not listen on port {port}") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def write_config(demo: Path, camera: str, mqtt_port: int, app_port: int) -> Config:
    """The demo's agent.yaml (rewritten every run with the ports of this run)."""
    path = demo / "agent.yaml"
    path.write_text(
        f"""# Written by the demo; see config/agent.example.yaml for every key.
device_id: {DEVICE_ID}
state_dir: {demo / "state"}
camera:
  source: "{camera}"
  fps: 10
recording:
  codec: h264             # the sample video is MPEG-4: the demo shows H.264 recording
  pre_roll: 3s
  post_roll: 5s
  max_clip: 30s
storage:
  retention: 1d
  max_bytes: 1GiB
mqtt:
  host: {HOST}
  port: {mqtt_port}
approval:
  channels: [app, cli]
  timeout: 1h
app:
  bind: {HOST}
  port: {app_port}
"""
    )
    return config_mod.load(path)


def prepare_state(cfg: Config, demo: Path) -> str:
    """Initialise the device and enrol the demo requester once; return the app password."""
    password_file = demo / DEMO_PASSWORD_FILE
    if not StatePaths(cfg.state_dir).device_key.exists():
        result = initialise(cfg.state_dir, cfg.device_id, now=utcnow())
        # Demo only: a real device prints the password once and keeps only its hash.
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(result.app_password + "\n")
    keys_dir = demo / "requester"
    if not (keys_dir / SIGNING_JWK).exists():
        generate_keys(keys_dir, REQUESTER_ID, now=utcnow())
    with RequestStore.open(cfg.state_dir) as store:
        if all(r.id != REQUESTER_ID for r in store.list_requesters()):
            public = parse_public_key(keys_dir / PUBLIC_JWK)
            audit_log = StatePaths(cfg.state_dir).audit_log
            with AuditLog(audit_log, load_device_key(cfg.state_dir)) as audit:
                store.add_requester(
                    REQUESTER_ID, "Demo Police Department", "law-enforcement", public,
                    "records@police.example", audit=audit,
                )
    try:
        password = password_file.read_text().strip()
    except OSError:
        return "(set one with: doorbell-agent app set-password)"
    # The owner may have changed it since (`app set-password` keeps only a hash): never
    # print a password that no longer works.
    if PasswordFile(StatePaths(cfg.state_dir).app_password).verify(password) is None:
        return "(changed with doorbell-agent app set-password: use the one you set)"
    return password


def instructions(cfg: Config, demo: Path, password: str, repo: Path) -> str:
    """What the demo prints: the app, then the exact commands of the whole story."""
    cert = StatePaths(cfg.state_dir).tls_cert
    venv = repo / ".venv" / "bin"
    return f"""
doorbell-agent demo is running (camera: {cfg.camera.source}; broker {HOST}:{cfg.mqtt.port}).

Local app:  https://{HOST}:{cfg.app.port}/   password: {password}
            certificate SHA-256 {certificate_fingerprint(cert)}

In a second terminal, be the requester (asks for the last 30 minutes and waits):

  cd {repo} && export PATH={venv}:$PATH DOORBELL_AGENT_CONFIG={demo / "agent.yaml"}
  doorbell-request send --key {demo / "requester"} --host {HOST} --port {cfg.mqtt.port} \\
      --device {cfg.device_id} --from "$(date -u -d '-30 min' +%Y-%m-%dT%H:%M:%SZ)" \\
      --to "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --reason "Parcel theft reported at 12 Main St" \\
      --legal-basis warrant --legal-ref "W-2026-0042" \\
      --wait -o {demo / "evidence"}/"$(date -u +%H%M%S)"

In a third terminal (same two first lines), be the homeowner: see the request and approve it
(or approve it in the local app):

  doorbell-agent pending
  doorbell-agent approve <id shown by pending>

The requester's terminal then receives the footage, checks the device's signed manifest and
hashes, decrypts it with its age identity, keeps the evidence (request, signed responses and
manifest, age files, videos, receipt) in {demo / "evidence"}/<time>/ and sends the receipt.
Check a video with the stock tools:  ffprobe {demo / "evidence"}/<time>/<file>.mkv
Re-check the whole evidence set offline:
  doorbell-request verify {demo / "evidence"}/<time> --key {demo / "requester"}
The age files can also be decrypted with the stock age CLI:
  age -d -i {demo / "requester" / AGE_IDENTITY} FILE.age > clip.mkv
Audit trail:  doorbell-agent audit show   and   doorbell-agent audit verify

Ctrl-C stops the agent and the broker.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="doorbell-agent-demo", description=__doc__)
    parser.add_argument("--dir", default="demo-state", help="demo directory (kept between runs)")
    parser.add_argument(
        "--camera", help="camera.source to use (default: sample video, else synthetic)"
    )
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    demo = Path(args.dir).resolve()
    demo.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        cfg = write_config(demo, pick_camera(args.camera), free_port(), free_port())
        password = prepare_state(cfg, demo)
        with local_broker(demo / "broker", cfg.mqtt.port):
            print(instructions(cfg, demo, password, repo), flush=True)
            return run_daemon(cfg)
    except AgentError as exc:
        print(f"doorbell-agent-demo: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
