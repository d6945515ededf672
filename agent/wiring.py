"""The composition root of ``doorbell-agent run``: every part of the agent, built in one order.

:func:`run_daemon` opens the state (lock, device key, the two audit logs, the vault) and then
calls each factory of :data:`WORKER_FACTORIES` in turn with one :class:`DaemonContext`. A
factory builds one worker (None when its part is switched off) and sets the context's typed
field for what later factories need, so the order below is the dependency order:

1. ``camera``        → ``ctx.camera``        (motion for Home Assistant)
2. ``retention``     (the vault's quotas; nothing shared)
3. ``requests``      → ``ctx.request_store``, ``ctx.requests`` (MQTT, intake, the responder)
4. ``approval``      → ``ctx.cutter``, ``ctx.approval`` (needs 3: answers and delivers over it)
5. ``app``           (needs 3 and 4: lists requests, decides through the coordinator)
6. ``homeassistant`` (needs 1 and 3)
7. ``checkpoints``   (waits for 3's start-up audit check)

Setup and teardown come in pairs: what a factory opens that is not a worker (the request
store) is entered into ``ctx.resources`` where it is opened, and closed after every worker;
the workers are closed by :class:`agent.daemon.Daemon` in the reverse of this order.
Feature modules never import this module nor :mod:`agent.daemon`: they take their
collaborators as typed arguments.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gpiozero.pins import Factory

from agent import __version__
from agent.approval.coordinator import ApprovalCoordinator
from agent.approval.worker import build_approval_worker
from agent.audit import AuditLog, Checkpointer
from agent.camera.frame import Clock, SystemClock
from agent.camera.pipeline import CameraWorker
from agent.config import Config
from agent.daemon import (
    STATUS_INTERVAL,
    AfterCheck,
    CheckpointWorker,
    Daemon,
    HomeAssistantWorker,
    RetentionWorker,
    Worker,
    signals_set_stop,
    worker_name,
)
from agent.errors import AgentError, AuditWriteError, StateError
from agent.homeassistant import HomeAssistantPublisher
from agent.keys import load_device_key
from agent.paths import StatePaths
from agent.release.cut import WindowCutter
from agent.requests.store import RequestStore
from agent.requests.worker import RequestsWorker
from agent.sdnotify import Notifier
from agent.statelock import StateLock
from agent.vault import Vault
from agent.web.server import AppServer, build_server, build_services, snapshot_items

log = logging.getLogger(__name__)

HA_PUBLISH_TIMEOUT = 1.0
"""Seconds a Home Assistant update may wait for room in a full MQTT outbox before it is dropped
(the next announcement carries the current state anyway)."""


@dataclass
class DaemonContext:
    """What worker factories build from; owned and closed by :func:`run_daemon`.

    The fields after ``activity`` start as None and are set by the factory that builds them
    (see the module docstring for the order).
    """

    config: Config
    stop: threading.Event
    clock: Clock
    device_key: Ed25519PrivateKey
    audit: AuditLog
    """The request log (``audit.jsonl``): requests, requesters, agent runs, checkpoints."""
    vault: Vault
    resources: contextlib.ExitStack
    """Factories register cleanups for objects they create (closed after every worker)."""
    snapshot: Callable[[], dict[str, object]] = field(default=dict)
    """The daemon's latest status document (``status.json``), for the app and MQTT."""
    activity: AuditLog | None = None
    """The camera and owner log (``activity.jsonl``): clips, logins, button presses, storage."""
    pin_factory: Factory | None = None
    """gpiozero's pin factory for the button and LED (None: gpiozero's own choice)."""
    camera: CameraWorker | None = None
    request_store: RequestStore | None = None
    requests: RequestsWorker | None = None
    cutter: WindowCutter | None = None
    """One cutter for the preview and the release: the file released is the one shown."""
    approval: ApprovalCoordinator | None = None


WorkerFactory = Callable[[DaemonContext], Worker | None]


