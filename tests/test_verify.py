"""The pure request verifier: every unverifiable case, every rejection code, the order of checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pyrage
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.keys import kid_for, public_jwk, raw_public_bytes
from agent.requester.build import build_request
from agent.requests.verify import (
    UNVERIFIABLE_REASONS,
    Rejection,
    RequestPolicy,
    TrustedKey,
    Unverifiable,
    VerifiedRequest,
    VerifyResult,
    verify_request,
)
from agent.vocabulary import REJECTION_CODES

T0 = datetime(2026, 1, 31, 12, 0, 0, tzinfo=UTC)
DEVICE = "front-door"
POLICY = RequestPolicy(device_id=DEVICE)
RECIPIENT = str(pyrage.x25519.Identity.generate().to_public())
TYP = "doorbell-request+jwt"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Party:
    """A requester's key pair and id."""

    requester_id: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def kid(self) -> str:
        return kid_for(self.key.public_key())

    def trusted(self, *, kind: str = "law-enforcement", revoked: bool = False) -> TrustedKey:
        return TrustedKey(self.requester_id, kind, self.kid, self.key.public_key(), revoked)


@dataclass
class Views:
    """In-memory trust store and replay cache (the verifier only reads them)."""

    keys: dict[str, TrustedKey] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)

    def key_for_kid(self, kid: str) -> TrustedKey | None:
        return self.keys.get(kid)

    def jti_seen(self, jti: str) -> bool:
        return jti in self.seen

    def recent_count(self, requester_id: str, since: datetime) -> int:
        return self.counts.get(requester_id, 0)

    def enrol(self, party: Party, **kw: Any) -> None:
        self.keys[party.kid] = party.trusted(**kw)


def claims(party: Party, **overrides: Any) -> dict[str, Any]:
    """Valid claims for ``party`` at T0; ``overrides`` replace (or with None, remove) members."""
    base: dict[str, Any] = {
        "iss": party.requester_id,
        "aud": DEVICE,
        "iat": int(T0.timestamp()),
        "exp": int((T0 + timedelta(hours=1)).timestamp()),
        "jti": "jti-0123456789abcdef",
        "window": {"start": "2026-01-31T11:00:00Z", "end": "2026-01-31T11:30:00Z"},
        "reason": "Parcel stolen from the porch",
        "legal_basis": "consent",
        "recipient": RECIPIENT,
    }
    for name, value in overrides.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def header(party: Party, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"alg": "EdDSA", "kid": party.kid, "typ": TYP}
    for name, value in overrides.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def sign_raw(
    key: Ed25519PrivateKey, hdr: dict[str, Any] | bytes, payload: dict[str, Any] | bytes
) -> bytes:
    """A compact JWS over arbitrary header and payload bytes, signed with ``key``."""
    h = hdr if isinstance(hdr, bytes) else json.dumps(hdr).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    return signing_input + b"." + b64(key.sign(signing_input)).encode()


def token(party: Party, **overrides: Any) -> bytes:
    """A request signed by ``party`` with claim overrides."""
    return sign_raw(party.key, header(party), claims(party, **overrides))


@pytest.fixture
def alice() -> Party:
    return Party("alice-pd")


@pytest.fixture
def views(alice: Party) -> Views:
    v = Views()
    v.enrol(alice)
    return v


def check(
    raw: bytes, views: Views, *, now: datetime = T0, policy: RequestPolicy = POLICY
) -> VerifyResult:
    return verify_request(raw, views, views, policy, now)


def unverifiable(raw: bytes, views: Views, reason: str) -> Unverifiable:
    result = check(raw, views)
    assert isinstance(result, Unverifiable), result
    assert result.reason == reason, result
    return result


def rejected(raw: bytes, views: Views, error: str, **kw: Any) -> Rejection:
    result = check(raw, views, **kw)
    assert isinstance(result, Rejection), result
    assert result.error == error, result
    return result


# --- accepted ---------------------------------------------------------------------------------


