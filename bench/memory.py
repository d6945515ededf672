"""Memory bench: the daemon's resident memory against the budget of a 1-2 GB Raspberry Pi.

Runs the real ``doorbell-agent run`` (a separate process, as systemd runs it) with every worker
on, once for each kind of camera at 1280x720 and 10 fps: a raw one (the synthetic source, its
frames encoded here by libx264, as for a USB webcam or on a Pi 5, which has no H.264 encoder)
and an H.264 one (its stream stored as it comes, as from RTSP or rpicam-vid on a Pi 4); each
through motion detection, the recorder and the encrypted vault; MQTT against a loopback
mosquitto; the local HTTPS app; approval; retention; Home Assistant discovery. Measured
natively (run it on the host, not under qemu: emulation changes allocator and JIT behaviour),
from ``/proc/PID/status`` of the daemon:

- ``baseline``: the same interpreter having imported the agent and its libraries, idle — what
  any Python process running this code costs before a worker starts;
- ``steady``: the median RSS over ``--steady`` seconds after ``--warmup`` seconds of recording
  (goal <= 150 MiB), with the highest sample, and its ratio to the baseline;
- ``release``: the highest RSS sampled while a real requester (``doorbell-request send --wait``)
  receives an approved request covering the steady period's footage, and its growth over steady.

The daemon gets the unit's ``Environment=`` settings (``systemd/doorbell-agent.service``), as on
the Pi; ``--without-unit-env`` leaves them out, to see what they are worth.

    python bench/memory.py [--warmup 20] [--steady 60] [--camera both|raw|h264]
                           [--without-unit-env]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mosquitto import Mosquitto, free_port  # noqa: E402

MIB = 1024 * 1024
GOAL_STEADY_MIB = 150
DEVICE = "bench-memory"
REQUESTER = "bench-requester"
AGENT = [sys.executable, "-c", "from agent.cli import entry; entry()"]
REQUEST = [sys.executable, "-c", "from agent.requester.cli import entry; entry()"]
IMPORTS = (
    "import agent.cli, agent.wiring, agent.camera.pipeline, agent.web.app, agent.mqtt, "
    "agent.release.deliver, agent.vault, cv2, numpy, uvicorn, starlette, paho.mqtt.client"
)


def unit_environment() -> dict[str, str]:
    """The unit's ``Environment=`` settings that mean the same outside systemd (no %t etc.)."""
    env: dict[str, str] = {}
    for line in (ROOT / "systemd" / "doorbell-agent.service").read_text().splitlines():
        if line.startswith("Environment=") and "%" not in line:
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