def camera_worker(ctx: DaemonContext) -> Worker | None:
    """camera → motion → recorder → vault; sets ``ctx.camera``."""
    ctx.camera = CameraWorker.from_config(ctx.config, ctx.vault, ctx.clock)
    return ctx.camera


def retention_worker(ctx: DaemonContext) -> Worker | None:
    """Retention and quota enforcement (storage warnings go to the activity log)."""
    return RetentionWorker(ctx.vault, now=ctx.clock.now, activity=ctx.activity)


def requests_worker(ctx: DaemonContext) -> Worker | None:
    """MQTT + request service on the daemon's key and audit log; sets ``ctx.request_store``
    (opened here, closed with ``ctx.resources``, unless an earlier factory did) and
    ``ctx.requests``."""
    if ctx.request_store is None:
        ctx.request_store = ctx.resources.enter_context(RequestStore.open(ctx.config.state_dir))
    ctx.requests = RequestsWorker(
        ctx.config,
        signing_key=ctx.device_key,
        store=ctx.request_store,
        audit=ctx.audit,
        now=ctx.clock.now,
    )
    return ctx.requests


def approval_worker(ctx: DaemonContext) -> Worker | None:
    """Coordinator, control socket and button; sets ``ctx.cutter`` and ``ctx.approval``."""
    requests, store = ctx.requests, ctx.request_store
    if requests is None or store is None:
        raise StateError("the approval worker needs the requests worker to be set up first")
    ctx.cutter = WindowCutter(ctx.vault)
    worker = build_approval_worker(
        ctx.config,
        store=store,
        audit=ctx.audit,
        activity=ctx.activity,
        vault=ctx.vault,
        device_key=ctx.device_key,
        respond=requests.service.responder.respond,
        publisher=requests.delivery_publisher,
        cutter=ctx.cutter,
        ready=requests.wait_checked,
        pin_factory=ctx.pin_factory,
        now=ctx.clock.now,
    )
    ctx.approval = worker.coordinator
    return worker


def app_worker(ctx: DaemonContext) -> AppServer | None:
    """The local app, when ``app.enabled``: needs ``ctx.request_store`` and ``ctx.approval``."""
    cfg = ctx.config
    if not cfg.app.enabled:
        return None
    store, engine = ctx.request_store, ctx.approval
    if store is None or engine is None:
        raise AgentError(
            "the local app needs the request store and the approval coordinator",
            hint="list app_worker after the requests and approval factories",
        )
    services = build_services(
        cfg,
        store=store,
        engine=engine,
        vault=ctx.vault,
        audit=ctx.audit,
        activity=ctx.activity,
        runtime=lambda: snapshot_items(ctx.snapshot()),
    )
    return build_server(cfg, services)


def homeassistant_worker(ctx: DaemonContext) -> Worker | None:
    """Home Assistant discovery over the requests worker's MQTT connection, when
    ``homeassistant.enabled``: motion from ``ctx.camera``, the pending count from the store."""
    cfg = ctx.config
    if not cfg.homeassistant.enabled:
        return None
    requests, store, camera = ctx.requests, ctx.request_store, ctx.camera
    if requests is None or store is None:
        log.warning("homeassistant.enabled is set but the agent runs no MQTT requests worker")
        return None
    client = requests.client

    def publish(topic: str, payload: bytes, *, retain: bool) -> object:
        return client.publish(topic, payload, retain=retain, timeout=HA_PUBLISH_TIMEOUT)

    def connection() -> int | None:
        return client.generation if client.connected else None

    def motion() -> bool:
        return camera is not None and camera.motion_active

    def pending() -> int:
        return len(store.list_requests(["pending"]))

    publisher = HomeAssistantPublisher(
        publish, cfg.device_id, cfg.mqtt.topic_prefix, cfg.homeassistant.discovery_prefix
    )
    return HomeAssistantWorker(publisher, connection=connection, motion=motion, pending=pending)


