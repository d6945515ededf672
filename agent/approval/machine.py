"""The approval state machine (contract §4), as pure code.

``transition(state, event, policy, now)`` returns the next state and the effects the caller must
carry out, in order: every :class:`Audit` effect comes first and must be durable before anything
else happens (no release without its audit entry); then the new state is persisted, then the
response, the delivery and the release of the retention hold.

::

    pending ──Approve──> approved ──DeliverySucceeded──> delivered ──(receipt)──> acknowledged
       │                    └──────DeliveryFailed─────> failed
       ├──Deny───────────> denied
       └──(timeout/exp)──> expired

    delivered | acknowledged | failed ──Redeliver──> approved (the next attempt)

``request_delivered`` is written by the delivery itself (before its manifest is published, §7),
so DeliverySucceeded audits nothing more; receipts move ``delivered`` to ``acknowledged`` in the
store (:meth:`agent.requests.store.RequestStore.acknowledge`), outside this machine.

With ``require: all`` an approval needs two factors: an app or CLI approval (the *first factor*,
which leaves the request pending) and then a button press within ``confirm_window`` of it. A
denial needs one factor from any enabled channel: refusing is always safe.

A pending request expires at ``received_at + timeout`` or at its ``exp``, whichever is first;
any event that reaches a pending request at or after that moment expires it first (a late
decision is then refused as ``expired``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from agent.timeutil import rfc3339
from agent.vocabulary import REDELIVERABLE, TRANSITIONS, Channel, FailureCode, Status

OUTCOMES: frozenset[Status] = frozenset(
    {Status.DENIED, Status.EXPIRED, Status.DELIVERED, Status.FAILED}
)
"""The statuses this machine ends a decision or a delivery in, each answered by a response of
its own (``rejected`` is the verifier's, ``acknowledged`` a receipt's, neither answered here)."""


class Refusal(StrEnum):
    """Why an event was not applied."""

    CHANNEL_DISABLED = "channel_disabled"
    NOT_PENDING = "not_pending"
    EXPIRED = "expired"
    NEEDS_FIRST_FACTOR = "needs_first_factor"
    NOT_APPROVED = "not_approved"
    NOT_DELIVERED = "not_delivered"


@dataclass(frozen=True)
class Policy:
    """The ``approval`` settings the machine needs."""

    channels: frozenset[Channel]
    require: Literal["any", "all"]
    timeout: timedelta
    confirm_window: timedelta

    def __post_init__(self) -> None:
        if self.require == "all" and (
            Channel.BUTTON not in self.channels or not {Channel.APP, Channel.CLI} & self.channels
        ):
            raise ValueError("require: all needs the button and the app or cli channel")

    @classmethod
    def from_settings(
        cls,
        channels: Sequence[str],
        require: Literal["any", "all"],
        timeout: timedelta,
        confirm_window: timedelta,
    ) -> Policy:
        """Build a policy from config values (``cfg.approval.*``)."""
        return cls(frozenset(Channel(c) for c in channels), require, timeout, confirm_window)


@dataclass(frozen=True)
class Factor:
    """One owner action that counts towards a decision."""

    channel: Channel
    at: datetime

    def to_json(self) -> dict[str, str]:
        """The factor as audit fields."""
        return {"channel": self.channel.value, "at": rfc3339(self.at)}


@dataclass(frozen=True)
class ApprovalState:
    """What the machine knows of one request."""

    jti: str
    status: Status
    received_at: datetime
    exp: datetime
    first_factor: Factor | None = None
    decided_by: tuple[Factor, ...] = ()

    def deadline(self, policy: Policy) -> datetime:
        """When a pending request expires."""
        return min(self.received_at + policy.timeout, self.exp)

    def awaiting_confirmation(self, policy: Policy, now: datetime) -> bool:
        """Whether a button press now would complete a ``require: all`` approval."""
        return (
            policy.require == "all"
            and self.status is Status.PENDING
            and self.first_factor is not None
            and self.first_factor.at <= now <= self.first_factor.at + policy.confirm_window
            and now < self.deadline(policy)
        )


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approve:
    """The owner approves on ``channel``."""

    channel: Channel


@dataclass(frozen=True)
class Deny:
    """The owner denies on ``channel``."""

    channel: Channel


@dataclass(frozen=True)
class Redeliver:
    """The owner sends a delivered (or acknowledged, or failed) request's footage again."""

    channel: Channel


@dataclass(frozen=True)
class Tick:
    """Time passed: expire a pending request whose deadline has come."""


@dataclass(frozen=True)
class DeliverySucceeded:
    """Every clip, the manifest and all acknowledgements are through."""

    clips: int


@dataclass(frozen=True)
class DeliveryFailed:
    """Delivery gave up (retries exhausted, or the vault could not produce a clip:
    ``delivery_error``) or was stopped because the requester was revoked (``revoked``)."""

    reason: str
    error: FailureCode = "delivery_error"


Event = Approve | Deny | Redeliver | Tick | DeliverySucceeded | DeliveryFailed


# -- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """Append ``event`` (with the request's fields and these) before anything else happens."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Respond:
    """Publish a response with ``status`` (and these claims) to the requester."""

    status: Status
    fields: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class StartDelivery:
    """Begin (or, after a restart, begin again) releasing the request's clips."""


@dataclass(frozen=True)
class ReleaseHold:
    """The request is over: its clips may age out of the vault again."""


Effect = Audit | Respond | StartDelivery | ReleaseHold


