"""The reliability harness: the real agent in a subprocess, a real requester, real checks.

Pieces (all bind 127.0.0.1; every wait polls a real observable, never sleeps as an assertion):

- :func:`replay_rng` — a ``random.Random`` seeded from ``DOORBELL_RELIABILITY_SEED`` (or a fresh
  seed), printed so that a failure can be replayed with the same random moments.
- :func:`wait_until` — poll a check until it returns something truthy; fails with a message
  (and the agent's log tail) on timeout or when the agent died meanwhile.
- :class:`MessageLog` — a paho MQTT v5 client with a persistent session that subscribes again on
  every (re)connect and keeps every message received, in order, for waiting and inspection. It
  survives broker restarts (mosquitto's persistence keeps its session and queued messages).
- :func:`make_motion_video` — a small MJPG ``.avi`` with a moving block for part of each loop,
  for ``camera.source: file:...`` (the camera then records clips continually).
- :class:`FakeClock` — shifts the running agent's wall clock (its one source,
  ``agent.timeutil.utcnow``) by an offset read from a file: :meth:`FakeClock.jump` steps it
  forward or back while monotonic time runs on, as an NTP step on an RTC-less device does.
- :class:`AgentProcess` — ``doorbell-agent run`` as a subprocess with its own state directory
  and config (initialised with device keys; small chunks and short timeouts), start / stop /
  kill9 / restart, ``status.json``, the audit log, the request store, the vault, and the
  ``doorbell-agent`` CLI (in-process for speed, or as a real subprocess).
- :class:`Requester` — keygen + enrolment, signed requests (any ``iat``/``exp``/``jti``),
  verified responses and deliveries, and a full check of a delivery: manifest signature,
  chunk hashes, age decryption, plaintext hash.

Typical use (see ``test_kill9.py``)::

    with AgentProcess(tmp_path / "agent", mosquitto, camera=video) as agent:
        requester = Requester(tmp_path / "police", agent)
        agent.start()
        jti = requester.send(start, end)
        requester.wait_status(jti, "pending")
        agent.approve(jti)
        requester.wait_status(jti, "delivered")
        requester.check_delivery(jti)
        agent.stop()
        agent.verify_clips(); agent.verify_audit()
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pyrage
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.audit import verify_file
from agent.cli import main as agent_main
from agent.errors import ReceiveError
from agent.keys import load_device_key, load_storage_key
from agent.provision import initialise
from agent.release.cut import WindowCutter
from agent.release.manifest import RESPONSE_TYP, Manifest, verify_device_jws, verify_manifest
from agent.requester.build import build_request
from agent.requester.keyfiles import PUBLIC_JWK, RequesterKeys, generate_keys
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import utcnow
from agent.vault import ClipInfo, Vault
from tests.mosquitto import Mosquitto

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
DEVICE = "front-door"
REQUESTER = "city-police"
PREFIX = "doorbell"
SEED_ENV = "DOORBELL_RELIABILITY_SEED"
CLOCK_OFFSET_ENV = "DOORBELL_TEST_CLOCK_OFFSET_FILE"
POLL = 0.02
"""Seconds between two looks at an observable."""
AGENT = f"""\
import os
import sys

offset_file = os.environ.get("{CLOCK_OFFSET_ENV}")
if offset_file:
    # Before anything else of the agent is imported, so every `from agent.timeutil import
    # utcnow` and every `now=utcnow` default binds the shifted clock (see FakeClock).
    from datetime import timedelta

    import agent.timeutil

    real_utcnow = agent.timeutil.utcnow

    def shifted_utcnow():
        try:
            with open(offset_file) as f:
                seconds = float(f.read())
        except (OSError, ValueError):
            seconds = 0.0
        return real_utcnow() + timedelta(seconds=seconds)

    agent.timeutil.utcnow = shifted_utcnow

from agent.cli import entry