def test_valid_request_is_verified_with_every_field(alice: Party, views: Views) -> None:
    raw = token(alice, legal_basis="warrant", legal_ref="W-2026-17", case="C-9")
    result = check(raw, views)
    assert isinstance(result, VerifiedRequest)
    assert result.requester_id == "alice-pd"
    assert result.kind == "law-enforcement"
    assert result.kid == alice.kid
    assert result.jti == "jti-0123456789abcdef"
    assert result.window_start == datetime(2026, 1, 31, 11, 0, tzinfo=UTC)
    assert result.window_end == datetime(2026, 1, 31, 11, 30, tzinfo=UTC)
    assert result.iat == T0 and result.exp == T0 + timedelta(hours=1)
    assert (result.reason, result.legal_basis, result.legal_ref, result.case) == (
        "Parcel stolen from the porch",
        "warrant",
        "W-2026-17",
        "C-9",
    )
    assert result.recipient == RECIPIENT
    assert result.audit_fields()["window"] == {
        "start": "2026-01-31T11:00:00Z",
        "end": "2026-01-31T11:30:00Z",
    }


def test_build_request_output_is_verified(alice: Party, views: Views) -> None:
    raw = build_request(
        alice.key,
        alice.kid,
        alice.requester_id,
        DEVICE,
        T0 - timedelta(minutes=20),
        T0 - timedelta(minutes=5),
        "Reason",
        "subpoena",
        "S-1",
        None,
        RECIPIENT,
        T0,
        timedelta(hours=2),
        jti="A" * 16,
    )
    result = check(raw.encode(), views)
    assert isinstance(result, VerifiedRequest)
    assert (result.jti, result.legal_ref, result.case) == ("A" * 16, "S-1", None)


def test_pyjwt_eddsa_request_is_verified(alice: Party, views: Views) -> None:
    raw = jwt.encode(
        claims(alice), alice.key, algorithm="EdDSA", headers={"kid": alice.kid, "typ": TYP}
    )
    assert isinstance(check(raw.encode(), views), VerifiedRequest)


def test_pyjwt_ed25519_alg_name_is_verified(alice: Party, views: Views) -> None:
    # RFC 9864's fully-specified name, registered in PyJWT as a custom algorithm.
    signer = jwt.PyJWS()
    signer.register_algorithm("Ed25519", jwt.algorithms.OKPAlgorithm())
    payload = json.dumps(claims(alice)).encode()
    raw = signer.encode(
        payload, alice.key, algorithm="Ed25519", headers={"kid": alice.kid, "typ": TYP}
    )
    assert json.loads(base64.urlsafe_b64decode(raw.split(".")[0] + "=="))["alg"] == "Ed25519"
    assert isinstance(check(raw.encode(), views), VerifiedRequest)


def test_unknown_claims_and_headers_are_ignored(alice: Party, views: Views) -> None:
    raw = sign_raw(
        alice.key, header(alice, cty="JWT", x_vendor="v1"), claims(alice, nbf=0, extra={"a": [1]})
    )
    assert isinstance(check(raw, views), VerifiedRequest)


def test_trailing_newline_from_mosquitto_pub_file_is_tolerated(alice: Party, views: Views) -> None:
    assert isinstance(check(token(alice) + b"\n", views), VerifiedRequest)


@pytest.mark.parametrize(
    "start,end",
    [
        ("2026-01-31T11:00:00.5Z", "2026-01-31T11:30:00.123456Z"),
        ("2026-01-31T11:00:00+00:00", "2026-01-31t11:30:00z"),
        ("2026-01-31T11:00:00.123456789Z", "2026-01-31T11:30:00Z"),
    ],
)
def test_rfc3339_utc_spellings_are_accepted(
    alice: Party, views: Views, start: str, end: str
) -> None:
    assert isinstance(
        check(token(alice, window={"start": start, "end": end}), views), VerifiedRequest
    )


# --- unverifiable: no response ----------------------------------------------------------------


