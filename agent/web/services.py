"""What the local app needs from the rest of the agent, as small protocols.

The app shows and changes data owned by other components; it depends only on these protocols,
which :class:`agent.vault.Vault`, :class:`agent.requests.store.RequestStore` and
:class:`agent.audit.AuditLog` satisfy as they are. Approving and denying go through the approval
engine (a :class:`Decider`), never straight to the store, so the app obeys the same policy
(enabled channels, ``require: all``, audit before effect) as the button and the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.approval.coordinator import DecisionResult
from agent.approval.decisions import Action
from agent.audit import AuditEntry, AuditSink, VerifyResult
from agent.camera.media import MediaError
from agent.errors import AgentError
from agent.release.preview import Preview
from agent.requests.store import Requester, RequestRecord, Revocation
from agent.vault import ClipInfo, Hold
from agent.vocabulary import Channel, Status

log = logging.getLogger(__name__)


class AuditPort(AuditSink, Protocol):
    """The audit log (:class:`agent.audit.AuditLog`)."""

    path: Path

    def verify(self) -> VerifyResult:
        """Verify the whole chain with the device key."""
        ...

    def last_entry(self) -> AuditEntry | None:
        """The last entry (parsed, not verified), or None for an empty log."""
        ...


class RequestsPort(Protocol):
    """Requesters and request records (:class:`agent.requests.store.RequestStore`)."""

    def list_requests(self, statuses: Iterable[str] | None = None) -> list[RequestRecord]:
        """Recorded requests, oldest first."""
        ...

    def get_request(self, jti: str) -> RequestRecord:
        """One request; raises RequestNotFoundError."""
        ...

    def list_requesters(self) -> list[Requester]:
        """Every enrolled requester, revoked ones included."""
        ...

    def add_requester(
        self,
        requester_id: str,
        name: str,
        kind: str,
        public_key: Ed25519PublicKey,
        contact: str | None = None,
        *,
        audit: AuditPort | None = None,
    ) -> Requester:
        """Enrol a requester (audited)."""
        ...

    def revoke_requester(
        self, requester_id: str, *, audit: AuditPort | None = None
    ) -> Revocation:
        """Revoke a requester and cancel its pending requests (audited)."""
        ...


class ClipReaderPort(Protocol):
    """A streaming reader of a clip's plaintext."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; b"" at the end."""
        ...

    def close(self) -> None:
        """Release the file (idempotent)."""
        ...


class VaultPort(Protocol):
    """The encrypted clip vault (:class:`agent.vault.Vault`)."""

    def list_clips(self) -> list[ClipInfo]:
        """Every clip, oldest first."""
        ...

    def get_clip(self, clip_id: str) -> ClipInfo:
        """One clip's index entry; raises ClipNotFoundError."""
        ...

    def open_clip(self, clip_id: str) -> ClipReaderPort:
        """Decrypting reader of a final clip."""
        ...

    def read_thumbnail(self, clip_id: str) -> bytes | None:
        """The decrypted JPEG thumbnail, or None."""
        ...

    def delete_clip(self, clip_id: str, reason: str) -> None:
        """Audit and shred a clip."""
        ...

    def holds(self) -> list[Hold]:
        """Windows kept from retention (pending and approved requests)."""
        ...


@dataclass(frozen=True)
class Decision:
    """What the approval engine did with an app decision, in words for the owner.

    ``record`` is the request after the decision; ``message`` says what happened (for instance
    that an approval now waits for the button under ``require: all``).
    """

    record: RequestRecord
    message: str


class Decider(Protocol):
    """The approval engine, as the app uses it (channel ``app``)."""

    def preview(self, jti: str) -> Preview | None:
        """What approving ``jti`` would release now (owner only), None when unknown."""
        ...

    def decide(self, jti: str, approve: bool, preview: str | None = None) -> Decision:
        """Approve or deny ``jti`` on the app channel; an approval binds to ``preview`` (the
        fingerprint of the preview the owner was shown).

        Raises :class:`agent.errors.ApprovalError` (with a message for the owner) when the
        decision is refused (not pending, expired, channel disabled, over
        ``delivery.max_bytes``; :class:`agent.errors.PreviewChangedError` when the preview
        changed) and RequestNotFoundError for an unknown id.
        """
        ...

    def redeliver(self, jti: str) -> Decision:
        """Send a delivered (acknowledged, or failed) request's footage again ("Send again",
        §5.2) on the app channel; raises ApprovalError saying why when it cannot be."""
        ...


