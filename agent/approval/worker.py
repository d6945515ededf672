"""The approval part of ``doorbell-agent run``: coordinator, control socket and button/LED.

:func:`build_approval_worker` builds it from typed collaborators; :mod:`agent.wiring` calls it
after the requests part (whose responder answers and whose MQTT connection delivers) and before
the local app (which decides through the coordinator).

The button is optional hardware: when the ``button`` channel is on but no GPIO is usable (not a
Raspberry Pi, no pin driver), the agent logs why and runs without it; the app and the CLI still
decide, and ``status`` shows the button as unavailable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from agent.approval.button import ButtonPanel
from agent.approval.control import ControlServer, socket_path
from agent.approval.coordinator import ApprovalCoordinator, DecisionResult
from agent.approval.decisions import Action
from agent.approval.machine import Policy
from agent.release.cut import WindowCutter
from agent.release.deliver import Deliverer, Publisher
from agent.release.preview import Preview, build_preview
from agent.requests.responder import RespondFn
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import utcnow
from agent.vocabulary import Channel

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from gpiozero.pins import Factory

    from agent.audit import AuditLog
    from agent.config import Config
    from agent.vault import Vault

log = logging.getLogger(__name__)


class ApprovalWorker:
    """Runs the coordinator, serves ``agent.sock`` and drives the button panel."""

    name = "approval"

    def __init__(
        self,
        coordinator: ApprovalCoordinator,
        control: ControlServer,
        panel: ButtonPanel | None,
        button_error: str | None = None,
        ready: Callable[[threading.Event], bool] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self._ready = ready
        self.control = control
        self.panel = panel
        self.button_error = button_error
        self._closed = False

    def run(self, stop: threading.Event) -> None:
        """Recover, serve decisions until ``stop``, then stop taking them.

        With ``ready``, waits first until the requests worker has checked the audit log (§7):
        responses carry an audit head, and none may go out before that check.
        """
        if self._ready is not None and not self._ready(stop):
            return
        self.coordinator.start()
        self.control.start()
        stop.wait()
        self.control.close()

    def stats(self) -> dict[str, object]:
        """Channels, whether the button works, and whether the LED says something is pending."""
        return {
            "channels": sorted(c.value for c in self.coordinator.policy.channels),
            "require": self.coordinator.policy.require,
            "button": "ok" if self.panel is not None else (self.button_error or "off"),
            "pending_indicator": self.panel.blinking if self.panel is not None else None,
            # Requests whose footage is not held (held-footage cap): the owner should decide.
            "unheld_requests": len(self.coordinator.unheld),
        }

    def close(self) -> None:
        """Release the pins, the socket and the coordinator's threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.panel is not None:
            self.panel.close()
        self.control.close()
        self.coordinator.close()


def policy_of(cfg: Config) -> Policy:
    """The approval policy of a configuration."""
    a = cfg.approval
    return Policy.from_settings(a.channels, a.require, a.timeout, a.confirm_window)


def previewer(
    vault: Vault, max_bytes: int, cutter: WindowCutter | None = None
) -> Callable[[RequestRecord], Preview]:
    """What approving a request would release, from the cut's own plan (contract §5.1).

    Give the delivery's ``cutter`` so both share its plans: the file released is the one the
    owner was shown.
    """
    cutter = cutter or WindowCutter(vault)

    def preview(record: RequestRecord) -> Preview:
        return build_preview(record, cutter, max_bytes)

    return preview


def build_approval_worker(
    cfg: Config,
    *,
    store: RequestStore,
    audit: AuditLog,
    activity: AuditLog | None,
    vault: Vault,
    device_key: Ed25519PrivateKey,
    respond: RespondFn,
    publisher: Callable[[], Publisher],
    cutter: WindowCutter,
    ready: Callable[[threading.Event], bool] | None = None,
    pin_factory: Factory | None = None,
    now: Callable[[], datetime] = utcnow,
) -> ApprovalWorker:
    """The approval part: a coordinator answering through ``respond`` and delivering through a
    fresh ``publisher()`` per release, its control socket and, when enabled, the button panel
    (on ``pin_factory``, gpiozero's default when None); ``now`` is the coordinator's clock.
    ``cutter`` plans both the preview and the release, so the file released is the one the
    owner was shown."""
    policy = policy_of(cfg)

    def deliverer() -> Deliverer:
        return Deliverer(
            vault=vault,
            publisher=publisher(),
            signing_key=device_key,
            topic_prefix=cfg.mqtt.topic_prefix,
            chunk_bytes=cfg.delivery.chunk_bytes,
            retries=cfg.delivery.retries,
            cutter=cutter,
        )

    panels: list[ButtonPanel] = []

    def indicate(pending: bool) -> None:
        for p in panels:
            p.set_pending(pending)

    coordinator = ApprovalCoordinator(
        store=store,
        audit=audit,
        activity=activity,
        policy=policy,
        vault=vault,
        respond=respond,
        deliverer_factory=deliverer,
        device_id=cfg.device_id,
        previewer=previewer(vault, cfg.delivery.max_bytes, cutter),
        indicator=indicate,
        max_bytes=cfg.delivery.max_bytes,
        now=now,
    )
    button_error: str | None = None
    if Channel.BUTTON in policy.channels and cfg.approval.button.enabled:
        b = cfg.approval.button
        try:
            panels.append(
                ButtonPanel(
                    pin=b.pin,
                    led_pin=b.led_pin,
                    hold_time=b.hold_time,
                    bounce_time=b.bounce_time,
                    on_press=coordinator.button_press,
                    on_hold=coordinator.button_hold,
                    pin_factory=pin_factory,
                )
            )
        except Exception as exc:  # gpiozero raises its own hierarchy, and OSError on /dev/gpio*
            button_error = f"unavailable: {exc}"
            log.warning("approval button on GPIO %d not available: %s", b.pin, exc)

    def decide(jti: str, action: Action, channel: Channel) -> dict[str, object]:
        result: DecisionResult = coordinator.decide(jti, action, channel)
        return result.to_json()

    def redeliver(jti: str, channel: Channel) -> dict[str, object]:
        return coordinator.redeliver(jti, channel).to_json()

    return ApprovalWorker(
        coordinator,
        ControlServer(socket_path(cfg.state_dir), decide, redeliver=redeliver),
        panels[0] if panels else None,
        button_error,
        ready=ready,
    )