def test_oversize_is_refused_before_parsing(views: Views) -> None:
    raw = b"x" * (POLICY.max_bytes + 1)
    assert unverifiable(raw, views, "oversize").size == POLICY.max_bytes + 1


def test_oversize_limit_follows_config(alice: Party, views: Views) -> None:
    raw = token(alice)
    small = RequestPolicy(device_id=DEVICE, max_bytes=len(raw) - 1)
    result = check(raw, views, policy=small)
    assert isinstance(result, Unverifiable) and result.reason == "oversize"


@pytest.mark.parametrize("raw", [b"\xff\xfe.\x80.\x00", "é.é.é".encode(), b"abc\x80"])
def test_non_ascii_is_unverifiable(views: Views, raw: bytes) -> None:
    unverifiable(raw, views, "not_ascii")


def test_non_ascii_claims_inside_base64_are_fine(alice: Party, views: Views) -> None:
    assert isinstance(check(token(alice, reason="Vélo volé — 🚲"), views), VerifiedRequest)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.rsplit(b".", 1)[0],  # two segments
        lambda t: t + b".AAAA",  # four segments
        lambda t: b"." + t.split(b".", 1)[1],  # empty header
        lambda t: t.replace(b".", b".!", 1),  # not base64url
        lambda t: t.replace(b".", b".+/", 1),  # standard base64 alphabet
        lambda t: t[:-1],  # 85-char signature
        lambda t: t[:-1] + b"B",  # non-canonical final signature character
        lambda t: b"",
    ],
)
def test_bad_shape_is_unverifiable(alice: Party, views: Views, mutate: Any) -> None:
    unverifiable(mutate(token(alice)), views, "bad_shape")


@pytest.mark.parametrize(
    "payload",
    [b"[1, 2]", b'"text"', b"not json", b"\xff\xfe", b"{" * 40 + b"}" * 40, b'{"a": 1, "a": 2}'],
)
def test_payload_must_be_a_shallow_json_object(alice: Party, views: Views, payload: bytes) -> None:
    unverifiable(sign_raw(alice.key, header(alice), payload), views, "bad_shape")


def test_deeply_nested_claims_are_refused_without_recursion(alice: Party, views: Views) -> None:
    payload = b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}"
    policy = RequestPolicy(device_id=DEVICE, max_bytes=65536)
    result = check(sign_raw(alice.key, header(alice), payload), views, policy=policy)
    assert isinstance(result, Unverifiable) and result.reason == "bad_shape"


def test_brackets_inside_strings_do_not_count_as_nesting(alice: Party, views: Views) -> None:
    raw = token(alice, reason='[[[[[[[[[[{{{{{{{{{{ see ]]]] }}}} "quoted"')
    assert isinstance(check(raw, views), VerifiedRequest)


@pytest.mark.parametrize(
    "hdr",
    [
        b"[]",
        b"not json",
        b'{"alg": "EdDSA", "alg": "EdDSA", "kid": "k", "typ": "doorbell-request+jwt"}',
        b'{"alg": "EdDSA", "typ": "doorbell-request+jwt", "kid": "k", "x": '
        + b"[" * 30
        + b"]" * 30
        + b"}",
    ],
)
def test_bad_header_json_is_unverifiable(alice: Party, views: Views, hdr: bytes) -> None:
    unverifiable(sign_raw(alice.key, hdr, claims(alice)), views, "bad_header")


@pytest.mark.parametrize(
    "overrides",
    [
        {"alg": None},
        {"alg": 5},
        {"kid": None},
        {"kid": ""},
        {"kid": 7},
        {"kid": "k" * 129},
        {"crit": ["exp"], "exp": 1},
        {"b64": False, "crit": ["b64"]},
    ],
)
def test_bad_header_members_are_unverifiable(
    alice: Party, views: Views, overrides: dict[str, Any]
) -> None:
    unverifiable(
        sign_raw(alice.key, header(alice, **overrides), claims(alice)), views, "bad_header"
    )


