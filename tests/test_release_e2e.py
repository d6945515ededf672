"""End to end over a real mosquitto: the daemon (requests + approval workers) in a subprocess,
``doorbell-request send --wait -o DIR``, ``doorbell-agent approve J`` over agent.sock, and a
``kill -9`` of the daemon in the middle of the delivery: restarted, it delivers again and the
requester ends up with the verified, decrypted clip."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from agent.audit import verify_file
from agent.cli import main as agent_main
from agent.keys import b64url_decode, load_device_key, load_storage_key
from agent.provision import initialise
from agent.release.cut import WindowCutter
from agent.requester.cli import main as requester_main
from agent.requester.keyfiles import PUBLIC_JWK, generate_keys
from agent.requests.store import RequestStore
from agent.timeutil import rfc3339, utcnow
from agent.vault import Vault
from tests.mosquitto import Mosquitto
from tests.realclips import record_clip

DEVICE = "front-door"
REQUESTER = "city-police"
DAEMON = (
    "import sys\n"
    "from agent import config\n"
    "from agent.wiring import approval_worker, requests_worker, run_daemon\n"
    "sys.exit(run_daemon(config.load(sys.argv[1]), factories=(requests_worker, approval_worker)))\n"
)


def start_daemon(cfg_path: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(cfg_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(
    check: Callable[[], object], what: str, proc: subprocess.Popen[str], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited while waiting for {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.timeout(240)
def test_send_approve_kill9_recover_receive(tmp_path: Path, mosquitto: Mosquitto) -> None:
    state = tmp_path / "state"
    initialise(state, DEVICE, now=utcnow())
    now = utcnow()
    with Vault(state, load_storage_key(state)) as vault:
        # A real recording (grainy frames, ~4 MB: hundreds of 16 KiB chunks to crash amid);
        # the window covers all of it, so the release is the whole clip, remuxed by the cut.
        clip = record_clip(vault, now - timedelta(minutes=10), frames=60, noise=5)
        expected = WindowCutter(vault).cut(
            clip.id, now - timedelta(minutes=30), now - timedelta(minutes=1)
        )
        assert expected is not None
        try:
            data = expected.stream.read()
        finally:
            expected.close()
        assert clip.size > 2 * 1024 * 1024
    cfg = {
        "device_id": DEVICE,
        "state_dir": str(state),
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port},
        "approval": {"channels": ["app", "cli"]},
        "app": {"enabled": False},
        "delivery": {"chunk_bytes": "16KiB", "max_inflight": 2, "retries": 3},
    }
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    keys_dir = tmp_path / "keys"
    generate_keys(keys_dir, REQUESTER, now=now)
    assert (
        agent_main(
            [
                "--config",
                str(cfg_path),
                "requesters",
                "add",
                "--id",
                REQUESTER,
                "--name",
                "City Police",
                "--kind",
                "law-enforcement",
                "--key",
                str(keys_dir / PUBLIC_JWK),
            ]
        )
        == 0
    )

    watcher = mosquitto.client()
    watcher.subscribe(f"doorbell/{DEVICE}/deliveries/#")
    receipts = mosquitto.client()
    receipts.subscribe(f"doorbell/{DEVICE}/receipts")
    daemon = start_daemon(cfg_path)
    out = tmp_path / "footage"
    codes: list[int] = []
    try:
        sender = threading.Thread(
            target=lambda: codes.append(
                requester_main(
                    [
                        "send",
                        "--device",
                        DEVICE,
                        "--from",
                        rfc3339(now - timedelta(minutes=30)),
                        "--to",
                        rfc3339(now - timedelta(minutes=1)),
                        "--reason",
                        "package theft on the porch",
                        "--legal-basis",
                        "consent",
                        "--key",
                        str(keys_dir),
                        "--wait",
                        "-o",
                        str(out),
                        "--timeout",
                        "180s",
                        "--host",
                        mosquitto.host,
                        "--port",
                        str(mosquitto.port),
                    ]
                )
            )
        )
        sender.start()
        with RequestStore.open(state) as store:
            wait_for(lambda: store.list_requests(["pending"]), "a pending request", daemon)
            jti = store.list_requests(["pending"])[0].jti
        assert agent_main(["--config", str(cfg_path), "approve", jti]) == 0
        # some of the delivery is out: crash the daemon in the middle of it
        first = watcher.get(timeout=60)
        assert first.topic.startswith(f"doorbell/{DEVICE}/deliveries/{REQUESTER}/{jti}/")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        with RequestStore.open(state) as store:
            assert store.get_request(jti).status == "approved"
        daemon = start_daemon(cfg_path)
        sender.join(180)
        assert not sender.is_alive()
        with RequestStore.open(state) as store:
            # the requester's receipt moves it on to acknowledged (§5.2)
            wait_for(
                lambda: store.get_request(jti).status == "acknowledged", "acknowledged", daemon
            )
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
        receipt = receipts.get(timeout=30)
    finally:
        watcher.close()
        receipts.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert codes == [0]
    # the released file has an opaque id, fresh for the attempt after the crash (so no chunk
    # of the interrupted attempt was spliced in): the manifest names it
    manifest = json.loads(b64url_decode((out / "manifest.jws").read_text().split(".")[1]))
    assert manifest["attempt"] == 2
    (file_id,) = [c["id"] for c in manifest["clips"]]
    assert file_id != clip.id
    # byte for byte the deterministic cut of the window, with every recorded frame
    assert (out / f"{file_id}.mkv").read_bytes() == data
    assert manifest["clips"][0]["frames"] == clip.frames == 60
    # the evidence set, and no spool or temporary file left
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{file_id}.mkv", f"{file_id}.age", "device.jwk", "manifest.jws", "receipt.jws",
         "request.jws", "responses"]
    )
    assert out.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir() if p.is_file())
    statuses = [p.name.split("-", 1)[1] for p in sorted((out / "responses").iterdir())]
    assert statuses[0] == "pending.jws" and statuses[-1] == "delivered.jws"
    # the receipt the device got is the one kept, and names this manifest
    assert receipt.payload == (out / "receipt.jws").read_bytes()
    claims = json.loads(b64url_decode(receipt.payload.decode().split(".")[1]))
    assert claims["req"] == jti and claims["iss"] == REQUESTER and claims["aud"] == DEVICE
    assert claims["manifest"] == hashlib.sha256((out / "manifest.jws").read_bytes()).hexdigest()
    assert requester_main(
        ["verify", str(out), "--key", str(keys_dir), "--identity",
         str(keys_dir / "age-identity.txt")]
    ) == 0
    entries = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    events = [e["event"] for e in entries]
    assert events.count("request_approved") == 1 and events.count("request_delivered") == 1
    assert events.count("release_started") == 2  # the interrupted attempt and the one after
    assert events.index("request_approved") < events.index("request_delivered")
    assert events.index("request_delivered") < events.index("delivery_acknowledged")
    assert verify_file(state / "audit.jsonl", load_device_key(state).public_key()).ok
    with Vault(state, load_storage_key(state)) as vault:
        assert vault.holds() == []
