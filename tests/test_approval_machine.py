"""The pure approval state machine: every event in every state, deadlines, two-factor approval."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.approval.machine import (
    ApprovalState,
    Approve,
    Audit,
    DeliveryFailed,
    DeliverySucceeded,
    Deny,
    Event,
    Factor,
    Policy,
    Redeliver,
    Refusal,
    ReleaseHold,
    Respond,
    StartDelivery,
    Tick,
    transition,
)
from agent.vocabulary import SETTLED, Channel, Status

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ALL_CHANNELS = frozenset(Channel)


def policy(
    require: Literal["any", "all"] = "any",
    channels: frozenset[Channel] = ALL_CHANNELS,
    timeout: timedelta = 24 * HOUR,
    confirm: timedelta = timedelta(minutes=5),
) -> Policy:
    return Policy(channels, require, timeout, confirm)


def state(status: Status = Status.PENDING, exp: timedelta = 7 * 24 * HOUR) -> ApprovalState:
    return ApprovalState("jti-0123456789abcdef", status, T0, T0 + exp)


EVENTS: list[Event] = [
    *(Approve(c) for c in Channel),
    *(Deny(c) for c in Channel),
    Tick(),
    DeliverySucceeded(3),
    DeliveryFailed("broker gone"),
]


def events_of(effects: tuple[object, ...]) -> list[str]:
    return [e.event for e in effects if isinstance(e, Audit)]


# -- the whole table ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("event", EVENTS, ids=repr)
def test_every_event_in_every_state(status: Status, event: Event) -> None:
    s = state(status)
    now = T0 + HOUR
    t = transition(s, event, policy(), now)
    if status is Status.PENDING:
        expected = {
            Approve: Status.APPROVED,
            Deny: Status.DENIED,
            Tick: Status.PENDING,
        }.get(type(event), Status.PENDING)
        assert t.after.status is expected
        if isinstance(event, DeliverySucceeded | DeliveryFailed):
            assert t.refusal is Refusal.NOT_APPROVED and t.effects == ()
    elif status is Status.APPROVED:
        expected = {
            DeliverySucceeded: Status.DELIVERED,
            DeliveryFailed: Status.FAILED,
        }.get(type(event), Status.APPROVED)
        assert t.after.status is expected
        if isinstance(event, Approve | Deny):
            assert t.refusal is Refusal.NOT_PENDING and t.effects == ()
    else:
        # terminal (acknowledged included): nothing moves, nothing is emitted
        assert status in SETTLED | {Status.ACKNOWLEDGED}
        assert t.after == s and t.effects == ()
        if isinstance(event, Approve | Deny):
            assert t.refusal is Refusal.NOT_PENDING
        elif isinstance(event, Tick):
            assert t.refusal is None
        else:
            assert t.refusal is Refusal.NOT_APPROVED
    # a status change always starts with its audit entry, and only then anything else; a
    # delivery's request_delivered was written by the delivery itself, before its manifest
    if t.status_changed and t.after.status is Status.DELIVERED:
        assert not any(isinstance(e, Audit) for e in t.effects)
    elif t.status_changed:
        assert isinstance(t.effects[0], Audit)
        assert t.effects[0].event == f"request_{t.after.status.value}"
        assert sum(isinstance(e, Audit) for e in t.effects) == 1
    else:
        assert not any(isinstance(e, Audit | Respond | StartDelivery) for e in t.effects)


def test_approve_effects_in_order() -> None:
    t = transition(state(), Approve(Channel.CLI), policy(), T0 + HOUR)
    assert t.effects == (
        Audit("request_approved", {"channel": "cli"}),
        Respond(Status.APPROVED, {"channel": "cli"}),
        StartDelivery(),
    )
    assert t.after.decided_by == (Factor(Channel.CLI, T0 + HOUR),)


def test_deny_effects_release_the_hold() -> None:
    t = transition(state(), Deny(Channel.BUTTON), policy(), T0 + HOUR)
    assert t.effects == (
        Audit("request_denied", {"channel": "button"}),
        Respond(Status.DENIED, {"channel": "button"}),
        ReleaseHold(),
    )


def test_delivery_outcomes() -> None:
    ok = transition(state(Status.APPROVED), DeliverySucceeded(2), policy(), T0)
    # request_delivered is the delivery's own entry (before the manifest, §7): not repeated
    assert ok.effects == (Respond(Status.DELIVERED, {"clips": 2}), ReleaseHold())
    bad = transition(state(Status.APPROVED), DeliveryFailed("no broker"), policy(), T0)
    assert bad.effects == (
        Audit("request_failed", {"error": "delivery_error", "detail": "no broker"}),
        Respond(Status.FAILED, {"error": "delivery_error"}),
        ReleaseHold(),
    )
    revoked = transition(
        state(Status.APPROVED), DeliveryFailed("revoked", error="revoked"), policy(), T0
    )
    assert revoked.after.status is Status.FAILED
    assert revoked.effects == (
        Audit("request_failed", {"error": "revoked", "detail": "revoked"}),
        Respond(Status.FAILED, {"error": "revoked"}),
        ReleaseHold(),
    )


def test_approved_requests_do_not_expire() -> None:
    # delivery (or its restart after a crash) is not cut short by the request's exp
    s = state(Status.APPROVED, exp=HOUR)
    t = transition(s, Tick(), policy(), T0 + 30 * 24 * HOUR)
    assert t.after == s and t.effects == ()
    assert transition(s, DeliverySucceeded(0), policy(), T0 + 30 * 24 * HOUR).after.status is (
        Status.DELIVERED
    )


# -- deadlines ---------------------------------------------------------------------------------


def test_timeout_expires_on_tick_exactly_at_the_deadline() -> None:
    p = policy(timeout=2 * HOUR)
    before = transition(state(), Tick(), p, T0 + 2 * HOUR - timedelta(microseconds=1))
    assert before.after.status is Status.PENDING and before.effects == ()
    at = transition(state(), Tick(), p, T0 + 2 * HOUR)
    assert at.after.status is Status.EXPIRED and at.refusal is None
    assert at.effects[0] == Audit(
        "request_expired", {"cause": "approval.timeout", "deadline": "2026-03-01T14:00:00Z"}
    )
    assert at.effects[1:] == (Respond(Status.EXPIRED), ReleaseHold())


def test_exp_before_timeout_wins() -> None:
    s = state(exp=HOUR)
    t = transition(s, Tick(), policy(timeout=24 * HOUR), T0 + HOUR)
    assert t.after.status is Status.EXPIRED
    assert t.effects[0] == Audit(
        "request_expired", {"cause": "exp", "deadline": "2026-03-01T13:00:00Z"}
    )


@pytest.mark.parametrize("event", [Approve(Channel.APP), Deny(Channel.CLI)], ids=repr)
def test_late_decision_expires_the_request_and_is_refused(event: Event) -> None:
    t = transition(state(exp=HOUR), event, policy(), T0 + HOUR)
    assert t.after.status is Status.EXPIRED
    assert t.refusal is Refusal.EXPIRED
    assert events_of(t.effects) == ["request_expired"]
    assert not any(isinstance(e, StartDelivery) for e in t.effects)


def test_decision_just_before_the_deadline_counts() -> None:
    t = transition(
        state(exp=HOUR), Approve(Channel.APP), policy(), T0 + HOUR - timedelta(seconds=1)
    )
    assert t.after.status is Status.APPROVED


# -- channels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", list(Channel))
def test_disabled_channel_is_refused_for_approve_and_deny(channel: Channel) -> None:
    p = policy(channels=ALL_CHANNELS - {channel})
    for event in (Approve(channel), Deny(channel)):
        t = transition(state(), event, p, T0 + HOUR)
        assert t.refusal is Refusal.CHANNEL_DISABLED
        assert t.after == state() and t.effects == ()


def test_policy_from_settings_and_validation() -> None:
    p = Policy.from_settings(["button", "cli"], "all", HOUR, timedelta(minutes=1))
    assert p.channels == {Channel.BUTTON, Channel.CLI}
    with pytest.raises(ValueError, match="require: all"):
        Policy.from_settings(["app", "cli"], "all", HOUR, timedelta(minutes=1))
    with pytest.raises(ValueError, match="require: all"):
        Policy.from_settings(["button"], "all", HOUR, timedelta(minutes=1))


# -- require: all ------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [Channel.APP, Channel.CLI])
def test_all_needs_app_or_cli_then_button_within_window(first: Channel) -> None:
    p = policy("all")
    one = transition(state(), Approve(first), p, T0 + HOUR)
    assert one.after.status is Status.PENDING and not one.status_changed
    assert one.after.first_factor == Factor(first, T0 + HOUR)
    assert one.effects == () and one.refusal is None
    assert one.after.awaiting_confirmation(p, T0 + HOUR + timedelta(minutes=5))

    press_at = T0 + HOUR + timedelta(minutes=5)
    two = transition(one.after, Approve(Channel.BUTTON), p, press_at)
    assert two.after.status is Status.APPROVED
    assert two.after.decided_by == (Factor(first, T0 + HOUR), Factor(Channel.BUTTON, press_at))
    assert two.effects[0] == Audit(
        "request_approved",
        {
            "channel": "button",
            "factors": [
                {"channel": first.value, "at": "2026-03-01T13:00:00Z"},
                {"channel": "button", "at": "2026-03-01T13:05:00Z"},
            ],
        },
    )
    assert two.effects[1] == Respond(Status.APPROVED, {"channel": "button"})


def test_all_button_alone_is_refused() -> None:
    t = transition(state(), Approve(Channel.BUTTON), policy("all"), T0 + HOUR)
    assert t.refusal is Refusal.NEEDS_FIRST_FACTOR
    assert t.after == state() and t.effects == ()


def test_all_button_after_the_window_is_refused() -> None:
    p = policy("all")
    one = transition(state(), Approve(Channel.CLI), p, T0 + HOUR)
    late = T0 + HOUR + timedelta(minutes=5, microseconds=1)
    assert not one.after.awaiting_confirmation(p, late)
    t = transition(one.after, Approve(Channel.BUTTON), p, late)
    assert t.refusal is Refusal.NEEDS_FIRST_FACTOR and t.after.status is Status.PENDING
    # approving again in the app opens a fresh window
    again = transition(t.after, Approve(Channel.APP), p, late)
    assert transition(again.after, Approve(Channel.BUTTON), p, late).after.status is (
        Status.APPROVED
    )


def test_all_two_app_approvals_are_not_two_factors() -> None:
    p = policy("all")
    one = transition(state(), Approve(Channel.APP), p, T0 + HOUR)
    two = transition(one.after, Approve(Channel.CLI), p, T0 + HOUR)
    assert two.after.status is Status.PENDING
    assert two.after.first_factor == Factor(Channel.CLI, T0 + HOUR)


@pytest.mark.parametrize("channel", list(Channel))
def test_all_any_single_channel_denies(channel: Channel) -> None:
    p = policy("all")
    one = transition(state(), Approve(Channel.APP), p, T0 + HOUR)
    t = transition(one.after, Deny(channel), p, T0 + HOUR)
    assert t.after.status is Status.DENIED


def test_all_confirmation_window_does_not_outlive_the_request() -> None:
    p = policy("all")
    s = state(exp=HOUR + timedelta(minutes=1))
    one = transition(s, Approve(Channel.APP), p, T0 + HOUR)
    press = transition(one.after, Approve(Channel.BUTTON), p, T0 + HOUR + timedelta(minutes=2))
    assert press.after.status is Status.EXPIRED and press.refusal is Refusal.EXPIRED


# -- properties --------------------------------------------------------------------------------

event_strategy = st.one_of(
    st.builds(Approve, st.sampled_from(list(Channel))),
    st.builds(Deny, st.sampled_from(list(Channel))),
    st.just(Tick()),
    st.builds(DeliverySucceeded, st.integers(0, 5)),
    st.builds(DeliveryFailed, st.just("x")),
    st.builds(Redeliver, st.sampled_from(list(Channel))),
)


@given(
    steps=st.lists(st.tuples(event_strategy, st.integers(0, 3600 * 30)), max_size=12),
    require=st.sampled_from(["any", "all"]),
)
def test_any_event_sequence_follows_the_diagram(
    steps: list[tuple[Event, int]], require: Literal["any", "all"]
) -> None:
    allowed = {
        Status.PENDING: {Status.PENDING, Status.APPROVED, Status.DENIED, Status.EXPIRED},
        Status.APPROVED: {Status.APPROVED, Status.DELIVERED, Status.FAILED},
        Status.DELIVERED: {Status.DELIVERED, Status.APPROVED},
        Status.FAILED: {Status.FAILED, Status.APPROVED},
    }
    p = policy(require, timeout=24 * HOUR)
    s = state(exp=20 * HOUR)
    now = T0
    for event, seconds in sorted(steps, key=lambda x: x[1]):
        now = max(now, T0 + timedelta(seconds=seconds))
        t = transition(s, event, p, now)
        assert t.after.status in allowed.get(s.status, {s.status})
        redelivery = isinstance(event, Redeliver)
        # A delivery and a redelivery write their own entries (release_started,
        # request_delivered/request_redelivered) before their effects.
        if t.status_changed and t.after.status is not Status.DELIVERED and not redelivery:
            assert isinstance(t.effects[0], Audit)
        if t.after.status is Status.APPROVED and t.status_changed and not redelivery:
            assert now < s.deadline(p)
            if require == "all":
                assert [f.channel for f in t.after.decided_by][-1] is Channel.BUTTON
                assert len(t.after.decided_by) == 2
        s = t.after


# -- redelivery (§5.2) -------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(Status))
def test_redeliver_only_from_delivered_acknowledged_or_failed(status: Status) -> None:
    t = transition(state(status), Redeliver(Channel.CLI), policy(), T0 + HOUR)
    if status in (Status.DELIVERED, Status.ACKNOWLEDGED, Status.FAILED):
        assert t.refusal is None and t.after.status is Status.APPROVED
        # no response and no audit entry of its own: release_started and
        # request_redelivered are written by the delivery
        assert t.effects == (StartDelivery(),)
    else:
        assert t.after.status is status and t.effects == ()
        assert t.refusal in (Refusal.NOT_DELIVERED, Refusal.EXPIRED, Refusal.NOT_APPROVED)


def test_redeliver_needs_the_same_channels_as_a_first_approval() -> None:
    cli_only = policy(channels=frozenset({Channel.CLI}))
    refused = transition(state(Status.DELIVERED), Redeliver(Channel.APP), cli_only, T0)
    assert refused.refusal is Refusal.CHANNEL_DISABLED and refused.effects == ()
    both = policy(require="all")
    first = transition(state(Status.DELIVERED), Redeliver(Channel.CLI), both, T0)
    assert first.after.status is Status.DELIVERED and first.after.first_factor is not None
    alone = transition(state(Status.DELIVERED), Redeliver(Channel.BUTTON), both, T0)
    assert alone.refusal is Refusal.NEEDS_FIRST_FACTOR
    late = transition(first.after, Redeliver(Channel.BUTTON), both, T0 + timedelta(minutes=6))
    assert late.refusal is Refusal.NEEDS_FIRST_FACTOR
    done = transition(first.after, Redeliver(Channel.BUTTON), both, T0 + timedelta(minutes=1))
    assert done.after.status is Status.APPROVED and done.effects == (StartDelivery(),)