def test_long_header_is_unverifiable(alice: Party, views: Views) -> None:
    raw = sign_raw(alice.key, header(alice, pad="p" * 800), claims(alice))
    unverifiable(raw, views, "bad_header")


def test_alg_none_is_refused(alice: Party, views: Views) -> None:
    h = b64(json.dumps(header(alice, alg="none")).encode())
    p = b64(json.dumps(claims(alice)).encode())
    unverifiable(f"{h}.{p}.".encode(), views, "bad_shape")  # no signature at all
    # with a signature-shaped third segment the alg itself is what refuses it
    unverifiable(f"{h}.{p}.{'A' * 86}".encode(), views, "alg_not_allowed")


@pytest.mark.parametrize(
    "secret",
    [
        lambda k: raw_public_bytes(k.public_key()),
        lambda k: json.dumps(public_jwk(k.public_key())).encode(),
        lambda k: k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ],
)
def test_hs256_signed_with_the_public_key_is_refused(
    alice: Party, views: Views, secret: Any
) -> None:
    h = b64(json.dumps(header(alice, alg="HS256")).encode())
    p = b64(json.dumps(claims(alice)).encode())
    mac = hmac.new(secret(alice.key), f"{h}.{p}".encode(), hashlib.sha256).digest()
    raw = f"{h}.{p}.{b64(mac)}".encode()
    # a 32-byte MAC is not signature-shaped; padded to 64 bytes it reaches the alg check
    unverifiable(raw, views, "bad_shape")
    unverifiable(f"{h}.{p}.{b64(mac * 2)}".encode(), views, "alg_not_allowed")


@pytest.mark.parametrize("alg", ["RS256", "ES256", "Ed448", "eddsa", "EDDSA", "HS512"])
def test_other_algs_are_refused(alice: Party, views: Views, alg: str) -> None:
    unverifiable(
        sign_raw(alice.key, header(alice, alg=alg), claims(alice)), views, "alg_not_allowed"
    )


@pytest.mark.parametrize(
    "typ", [None, "JWT", "doorbell-request+JWT", "application/doorbell-request+jwt", 1]
)
def test_missing_or_wrong_typ_is_refused(alice: Party, views: Views, typ: Any) -> None:
    unverifiable(sign_raw(alice.key, header(alice, typ=typ), claims(alice)), views, "typ")


def test_unknown_kid_is_unverifiable(views: Views) -> None:
    mallory = Party("alice-pd")
    result = unverifiable(token(mallory), views, "unknown_kid")
    assert result.kid == mallory.kid
    assert result.audit_fields() == {
        "reason": "unknown_kid",
        "bytes": len(token(mallory)),
        "kid": mallory.kid,
    }


def test_signature_by_another_key_with_a_known_kid_is_refused(alice: Party, views: Views) -> None:
    mallory = Ed25519PrivateKey.generate()
    unverifiable(sign_raw(mallory, header(alice), claims(alice)), views, "bad_signature")


def test_modified_claims_break_the_signature(alice: Party, views: Views) -> None:
    h, _, s = token(alice).split(b".")
    forged = b64(
        json.dumps(
            claims(alice, window={"start": "2026-01-30T00:00:00Z", "end": "2026-01-30T01:00:00Z"})
        ).encode()
    )
    unverifiable(h + b"." + forged.encode() + b"." + s, views, "bad_signature")


@pytest.mark.parametrize("member", ["jwk", "jku", "x5c", "x5u"])
def test_key_carrying_headers_are_never_used(alice: Party, views: Views, member: str) -> None:
    mallory = Ed25519PrivateKey.generate()
    values: dict[str, Any] = {
        "jwk": public_jwk(mallory.public_key()),
        "jku": "https://attacker.example/jwks.json",
        "x5c": ["MIIB"],
        "x5u": "https://attacker.example/cert.pem",
    }
    raw = sign_raw(mallory, header(alice, **{member: values[member]}), claims(alice))
    result = check(raw, views)
    assert isinstance(result, Unverifiable)
    assert result.reason in ("bad_signature", "bad_header")