sys.argv[0] = "doorbell-agent"
entry()
"""
"""``doorbell-agent`` from this checkout (not whatever an installed console script points at),
with the wall clock shifted when ``$DOORBELL_TEST_CLOCK_OFFSET_FILE`` is set."""


# --- randomness and waiting ---------------------------------------------------------------------


def replay_rng(test_name: str) -> random.Random:
    """A generator seeded from ``$DOORBELL_RELIABILITY_SEED`` (else a fresh seed), printed.

    The seed is mixed with ``test_name`` so tests sharing one seed still differ. Re-run a failure
    with ``DOORBELL_RELIABILITY_SEED=<printed seed> pytest ...``.
    """
    text = os.environ.get(SEED_ENV)
    seed = int(text) if text else random.SystemRandom().randrange(1 << 32)
    print(f"{test_name}: random seed {seed} (replay with {SEED_ENV}={seed})")
    return random.Random(f"{seed}:{test_name}")


def wait_until(
    check: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 60.0,
    agent: AgentProcess | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy and return that.

    Fails (AssertionError naming ``what``) after ``timeout`` seconds, or at once when ``agent``
    is given and its process has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if agent is not None and agent.exited:
            raise AssertionError(
                f"the agent exited (status {agent.returncode}) while waiting for {what}\n"
                f"{agent.log_tail()}"
            )
        if time.monotonic() > deadline:
            tail = f"\n{agent.log_tail()}" if agent is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{tail}")
        time.sleep(POLL)


# --- MQTT -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message as it arrived."""

    topic: str
    payload: bytes
    retain: bool
    index: int


