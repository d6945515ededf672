"""Every response of the agent (CONTRACT §4): built, signed, sent and recorded in one place.

:class:`Responder` is the one way a request is answered, by the intake
(:class:`agent.requests.service.RequestService`: ``pending``/``rejected``, revocations) and by
the approval coordinator (``approved`` ... ``failed``) alike. A response is signed with the
device key, carries an audit head freshly signed over the newest request-log entry (§4, §7),
echoes the request's Correlation Data and goes to ``P/D/responses/R``, where ``R`` is the
requester id the store enrolled for the signing key. The store records that a status was
answered (``responded``) only once the broker has acknowledged its publish
(:meth:`Responder.mark_sent`).

After a restart, :func:`answer_unanswered` is the one path that answers again what the store
does not record as answered: the intake calls it for ``pending``/``rejected`` requests at its
start, the coordinator for ``approved`` and finished ones in its recovery.

Responses never say anything about footage before approval: ``pending`` and ``rejected`` carry
only ``iss``, ``aud``, ``iat``, ``req``, ``status`` (and ``error``/``detail``). ``detail`` is a
fixed text per error code; the verifier's precise reason goes to the local log and the audit log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import AgentError, MQTTError, RequestNotFoundError
from agent.keys import sign_jws
from agent.logtext import one_line
from agent.mqtt import MessagePublisher, message_expiry
from agent.release.manifest import RESPONSE_TYP
from agent.requests.store import RequestRecord, RequestStore
from agent.timeutil import to_epoch, utcnow
from agent.topics import Topics
from agent.vocabulary import REJECTION_CODES, RESPONSE_STATUSES, Channel

log = logging.getLogger(__name__)

# What a rejected requester is told: one fixed sentence per code. The verifier's precise reason
# stays on the device (log and audit): remote callers get an opaque rejection.
REJECTION_DETAIL: Final[Mapping[str, str]] = {
    "expired": "the request has expired",
    "not_yet_valid": "the request is not valid yet (iat is in the future)",
    "lifetime_too_long": "exp - iat is longer than the device accepts",
    "wrong_audience": "the request is not addressed to this device",
    "replayed": "this jti has been used before",
    "window_too_long": "the footage window is longer than the device accepts",
    "window_outside_retention": "the footage window starts before the storage retention",
    "window_in_future": "the footage window ends in the future; ask for recorded footage only",
    "bad_claims": "a claim is missing or malformed",
    "rate_limited": "too many requests from this requester; try again later",
    "revoked": "the requester's key has been revoked",
}

FAILURE_DETAIL: Final[dict[str, str]] = {
    "revoked": "the requester was revoked; the delivery was stopped",
    "delivery_error": "the delivery could not be completed",
}
"""The ``error`` codes of a ``failed`` response (§4) and their fixed ``detail`` texts."""


def shown(value: object, limit: int = 200) -> str:
    """Requester text made safe for one log line (:func:`agent.logtext.one_line`), cut to
    ``limit`` characters."""
    return one_line(value, limit)


def response_claims(
    *,
    device_id: str,
    requester_id: str,
    jti: str | None,
    status: str,
    now: datetime,
    error: str | None = None,
    detail: str | None = None,
    clips: int | None = None,
    channel: str | None = None,
) -> dict[str, Any]:
    """The claims of a §4 response, with exactly the claims its status carries.

    ``rejected`` needs ``error`` (a contract code; ``detail`` defaults to its fixed text),
    ``failed`` needs ``error`` ``revoked`` or ``delivery_error`` (``detail`` its fixed text),
    ``approved`` needs ``clips`` and ``channel``, ``delivered`` needs ``clips``, ``denied`` needs
    ``channel``; every other combination raises ValueError. ``req`` is null only for a rejected
    request whose ``jti`` claim was not a string.
    """
    if status not in RESPONSE_STATUSES:
        raise ValueError(f"unknown response status {status!r}")
    wants_error = status in ("rejected", "failed")
    wants_clips = status in ("approved", "delivered")
    wants_channel = status in ("approved", "denied")
    if wants_error != (error is not None) or (detail is not None and not wants_error):
        raise ValueError(f"error/detail go with status rejected and failed only ({status})")
    if wants_clips != (clips is not None):
        raise ValueError(f"clips go with approved and delivered only (status {status})")
    if wants_channel != (channel is not None):
        raise ValueError(f"channel goes with approved and denied only (status {status})")
    if jti is None and status != "rejected":
        raise ValueError("only a rejected response may lack req")
    claims: dict[str, Any] = {
        "iss": device_id,
        "aud": requester_id,
        "iat": to_epoch(now),
        "req": jti,
        "status": status,
    }
    if error is not None and status == "failed":
        if error not in FAILURE_DETAIL:
            raise ValueError(f"{error!r} is not a failure code of the contract")
        claims["error"] = error
        claims["detail"] = detail if detail is not None else FAILURE_DETAIL[error]
    elif error is not None:
        if error not in REJECTION_CODES:
            raise ValueError(f"{error!r} is not a rejection code of the contract")
        claims["error"] = error
        claims["detail"] = detail if detail is not None else REJECTION_DETAIL[error]
    if clips is not None:
        if isinstance(clips, bool) or not isinstance(clips, int) or clips < 0:
            raise ValueError("clips must be a count (a non-negative integer)")
        claims["clips"] = clips
    if channel is not None:
        if channel not in list(Channel):
            raise ValueError(f"channel must be one of {', '.join(Channel)}")
        claims["channel"] = channel
    return claims


class ResponseTarget(Protocol):
    """Whom a response answers: a stored :class:`RequestRecord` fits."""

    @property
    def jti(self) -> str | None:
        """The request's jti (``req``)."""
        ...

    @property
    def requester_id(self) -> str:
        """The verified requester id (the topic level and ``aud``)."""
        ...

    @property
    def correlation(self) -> bytes | None:
        """MQTT v5 Correlation Data of the request, echoed on every response."""
        ...


