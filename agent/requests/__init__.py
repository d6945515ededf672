"""Footage requests: the pure verifier (:mod:`.verify`) and the SQLite store (:mod:`.store`)."""

from agent.requests.store import (
    AuditSink,
    Requester,
    RequestRecord,
    RequestStore,
    Revocation,
)
from agent.requests.verify import (
    ERROR_CODES,
    Rejection,
    RequestPolicy,
    TrustedKey,
    Unverifiable,
    VerifiedRequest,
    VerifyResult,
    verify_request,
)

__all__ = [
    "ERROR_CODES",
    "AuditSink",
    "Rejection",
    "RequestPolicy",
    "RequestRecord",
    "RequestStore",
    "Requester",
    "Revocation",
    "TrustedKey",
    "Unverifiable",
    "VerifiedRequest",
    "VerifyResult",
    "verify_request",
]