def test_jwk_header_is_ignored_when_alice_signs(alice: Party, views: Views) -> None:
    # Ignored, not honoured: a valid request that also carries someone's jwk still verifies
    # against the enrolled key only.
    mallory = Ed25519PrivateKey.generate()
    raw = sign_raw(alice.key, header(alice, jwk=public_jwk(mallory.public_key())), claims(alice))
    assert isinstance(check(raw, views), VerifiedRequest)


def test_every_unverifiable_reason_is_covered() -> None:
    assert set(UNVERIFIABLE_REASONS) == {
        "oversize",
        "not_ascii",
        "bad_shape",
        "bad_header",
        "alg_not_allowed",
        "typ",
        "unknown_kid",
        "bad_signature",
    }


# --- rejected: signed, but a claim rule is broken ---------------------------------------------


def test_revoked_requester_with_valid_signature_is_rejected(alice: Party) -> None:
    views = Views()
    views.enrol(alice, revoked=True)
    result = rejected(token(alice), views, "revoked")
    assert not result.recordable
    assert result.requester_id == "alice-pd"


def test_revoked_requester_with_bad_signature_is_unverifiable(alice: Party) -> None:
    views = Views()
    views.enrol(alice, revoked=True)
    unverifiable(
        sign_raw(Ed25519PrivateKey.generate(), header(alice), claims(alice)), views, "bad_signature"
    )


def test_iss_must_be_the_enrolled_requester(alice: Party, views: Views) -> None:
    bob = Party("bob")
    views.enrol(bob)
    result = rejected(token(alice, iss="bob"), views, "bad_claims")
    assert result.requester_id == "alice-pd"  # the answer goes to the key's owner
    rejected(token(alice, iss=None), views, "bad_claims")


@pytest.mark.parametrize(
    "aud,error",
    [
        ("back-door", "wrong_audience"),
        ([DEVICE], "wrong_audience"),
        ([DEVICE, "back-door"], "wrong_audience"),
        (5, "bad_claims"),
        ({"d": DEVICE}, "bad_claims"),
    ],
)
def test_audience(alice: Party, views: Views, aud: Any, error: str) -> None:
    rejected(token(alice, aud=aud), views, error)


def test_missing_audience_is_bad_claims(alice: Party, views: Views) -> None:
    rejected(token(alice, aud=None), views, "bad_claims")


def test_expired(alice: Party, views: Views) -> None:
    exp = int(T0.timestamp())
    result = rejected(token(alice, exp=exp, iat=exp - 60), views, "expired")
    assert result.recordable and result.jti == "jti-0123456789abcdef"
    assert isinstance(check(token(alice, exp=exp + 1, iat=exp - 60), views), VerifiedRequest)


def test_not_yet_valid_beyond_clock_skew(alice: Party, views: Views) -> None:
    now = int(T0.timestamp())
    skew = int(POLICY.clock_skew.total_seconds())
    ok = token(alice, iat=now + skew, exp=now + skew + 60)
    assert isinstance(check(ok, views), VerifiedRequest)
    rejected(token(alice, iat=now + skew + 1, exp=now + skew + 61), views, "not_yet_valid")


def test_lifetime_too_long(alice: Party, views: Views) -> None:
    now = int(T0.timestamp())
    limit = int(POLICY.max_lifetime.total_seconds())
    assert isinstance(check(token(alice, iat=now, exp=now + limit), views), VerifiedRequest)
    rejected(token(alice, iat=now, exp=now + limit + 1), views, "lifetime_too_long")