class MessageLog:
    """A paho MQTT v5 client that keeps every message, with a session that outlives restarts.

    The session (expiry one hour) and the subscriptions, renewed on every connect, make the
    broker queue QoS 1 messages while this client is cut off by a broker restart; paho
    reconnects by itself. ``publish`` waits for the PUBACK.
    """

    def __init__(self, broker: Mosquitto, topics: Iterable[str], *, name: str = "log") -> None:
        self.topics = list(topics)
        self._messages: list[Received] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._triggers: list[tuple[Callable[[Received], bool], Callable[[], None], threading.Event]]
        self._triggers = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{name}-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self._connected.clear()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, keepalive=30, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise ConnectionError(f"{name}: no SUBACK from the broker")

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        self._connected.set()
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            received = Received(
                msg.topic, bytes(msg.payload), bool(msg.retain), len(self._messages)
            )
            self._messages.append(received)
            fired = [t for t in self._triggers if t[0](received)]
            self._triggers = [t for t in self._triggers if t not in fired]
        for _match, action, done in fired:
            action()
            done.set()

    def arm(self, match: Callable[[Received], bool], action: Callable[[], None]) -> threading.Event:
        """Run ``action`` on the network thread the moment a message ``match``-ing arrives (once).

        This is how a test acts *inside* a phase it observes (e.g. SIGKILL on the 5th delivery
        chunk) without a polling delay. The returned event is set once ``action`` ran.
        """
        done = threading.Event()
        with self._cond:
            self._triggers.append((match, action, done))
        return done

    def disarm(self) -> None:
        """Drop every trigger that has not fired."""
        with self._cond:
            self._triggers = []

    def mark(self) -> int:
        """The number of messages received so far (a starting point for :meth:`since`)."""
        with self._cond:
            return len(self._messages)

    def since(self, mark: int = 0, prefix: str = "") -> list[Received]:
        """Messages received from ``mark`` on whose topic starts with ``prefix``."""
        with self._cond:
            return [m for m in self._messages[mark:] if m.topic.startswith(prefix)]

    def wait(
        self,
        match: Callable[[Received], bool],
        what: str,
        *,
        mark: int = 0,
        timeout: float = 60.0,
        agent: AgentProcess | None = None,
    ) -> Received:
        """The first message from ``mark`` on for which ``match`` holds, waiting for it."""

        def find() -> Received | None:
            return next((m for m in self.since(mark) if match(m)), None)

        return wait_until(find, what, timeout=timeout, agent=agent)

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Block until the client is connected (after a broker restart)."""
        if not self._connected.wait(timeout):
            raise AssertionError(f"MQTT client not reconnected within {timeout:g} s")

    def publish(
        self, topic: str, payload: bytes | str, *, correlation: bytes | None = None
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = correlation
        self.wait_connected()
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(30)
        if not info.is_published():
            raise AssertionError(f"no PUBACK for a message on {topic}")

    def close(self) -> None:
        """Disconnect and stop the network thread. Idempotent."""
        self.client.disconnect()
        self.client.loop_stop()


# --- camera input -------------------------------------------------------------------------------


def make_motion_video(
    path: Path,
    *,
    seconds: float = 10.0,
    moving: tuple[float, float] = (2.0, 8.0),
    fps: float = 10.0,
    size: tuple[int, int] = (320, 240),
) -> Path:
    """Write an MJPG ``.avi``: a still doorstep, with a block crossing it during ``moving``
    (seconds into each loop). Played with ``camera.loop``, the agent records a clip every loop.
    """
    width, height = size
    rng = np.random.default_rng(11)
    # Some texture so the JPEG frames are realistically sized, blurred to keep them small.
    noise = rng.integers(0, 60, (height, width, 1), dtype=np.uint8)
    texture = cv2.GaussianBlur(np.repeat(noise, 3, axis=2), (7, 7), 0)
    base = np.full((height, width, 3), (90, 110, 120), np.uint8) + texture
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write MJPG video")
    frames = round(seconds * fps)
    first, last = round(moving[0] * fps), round(moving[1] * fps)
    for n in range(frames):
        frame = base.copy()
        if first <= n < last:
            x = int((n - first) / max(last - first, 1) * (width - 60))
            cv2.rectangle(frame, (x, height // 4), (x + 60, height // 4 + 120), (20, 20, 230), -1)
        writer.write(frame)
    writer.release()
    return path


# --- the agent's clock --------------------------------------------------------------------------


class FakeClock:
    """The agent's wall clock = real time + an offset the test changes while the agent runs.

    The agent reads wall time in exactly one place, :func:`agent.timeutil.utcnow` (every
    component takes ``now`` from it; ``test_clock_source_is_single`` keeps it that way), and
    measures durations on ``time.monotonic``. The :data:`AGENT` bootstrap replaces that one
    function, before the agent is imported, with one adding the offset written in a file; the
    offset is re-read at every call, so :meth:`jump` steps the clock of the running agent while
    monotonic time runs on, as when NTP steps the clock of a Raspberry Pi that booted without a
    real-time clock. (libfaketime cannot do this for Python: with a real monotonic clock its
    ``clock_nanosleep`` fails, so ``time.sleep`` raises EINVAL.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = timedelta(0)
        self.jump(timedelta(0))

    def env(self) -> dict[str, str]:
        """Environment for the agent process."""
        return {CLOCK_OFFSET_ENV: str(self.path)}

    def jump(self, offset: timedelta) -> None:
        """Set the agent's clock to real time + ``offset`` (atomic: read whole or not at all)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{offset.total_seconds()!r}\n")
        os.replace(tmp, self.path)
        self.offset = offset

    def now(self) -> datetime:
        """What the agent's clock says now."""
        return utcnow() + self.offset


# --- the agent --------------------------------------------------------------------------------


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively with ``extra`` (nested mappings merged, the rest replaced)."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class CliResult:
    """What one ``doorbell-agent`` command did."""

    code: int
    out: str
    err: str


class AgentProcess:
    """``doorbell-agent run`` as a subprocess with its own state directory and config.

    ``camera`` is a ``file:`` video (see :func:`make_motion_video`) to record from; without it
    the agent runs a slow synthetic camera with motion detection off, so nothing is recorded
    and the vault holds only what the test puts there. ``config`` is merged over the test
    defaults (small delivery chunks, no web app, approval by app/CLI, a generous rate limit).
    ``env`` is added to the agent's environment (e.g. :meth:`FakeClock.env`).

    Logs go to ``root/agent.log`` (appended across restarts; :meth:`log_tail` for messages).
    """

    def __init__(
        self,
        root: Path,
        broker: Mosquitto,
        *,
        camera: Path | None = None,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        device_id: str = DEVICE,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.device_id = device_id
        self.state_dir = root / "state"
        self.config_path = root / "agent.yaml"
        self.log_path = root / "agent.log"
        self.extra_env = dict(env or {})
        initialise(self.state_dir, device_id, now=utcnow())
        self.config: dict[str, Any] = {}
        self.write_config(self._defaults(camera), config or {})
        self.public_key: Ed25519PublicKey = load_device_key(self.state_dir).public_key()
        self.topic = f"{PREFIX}/{device_id}"
        self.watch = MessageLog(broker, [f"{self.topic}/status"], name="agent-watch")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _defaults(self, camera: Path | None) -> dict[str, Any]:
        if camera is not None:
            camera_cfg: dict[str, Any] = {
                "source": f"file:{camera}", "fps": 10, "loop": True, "realtime": True,
            }
            motion: dict[str, Any] = {"enabled": True}
        else:
            camera_cfg = {"source": "synthetic", "fps": 1, "width": 160, "height": 120}
            motion = {"enabled": False}
        return {
            "device_id": self.device_id,
            "state_dir": str(self.state_dir),
            "camera": camera_cfg,
            "motion": motion,
            "recording": {
                "pre_roll": "1s", "post_roll": "1s", "max_clip": "5s", "merge_gap": "1s",
                "jpeg_quality": 60,
            },
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "keepalive": "5s"},
            "requests": {"rate_limit": 1000},
            "approval": {"channels": ["app", "cli"], "timeout": "1h"},
            "app": {"enabled": False},
            "delivery": {"chunk_bytes": "4KiB", "max_inflight": 2, "retries": 5},
        }

    def write_config(self, *layers: Mapping[str, Any]) -> None:
        """Merge ``layers`` over the current config and write it (read at the next start)."""
        for layer in layers:
            self.config = merge(self.config, layer)
        self.config_path.write_text(yaml.safe_dump(self.config))

    # -- process control -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the agent process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def exited(self) -> bool:
        """Whether a started agent process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process (None while it runs or before any start)."""
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        """The running agent's process id."""
        assert self.proc is not None, "the agent was never started"
        return self.proc.pid

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start ``doorbell-agent run``; with ``wait``, return once it is online on MQTT
        (subscribed: its retained status went out after the SUBSCRIBE) and wrote status.json."""
        assert not self.running, "the agent is already running"
        mark = self.watch.mark()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        env.update(self.extra_env)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", AGENT, "--config", str(self.config_path), "run"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        if wait:
            self.wait_online(mark, timeout=timeout)

    def wait_online(self, mark: int = 0, *, timeout: float = 60.0) -> None:
        """Wait for a live ``online: true`` status from mark on, and status.json of this pid."""
        self.watch.wait(
            lambda m: not m.retain and json.loads(m.payload).get("online") is True,
            "the agent to come online on MQTT",
            mark=mark,
            timeout=timeout,
            agent=self,
        )
        wait_until(
            lambda: (s := self.status()) is not None and s.get("pid") == self.pid,
            "status.json of the running agent",
            timeout=timeout,
            agent=self,
        )

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self, *, reap: bool = True) -> None:
        """SIGKILL the agent (a crash or power cut) and, unless ``reap`` is False (e.g. from an
        :meth:`MessageLog.arm` action on the network thread), wait for it to die."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        if reap:
            self.proc.wait(30)

    def restart(self, *, wait: bool = True) -> None:
        """SIGTERM, then start again."""
        self.stop()
        self.start(wait=wait)

    def close(self) -> None:
        """Kill the agent if it still runs; close the status watcher. Idempotent."""
        if self.running:
            self.kill9()
        self.watch.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the agent's log (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no agent log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        """The whole agent log, every run."""
        return self.log_path.read_text(errors="replace")

    # -- state -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """``status.json`` (None when absent; it is replaced atomically so never torn)."""
        try:
            doc: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        except FileNotFoundError:
            return None
        return doc

    def audit_entries(
        self, logs: tuple[str, ...] = ("audit.jsonl", "activity.jsonl")
    ) -> list[dict[str, Any]]:
        """Every complete line of the request log, then of the activity log (clips, logins:
        contract §7), as dicts (a torn last line is left out). Each log counts its own seq."""
        out: list[dict[str, Any]] = []
        for name in logs:
            try:
                data = (self.state_dir / name).read_bytes()
            except FileNotFoundError:
                continue
            out += [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]
        return out

    def audit_events(self, event: str, **fields: object) -> list[dict[str, Any]]:
        """Audit entries of ``event`` whose fields include ``fields``."""
        return [
            e
            for e in self.audit_entries()
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_audit(self, event: str, timeout: float = 60.0, **fields: object) -> dict[str, Any]:
        """The first audit entry of ``event`` with ``fields``, waiting for it."""
        return wait_until(
            lambda: next(iter(self.audit_events(event, **fields)), None),
            f"audit event {event} {fields}",
            timeout=timeout,
            agent=self,
        )

    def requests(self, statuses: Iterable[str] | None = None) -> list[RequestRecord]:
        """The request store's records (optionally only those with ``statuses``)."""
        with RequestStore.open(self.state_dir) as store:
            return store.list_requests(list(statuses) if statuses is not None else None)

    def request(self, jti: str) -> RequestRecord | None:
        """One stored request, or None when the agent has no record of it."""
        return next((r for r in self.requests() if r.jti == jti), None)

    def wait_request(
        self, jti: str, statuses: Iterable[str], timeout: float = 60.0, *, answered: bool = False
    ) -> RequestRecord:
        """Wait until request ``jti`` is stored with one of ``statuses``.

        With ``answered``, also until the store records that the broker took the response for
        that status: the requester can read an answer before the agent marks it sent.
        """
        wanted = set(statuses)

        def found() -> RequestRecord | None:
            record = self.request(jti)
            if record is None or record.status not in wanted:
                return None
            return record if not answered or record.responded == record.status else None

        return wait_until(
            found,
            f"request {jti} to be {'/'.join(sorted(wanted))}",
            timeout=timeout,
            agent=self,
        )

    def open_vault(self) -> Vault:
        """The vault, opened from this (test) process."""
        return Vault(self.state_dir, load_storage_key(self.state_dir))

    def clips(self) -> list[ClipInfo]:
        """Every clip in the vault index (finished or being written)."""
        with self.open_vault() as vault:
            return vault.list_clips()

    def expected_release(self, jti: str) -> dict[str, bytes]:
        """What releasing request ``jti`` must give, by stored clip id: the cut of its window
        of every clip in the vault overlapping it (see :meth:`expected_cut`)."""
        start, end = self._window(jti)
        with self.open_vault() as vault:
            plans = WindowCutter(vault).preview(start, end)
        return {p.clip_id: self.expected_cut(jti, p.clip_id) for p in plans}

    def expected_cut(self, jti: str, clip_id: str) -> bytes:
        """The file releasing request ``jti`` must give for stored clip ``clip_id``: the cut
        of the request's window made here by :class:`WindowCutter` on the device's vault (a
        cut is deterministic, so this is byte for byte what the agent released)."""
        start, end = self._window(jti)
        with self.open_vault() as vault:
            cut = WindowCutter(vault).cut(clip_id, start, end)
            assert cut is not None, f"no frame of clip {clip_id} in the window of {jti}"
            try:
                return b"".join(iter(partial(cut.stream.read, 65536), b""))
            finally:
                cut.close()

    def _window(self, jti: str) -> tuple[datetime, datetime]:
        record = self.request(jti)
        assert record is not None and record.window_start and record.window_end, jti
        return record.window_start, record.window_end

    def recording(self) -> Path | None:
        """A clip file the camera is writing right now (``vault/*.part`` with data), or None."""
        for part in (self.state_dir / "vault").glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_size > 0:
                    return part
        return None

    # -- the command line ----------------------------------------------------------------------

    def cli(self, *args: str) -> CliResult:
        """Run ``doorbell-agent --config CFG ARGS`` in this process (fast; same code path)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = agent_main(["--config", str(self.config_path), *args])
            except SystemExit as exc:  # argparse refusing the arguments (exit status 2)
                code = exc.code if isinstance(exc.code, int) else 2
        return CliResult(code, out.getvalue(), err.getvalue())

    def cli_subprocess(self, *args: str, timeout: float = 120.0) -> CliResult:
        """Run ``doorbell-agent --config CFG ARGS`` as its own process (the real program)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)
        done = subprocess.run(
            [sys.executable, "-c", AGENT, "--config", str(self.config_path), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(done.returncode, done.stdout, done.stderr)

    def approve(self, jti: str) -> CliResult:
        """``doorbell-agent approve -- J`` (over agent.sock, or stored for the next start; ``--``
        because a jti may start with ``-``)."""
        return self.cli("approve", "--", jti)

    def deny(self, jti: str) -> CliResult:
        """``doorbell-agent deny J``."""
        return self.cli("deny", "--", jti)

    def verify_clips(self, *, subprocess_: bool = False) -> CliResult:
        """``doorbell-agent clips verify``; asserts exit 0."""
        run = self.cli_subprocess if subprocess_ else self.cli
        result = run("clips", "verify")
        assert result.code == 0, f"clips verify failed: {result.out}{result.err}"
        return result

    def verify_audit(self, *, subprocess_: bool = False) -> CliResult:
        """``doorbell-agent audit verify``; asserts exit 0 (and checks the file directly too)."""
        run = self.cli_subprocess if subprocess_ else self.cli
        result = run("audit", "verify")
        assert result.code == 0, f"audit verify failed: {result.out}{result.err}"
        assert verify_file(self.state_dir / "audit.jsonl", self.public_key).ok
        return result


# --- the requester ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """A verified response from the device."""

    claims: dict[str, Any]
    index: int
    payload: bytes
    """The signed message as received: a QoS 1 redelivery of the same message is identical."""

    @property
    def status(self) -> str:
        """The response's ``status``."""
        return str(self.claims["status"])


class Requester:
    """An enrolled requester: signing key, age identity, and a message log of its topics."""

    def __init__(
        self, root: Path, agent: AgentProcess, requester_id: str = REQUESTER, *, enrol: bool = True
    ) -> None:
        self.agent = agent
        self.id = requester_id
        self.keys: RequesterKeys = generate_keys(root / requester_id, requester_id, now=utcnow())
        if enrol:
            result = agent.cli(
                "requesters", "add", "--id", requester_id, "--name", f"{requester_id} (test)",
                "--kind", "law-enforcement", "--key", str(self.keys.directory / PUBLIC_JWK),
            )
            assert result.code == 0, result.err
        self.responses_topic = f"{agent.topic}/responses/{requester_id}"
        self.deliveries_prefix = f"{agent.topic}/deliveries/{requester_id}/"
        self.log = MessageLog(
            agent.broker, [self.responses_topic, self.deliveries_prefix + "#"], name=requester_id
        )
        self.tokens: dict[str, str] = {}

    def close(self) -> None:
        """Close the MQTT client."""
        self.log.close()

    def token(
        self,
        window_start: datetime,
        window_end: datetime,
        *,
        now: datetime | None = None,
        lifetime: timedelta = timedelta(hours=1),
        jti: str | None = None,
        reason: str = "parcel theft on the porch",
    ) -> tuple[str, str]:
        """A signed request token and its jti (``iat`` = ``now``, default the real time)."""
        token = build_request(
            self.keys.signing_key, self.keys.kid, self.id, self.agent.device_id,
            window_start, window_end, reason, "consent", None, None, self.keys.recipient,
            now or utcnow(), lifetime, jti,
        )
        claims = json.loads(_b64(token.split(".")[1]))
        return str(claims["jti"]), token

    def send(self, window_start: datetime, window_end: datetime, **options: Any) -> str:
        """Sign and publish a request (QoS 1, PUBACK awaited); returns its jti."""
        jti, token = self.token(window_start, window_end, **options)
        self.tokens[jti] = token
        self.publish(token, correlation=jti.encode())
        return jti

    def publish(self, token: str, *, correlation: bytes | None = None) -> None:
        """Publish a (possibly replayed) token on the device's request topic."""
        self.log.publish(f"{self.agent.topic}/requests", token, correlation=correlation)

    # -- responses ---------------------------------------------------------------------------

    def responses(self, jti: str | None = None) -> list[Response]:
        """Verified responses (to ``jti``, or all), in arrival order; forgeries fail the test."""
        out = []
        for m in self.log.since(0, self.responses_topic):
            if m.topic != self.responses_topic:
                continue
            claims = verify_device_jws(m.payload, self.agent.public_key, RESPONSE_TYP)
            assert claims["iss"] == self.agent.device_id and claims["aud"] == self.id, claims
            if jti is None or claims.get("req") == jti:
                out.append(Response(claims, m.index, m.payload))
        return out

    def statuses(self, jti: str) -> list[str]:
        """The statuses answered to ``jti``, in arrival order."""
        return [r.status for r in self.responses(jti)]

    def wait_status(self, jti: str, *statuses: str, timeout: float = 60.0) -> Response:
        """The first response to ``jti`` with one of ``statuses``, waiting for it."""
        return wait_until(
            lambda: next((r for r in self.responses(jti) if r.status in statuses), None),
            f"a {'/'.join(statuses)} response to {jti}",
            timeout=timeout,
            agent=self.agent if self.agent.proc is not None else None,
        )

    # -- deliveries --------------------------------------------------------------------------

    def delivery_messages(self, jti: str) -> list[Received]:
        """Every delivery message (chunks and manifests) for ``jti``, in arrival order."""
        return self.log.since(0, f"{self.deliveries_prefix}{jti}/")

    def chunks(self, jti: str) -> int:
        """How many chunk messages for ``jti`` arrived (all attempts)."""
        return sum(not m.topic.endswith("/manifest") for m in self.delivery_messages(jti))

    def manifests(self, jti: str) -> list[Manifest]:
        """The verified manifests received for ``jti`` (one per completed attempt)."""
        return [
            verify_manifest(
                m.payload, self.agent.public_key, device_id=self.agent.device_id,
                requester_id=self.id, jti=jti,
            )
            for m in self.delivery_messages(jti)
            if m.topic.endswith("/manifest")
        ]

    def check_delivery(self, jti: str) -> dict[str, bytes]:
        """Check the last complete delivery of ``jti`` the way a requester would, and return the
        decrypted files by the id of the stored clip each came from (released files have
        opaque ids; the owner's ``request_delivered``/``request_redelivered`` entry for the
        manifest names their clips).

        For every clip of the last manifest: its chunks of the latest attempt (an attempt
        starts again at chunk 0) are all there, their concatenation has the manifest's
        SHA-256, decrypts with the requester's age identity, and the plaintext has the
        manifest's ``plaintext_sha256``. Raises ReceiveError or AssertionError otherwise.
        """
        messages = self.delivery_messages(jti)
        last = max(
            (i for i, m in enumerate(messages) if m.topic.endswith("/manifest")), default=None
        )
        if last is None:
            raise ReceiveError(f"no manifest received for {jti}")
        manifest = verify_manifest(
            messages[last].payload, self.agent.public_key, device_id=self.agent.device_id,
            requester_id=self.id, jti=jti,
        )
        latest: dict[str, dict[int, bytes]] = {}
        for m in messages[:last]:
            if m.topic.endswith("/manifest"):
                continue  # an earlier attempt's: its chunks are superseded below
            clip_id, seq_text = m.topic.rsplit("/", 2)[-2:]
            seq = int(seq_text)
            if seq == 0:
                latest[clip_id] = {}
            latest.setdefault(clip_id, {})[seq] = m.payload
        identity = self.keys.age_identity()
        out: dict[str, bytes] = {}
        for clip in manifest.clips:
            chunks = latest.get(clip.id, {})
            missing = [n for n in range(clip.chunks) if n not in chunks]
            assert not missing, f"clip {clip.id} of {jti}: chunks {missing[:10]} missing"
            data = b"".join(chunks[n] for n in range(clip.chunks))
            assert len(data) == clip.bytes
            assert hashlib.sha256(data).hexdigest() == clip.sha256, f"clip {clip.id}: bad age file"
            plain = pyrage.decrypt(data, [identity])
            assert hashlib.sha256(plain).hexdigest() == clip.plaintext_sha256
            out[clip.id] = plain
        digest = hashlib.sha256(messages[last].payload).hexdigest()
        entries = [
            e for e in self.agent.audit_entries()
            if e["event"] in ("request_delivered", "request_redelivered")
            and e.get("jti") == jti and e.get("manifest_sha256") == digest
        ]
        assert entries, f"no release entry in the audit log names the manifest of {jti}"
        sources = {f["id"]: f["clip"] for f in entries[-1]["files"]}
        return {sources[file_id]: plain for file_id, plain in out.items()}


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