class DecidingEngine(Protocol):
    """The approval coordinator (:class:`agent.approval.coordinator.ApprovalCoordinator`)."""

    def preview(self, jti: str) -> Preview | None:
        """What approving ``jti`` would release now."""
        ...

    def decide(
        self,
        jti: str,
        action: Action,
        channel: Channel,
        *,
        at: datetime | None = None,
        preview: str | None = None,
    ) -> DecisionResult:
        """Apply a decision; raises ApprovalError when refused."""
        ...

    def redeliver(
        self, jti: str, channel: Channel, *, at: datetime | None = None
    ) -> DecisionResult:
        """Send a request's footage again; raises ApprovalError when refused."""
        ...


class EngineDecider:
    """A :class:`Decider` over the approval coordinator: decisions on the ``app`` channel."""

    def __init__(self, engine: DecidingEngine, requests: RequestsPort) -> None:
        self._engine = engine
        self._requests = requests

    def preview(self, jti: str) -> Preview | None:
        """What approving ``jti`` would release now; None when it cannot be worked out."""
        try:
            return self._engine.preview(jti)
        except (AgentError, MediaError, ValueError) as exc:
            log.warning("no preview of request %s: %s", jti, exc)
            return None

    def decide(self, jti: str, approve: bool, preview: str | None = None) -> Decision:
        """Approve or deny ``jti`` as the app; the message says what the owner should expect."""
        result = self._engine.decide(
            jti, "approve" if approve else "deny", Channel.APP, preview=preview if approve else None
        )
        record = self._requests.get_request(jti)
        name = record.requester_name
        if result.awaiting_confirmation:
            message = (
                f"Approval of {name}'s request recorded. Press the doorbell's button now to "
                "confirm it; nothing is sent until you do."
            )
        elif result.status is Status.APPROVED:
            clips = record.clips if record.clips is not None else 0
            plural = "" if clips == 1 else "s"
            message = f"Approved the request of {name}: sending {clips} clip{plural}."
        elif result.status is Status.DENIED:
            message = f"Denied the request of {name}: nothing is sent."
        else:
            message = f"The request from {name} is now {result.status.value}."
        return Decision(record, message)

    def redeliver(self, jti: str) -> Decision:
        """Send ``jti``'s footage again as the app; the message says what to expect."""
        result = self._engine.redeliver(jti, Channel.APP)
        record = self._requests.get_request(jti)
        name = record.requester_name
        if result.awaiting_confirmation:
            message = (
                f"Sending {name}'s footage again is recorded. Press the doorbell's button now "
                "to confirm it; nothing is sent until you do."
            )
        else:
            message = f"Sending the footage to {name} again (a new delivery, fresh file ids)."
        return Decision(record, message)


@dataclass(frozen=True)
class StatusItem:
    """One line of the status page: a label, a value and whether it is healthy (None: neutral)."""

    label: str
    value: str
    ok: bool | None = None


@dataclass
class AppServices:
    """Everything the app reads and changes, plus the settings it shows.

    ``runtime`` reports the daemon's live parts (camera, MQTT); ``deadline`` says when a pending
    request expires (the approval engine's rule).
    """

    requests: RequestsPort
    decider: Decider
    vault: VaultPort
    audit: AuditPort
    device_id: str
    retention: timedelta
    max_bytes: int
    deadline: Callable[[RequestRecord], datetime]
    runtime: Callable[[], Sequence[StatusItem]] = field(default=lambda: ())
    camera_fps: float = 10.0
    activity: AuditPort | None = None
    """The camera and owner log (§7 ``activity.jsonl``): logins go there; None: ``audit``."""
