"""``doorbell-agent status``: what the device is, whether the agent runs, and its health."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timedelta
from typing import Any

from agent import __version__, clock
from agent.audit import AuditLog, audit_state
from agent.cli.common import add_json_flag, load_config, print_json, require_initialised
from agent.config import Config
from agent.daemon import STATUS_INTERVAL
from agent.keys import kid_for, load_device_key, public_jwk
from agent.paths import StatePaths
from agent.provision import certificate_fingerprint, configured_client_id
from agent.requests.store import RequestStore
from agent.timeutil import format_duration, format_size, parse_rfc3339, utcnow
from agent.vault import Vault, held_cap
from agent.vocabulary import Status

STALE_AFTER = timedelta(seconds=STATUS_INTERVAL * 3)
"""A status.json not refreshed for this long means the daemon is not running."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` command."""
    p = sub.add_parser("status", help="device identity, agent state, storage, audit head, clock")
    add_json_flag(p)
    p.set_defaults(func=handler)


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_state(document: dict[str, Any] | None, now: datetime) -> str:
    """``running`` when the snapshot is fresh and its process alive, else why not."""
    if document is None:
        return "not running (no status.json: the agent has not run yet)"
    if document.get("state") == "stopped" or not _pid_alive(document.get("pid")):
        return "not running"
    try:
        updated = parse_rfc3339(str(document.get("updated")))
    except ValueError:
        return "unknown (status.json is malformed)"
    if now - updated > STALE_AFTER:
        return f"not responding (status last written {document.get('updated')})"
    return str(document.get("state", "unknown"))


def collect(cfg: Config, *, now: datetime) -> dict[str, Any]:
    """The whole status document shown by ``status --json``."""
    state_dir = cfg.state_dir
    paths = StatePaths(state_dir)
    key = load_device_key(state_dir)
    snapshot: dict[str, Any] | None
    try:
        snapshot = json.loads(paths.status.read_text(encoding="utf-8"))
    except FileNotFoundError:
        snapshot = None
    except (OSError, ValueError):
        snapshot = {"state": "unknown"}
    cert = paths.tls_cert
    with Vault.from_config(cfg) as vault:
        clips = vault.list_clips()
        space = vault.space()
        holds = vault.holds()
        held_bytes = vault.held_bytes(holds)
    with RequestStore.open(state_dir) as store:
        pending_records = store.list_requests([Status.PENDING])
    pending = len(pending_records)
    holders = {h.holder for h in holds}
    unheld = [r.jti for r in pending_records if r.jti not in holders]
    last = AuditLog(paths.audit_log, key).last_entry()
    stored = sum(c.stored_bytes for c in clips)
    return {
        "device_id": cfg.device_id,
        "version": __version__,
        "kid": kid_for(key.public_key()),
        "public_jwk": public_jwk(key.public_key()),
        "app_tls_fingerprint": certificate_fingerprint(cert) if cert.exists() else None,
        "agent": {"state": daemon_state(snapshot, now), "snapshot": snapshot},
        "storage": {
            "clips": len(clips),
            "stored_bytes": stored,
            "max_bytes": cfg.storage.max_bytes,
            "retention": format_duration(cfg.storage.retention),
            "held_bytes": held_bytes,
            "max_held_bytes": held_cap(cfg.storage.max_bytes, cfg.storage.max_held_share),
        },
        "disk": {
            "state": space.state,
            "free_bytes": space.free,
            "reserve_bytes": space.reserve,
            "detail": space.describe(),
        },
        "requests": {"pending": pending, "unheld": unheld},
        "audit": {
            "state": audit_state(state_dir),
            **({"seq": last.seq, "hash": last.hash} if last else {"seq": 0, "hash": None}),
        },
        "clock": clock.status_json(clock.clock_state()),
        "mqtt": {
            "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}",
            "tls": cfg.mqtt.tls.enabled,
            "topic_prefix": cfg.mqtt.topic_prefix,
            "client_id": configured_client_id(state_dir, cfg.device_id, cfg.mqtt.client_id),
            "client_id_conflict": client_id_conflict(snapshot),
        },
    }


_SHOWN_ELSEWHERE = frozenset({"stored_bytes", "free_bytes", "reserve_bytes", "storage"})