@pytest.mark.parametrize(
    "overrides",
    [
        {"iat": "1769860800"},
        {"iat": True},
        {"exp": 1.5e9},
        {"exp": None},
        {"iat": None},
        {"iat": int(T0.timestamp()) + 100, "exp": int(T0.timestamp()) + 100},  # exp == iat
        {"iat": 99999999999999},
        {"iat": -(2**62)},
        {"iat": 946684799},  # 1999-12-31T23:59:59Z
        {"exp": 2**70},
        {"exp": 253402300800},  # 10000-01-01T00:00:00Z
        {"exp": 10**4000},
        {"iat": -(10**4000)},
        {"exp": 1.7e9},
        {"iat": 1769860800.0},
        {"exp": False},
        {"iat": [1769860800]},
        {"exp": {"t": 1769864400}},
    ],
)
def test_bad_times_are_bad_claims(alice: Party, views: Views, overrides: dict[str, Any]) -> None:
    result = rejected(token(alice, **overrides), views, "bad_claims")
    # Out-of-range or mistyped values never reach a Rejection's iat/exp (stored, converted).
    for value in (result.iat, result.exp):
        assert value is None or 946684800 <= value <= 253402300799


def test_time_range_edges_are_accepted_as_times(alice: Party, views: Views) -> None:
    # In range, so judged as times: `expired`, not bad_claims.
    rejected(token(alice, iat=946684800, exp=946684800 + 3600), views, "expired")
    late = 253402300799
    rejected(token(alice, iat=late - 3600, exp=late), views, "not_yet_valid")


@pytest.mark.parametrize(
    "payload",
    [
        b'{"iat": NaN}',
        b'{"exp": Infinity}',
        b'{"exp": -Infinity}',
        b'{"iat": ' + b"9" * 5000 + b"}",
    ],
)
def test_payloads_that_are_not_json_are_bad_shape(
    alice: Party, views: Views, payload: bytes
) -> None:
    unverifiable(sign_raw(alice.key, header(alice), payload), views, "bad_shape")


@pytest.mark.parametrize(
    "jti", ["a" * 15, "a" * 129, "has space in it!!", "slash/in/the/jti", 12345678901234567, None]
)
def test_bad_jti_is_bad_claims(alice: Party, views: Views, jti: Any) -> None:
    result = rejected(token(alice, jti=jti), views, "bad_claims")
    assert not result.recordable


@pytest.mark.parametrize("jti", ["a" * 16, "Z" * 128, "a-b_c-0123456789"])
def test_jti_bounds(alice: Party, views: Views, jti: str) -> None:
    assert isinstance(check(token(alice, jti=jti), views), VerifiedRequest)


def test_replayed(alice: Party, views: Views) -> None:
    views.seen.add("jti-0123456789abcdef")
    result = rejected(token(alice), views, "replayed")
    assert not result.recordable


def test_window_too_long(alice: Party, views: Views) -> None:
    exact = {"start": "2026-01-31T10:00:00Z", "end": "2026-01-31T11:00:00Z"}
    assert isinstance(check(token(alice, window=exact), views), VerifiedRequest)
    longer = {"start": "2026-01-31T10:00:00Z", "end": "2026-01-31T11:00:00.001Z"}
    rejected(token(alice, window=longer), views, "window_too_long")


