"""The request vocabulary of the contract (§3, §4, §7), defined once: pure, imports no adapter.

A request's :class:`Status`, the :data:`TRANSITIONS` between statuses (the store's
compare-and-set and the approval machine's transitions both check them), the approval
:class:`Channel`, the rejection and failure codes a response carries, and the fields every audit
entry about a request names.

The enums are :class:`~enum.StrEnum`, so a member *is* its contract string: stored, printed and
serialised to JSON exactly as the contract spells it.

::

    pending      -> approved | denied | expired | rejected (requester revoked)
    approved     -> delivered | failed
    delivered    -> acknowledged (a receipt, §5.2) | approved (the owner's redeliver)
    acknowledged -> approved (redeliver)
    failed       -> approved (redeliver, only after a delivery_error)
    rejected, denied, expired: terminal
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final, Literal, get_args


class Status(StrEnum):
    """A recorded request's status (§4)."""

    PENDING = "pending"
    REJECTED = "rejected"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    DELIVERED = "delivered"
    FAILED = "failed"
    ACKNOWLEDGED = "acknowledged"


TRANSITIONS: Final[Mapping[Status, frozenset[Status]]] = {
    Status.PENDING: frozenset({Status.APPROVED, Status.DENIED, Status.EXPIRED, Status.REJECTED}),
    Status.APPROVED: frozenset({Status.DELIVERED, Status.FAILED}),
    Status.REJECTED: frozenset(),
    Status.DENIED: frozenset(),
    Status.EXPIRED: frozenset(),
    Status.DELIVERED: frozenset({Status.ACKNOWLEDGED, Status.APPROVED}),
    Status.FAILED: frozenset({Status.APPROVED}),
    Status.ACKNOWLEDGED: frozenset({Status.APPROVED}),
}

REDELIVERABLE: Final = frozenset({Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED})
"""Where the owner's ``redeliver`` may start (``failed`` only after a ``delivery_error``)."""

SETTLED: Final = frozenset(Status) - {Status.PENDING, Status.APPROVED}
"""Statuses no decision and no delivery outcome moves (only a receipt or a redeliver does)."""

APPROVED_SINCE: Final = frozenset(
    {Status.APPROVED, Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED}
)
"""Statuses a request reaches only after the owner approved it."""

RELEASED: Final = frozenset({Status.DELIVERED, Status.ACKNOWLEDGED})
"""Statuses of a request whose footage was delivered."""

RESPONSE_STATUSES: Final = tuple(s for s in Status if s is not Status.ACKNOWLEDGED)
"""The ``status`` claims a response may carry (a receipt is never answered, §5.2)."""


class Channel(StrEnum):
    """Where an owner's decision came from (``approval.channels``)."""

    BUTTON = "button"
    APP = "app"
    CLI = "cli"


RejectionCode = Literal[
    "expired",
    "not_yet_valid",
    "lifetime_too_long",
    "wrong_audience",
    "replayed",
    "window_too_long",
    "window_outside_retention",
    "window_in_future",
    "bad_claims",
    "rate_limited",
    "revoked",
]
"""The ``error`` of a ``rejected`` response (§4), in the order the checks run."""
REJECTION_CODES: Final[tuple[RejectionCode, ...]] = get_args(RejectionCode)

FailureCode = Literal["revoked", "delivery_error"]
"""The ``error`` of a ``failed`` response (§4)."""
FAILURE_CODES: Final[tuple[FailureCode, ...]] = get_args(FailureCode)


def request_audit_fields(
    *,
    jti: str | None,
    requester: str,
    kid: str,
    window: tuple[str | None, str | None] | None,
    reason: str | None,
    legal_basis: str | None,
    legal_ref: str | None,
    case: str | None,
) -> dict[str, Any]:
    """The fields naming a request in its audit entries (§7): who asked, with which key, for
    which window and on what basis. ``window`` is ``(start, end)`` as RFC 3339 text; None leaves
    the ``window`` field out (a rejected request that carried none)."""
    fields: dict[str, Any] = {"jti": jti, "requester": requester, "kid": kid}
    if window is not None:
        fields["window"] = {"start": window[0], "end": window[1]}
    fields.update(reason=reason, legal_basis=legal_basis, legal_ref=legal_ref, case=case)
    return fields