def client_id_conflict(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the running agent saw of another MQTT client using its client id, if anything."""
    workers = snapshot.get("workers") if snapshot else None
    requests = workers.get("requests") if isinstance(workers, dict) else None
    stats = requests.get("stats") if isinstance(requests, dict) else None
    conflict = stats.get("client_id_conflict") if isinstance(stats, dict) else None
    return conflict if isinstance(conflict, dict) else None


def _worker_lines(snapshot: dict[str, Any] | None) -> list[str]:
    if not snapshot or not isinstance(snapshot.get("workers"), dict):
        return []
    lines = []
    for name, worker in sorted(snapshot["workers"].items()):
        stats = worker.get("stats") or {}
        detail = ", ".join(
            f"{k}={format_size(v) if k.endswith('_bytes') and isinstance(v, int) else v}"
            for k, v in sorted(stats.items())
            # The storage and disk lines are the one source of those figures; None says nothing.
            if not isinstance(v, dict | list) and v is not None and k not in _SHOWN_ELSEWHERE
        )
        error = f" error: {worker['error']}" if worker.get("error") else ""
        lines.append(f"  {name}: {worker.get('state')}{error}" + (f" ({detail})" if detail else ""))
    return lines


def _camera_lines(snapshot: dict[str, Any] | None) -> list[str]:
    """The camera's and recorder's state in words, with the last error of each."""
    workers = snapshot.get("workers") if snapshot else None
    camera = workers.get("camera") if isinstance(workers, dict) else None
    stats = camera.get("stats") if isinstance(camera, dict) else None
    if not isinstance(stats, dict):
        return []
    lines = []
    capture = stats.get("capture")
    if isinstance(capture, dict):
        error = capture.get("last_error")
        lines.append(
            f"camera: {capture.get('state')} ({capture.get('source')})"
            + (f"; last error: {error}" if error and capture.get("state") != "streaming" else "")
        )
    recorder = stats.get("recorder")
    if isinstance(recorder, dict):
        error = recorder.get("last_error")
        lines.append(
            f"recording: {recorder.get('state')}, {recorder.get('clips')} clips, "
            f"{recorder.get('failures')} failures" + (f"; last error: {error}" if error else "")
        )
        codec = recorder.get("codec")
        rate = recorder.get("stored_bytes_per_minute")
        if codec:
            lines.append(
                f"storage: {codec}"
                + (f", {format_size(rate)} per minute of footage" if isinstance(rate, int) else "")
            )
    return lines


def handler(args: argparse.Namespace) -> int:
    """Print the status as text or one JSON document."""
    cfg = load_config(args)
    require_initialised(cfg)
    doc = collect(cfg, now=utcnow())
    if args.json:
        print_json(doc)
        return 0
    storage = doc["storage"]
    audit = doc["audit"]
    print(f"device: {doc['device_id']} (doorbell-agent {doc['version']})")
    print(f"device key id (kid): {doc['kid']}")
    if doc["app_tls_fingerprint"]:
        print(f"local app TLS certificate SHA-256: {doc['app_tls_fingerprint']}")
    print(f"agent: {doc['agent']['state']}")
    for line in _worker_lines(doc["agent"]["snapshot"]):
        print(line)
    for line in _camera_lines(doc["agent"]["snapshot"]):
        print(line)
    print(
        f"storage: {storage['clips']} clips, {format_size(storage['stored_bytes'])} of "
        f"{format_size(storage['max_bytes'])}, retention {storage['retention']}"
    )
    disk = doc["disk"]
    full = disk["state"] == "full"
    print(
        f"disk: {'FULL' if full else 'ok'} ({disk['detail']})"
        + ("; no new clip is recorded until space is freed" if full else "")
    )
    print(f"requests pending: {doc['requests']['pending']}")
    if doc["requests"]["unheld"]:
        print(
            f"  footage NOT held from retention for {len(doc['requests']['unheld'])} of them "
            f"(held {format_size(doc['storage']['held_bytes'])} of "
            f"{format_size(doc['storage']['max_held_bytes'])} allowed by "
            "storage.max_held_share): decide soon, see `doorbell-agent pending`"
        )
    print(
        f"audit head: seq {audit['seq']}"
        + (f" hash {audit['hash']}" if audit["hash"] else "")
        + (
            "; BROKEN: the log was found cut short at start (see `doorbell-agent audit verify`)"
            if audit["state"] == "broken"
            else ""
        )
    )
    mqtt = doc["mqtt"]
    print(
        f"mqtt: {mqtt['broker']}" + (" (TLS)" if mqtt["tls"] else "")
        + (f", client id {mqtt['client_id']}" if mqtt["client_id"] else "")
    )
    conflict = mqtt["client_id_conflict"]
    if conflict:
        print(
            f"MQTT CLIENT ID CONFLICT: another client uses this client id: {conflict['detail']} "
            f"(last {conflict['last']}, seen {conflict['conflicts']} times); the agent "
            "backs off between reconnects. Give each agent its own mqtt.client_id."
        )
    print(clock.status_text(clock.clock_state()))
    return 0