@dataclass(frozen=True)
class Transition:
    """The outcome of one event: the new state, the effects in order, and any refusal."""

    before: ApprovalState
    after: ApprovalState
    effects: tuple[Effect, ...] = ()
    refusal: Refusal | None = None

    def __post_init__(self) -> None:
        # The machine moves only along the contract's transitions (the store enforces the same
        # table), so a move missing from it is a bug here, not a state to persist.
        if self.status_changed and self.after.status not in TRANSITIONS[self.before.status]:
            raise ValueError(f"no transition from {self.before.status} to {self.after.status}")

    @property
    def status_changed(self) -> bool:
        """Whether the request's status moved."""
        return self.before.status is not self.after.status


def _expire(state: ApprovalState, policy: Policy, now: datetime) -> Transition:
    cause = "exp" if state.exp <= state.received_at + policy.timeout else "approval.timeout"
    after = replace(state, status=Status.EXPIRED)
    effects: tuple[Effect, ...] = (
        Audit("request_expired", {"cause": cause, "deadline": rfc3339(state.deadline(policy))}),
        Respond(Status.EXPIRED),
        ReleaseHold(),
    )
    return Transition(state, after, effects)


def _refuse(state: ApprovalState, why: Refusal) -> Transition:
    return Transition(state, state, (), why)


def transition(state: ApprovalState, event: Event, policy: Policy, now: datetime) -> Transition:
    """Apply ``event`` to ``state`` at ``now`` under ``policy``; pure."""
    if state.status is Status.PENDING:
        if now >= state.deadline(policy):
            expired = _expire(state, policy, now)
            if isinstance(event, Tick):
                return expired
            refusal = Refusal.EXPIRED if isinstance(event, Approve | Deny) else Refusal.NOT_APPROVED
            return replace(expired, refusal=refusal)
        return _pending(state, event, policy, now)
    if isinstance(event, Tick):
        return Transition(state, state)
    if isinstance(event, Redeliver):
        return _redeliver(state, event, policy, now)
    if isinstance(event, Approve | Deny):
        return _refuse(state, Refusal.NOT_PENDING)
    if state.status is not Status.APPROVED:
        return _refuse(state, Refusal.NOT_APPROVED)
    if isinstance(event, DeliverySucceeded):
        after = replace(state, status=Status.DELIVERED)
        clips = {"clips": event.clips}
        return Transition(state, after, (Respond(Status.DELIVERED, clips), ReleaseHold()))
    after = replace(state, status=Status.FAILED)
    return Transition(
        state,
        after,
        (
            Audit("request_failed", {"error": event.error, "detail": event.reason}),
            Respond(Status.FAILED, {"error": event.error}),
            ReleaseHold(),
        ),
    )


def _redeliver(state: ApprovalState, event: Redeliver, policy: Policy, now: datetime) -> Transition:
    """Redelivery needs the same channels as a first approval (§5.2). The caller gives only a
    first factor made after the request's last delivery ended."""
    if state.status not in REDELIVERABLE:
        return _refuse(state, Refusal.NOT_DELIVERED)
    if event.channel not in policy.channels:
        return _refuse(state, Refusal.CHANNEL_DISABLED)
    factor = Factor(event.channel, now)
    if policy.require == "all":
        if event.channel is not Channel.BUTTON:
            return Transition(state, replace(state, first_factor=factor))
        first = state.first_factor
        if first is None or not first.at <= now <= first.at + policy.confirm_window:
            return _refuse(state, Refusal.NEEDS_FIRST_FACTOR)
        factors: tuple[Factor, ...] = (first, factor)
    else:
        factors = (factor,)
    after = replace(state, status=Status.APPROVED, decided_by=factors)
    return Transition(state, after, (StartDelivery(),))


def _pending(state: ApprovalState, event: Event, policy: Policy, now: datetime) -> Transition:
    if isinstance(event, Tick):
        return Transition(state, state)
    if isinstance(event, DeliverySucceeded | DeliveryFailed):
        return _refuse(state, Refusal.NOT_APPROVED)
    if isinstance(event, Redeliver):
        return _refuse(state, Refusal.NOT_DELIVERED)
    if event.channel not in policy.channels:
        return _refuse(state, Refusal.CHANNEL_DISABLED)
    factor = Factor(event.channel, now)
    if isinstance(event, Deny):
        after = replace(state, status=Status.DENIED, decided_by=(factor,))
        channel = {"channel": event.channel.value}
        return Transition(
            state,
            after,
            (Audit("request_denied", channel), Respond(Status.DENIED, channel), ReleaseHold()),
        )
    if policy.require == "any":
        return _approved(state, (factor,))
    if event.channel is not Channel.BUTTON:
        # First factor of two: remembered (and persisted by the caller), status unchanged.
        return Transition(state, replace(state, first_factor=factor))
    if not state.awaiting_confirmation(policy, now):
        return _refuse(state, Refusal.NEEDS_FIRST_FACTOR)
    assert state.first_factor is not None
    return _approved(state, (state.first_factor, factor))


def _approved(state: ApprovalState, factors: tuple[Factor, ...]) -> Transition:
    channel = factors[-1].channel.value
    after = replace(state, status=Status.APPROVED, decided_by=factors)
    audit_fields: dict[str, object] = {"channel": channel}
    if len(factors) > 1:
        audit_fields["factors"] = [f.to_json() for f in factors]
    return Transition(
        state,
        after,
        (
            Audit("request_approved", audit_fields),
            Respond(Status.APPROVED, {"channel": channel}),
            StartDelivery(),
        ),
    )
