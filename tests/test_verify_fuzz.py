"""Fuzzing the verifier: it returns a result for any bytes and never accepts mutated signed bytes.

Examples per test come from a Hypothesis profile: ``verify-ci`` (10 000, chosen when CI=true)
or ``verify-dev`` (a few hundred) otherwise; the structured-JSON test is capped at 2 000. The
profiles are applied per test, not loaded globally, so other test files keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.requests.verify import (
    UNVERIFIABLE_REASONS,
    Rejection,
    Unverifiable,
    VerifiedRequest,
    VerifyResult,
    verify_request,
)
from agent.vocabulary import REJECTION_CODES
from tests.test_verify import POLICY, T0, Party, Views, claims, header, sign_raw, token

settings.register_profile(
    "verify-ci", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("verify-dev", max_examples=300, deadline=None)
PROFILE = settings.get_profile("verify-ci" if os.environ.get("CI") == "true" else "verify-dev")

ALICE = Party("alice-pd")
VIEWS = Views()
VIEWS.enrol(ALICE)
VALID = token(ALICE)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = (
    SCALARS
    | st.lists(SCALARS, max_size=3)
    | st.dictionaries(st.sampled_from(["start", "end", "x"]), SCALARS, max_size=3)
)
CLAIM_NAMES = st.sampled_from(
    [
        "iss",
        "aud",
        "iat",
        "exp",
        "jti",
        "window",
        "reason",
        "legal_basis",
        "legal_ref",
        "case",
        "recipient",
        "nbf",
        "x",
    ]
)
HEADER_NAMES = st.sampled_from(["jwk", "jku", "x5c", "x5u", "cty", "zip", "enc", "x"])


def check(raw: bytes) -> VerifyResult:
    result = verify_request(raw, VIEWS, VIEWS, POLICY, T0)
    assert isinstance(result, VerifiedRequest | Rejection | Unverifiable)
    if isinstance(result, Unverifiable):
        assert result.reason in UNVERIFIABLE_REASONS
    if isinstance(result, Rejection):
        assert result.error in REJECTION_CODES
    return result


def test_the_unmutated_request_is_accepted() -> None:
    assert isinstance(check(VALID), VerifiedRequest)


@settings(PROFILE)
@given(st.binary(max_size=POLICY.max_bytes + 16))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert not isinstance(check(raw), VerifiedRequest)


@settings(PROFILE)
@given(
    st.lists(
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=",
            max_size=200,
        ),
        max_size=4,
    )
)
def test_token_shaped_text_never_raises(parts: list[str]) -> None:
    check(".".join(parts).encode())


@settings(PROFILE)
@given(st.data())
def test_mutated_signed_bytes_are_never_accepted(data: st.DataObject) -> None:
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["flip", "replace", "insert", "delete"]), label="kind")
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="pos")
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "replace" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=3))
        elif raw:
            del raw[pos]
    mutated = bytes(raw)
    result = check(mutated)
    if isinstance(result, VerifiedRequest):
        # only surrounding whitespace (a trailing newline from a file) may differ
        assert mutated.strip(b" \t\r\n") == VALID


# Hypothesis spends ~10 ms generating each structured example; 2 000 keep CI near half a minute.
@settings(PROFILE, max_examples=min(PROFILE.max_examples, 2_000))
@given(
    st.dictionaries(CLAIM_NAMES, JSON_VALUES, max_size=4),
    st.dictionaries(HEADER_NAMES, JSON_VALUES, max_size=3),
)
def test_signed_garbage_claims_and_headers_never_raise(
    extra_claims: dict[str, object], extra_header: dict[str, object]
) -> None:
    body = {**claims(ALICE), **extra_claims}
    hdr = {**extra_header, **header(ALICE)}
    check(sign_raw(ALICE.key, hdr, body))
    # claims replaced wholesale by arbitrary JSON, still validly signed
    check(sign_raw(ALICE.key, header(ALICE), extra_claims))
