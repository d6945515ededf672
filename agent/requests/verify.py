"""Verification of footage requests (CONTRACT §3, §4): a pure function, cheapest check first.

``verify_request(raw, trust, replay, policy, now)`` returns exactly one of:

- :class:`Unverifiable` — size, shape, header, ``alg``, ``typ``, ``kid`` or signature failed. The
  device cannot know who sent it, so it gets no response; ``reason`` is for local logs and counts.
- :class:`Rejection` — a request signed by an enrolled key that breaks a claim rule; ``error`` is
  one of the contract's codes and goes into the signed ``rejected`` response.
- :class:`VerifiedRequest` — valid; it becomes ``pending`` once the store has recorded it.

Order of checks, first failure wins (the order is part of the design, tests pin it):

1. size (``requests.max_bytes``, before anything is decoded) → ``oversize``
2. ASCII → ``not_ascii``; three non-empty base64url segments, a 64-byte signature in canonical
   base64url → ``bad_shape``
3. header: a small, shallow JSON object without duplicate names, no ``crit``/``b64``, a string
   ``kid`` → ``bad_header``; ``alg`` ``EdDSA`` or ``Ed25519`` → ``alg_not_allowed`` (checked
   before any key is looked at); ``typ`` exactly ``doorbell-request+jwt`` → ``typ``; joserfc's
   checks of the registered header members (types of ``jku``, ``x5c``, ...) → ``bad_header``
4. payload: a shallow JSON object without duplicate names → ``bad_shape``
5. ``kid`` enrolled → ``unknown_kid``
6. signature: Ed25519 (``cryptography``) over the signing input as received, with the enrolled
   key only (``jwk``/``jku``/``x5c``/``x5u`` headers are never read) → ``bad_signature``
7. requester revoked → rejected ``revoked`` (revoked keys cannot make a request, so this wins
   over every claim error)
8. types and ranges, every one of them before any claim's value is used → ``bad_claims``:
   ``iss`` is the id enrolled for ``kid``; ``aud`` a string or an array; ``iat`` and ``exp``
   JSON integers (not booleans, not floats) within 2000-01-01..9999-12-31 and ``exp > iat``;
   ``jti`` 16-128 of ``[A-Za-z0-9_-]``; ``window`` an object of two RFC 3339 UTC strings
   within the same range, ``start < end``; ``reason``, ``legal_basis``, ``legal_ref``,
   ``case``, ``recipient``
9. ``aud``: an array, or a string other than the device id → ``wrong_audience``
10. ``exp <= now`` → ``expired``; ``iat > now + skew`` → ``not_yet_valid``; ``exp - iat >
    max_lifetime`` → ``lifetime_too_long``
11. ``jti`` already seen → ``replayed``
12. ``end - start > max_window`` → ``window_too_long``; ``start < now - retention`` →
    ``window_outside_retention``; ``end > now + clock_skew`` → ``window_in_future`` (``now``
    is when the device received the request: no standing orders for footage not yet recorded)
13. per-requester rate limit (signed requests recorded in the last hour) → ``rate_limited``

Step 8 is what makes the rest safe: nothing converts, compares, stores or does arithmetic on a
requester's value before it has its type and a range every later step can handle (a ``datetime``
cannot hold year 10000; SQLite cannot hold 2**70). Payloads with ``NaN``/``Infinity`` (not JSON)
or integers too long to parse are ``bad_shape``.

Cost. A flood of forgeries naming an enrolled kid pays for one Ed25519 verification each and
little else: a header segment that passed step 3 is remembered (a flood repeats the same one),
and the signature is checked directly on the received bytes rather than through a JOSE
library's object model. The alg allow-list above is what makes that safe: only Ed25519 ever
runs, with the enrolled key, whatever the message says.

The order of steps 8-13 is CONTRACT §3's; the rate limit comes last.

Receipts (§5.2, :func:`verify_receipt`) share steps 1-6 with ``typ`` ``doorbell-receipt+jwt``,
then: requester not revoked, ``iss`` the id enrolled for ``kid``, ``aud`` the device, ``iat``
not beyond ``clock_skew`` in the future nor older than ``max_lifetime``, and ``req``,
``manifest`` and ``audit_head`` of the right shape. Whether ``req`` names a delivery to ``iss``
with that manifest is the store's to say.
``exp`` gets no leeway (the contract says "in the future"); ``iat`` gets ``clock_skew``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

import pyrage
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwa import JWSAlgModel

from agent.timeutil import TIME_MAX, TIME_MIN, epoch_in_range, from_epoch, parse_rfc3339, rfc3339
from agent.vocabulary import RejectionCode, request_audit_fields

if TYPE_CHECKING:
    from agent.config import Config

REQUEST_TYP: Final = "doorbell-request+jwt"
RECEIPT_TYP: Final = "doorbell-receipt+jwt"
MAX_AUDIT_HEAD: Final = 2048
"""Longest ``audit_head`` a receipt may carry (a device audit-head JWS is about 400 bytes)."""
ALLOWED_ALGS: Final = frozenset({"EdDSA", "Ed25519"})
LEGAL_BASES: Final = ("consent", "warrant", "subpoena", "emergency")
REQUESTER_KINDS: Final = ("law-enforcement", "neighbor", "insurer", "other")
RATE_WINDOW: Final = timedelta(hours=1)

MAX_REASON: Final = 1000
MAX_LEGAL_REF: Final = 256
MAX_CASE: Final = 128
MAX_KID: Final = 128
# A compact-serialized protected header of ours is ~120 characters; 1 KiB leaves room for other
# libraries' extra members while keeping attacker-chosen JSON small.
MAX_HEADER_SEGMENT: Final = 1024
# JSON containers allowed in the header and in the claims. Ours has one and two; counting
# containers (in C, via regex and str.count) bounds nesting depth without a recursive parse.
MAX_JSON_CONTAINERS: Final = 16
ED25519_SIG_SEGMENT: Final = 86  # 64 bytes in unpadded base64url
_CANONICAL_LAST_SIG_CHARS: Final = (b"A", b"Q", b"g", b"w")  # base64url 0, 16, 32, 48

UnverifiableReason = Literal[
    "oversize",
    "not_ascii",
    "bad_shape",
    "bad_header",
    "alg_not_allowed",
    "typ",
    "unknown_kid",
    "bad_signature",
]
UNVERIFIABLE_REASONS: Final[tuple[UnverifiableReason, ...]] = get_args(UnverifiableReason)

JTI_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,128}")
REQUESTER_ID_RE: Final = re.compile(r"[a-z0-9-]{1,64}")
_B64URL_RE: Final = re.compile(rb"[A-Za-z0-9_-]+")
# The usual `...Z` form with at most microseconds, parsed without parse_rfc3339's general path.
_PLAIN_UTC_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?Z")
_JSON_STRING_RE: Final = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


# --- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPolicy:
    """The configuration the verifier needs (``requests.*``, ``storage.retention``, device id)."""

    device_id: str
    max_bytes: int = 8192
    max_window: timedelta = timedelta(hours=1)
    max_lifetime: timedelta = timedelta(days=7)
    clock_skew: timedelta = timedelta(seconds=300)
    rate_limit: int = 10
    retention: timedelta = timedelta(days=7)

    @classmethod
    def from_config(cls, cfg: Config) -> RequestPolicy:
        """The policy of a loaded :class:`agent.config.Config`."""
        return cls(
            device_id=cfg.device_id,
            max_bytes=cfg.requests.max_bytes,
            max_window=cfg.requests.max_window,
            max_lifetime=cfg.requests.max_lifetime,
            clock_skew=cfg.requests.clock_skew,
            rate_limit=cfg.requests.rate_limit,
            retention=cfg.storage.retention,
        )


@dataclass(frozen=True)
class TrustedKey:
    """An enrolled requester key as the verifier sees it (revoked ones included)."""

    requester_id: str
    kind: str
    kid: str
    public_key: Ed25519PublicKey
    revoked: bool


class TrustView(Protocol):
    """Read access to the requester trust store."""

    def key_for_kid(self, kid: str) -> TrustedKey | None:
        """The enrolled key with this kid (revoked or not), or None."""
        ...


class ReplayView(Protocol):
    """Read access to the replay cache and the per-requester request counts."""

    def jti_seen(self, jti: str) -> bool:
        """Whether this jti is in the replay cache."""
        ...

    def recent_count(self, requester_id: str, since: datetime) -> int:
        """How many signed requests of this requester were recorded at or after ``since``."""
        ...


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unverifiable:
    """A message that failed size, shape, header, kid or signature: no response is sent."""

    reason: UnverifiableReason
    detail: str
    size: int
    kid: str | None = None

    def audit_fields(self) -> dict[str, Any]:
        """Fields for the ``request_unverifiable`` audit event (bounded, attacker-controlled)."""
        fields: dict[str, Any] = {"reason": self.reason, "bytes": self.size}
        if self.kid is not None:
            fields["kid"] = self.kid
        return fields


@dataclass(frozen=True)
class VerifiedRequest:
    """A request that passed every check; the store records it as ``pending``."""

    jti: str
    requester_id: str
    kind: str
    kid: str
    iat: datetime
    exp: datetime
    window_start: datetime
    window_end: datetime
    reason: str
    legal_basis: str
    legal_ref: str | None
    case: str | None
    recipient: str
    claims: Mapping[str, Any] = field(repr=False)

    def audit_fields(self) -> dict[str, Any]:
        """Fields for the request audit events (contract §7)."""
        return request_audit_fields(
            jti=self.jti,
            requester=self.requester_id,
            kid=self.kid,
            window=(rfc3339(self.window_start), rfc3339(self.window_end)),
            reason=self.reason,
            legal_basis=self.legal_basis,
            legal_ref=self.legal_ref,
            case=self.case,
        )


@dataclass(frozen=True)
class Rejection:
    """A request signed by an enrolled key that broke a claim rule: answered ``rejected``.

    ``requester_id`` is the id enrolled for the signing kid (responses go to its topic, never to
    one named by the message). ``jti`` is the claim when it is a string (for the response's
    ``req``), well-formed or not. ``iat``/``exp`` are the claims when they are integers within
    the contract's time range (so they can always be stored and converted).
    ``claims`` is the whole verified payload, for recording and audit.
    """

    error: RejectionCode
    detail: str
    requester_id: str
    kind: str
    kid: str
    jti: str | None
    iat: int | None
    exp: int | None
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def recordable(self) -> bool:
        """Whether the store should burn the jti and keep a ``rejected`` row for it.

        Not for revoked keys (they can never succeed), replays (already recorded), rate-limited
        floods (that would fill the disk), nor claims without a well-formed jti. One whose
        ``iat``/``exp`` are unusable is recorded with stand-ins (see ``RequestStore.admit``), so
        that it too counts toward the rate limit and burns its jti (CONTRACT §3).
        """
        return (
            self.error not in ("revoked", "replayed", "rate_limited")
            and self.jti is not None
            and JTI_RE.fullmatch(self.jti) is not None
        )

    def audit_fields(self) -> dict[str, Any]:
        """Fields for the ``request_rejected`` audit event: well-typed claims, cut to size."""
        window = self.claims.get("window")
        return {
            "error": self.error,
            "detail": self.detail,
            **request_audit_fields(
                jti=_cut(self.jti, 128),
                requester=self.requester_id,
                kid=self.kid,
                window=(
                    (_cut(window.get("start"), 64), _cut(window.get("end"), 64))
                    if isinstance(window, dict)
                    else None
                ),
                reason=_cut(self.claims.get("reason"), MAX_REASON),
                legal_basis=_cut(self.claims.get("legal_basis"), 32),
                legal_ref=_cut(self.claims.get("legal_ref"), MAX_LEGAL_REF),
                case=_cut(self.claims.get("case"), MAX_CASE),
            ),
        }


VerifyResult = VerifiedRequest | Rejection | Unverifiable


def _cut(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


# --- joserfc set-up ---------------------------------------------------------------------------


class _Ed25519Only(JWSAlgModel):
    """EdDSA restricted to Ed25519 keys, registered under both ``EdDSA`` and ``Ed25519``.

    joserfc's own ``EdDSA`` model warns on every use (RFC 9864 deprecates the name) and also
    accepts Ed448; the contract wants both names and only Ed25519.
    """

    key_type = "OKP"

    def __init__(self, name: str) -> None:
        self.name = name
        self.description = f"Ed25519 signatures under the JOSE name {name}"

    def sign(self, msg: bytes, key: Any) -> bytes:
        op_key = key.get_op_key("sign")
        if not isinstance(op_key, Ed25519PrivateKey):
            raise JoseError("an Ed25519 private key is required")
        return op_key.sign(msg)

    def verify(self, msg: bytes, sig: bytes, key: Any) -> bool:
        op_key = key.get_op_key("verify")
        if not isinstance(op_key, Ed25519PublicKey):
            return False
        try:
            op_key.verify(sig, msg)
        except InvalidSignature:
            return False
        return True


class _RequestRegistry(jws.JWSRegistry):
    # joserfc declares these as plain class attributes, read through the class.
    algorithms: dict[str, JWSAlgModel] = {  # noqa: RUF012
        name: _Ed25519Only(name) for name in sorted(ALLOWED_ALGS)
    }
    recommended: list[str] = []  # noqa: RUF012
    max_header_length = MAX_HEADER_SEGMENT
    max_payload_length = 65536
    max_signature_length = ED25519_SIG_SEGMENT


# Headers we do not know are ignored rather than refused (strict_check_header=False): other JOSE
# libraries add their own, and none of them is ever read as a key.
JWS_REGISTRY: Final = _RequestRegistry(algorithms=sorted(ALLOWED_ALGS), strict_check_header=False)


# --- the verifier -----------------------------------------------------------------------------


class _Fail(Exception):
    def __init__(self, reason: UnverifiableReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Claim(Exception):
    def __init__(self, error: RejectionCode, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


def _b64decode(segment: bytes) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise _Fail("bad_shape", "a segment is not base64url") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are not JSON (RFC 8259); Python's decoder would accept them.
_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constants
)


def _parse_object(data: bytes, what: str, reason: UnverifiableReason) -> dict[str, Any]:
    """A JSON object from untrusted bytes: UTF-8, few containers, no duplicate names."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Fail(reason, f"{what} is not UTF-8") from None
    if text.count("{") + text.count("[") > MAX_JSON_CONTAINERS:
        # Only brackets outside strings count; stripping strings is the slow path, rarely taken.
        bare = _JSON_STRING_RE.sub("", text)
        if bare.count("{") + bare.count("[") > MAX_JSON_CONTAINERS:
            raise _Fail(reason, f"{what} JSON is too deeply nested or has too many containers")
    try:
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _Fail(reason, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Fail(reason, f"{what} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class _Token:
    """A request that passed the size, shape and header checks."""

    header: Mapping[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _split(raw: bytes, policy: RequestPolicy, typ: str = REQUEST_TYP) -> _Token:
    """Size, ASCII, shape, header and payload checks (steps 1-4) of a JWS of type ``typ``."""
    if len(raw) > policy.max_bytes:
        raise _Fail("oversize", f"{len(raw)} bytes, limit {policy.max_bytes}")
    if not raw.isascii():
        raise _Fail("not_ascii", "the payload has non-ASCII bytes")
    # A trailing newline is what `mosquitto_pub -f` sends for a file written by an editor.
    token = raw.strip(b" \t\r\n")
    parts = token.split(b".")
    if len(parts) != 3:
        raise _Fail("bad_shape", f"{len(parts)} dot-separated segments, expected 3")
    header_seg, payload_seg, sig_seg = parts
    if not all(_B64URL_RE.fullmatch(p) for p in parts):
        raise _Fail("bad_shape", "a segment is empty or not base64url")
    if len(sig_seg) != ED25519_SIG_SEGMENT:
        raise _Fail("bad_shape", f"the signature segment has {len(sig_seg)} characters, not 86")
    # 86 characters carry 516 bits for 512: the last one's 4 spare bits must be zero, or one
    # signature would have 16 spellings and a mutated message would still verify.
    if sig_seg[-1:] not in _CANONICAL_LAST_SIG_CHARS:
        raise _Fail("bad_shape", "the signature segment is not canonical base64url")
    if len(header_seg) > MAX_HEADER_SEGMENT:
        raise _Fail("bad_header", f"the header segment is longer than {MAX_HEADER_SEGMENT}")
    header = _header(header_seg, typ)
    claims = _parse_object(_b64decode(payload_seg), "the payload", "bad_shape")
    # The signing input is the received bytes, not a re-serialisation: what was signed.
    signing_input = token[: len(header_seg) + 1 + len(payload_seg)]
    return _Token(header, claims, signing_input, _b64decode(sig_seg))


@lru_cache(maxsize=256)
def _header(segment: bytes, typ: str = REQUEST_TYP) -> Mapping[str, Any]:
    """The checked header of a header segment (step 3), read-only.

    Cached by the segment's bytes: a requester's tokens, and a flood of forgeries under an
    enrolled kid, repeat one header segment. Failures raise and are not cached.
    """
    header = _parse_object(_b64decode(segment), "the header", "bad_header")
    _check_header(header, typ)
    try:
        JWS_REGISTRY.check_header(header)
    except JoseError as exc:
        raise _Fail("bad_header", f"joserfc refused the header: {exc}") from None
    return MappingProxyType(header)


def _check_header(header: dict[str, Any], typ: str = REQUEST_TYP) -> None:
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _Fail("bad_header", "alg is missing or not a string")
    if alg not in ALLOWED_ALGS:
        raise _Fail("alg_not_allowed", f"alg {alg[:32]!r} is not EdDSA or Ed25519")
    if "crit" in header or "b64" in header:
        raise _Fail("bad_header", "crit/b64 header extensions are not supported")
    if header.get("typ") != typ:
        found = header.get("typ")
        shown = found[:64] if isinstance(found, str) else found
        raise _Fail("typ", f"typ {shown!r} is not {typ}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KID:
        raise _Fail("bad_header", "kid is missing, not a string or too long")


def _authenticate(
    raw: bytes, trust: TrustView, policy: RequestPolicy, typ: str
) -> tuple[_Token, TrustedKey] | Unverifiable:
    """Steps 1-6, shared by requests and receipts: the cheap checks (with ``typ``), the kid
    enrolled, and the signature with the enrolled key only. The token and its key, or why the
    sender cannot be known."""
    try:
        tok = _split(raw, policy, typ)
    except _Fail as fail:
        return Unverifiable(fail.reason, fail.detail, len(raw))
    kid: str = tok.header["kid"]
    key = trust.key_for_kid(kid)
    if key is None:
        return Unverifiable("unknown_kid", "no requester is enrolled with this kid", len(raw), kid)
    try:
        # alg is EdDSA or Ed25519 (step 3), both meaning Ed25519 here; the enrolled key only.
        key.public_key.verify(tok.signature, tok.signing_input)
    except InvalidSignature:
        return Unverifiable("bad_signature", "the signature does not verify", len(raw), kid)
    return tok, key


def verify_request(
    raw: bytes,
    trust: TrustView,
    replay: ReplayView,
    policy: RequestPolicy,
    now: datetime,
    *,
    received: datetime | None = None,
) -> VerifyResult:
    """Check one request payload; never raises for any input bytes (see the module docstring).

    ``now`` is an aware datetime; ``received`` when the device received the message (default
    ``now``; the window may end at most ``clock_skew`` after it); ``trust`` and ``replay`` are
    read only.
    """
    signed = _authenticate(raw, trust, policy, REQUEST_TYP)
    if isinstance(signed, Unverifiable):
        return signed
    tok, key = signed
    kid: str = tok.header["kid"]
    claims = tok.claims

    jti = claims.get("jti")
    iat = claims.get("iat")
    exp = claims.get("exp")
    try:
        if key.revoked:
            raise _Claim("revoked", f"requester {key.requester_id} is revoked")
        result = _check_claims(claims, key, replay, policy, now, received=received or now)
    except _Claim as claim:
        return Rejection(
            error=claim.error,
            detail=claim.detail,
            requester_id=key.requester_id,
            kind=key.kind,
            kid=kid,
            jti=jti if isinstance(jti, str) else None,
            iat=iat if epoch_in_range(iat) else None,
            exp=exp if epoch_in_range(exp) else None,
            claims=claims,
        )
    return result


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt signed by an enrolled, unrevoked requester whose claims hold (§5.2)."""

    requester_id: str
    kid: str
    req: str
    manifest: str
    audit_head: str | None
    """Absent when the requester had seen no head (it then witnessed nothing)."""
    iat: datetime
    token: str
    """The receipt JWS as received (it goes into ``delivery_acknowledged``)."""


@dataclass(frozen=True)
class RefusedReceipt:
    """A receipt signed by an enrolled key that breaks a rule: ignored, counted, never answered."""

    reason: str
    detail: str
    requester_id: str
    kid: str


ReceiptResult = VerifiedReceipt | RefusedReceipt | Unverifiable


def verify_receipt(
    raw: bytes, trust: TrustView, policy: RequestPolicy, now: datetime
) -> ReceiptResult:
    """Check one receipt payload (§5.2); never raises for any input bytes.

    The cheap checks and the signature are the request's (steps 1-6 of the module docstring)
    with ``typ`` ``doorbell-receipt+jwt``; ``trust`` is read only.
    """
    signed = _authenticate(raw, trust, policy, RECEIPT_TYP)
    if isinstance(signed, Unverifiable):
        return signed
    tok, key = signed
    kid: str = tok.header["kid"]
    claims = tok.claims

    def refused(reason: str, detail: str) -> RefusedReceipt:
        return RefusedReceipt(reason, detail, key.requester_id, kid)

    if key.revoked:
        return refused("revoked", f"requester {key.requester_id} is revoked")
    if claims.get("iss") != key.requester_id:
        return refused("bad_claims", "iss is not the requester enrolled for kid")
    if claims.get("aud") != policy.device_id:
        return refused("wrong_audience", "aud is not this device")
    iat = claims.get("iat")
    if not epoch_in_range(iat):
        return refused("bad_claims", "iat is not an integer within 2000-01-01..9999-12-31")
    issued = from_epoch(iat)
    if issued > now + policy.clock_skew:
        return refused("not_yet_valid", "iat is in the future")
    if issued < now - policy.max_lifetime:
        return refused("expired", "iat is older than requests.max_lifetime")
    req, manifest, head = claims.get("req"), claims.get("manifest"), claims.get("audit_head")
    if not isinstance(req, str) or not JTI_RE.fullmatch(req):
        return refused("bad_claims", "req is not a request id")
    if not isinstance(manifest, str) or not re.fullmatch(r"[0-9a-f]{64}", manifest):
        return refused("bad_claims", "manifest is not 64 lowercase hex digits")
    if head is not None and (
        not isinstance(head, str) or not 1 <= len(head) <= MAX_AUDIT_HEAD or not head.isascii()
    ):
        return refused("bad_claims", "audit_head is not a compact JWS")
    token = raw.strip(b" \t\r\n").decode("ascii")
    return VerifiedReceipt(key.requester_id, kid, req, manifest, head, issued, token)


def _str_claim(
    claims: Mapping[str, Any], name: str, low: int, high: int, *, required: bool
) -> str | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise _Claim("bad_claims", f"{name} must be a string of {low}-{high} characters")
    return value


def _check_claims(
    claims: Mapping[str, Any],
    key: TrustedKey,
    replay: ReplayView,
    policy: RequestPolicy,
    now: datetime,
    *,
    received: datetime,
) -> VerifiedRequest:
    # Step 8: types and ranges of everything, before any value is used.
    if claims.get("iss") != key.requester_id:
        raise _Claim("bad_claims", f"iss is not {key.requester_id}, the requester enrolled for kid")
    aud = claims.get("aud")
    if not isinstance(aud, str | list):
        raise _Claim("bad_claims", "aud is missing or not a string")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not epoch_in_range(iat) or not epoch_in_range(exp):
        raise _Claim(
            "bad_claims", "iat and exp must be integers within 2000-01-01..9999-12-31"
        )
    if exp <= iat:
        raise _Claim("bad_claims", "exp is not after iat")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not JTI_RE.fullmatch(jti):
        raise _Claim("bad_claims", "jti must be 16-128 characters of A-Z a-z 0-9 _ -")
    start, end = _window(claims.get("window"))
    reason = _str_claim(claims, "reason", 1, MAX_REASON, required=True)
    legal_basis = claims.get("legal_basis")
    if legal_basis not in LEGAL_BASES:
        raise _Claim("bad_claims", f"legal_basis must be one of {', '.join(LEGAL_BASES)}")
    legal_ref = _str_claim(
        claims, "legal_ref", 1, MAX_LEGAL_REF, required=legal_basis in ("warrant", "subpoena")
    )
    case = _str_claim(claims, "case", 0, MAX_CASE, required=False)
    recipient = claims.get("recipient")
    if not isinstance(recipient, str) or not _is_age_recipient(recipient):
        raise _Claim("bad_claims", "recipient is not an age X25519 recipient (age1...)")

    # Step 9: audience.
    if isinstance(aud, list):
        raise _Claim("wrong_audience", "aud is an array; one request names one device")
    if aud != policy.device_id:
        raise _Claim("wrong_audience", "aud names another device")

    # Step 10: time validity (integers in range: the arithmetic below cannot overflow).
    now_s = now.timestamp()
    if exp <= now_s:
        raise _Claim("expired", "exp is in the past")
    if iat > now_s + policy.clock_skew.total_seconds():
        raise _Claim("not_yet_valid", "iat is in the future beyond the allowed clock skew")
    if exp - iat > policy.max_lifetime.total_seconds():
        raise _Claim("lifetime_too_long", "exp - iat exceeds requests.max_lifetime")

    # Step 11: replay.
    if replay.jti_seen(jti):
        raise _Claim("replayed", "this jti was seen before")

    # Step 12: the window against the policy and the time of arrival.
    if end - start > policy.max_window:
        raise _Claim("window_too_long", "window end - start exceeds requests.max_window")
    if start < now - policy.retention:
        raise _Claim("window_outside_retention", "window start is older than the storage retention")
    if end > received + policy.clock_skew:
        raise _Claim(
            "window_in_future", "window end is later than its arrival plus requests.clock_skew"
        )

    # Step 13: the rate limit.
    if replay.recent_count(key.requester_id, now - RATE_WINDOW) >= policy.rate_limit:
        raise _Claim("rate_limited", f"more than {policy.rate_limit} requests in the last hour")

    assert reason is not None  # required=True above
    return VerifiedRequest(
        jti=jti,
        requester_id=key.requester_id,
        kind=key.kind,
        kid=key.kid,
        iat=from_epoch(iat),
        exp=from_epoch(exp),
        window_start=start,
        window_end=end,
        reason=reason,
        legal_basis=legal_basis,
        legal_ref=legal_ref,
        case=case,
        recipient=recipient,
        claims=claims,
    )


def _window(value: object) -> tuple[datetime, datetime]:
    if not isinstance(value, dict):
        raise _Claim("bad_claims", 'window must be an object {"start": T, "end": T}')
    bounds: list[datetime] = []
    for name in ("start", "end"):
        text = value.get(name)
        if not isinstance(text, str) or not _is_utc_text(text):
            raise _Claim("bad_claims", f"window.{name} must be an RFC 3339 UTC timestamp")
        try:
            if _PLAIN_UTC_RE.fullmatch(text):
                bounds.append(datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC))
            else:
                bounds.append(parse_rfc3339(text))
        except (ValueError, OverflowError):
            raise _Claim("bad_claims", f"window.{name} is not a valid RFC 3339 timestamp") from None
        if not TIME_MIN <= bounds[-1] <= TIME_MAX:
            raise _Claim("bad_claims", f"window.{name} is outside 2000-01-01..9999-12-31")
    start, end = bounds
    if not start < end:
        raise _Claim("bad_claims", "window start must be before end")
    return start, end


def _is_utc_text(text: str) -> bool:
    # The contract says UTC: `Z` or a zero offset, nothing else.
    return len(text) <= 40 and (text[-1:] in ("Z", "z") or text.endswith(("+00:00", "-00:00")))


@lru_cache(maxsize=256)
def _is_age_recipient(text: str) -> bool:
    if not text.startswith("age1") or len(text) > 100:
        return False
    try:
        pyrage.x25519.Recipient.from_str(text)
    except (pyrage.RecipientError, ValueError):
        return False
    return True