def checkpoint_worker(ctx: DaemonContext) -> Worker | None:
    """Checkpoints of ``activity.jsonl`` in ``audit.jsonl``, once the start-up check is done."""
    if ctx.activity is None:
        return None
    interval = int(ctx.config.audit.head_interval.total_seconds())
    worker = CheckpointWorker(Checkpointer(ctx.audit, ctx.activity, interval), now=ctx.clock.now)
    if ctx.requests is not None:
        return AfterCheck(worker, ctx.requests.wait_checked)
    return worker


WORKER_FACTORIES: tuple[WorkerFactory, ...] = (
    camera_worker,
    retention_worker,
    requests_worker,
    approval_worker,
    app_worker,
    homeassistant_worker,
    checkpoint_worker,
)
"""Every part of the running agent, in start order (closed in reverse)."""


def run_daemon(
    cfg: Config,
    *,
    factories: Sequence[WorkerFactory] = WORKER_FACTORIES,
    stop: threading.Event | None = None,
    status_interval: float = STATUS_INTERVAL,
    handle_signals: bool = True,
    clock: Clock | None = None,
    pin_factory: Factory | None = None,
) -> int:
    """Open the state, build the workers, run until SIGTERM/SIGINT (or ``stop``).

    ``clock`` (default: the real one, its sleeps cut short by ``stop``) paces the camera and
    is every worker's wall clock (retention, requests, approvals, checkpoints, ``status.json``);
    ``pin_factory`` drives the button and LED (default: gpiozero's choice). Audits
    ``agent_started`` before any worker runs and ``agent_stopped`` after all have finished.
    Raises AgentError when the state cannot be opened or a worker cannot be built, and
    StateLockedError, before anything is touched, while another run holds ``state_dir``.
    """
    stop = stop or threading.Event()
    clock = clock or SystemClock(stop)
    state_dir = cfg.state_dir
    paths = StatePaths(state_dir)
    with contextlib.ExitStack() as resources:
        # First of all: a second agent must not touch the broker, camera, app or logs.
        resources.enter_context(StateLock(state_dir))
        notifier = resources.enter_context(Notifier.from_env())
        key = load_device_key(state_dir)
        audit = resources.enter_context(AuditLog(paths.audit_log, key))
        # Clips and owner activity go to their own log: the public head covers requests only.
        activity = resources.enter_context(AuditLog(paths.activity_log, key))
        vault = resources.enter_context(Vault.from_config(cfg, audit=activity))
        report = vault.recover()
        if report.recovered or report.discarded or report.unrecoverable:
            log.warning(
                "vault recovery: %d clip(s) recovered, %d discarded, %d unrecoverable",
                len(report.recovered), len(report.discarded), len(report.unrecoverable),
            )
        ctx = DaemonContext(
            config=cfg,
            stop=stop,
            clock=clock,
            device_key=key,
            audit=audit,
            vault=vault,
            resources=resources.enter_context(contextlib.ExitStack()),
            activity=activity,
            pin_factory=pin_factory,
        )
        workers: list[Worker] = []
        try:
            for factory in factories:
                worker = factory(ctx)
                if worker is not None:
                    workers.append(worker)
        except BaseException:
            for built in reversed(workers):
                with contextlib.suppress(Exception):
                    built.close()
            raise
        daemon = Daemon(
            workers,
            stop,
            status_path=paths.status,
            info={"device_id": cfg.device_id},
            status_interval=status_interval,
            notifier=notifier,
            now=clock.now,
        )
        ctx.snapshot = daemon.snapshot
        names = [worker_name(w) for w in workers]
        audit.append("agent_started", version=__version__, workers=names)
        with signals_set_stop(daemon) if handle_signals else contextlib.nullcontext():
            code = daemon.run()
        try:
            audit.append(
                "agent_stopped", reason=daemon.stop_reason or "shutdown", clean=code == 0
            )
        except AuditWriteError as exc:
            log.error("could not record agent_stopped: %s", exc)
        return code