@dataclass(frozen=True)
class Target:
    """A :class:`ResponseTarget` made from a message being handled."""

    jti: str | None
    requester_id: str
    correlation: bytes | None
    exp: datetime | int | None = None


def response_expiry(exp: object, now: datetime, cap: timedelta) -> int:
    """The Message Expiry Interval of a response to a request with claim ``exp`` (a datetime,
    or the raw integer claim of a rejected request): its remaining lifetime, 1 s at least,
    ``cap`` (the longest lifetime a request may have) at most or when ``exp`` is unknown."""
    if isinstance(exp, datetime):
        return message_expiry(exp, now, cap)
    limit = max(1, math.ceil(cap.total_seconds()))
    if isinstance(exp, int) and not isinstance(exp, bool):
        # Integer arithmetic: a rejected request's exp may be far outside datetime's range.
        return max(1, min(exp - to_epoch(now), limit))
    return limit


def claims_of(record: RequestRecord) -> dict[str, Any]:
    """The claims a stored request's response carries for its current status (to answer it
    again): the error of a rejection or failure, the channel and clip count of a decision."""
    status = record.status
    if status == "rejected":
        return {"error": record.error if record.error in REJECTION_CODES else "bad_claims"}
    if status in ("approved", "denied"):
        claims: dict[str, Any] = {"channel": record.channel}
        if status == "approved":
            claims["clips"] = record.clips if record.clips is not None else 0
        return claims
    if status == "delivered":
        return {"clips": record.clips if record.clips is not None else 0}
    if status == "failed":
        return {"error": "revoked" if record.error == "revoked" else "delivery_error"}
    return {}


class RespondFn(Protocol):
    """Signs and queues a response (:meth:`Responder.respond`)."""

    def __call__(self, request: RequestRecord, status: str, /, **claims: Any) -> object: ...


def answer_unanswered(
    records: Iterable[RequestRecord], respond: RespondFn, now: datetime
) -> None:
    """Answer again each of ``records`` whose current status the store does not record as
    answered (its last answer was never acknowledged: a crash, a lost connection).

    Skipped: a ``rejected``/``revoked`` request (:meth:`Responder.answer_revocations` answers
    it) and a ``pending`` one past its ``exp`` at ``now`` (the approval coordinator expires it
    and answers that instead). A response ``respond`` refuses (AgentError, ValueError) is
    logged and the next record answered.
    """
    for record in records:
        if record.responded == record.status:
            continue
        if record.status == "rejected" and record.error == "revoked":
            continue
        if record.status == "pending" and record.exp <= now:
            continue
        log.info("answering request %s again (%s): last answer unconfirmed",
                 shown(record.jti), record.status)
        try:
            respond(record, record.status, **claims_of(record))
        except (AgentError, ValueError) as exc:
            log.warning("response %s to request %s not sent: %s",
                        record.status, shown(record.jti), exc)