class Sampler:
    """Samples a process's RSS on a thread every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss(self.pid)
            if value:
                self.samples.append(value)
            self._stop.wait(self._interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def baseline_rss() -> int:
    """RSS of an idle interpreter that has imported what the daemon imports."""
    code = f"{IMPORTS}\nimport sys, time\nprint('ready', flush=True)\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        return rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def cli(cfg: Path, *args: str) -> str:
    """``doorbell-agent --config CFG ARGS``; its stdout (raises on failure)."""
    done = subprocess.run([*AGENT, "--config", str(cfg), *args], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"doorbell-agent {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def status(state: Path) -> dict[str, Any]:
    """The daemon's status.json ({} until written)."""
    try:
        doc = json.loads((state / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def wait(what: str, check: Any, timeout: float) -> Any:
    """Poll ``check()`` until truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def rfc3339(t: datetime) -> str:
    """Whole seconds, UTC, with Z."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def camera_file(path: Path, seconds: int = 40) -> Path:
    """The demo scene at 1280x720, 10 fps, as a camera that encodes in hardware sends it
    (H.264 with B-frames, a keyframe every 2 s): what the ``file:`` source then stores as it
    comes, as it does an RTSP camera's or rpicam-vid's stream."""
    import av

    from agent.camera.synthetic import demo_scene

    scene = demo_scene(1280, 720, 10.0)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "veryfast", "g": "20", "bf": "2"}
        for n in range(seconds * 10):
            image = np.ascontiguousarray(scene.render(n), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


@dataclass
class Measured:
    """One scenario's samples and what it released."""

    label: str
    workers: list[str]
    fps: float
    steady: list[int]
    release: list[int]
    files: int
    released: int


def measure(label: str, camera: dict[str, Any], tmp: Path, args: argparse.Namespace,
            extra_env: dict[str, str]) -> Measured:
    """Run the daemon with ``camera``; sample it steady, then through one release."""
    broker = Mosquitto(tmp / "broker")
    broker.start()
    state = tmp / "state"
    cfg = tmp / "agent.yaml"
    cfg.write_text(yaml.safe_dump({
        "device_id": DEVICE,
        "state_dir": str(state),
        "camera": camera,
        "recording": {"max_clip": "30s"},
        "mqtt": {"host": broker.host, "port": broker.port},
        "app": {"enabled": True, "bind": "127.0.0.1", "port": free_port()},
        "homeassistant": {"enabled": True},
    }))
    cli(cfg, "init")
    keys = tmp / "requester"
    subprocess.run([*REQUEST, "keygen", "--id", REQUESTER, "-o", str(keys)], check=True,
                   capture_output=True, cwd=ROOT)
    cli(cfg, "requesters", "add", "--id", REQUESTER, "--name", "Bench", "--kind", "other",
        "--key", str(keys / "public-key.jwk"))
    log = (tmp / "agent.log").open("w")
    daemon = subprocess.Popen([*AGENT, "--config", str(cfg), "run"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, **extra_env})
    try:
        wait("the daemon to run", lambda: status(state).get("state") == "running", 60)
        time.sleep(args.warmup)
        steady_from = datetime.now(UTC)
        frames_before = status(state)["workers"]["camera"]["stats"]["processing"]["frames"]
        with Sampler(daemon.pid, 0.25) as steady:
            time.sleep(args.steady)
        frames = (status(state)["workers"]["camera"]["stats"]["processing"]["frames"]
                  - frames_before)
        workers = sorted(status(state)["workers"])

        # A release of the steady period's footage to a real requester.
        wait("a finished clip", lambda: [c for c in json.loads(cli(cfg, "clips", "list",
             "--json")) if c["state"] == "final"], 60)
        send = subprocess.Popen(
            [*REQUEST, "send", "--device", DEVICE, "--from", rfc3339(steady_from),
             "--to", rfc3339(datetime.now(UTC) - timedelta(seconds=1)),
             "--reason", "memory bench", "--legal-basis", "consent", "--key", str(keys),
             "--host", broker.host, "--port", str(broker.port), "--wait",
             "--timeout", "5m", "-o", str(tmp / "evidence")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        pending = wait("the request to be pending",
                       lambda: json.loads(cli(cfg, "pending", "--json")), 60)
        with Sampler(daemon.pid, 0.02) as release:
            cli(cfg, "approve", pending[0]["id"])
            out, _ = send.communicate(timeout=300)
        if send.returncode != 0:
            raise RuntimeError(f"the delivery failed:\n{out}")
        videos = list((tmp / "evidence").glob("*.mkv"))
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
        broker.close()
    return Measured(label, workers, frames / args.steady, steady.samples, release.samples,
                    len(videos), sum(v.stat().st_size for v in videos))


def report(m: Measured, base: int) -> None:
    """Print one scenario's lines."""
    med = statistics.median(m.steady)
    top = max(m.steady)
    peak = max(m.release)
    print(f"{m.label} ({m.fps:.1f} fps processed while sampled)")
    print(f"  steady RSS, median of {len(m.steady)} samples:  {med / MIB:6.1f} MiB  "
          f"(max {top / MIB:.1f} MiB)  {med / base:.2f}x baseline  "
          f"(goal <= {GOAL_STEADY_MIB} MiB)  "
          f"{'OK' if top <= GOAL_STEADY_MIB * MIB else 'OVER BUDGET'}")
    print(f"  peak RSS during a release ({m.files} file(s), {m.released / MIB:.1f} MiB, "
          f"approval to verified evidence): {peak / MIB:6.1f} MiB  "
          f"(+{(peak - med) / MIB:.1f} MiB over steady, {peak / base:.2f}x baseline)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before sampling")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady sampling")
    parser.add_argument("--without-unit-env", action="store_true",
                        help="run the daemon without the unit's Environment= settings")
    parser.add_argument("--camera", choices=["both", "raw", "h264"], default="both",
                        help="raw: synthetic frames encoded here; h264: a camera's own stream")
    args = parser.parse_args()
    extra_env = {} if args.without_unit_env else unit_environment()

    base = baseline_rss()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        if args.camera in ("both", "raw"):
            (tmp / "raw").mkdir()
            results.append(measure(
                "raw camera (synthetic 1280x720 @ 10 fps, encoded here by libx264)",
                {"source": "synthetic", "fps": 10, "width": 1280, "height": 720},
                tmp / "raw", args, extra_env))
        if args.camera in ("both", "h264"):
            (tmp / "h264").mkdir()
            video = camera_file(tmp / "camera.mp4")
            results.append(measure(
                "H.264 camera (1280x720 @ 10 fps, stored as it comes, as from RTSP or rpicam)",
                {"source": f"file:{video}", "fps": 10}, tmp / "h264", args, extra_env))
    print(f"memory bench: doorbell-agent run, workers {', '.join(results[0].workers)}")
    print(f"daemon environment from the unit: "
          f"{' '.join(f'{k}={v}' for k, v in extra_env.items()) or '(none)'}")
    print(f"baseline (interpreter + agent imports, idle): {base / MIB:6.1f} MiB")
    for m in results:
        report(m, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
