"""``doorbell-agent run``: workers sharing one stop event, a status snapshot, clean shutdown.

Structure
---------
- A **worker** is anything with ``run(stop)`` (block until the shared ``stop`` event is set,
  then return once its in-flight work is finished) and an idempotent ``close()``. Optional:
  a ``name`` attribute (default: the class name) and ``stats() -> dict`` (shown in
  ``status.json``). Each worker's ``run`` gets its own thread.
- Workers are built by :mod:`agent.wiring` (the composition root): one factory per part, in
  the start order its ``WORKER_FACTORIES`` lists, from a typed context. This module knows no
  feature: it runs whatever workers it is given.
- :class:`Daemon` starts every worker, turns SIGTERM/SIGINT into the stop event, writes
  ``status.json`` every few seconds, tells systemd (``READY=1``, ``STOPPING=1``, watchdog),
  and on stop joins the workers (the camera worker finishes its open clip) and closes them in
  reverse order. A worker that raises stops the whole daemon (exit status 1) so systemd
  restarts it; camera faults never get that far (the camera worker absorbs them).

``status.json`` (state directory, mode 0600, replaced atomically)::

    {"device_id": ..., "version": ..., "pid": ..., "state": "running"|"stopping"|"stopped",
     "started": RFC 3339, "updated": RFC 3339,
     "workers": {NAME: {"state": "running"|"finished"|"failed"|"not started",
                        "error": str|null, "stats": {...}|null}}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from agent import __version__
from agent.audit import AuditLog, Checkpointer
from agent.diagnostics import stack_of
from agent.errors import AgentError
from agent.homeassistant import HomeAssistantPublisher
from agent.sdnotify import Notifier, Watchdog
from agent.timeutil import rfc3339, utcnow
from agent.vault import Space, Vault

log = logging.getLogger(__name__)

STATUS_INTERVAL = 5.0
"""Seconds between ``status.json`` snapshots."""
JOIN_TIMEOUT = 30.0
"""Seconds the daemon waits, in total, for workers to finish after the stop event."""
RETENTION_INTERVAL = timedelta(minutes=10)
SPACE_CHECK_INTERVAL = 5.0
"""Seconds between the retention worker's looks at free space (a pass runs at once when low)."""
HA_POLL_INTERVAL = 1.0
"""Seconds between the Home Assistant worker's looks at motion, pending count and connection."""
HA_PUBLISH_TIMEOUT = 1.0
"""Seconds a Home Assistant update may wait for room in a full MQTT outbox before it is dropped
(the next announcement carries the current state anyway)."""


class Worker(Protocol):
    """A part of the daemon run in its own thread (see the module docstring)."""

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; return once in-flight work is finished."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...