class Responder:
    """Builds, signs, sends and records every response; see the module docstring.

    ``attach`` gives it the MQTT client. Thread-safe for ``respond`` (the intake's worker thread
    and the coordinator's threads answer at the same time); ``mark_sent``,
    ``answer_revocations`` and ``resend_unanswered`` run on the intake's worker thread.
    """

    def __init__(
        self,
        *,
        topics: Topics,
        store: RequestStore,
        signing_key: Ed25519PrivateKey,
        max_lifetime: timedelta,
        audit_head: Callable[[], str] | None = None,
        now: Callable[[], datetime] = utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self._store = store
        self._key = signing_key
        self._max_lifetime = max_lifetime
        self._audit_head = audit_head
        self._now = now
        self._clock = clock
        self._client: MessagePublisher | None = None
        self.responses = 0
        """Responses queued so far."""
        self._answering: set[str] = set()
        self._sent: deque[tuple[Future[None], str, str]] = deque()
        self._sent_lock = threading.Lock()

    def attach(self, client: MessagePublisher) -> None:
        """Publish responses through ``client``."""
        self._client = client

    def respond(self, request: ResponseTarget, status: str, /, **claims: Any) -> Future[None]:
        """Sign a response and queue it for ``P/D/responses/R`` (R = ``request.requester_id``).

        ``claims`` are the status's extra claims (``error``/``detail``, ``clips``, ``channel``,
        see :func:`response_claims`). The request's Correlation Data is echoed. When the broker
        acknowledges it, the store records that ``status`` was answered. The future completes
        on that acknowledgement (or fails with MQTTError). Raises ValueError for claims that do
        not fit the status and MQTTError when the client is closing.
        """
        if self._client is None:
            raise MQTTError("the request service has no MQTT client attached")
        body = response_claims(
            device_id=self.topics.device_id,
            requester_id=request.requester_id,
            jti=request.jti,
            status=status,
            now=self._now(),
            **claims,
        )
        if self._audit_head is not None:
            # §4: a head freshly signed over the newest request-log entry, to be witnessed.
            body["audit"] = self._audit_head()
        token = sign_jws(self._key, RESPONSE_TYP, body)
        future = self._client.publish(
            self.topics.responses(request.requester_id),
            token,
            correlation_data=request.correlation,
            expiry=response_expiry(
                getattr(request, "exp", None), self._now(), self._max_lifetime
            ),
        )
        self.responses += 1
        if request.jti is not None:
            with self._sent_lock:
                self._sent.append((future, request.jti, status))
        return future

    def respond_logged(self, target: ResponseTarget, status: str, **claims: Any) -> None:
        """:meth:`respond`, logging (not raising) a client that is closing."""
        try:
            self.respond(target, status, **claims)
        except MQTTError as exc:
            log.warning(
                "could not queue the %s response for %s: %s", status, shown(target.jti), exc
            )

    def mark_sent(self, *, wait: float) -> None:
        """Record in the store the responses the broker has acknowledged, oldest first."""
        deadline = self._clock() + wait
        while True:
            with self._sent_lock:
                if not self._sent:
                    return
                future, jti, status = self._sent[0]
            if not future.done():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                try:
                    future.exception(timeout=remaining)
                except TimeoutError:
                    return
            with self._sent_lock:
                self._sent.popleft()
            self._answering.discard(jti)
            if future.exception() is not None:
                continue
            # An unrecorded rejection (rate limited, revoked key) has no row to mark.
            with contextlib.suppress(RequestNotFoundError):
                self._store.mark_responded(jti, status)

    def answer_revocations(self) -> None:
        """Answer ``rejected``/``revoked`` each request a revocation cancelled (the CLI revokes
        while the daemon runs) whose answer has not gone out."""
        try:
            records = self._store.unanswered_revocations()
        except AgentError as exc:
            log.warning("cannot poll the store for revocations: %s", exc)
            return
        for record in records:
            if record.jti in self._answering:
                continue
            self._answering.add(record.jti)
            log.info("answering request %s: its requester was revoked", shown(record.jti))
            self.respond_logged(record, "rejected", error="revoked")

    def resend_unanswered(self) -> None:
        """At start: answer again the ``pending``/``rejected`` requests whose answer was never
        acknowledged (:func:`answer_unanswered`)."""
        answer_unanswered(
            self._store.list_requests(["pending", "rejected"]), self._respond_again, self._now()
        )

    def _respond_again(self, record: RequestRecord, status: str, /, **claims: Any) -> None:
        self._answering.add(record.jti)
        try:
            self.respond_logged(record, status, **claims)
        except Exception:
            # One odd stored record must not keep the agent from starting.
            log.exception("cannot answer request %s again", shown(record.jti))