def test_window_outside_retention(alice: Party, views: Views) -> None:
    edge = T0 - POLICY.retention
    start = edge.strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (edge + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert isinstance(
        check(token(alice, window={"start": start, "end": end}), views), VerifiedRequest
    )
    older = (edge - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    rejected(token(alice, window={"start": older, "end": end}), views, "window_outside_retention")


def test_window_in_future(alice: Party, views: Views) -> None:
    # `end` may reach the arrival time plus clock_skew, not a moment later (injected now).
    edge = T0 + POLICY.clock_skew
    start = (edge - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    exact = {"start": start, "end": edge.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert isinstance(check(token(alice, window=exact), views), VerifiedRequest)
    later = {"start": start, "end": edge.strftime("%Y-%m-%dT%H:%M:%S.001Z")}
    result = rejected(token(alice, window=later), views, "window_in_future")
    assert result.recordable
    # The same request an hour later asks for footage that exists by then.
    exp = int((T0 + timedelta(hours=2)).timestamp())
    assert isinstance(
        check(token(alice, window=later, exp=exp), views, now=T0 + timedelta(hours=1)),
        VerifiedRequest,
    )


@pytest.mark.parametrize(
    "window",
    [
        None,
        "2026-01-31T11:00:00Z/2026-01-31T11:30:00Z",
        {"start": "2026-01-31T11:00:00Z"},
        {"start": "2026-01-31T11:30:00Z", "end": "2026-01-31T11:00:00Z"},
        {"start": "2026-01-31T11:00:00Z", "end": "2026-01-31T11:00:00Z"},
        {"start": "2026-01-31T11:00:00+01:00", "end": "2026-01-31T12:30:00+01:00"},
        {"start": "2026-01-31T11:00:00", "end": "2026-01-31T11:30:00"},
        {"start": "2026-02-30T11:00:00Z", "end": "2026-02-30T11:30:00Z"},
        {"start": "31/01/2026 11:00", "end": "2026-01-31T11:30:00Z"},
        {"start": 1769857200, "end": 1769859000},
        {"start": "1999-12-31T23:59:59Z", "end": "2000-01-01T00:10:00Z"},
        {"start": "0001-01-01T00:00:00Z", "end": "0001-01-01T00:10:00Z"},
        {"start": "9999-12-31T23:59:00Z", "end": "10000-01-01T00:00:00Z"},
        {"start": True, "end": False},
        {"start": ["2026-01-31T11:00:00Z"], "end": {"x": 1}},
    ],
)
def test_bad_window_is_bad_claims(alice: Party, views: Views, window: Any) -> None:
    rejected(token(alice, window=window), views, "bad_claims")


@pytest.mark.parametrize(
    "overrides",
    [
        {"reason": ""},
        {"reason": "r" * 1001},
        {"reason": None},
        {"reason": ["x"]},
        {"legal_basis": "curiosity"},
        {"legal_basis": None},
        {"legal_basis": "Consent"},
        {"legal_basis": "warrant"},
        {"legal_basis": "subpoena", "legal_ref": ""},
        {"legal_basis": "warrant", "legal_ref": "w" * 257},
        {"legal_ref": 5},
        {"case": "c" * 129},
        {"case": 42},
        {"recipient": None},
        {"recipient": "age1notarecipient"},
        {"recipient": RECIPIENT.upper()},
        {"recipient": "AGE-SECRET-KEY-1" + "Q" * 58},
        {"recipient": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB"},
    ],
)
def test_bad_content_is_bad_claims(alice: Party, views: Views, overrides: dict[str, Any]) -> None:
    rejected(token(alice, **overrides), views, "bad_claims")


@pytest.mark.parametrize(
    "overrides",
    [
        {"reason": "r" * 1000},
        {"reason": "x"},
        {"legal_basis": "warrant", "legal_ref": "w" * 256},
        {"legal_basis": "emergency"},
        {"legal_basis": "consent", "legal_ref": "optional ref"},
        {"case": "c" * 128},
        {"case": ""},
    ],
)
def test_content_bounds_are_accepted(alice: Party, views: Views, overrides: dict[str, Any]) -> None:
    assert isinstance(check(token(alice, **overrides), views), VerifiedRequest)


def test_rate_limited(alice: Party, views: Views) -> None:
    views.counts["alice-pd"] = POLICY.rate_limit - 1
    assert isinstance(check(token(alice), views), VerifiedRequest)
    views.counts["alice-pd"] = POLICY.rate_limit
    result = rejected(token(alice), views, "rate_limited")
    assert not result.recordable


def test_every_contract_error_code_is_produced() -> None:
    # The tests above produce each of these; this pins the list to the contract's.
    assert set(REJECTION_CODES) == {
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
    }


# --- which check wins -------------------------------------------------------------------------


def test_order_revoked_beats_every_claim_error(alice: Party) -> None:
    views = Views()
    views.enrol(alice, revoked=True)
    rejected(token(alice, aud="elsewhere", exp=1, reason=""), views, "revoked")


def test_order_types_and_ranges_before_everything_else(alice: Party, views: Views) -> None:
    # CONTRACT §3 (revision 2): types and ranges first, whatever else is wrong.
    views.seen.add("jti-0123456789abcdef")
    views.counts["alice-pd"] = 10**6
    window = {"start": "2026-01-01T00:00:00Z", "end": "2026-12-31T00:00:00Z"}
    everything = {"aud": "elsewhere", "iat": 946684800, "exp": 946684801, "window": window}
    rejected(token(alice, reason="", **everything), views, "bad_claims")
    rejected(token(alice, iat=99999999999999, aud="elsewhere"), views, "bad_claims")
    rejected(token(alice, jti="short", aud="elsewhere"), views, "bad_claims")
    rejected(token(alice, legal_basis="nope", aud="elsewhere"), views, "bad_claims")


def test_order_audience_before_time(alice: Party, views: Views) -> None:
    rejected(token(alice, aud="elsewhere", exp=946684801, iat=946684800), views, "wrong_audience")


def test_order_expired_before_lifetime(alice: Party, views: Views) -> None:
    rejected(token(alice, iat=946684800, exp=946684800 + 10**8), views, "expired")


def test_order_time_before_jti(alice: Party, views: Views) -> None:
    views.seen.add("jti-0123456789abcdef")
    future = int(T0.timestamp()) + 3600
    rejected(token(alice, iat=future, exp=future + 60), views, "not_yet_valid")


def test_order_replay_before_window(alice: Party, views: Views) -> None:
    views.seen.add("jti-0123456789abcdef")
    window = {"start": "2026-01-01T00:00:00Z", "end": "2026-01-31T00:00:00Z"}
    rejected(token(alice, window=window), views, "replayed")


def test_order_window_length_before_retention(alice: Party, views: Views) -> None:
    window = {"start": "2025-01-01T00:00:00Z", "end": "2025-01-02T00:00:00Z"}
    rejected(token(alice, window=window), views, "window_too_long")


def test_order_retention_before_future(alice: Party, views: Views) -> None:
    window = {"start": "2025-01-01T00:00:00Z", "end": "2025-01-01T00:30:00Z"}
    rejected(token(alice, window=window), views, "window_outside_retention")
    future = {"start": "2027-01-01T00:00:00Z", "end": "2027-01-01T02:00:00Z"}
    rejected(token(alice, window=future), views, "window_too_long")


def test_order_claim_errors_before_rate_limit(alice: Party, views: Views) -> None:
    views.counts["alice-pd"] = 10**6
    rejected(token(alice, reason=""), views, "bad_claims")
    rejected(token(alice, aud="elsewhere"), views, "wrong_audience")
    future = {"start": "2026-01-31T12:00:00Z", "end": "2026-01-31T12:30:00Z"}
    rejected(token(alice, window=future), views, "window_in_future")


def test_rejection_audit_fields_are_bounded(alice: Party, views: Views) -> None:
    result = rejected(token(alice, reason="r" * 5000), views, "bad_claims")
    fields = result.audit_fields()
    assert fields["error"] == "bad_claims"
    assert len(fields["reason"]) == 1000
    assert fields["window"] == {"start": "2026-01-31T11:00:00Z", "end": "2026-01-31T11:30:00Z"}


def test_verifier_does_not_modify_its_views(alice: Party, views: Views) -> None:
    check(token(alice), views)
    check(token(alice, reason=""), views)
    assert views.seen == set() and views.counts == {}


def test_window_in_future_is_judged_at_arrival(alice: Party, views: Views) -> None:
    # Handled ten minutes after it arrived: its window's end is compared with the arrival.
    edge = T0 + POLICY.clock_skew
    window = {"start": "2026-01-31T11:50:00Z", "end": edge.strftime("%Y-%m-%dT%H:%M:%S.001Z")}
    later = T0 + timedelta(minutes=10)
    raw = token(alice, window=window)
    assert isinstance(check(raw, views, now=later), VerifiedRequest)
    result = verify_request(raw, views, views, POLICY, later, received=T0)
    assert isinstance(result, Rejection) and result.error == "window_in_future"