class RetentionWorker:
    """Crypto-shreds clips past ``storage.retention`` or beyond ``storage.max_bytes``, and the
    oldest unheld ones early when free space falls below the vault's reserve (a full disk must
    not stop recording or the audit log)."""

    name = "retention"

    def __init__(
        self,
        vault: Vault,
        *,
        interval: timedelta = RETENTION_INTERVAL,
        space_interval: float = SPACE_CHECK_INTERVAL,
        now: Callable[[], datetime] = utcnow,
        activity: AuditLog | None = None,
    ) -> None:
        self.vault = vault
        self.activity = activity
        self._storage_state: str | None = None
        self.interval = interval
        self.space_interval = space_interval
        self.now = now
        self.runs = 0
        self.deleted = 0
        self.stored_bytes: int | None = None
        self.last_error: str | None = None
        self.space: Space | None = None

    def run(self, stop: threading.Event) -> None:
        """Enforce retention now and every ``interval``, and whenever space runs low, until
        ``stop``."""
        due = 0.0
        while True:
            if time.monotonic() >= due or self.check_space():
                self.enforce()
                due = time.monotonic() + self.interval.total_seconds()
            if stop.wait(min(self.space_interval, self.interval.total_seconds())):
                return

    def check_space(self) -> bool:
        """Look at free space; True when it is below the reserve."""
        try:
            self.space = self.vault.space()
        except OSError as exc:
            self.last_error = f"cannot measure free space: {exc}"
            return False
        self._note_storage(self.space)
        return self.space.low

    def _note_storage(self, space: Space) -> None:
        """Record in the activity log when storage becomes full and when it recovers (camera
        activity: it never reaches the public request log)."""
        if space.state == self._storage_state or self.activity is None:
            return
        if self._storage_state is None and space.state == "ok":
            self._storage_state = "ok"
            return
        event = "storage_full" if space.low else "storage_ok"
        try:
            self.activity.append(event, free_bytes=space.free, reserve_bytes=space.reserve)
        except (AgentError, OSError) as exc:
            log.warning("could not record %s in the activity log: %s", event, exc)
            return
        self._storage_state = space.state

    def enforce(self) -> None:
        """One pass; failures are logged and retried next time (recording goes on)."""
        try:
            report = self.vault.enforce_retention(self.now())
        except (AgentError, OSError) as exc:
            self.last_error = str(exc)
            log.error("retention pass failed: %s", exc)
            return
        self.runs += 1
        self.deleted += len(report.deleted)
        self.stored_bytes = report.stored_bytes
        self.last_error = None
        if self.check_space() and self.space is not None:
            # Everything left is held (or being written): say so, recording stays paused.
            self.last_error = (
                f"storage full ({self.space.describe()}): the clips left are held or being "
                "written; recording is paused"
            )

    def stats(self) -> dict[str, Any]:
        """Passes, clips deleted, bytes stored, free space and whether storage is full."""
        space = self.space
        return {
            "runs": self.runs,
            "deleted": self.deleted,
            "stored_bytes": self.stored_bytes,
            "storage": None if space is None else space.state,
            "free_bytes": None if space is None else space.free,
            "reserve_bytes": None if space is None else space.reserve,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Nothing to release (the vault belongs to the daemon)."""


class CheckpointWorker:
    """Writes a ``checkpoint`` of the activity log to the request log every
    ``audit.head_interval``, whatever happened (§7; see :class:`agent.audit.Checkpointer`)."""

    name = "checkpoints"

    def __init__(
        self, checkpointer: Checkpointer, *, now: Callable[[], datetime] = utcnow
    ) -> None:
        self.checkpointer = checkpointer
        self.now = now
        self.last_error: str | None = None

    def tick(self) -> float:
        """Write a due checkpoint; the seconds until the next one is due."""
        now = self.now()
        try:
            self.checkpointer.tick(now)
            self.last_error = None
        except (AgentError, OSError) as exc:
            self.last_error = str(exc)
            log.error("could not write an audit checkpoint: %s", exc)
            return 5.0
        return max((self.checkpointer.due(now) - now).total_seconds(), 0.0)

    def run(self, stop: threading.Event) -> None:
        """Checkpoint on schedule until ``stop`` (looking at least once a minute, so a clock
        step is noticed)."""
        while not stop.wait(min(self.tick(), 60.0)):
            pass

    def stats(self) -> dict[str, Any]:
        """Checkpoints written and the last failure."""
        return {"written": self.checkpointer.written, "last_error": self.last_error}

    def close(self) -> None:
        """Nothing to release (both logs belong to the daemon)."""


class AfterCheck:
    """Runs ``worker`` only once ``ready`` (the requests worker's ``wait_checked``) says the
    start-up audit check is done: nothing is added to the request log before a gap in it has
    been recorded."""

    def __init__(
        self, worker: CheckpointWorker, ready: Callable[[threading.Event], bool]
    ) -> None:
        self.worker = worker
        self.ready = ready
        self.name = worker.name

    def run(self, stop: threading.Event) -> None:
        if self.ready(stop):
            self.worker.run(stop)

    def stats(self) -> dict[str, Any]:
        return self.worker.stats()

    def close(self) -> None:
        self.worker.close()


class HomeAssistantWorker:
    """Keeps Home Assistant's entities current (see :mod:`agent.homeassistant`); never images.

    Polls every ``interval`` seconds: ``connection()`` (the MQTT connection's generation, None
    while disconnected), ``motion()`` and ``pending()``. A new generation means a (re)connect:
    the discovery configs and both states are announced again, since a broker that lost its
    retained messages would otherwise leave Home Assistant without them. Otherwise only changed
    states are published. Nothing is published while disconnected: the announcement on the next
    connection carries the current state, so no stale backlog builds up.
    """

    name = "homeassistant"

    def __init__(
        self,
        publisher: HomeAssistantPublisher,
        *,
        connection: Callable[[], int | None],
        motion: Callable[[], bool],
        pending: Callable[[], int],
        interval: float = HA_POLL_INTERVAL,
    ) -> None:
        self.publisher = publisher
        self.interval = interval
        self._connection = connection
        self._motion = motion
        self._pending = pending
        self._announced: int | None = None
        self.announcements = 0
        self.motion: bool | None = None
        self.pending: int | None = None
        self.last_error: str | None = None

    def tick(self) -> None:
        """One look: announce after a (re)connect, else publish what changed."""
        generation = self._connection()
        if generation is None:
            return
        try:
            pending = self._pending()
        except (AgentError, sqlite3.Error) as exc:
            # Motion still goes out; the count follows once the store answers again.
            self.last_error = f"cannot count pending requests: {exc}"
            log.warning("Home Assistant: %s", self.last_error)
            pending = None
        motion = self._motion()
        self.motion = motion
        if generation != self._announced:
            if pending is None:
                return  # announce on a later tick, with a count
            self.publisher.announce(motion, pending)
            self._announced = generation
            self.announcements += 1
        else:
            self.publisher.set_motion(motion)
            if pending is not None:
                self.publisher.set_pending(pending)
        if pending is not None:
            self.pending = pending
            self.last_error = None

    def run(self, stop: threading.Event) -> None:
        """Look every ``interval`` seconds until ``stop``."""
        while True:
            self.tick()
            if stop.wait(self.interval):
                return

    def stats(self) -> dict[str, Any]:
        """What Home Assistant was last told, and how often it was announced to."""
        return {
            "announcements": self.announcements,
            "motion": self.motion,
            "pending": self.pending,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Nothing to release (the MQTT client belongs to the requests worker)."""


def worker_name(worker: Worker) -> str:
    """A worker's ``name`` attribute, else its class name."""
    name = getattr(worker, "name", None)
    return name if isinstance(name, str) and name else type(worker).__name__


def write_status(path: Path, document: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``document`` as JSON (mode 0600)."""
    data = json.dumps(document, indent=2, sort_keys=True, default=str).encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".status-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Slot:
    """One worker, its thread and how it ended."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.name = worker_name(worker)
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.finished = False

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        if self.thread is None:
            return "not started"
        if self.finished or not self.thread.is_alive():
            return "finished"
        return "running"


class Daemon:
    """Runs workers until the stop event; see the module docstring."""

    def __init__(
        self,
        workers: Sequence[Worker],
        stop: threading.Event,
        *,
        status_path: Path | None = None,
        info: Mapping[str, Any] | None = None,
        status_interval: float = STATUS_INTERVAL,
        join_timeout: float = JOIN_TIMEOUT,
        notifier: Notifier | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.stop = stop
        self.status_path = status_path
        self.info = dict(info or {})
        self.status_interval = status_interval
        self.join_timeout = join_timeout
        self.notifier = notifier or Notifier(None)
        self.now = now
        self.started = now()
        self.state = "starting"
        self.stop_reason: str | None = None
        self._slots = [_Slot(w) for w in workers]
        self._lock = threading.Lock()

    def request_stop(self, reason: str) -> None:
        """Set the stop event, remembering the first reason given."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self.stop.set()

    @property
    def failed(self) -> bool:
        """Whether a worker raised."""
        return any(s.error is not None for s in self._slots)

    def healthy(self) -> bool:
        """No worker has failed (the systemd watchdog pings only while this holds)."""
        return not self.failed

    def snapshot(self) -> dict[str, Any]:
        """The status document (see the module docstring)."""
        workers: dict[str, Any] = {}
        for slot in self._slots:
            stats: Any = None
            fn = getattr(slot.worker, "stats", None)
            if callable(fn):
                try:
                    stats = fn()
                except Exception as exc:
                    stats = {"error": f"stats failed: {exc}"}
            workers[slot.name] = {"state": slot.state, "error": slot.error, "stats": stats}
        return {
            **self.info,
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state,
            "started": rfc3339(self.started),
            "updated": rfc3339(self.now()),
            "workers": workers,
        }

    def write_status(self) -> None:
        """Write ``status.json`` now (failures are logged: status must not stop the agent)."""
        if self.status_path is None:
            return
        try:
            write_status(self.status_path, self.snapshot())
        except OSError as exc:
            log.warning("cannot write %s: %s", self.status_path, exc)

    def _run_slot(self, slot: _Slot) -> None:
        try:
            slot.worker.run(self.stop)
        except BaseException as exc:
            slot.error = f"{type(exc).__name__}: {exc}"
            log.exception("worker %s failed; stopping the agent", slot.name)
            self.request_stop(f"worker {slot.name} failed")
        else:
            slot.finished = True
            if not self.stop.is_set():
                log.info("worker %s finished", slot.name)

    def run(self) -> int:
        """Start every worker, serve until stopped, shut down; 0 clean, 1 a worker failed."""
        self.state = "running"
        watchdog: threading.Thread | None = None
        try:
            for slot in self._slots:
                slot.thread = threading.Thread(
                    target=self._run_slot, args=(slot,), name=f"worker-{slot.name}", daemon=True
                )
                slot.thread.start()
            names = ", ".join(s.name for s in self._slots)
            log.info("agent running: %s", names)
            self.notifier.ready(f"running: {names}")
            dog = Watchdog.from_env(self.notifier, self.healthy, self.stop)
            watchdog = dog.start() if dog is not None else None
            self.write_status()
            while not self.stop.wait(self.status_interval):
                self.write_status()
        finally:
            self.request_stop("shutdown")
            self.state = "stopping"
            self.notifier.stopping(f"stopping: {self.stop_reason}")
            log.info("stopping (%s)", self.stop_reason)
            self.write_status()
            self._join()
            if watchdog is not None:
                watchdog.join(1.0)
            for slot in reversed(self._slots):
                try:
                    slot.worker.close()
                except Exception:
                    log.exception("closing worker %s failed", slot.name)
            self.state = "stopped"
            self.write_status()
        return 1 if self.failed else 0

    def _join(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        for slot in self._slots:
            if slot.thread is None:
                continue
            slot.thread.join(max(deadline - time.monotonic(), 0.0))
            if slot.thread.is_alive():
                # Its thread is a daemon thread: it cannot keep the process alive.
                log.error(
                    "worker %s did not stop within %.0f s; it is at:\n%s",
                    slot.name, self.join_timeout, stack_of(slot.thread),
                )


@contextlib.contextmanager
def signals_set_stop(daemon: Daemon) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT ask ``daemon`` to stop (previous handlers restored)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
