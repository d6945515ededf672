"""The approval coordinator over the real store, audit log and vault, delivering through an
in-process publisher: decisions, fail-closed auditing, expiry, two-factor approval, stored
decisions, crash recovery and release of real vault clips (decrypted with the stock age CLI)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from agent.approval.coordinator import ApprovalCoordinator
from agent.approval.machine import Policy
from agent.audit import AuditLog, verify_file
from agent.errors import ApprovalError, AuditWriteError, RequestNotFoundError
from agent.keys import kid_for
from agent.release.deliver import Deliverer
from agent.requests.store import RequestRecord, RequestStore
from agent.requests.verify import RequestPolicy, VerifiedRequest
from agent.vault import Vault
from agent.vocabulary import Channel, Status
from tests.test_release_deliver import LoopbackPublisher, age_decrypt_cli, age_files, make_job

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEVICE = "door-1"
REQUESTER = "police-7"


class Clock:
    """A settable clock for the coordinator."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class SelectiveAudit:
    """The real audit log, except that chosen events fail to be written."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.fail: set[str] = set()

    def append(self, event: str, **fields: object) -> object:
        if event in self.fail:
            raise AuditWriteError(f"disk full while writing {event}")
        return self.log.append(event, **fields)


@dataclass
class Harness:
    tmp: Path
    key: Ed25519PrivateKey
    identity: x25519.Identity
    clock: Clock
    store: RequestStore
    audit: SelectiveAudit
    vault: Vault
    publisher: LoopbackPublisher
    responses: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    led: list[bool] = field(default_factory=list)
    coordinators: list[ApprovalCoordinator] = field(default_factory=list)
    retries: int = 1

    def respond(self, request: RequestRecord, status: str, /, **claims: Any) -> None:
        self.responses.append((request.jti, status, claims))

    def coordinator(
        self,
        require: Literal["any", "all"] = "any",
        channels: tuple[str, ...] = ("button", "app", "cli"),
        indicator: Callable[[bool], None] | None = None,
        max_bytes: int | None = None,
    ) -> ApprovalCoordinator:
        policy = Policy.from_settings(channels, require, timedelta(hours=24), timedelta(minutes=5))

        def deliverer() -> Deliverer:
            return Deliverer(
                vault=self.vault,
                publisher=self.publisher,
                signing_key=self.key,
                topic_prefix="doorbell",
                chunk_bytes=64 * 1024,
                retries=self.retries,
                reconnect_timeout=1.0,
                now=self.clock,
            )

        c = ApprovalCoordinator(
            store=self.store,
            audit=self.audit,
            policy=policy,
            vault=self.vault,
            respond=self.respond,
            deliverer_factory=deliverer,
            device_id=DEVICE,
            now=self.clock,
            tick_interval=3600,
            indicator=indicator or self.led.append,
            max_bytes=max_bytes,
        )
        self.coordinators.append(c)
        return c

    def add_request(
        self, jti: str, *, received: datetime = T0, exp: timedelta = timedelta(days=2)
    ) -> None:
        req = VerifiedRequest(
            jti=jti,
            requester_id=REQUESTER,
            kind="law-enforcement",
            kid=kid_for(self.requester_key.public_key()),
            iat=received,
            exp=received + exp,
            window_start=T0 - timedelta(minutes=30),
            window_end=T0 - timedelta(minutes=5),
            reason="burglary next door",
            legal_basis="warrant",
            legal_ref="W-2026-17",
            case=None,
            recipient=str(self.identity.to_public()),
            claims={},
        )
        result = self.store.admit(req, RequestPolicy(device_id=DEVICE), received)
        assert isinstance(result, VerifiedRequest)

    requester_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    def _lines(self) -> list[str]:
        path = self.tmp / "audit.jsonl"
        return path.read_text().splitlines() if path.exists() else []

    def events(self) -> list[str]:
        return [json.loads(line)["event"] for line in self._lines()]

    def entries(self, event: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, self._lines()) if e["event"] == event]

    def status(self, jti: str) -> str:
        return self.store.get_request(jti).status


def open_harness(tmp_path: Path) -> Harness:
    """A store, audit log and vault in ``tmp_path`` with one enrolled requester."""
    key = Ed25519PrivateKey.generate()
    clock = Clock(T0 + timedelta(minutes=1))
    store = RequestStore(tmp_path / "requests.db", now=clock)
    audit = SelectiveAudit(AuditLog(tmp_path / "audit.jsonl", key, now=clock))
    vault = Vault(tmp_path, os.urandom(32), now=clock)
    harness = Harness(
        tmp_path, key, x25519.Identity.generate(), clock, store, audit, vault, LoopbackPublisher()
    )
    store.add_requester(
        REQUESTER, "City Police", "law-enforcement", harness.requester_key.public_key()
    )
    return harness


def close_harness(harness: Harness) -> None:
    """Stop every coordinator the harness made, then close the vault and the store."""
    for c in harness.coordinators:
        c.close()
    harness.vault.close()
    harness.store.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = open_harness(tmp_path)
    yield harness
    close_harness(harness)


def add_clip(h: Harness, minutes_before: int, size: int, seed: int) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    writer = h.vault.create_clip(T0 - timedelta(minutes=minutes_before), "video/x-msvideo")
    writer.write(data)
    info = writer.finish(T0 - timedelta(minutes=minutes_before - 1), frames=10)
    return info.id, data


JTI = "req-aaaaaaaaaaaaaaaa"
JTI2 = "req-bbbbbbbbbbbbbbbb"


def test_cli_approval_releases_real_vault_clips_in_order(h: Harness) -> None:
    clip_a = add_clip(h, 20, 200_000, 1)
    clip_b = add_clip(h, 10, 70_000, 2)
    add_clip(h, 120, 5_000, 3)  # outside the window: never released
    h.add_request(JTI)
    with h.coordinator() as c:
        assert h.led == [True]
        assert {hold.holder for hold in h.vault.holds()} == {JTI}
        result = c.decide(JTI, "approve", Channel.CLI)
        assert result.status is Status.APPROVED
        assert c.wait_idle(60)

    assert h.status(JTI) == "delivered"
    assert h.responses == [
        (JTI, "approved", {"channel": "cli", "clips": 2}),
        (JTI, "delivered", {"clips": 2}),
    ]
    assert h.events() == ["request_approved", "release_started", "request_delivered"]
    approved = h.entries("request_approved")[0]
    assert approved["channel"] == "cli" and approved["requester"] == REQUESTER
    assert approved["legal_ref"] == "W-2026-17" and approved["jti"] == JTI
    assert verify_file(h.tmp / "audit.jsonl", h.key.public_key()).ok
    assert h.vault.holds() == []
    assert h.led == [True, False]
    # what went out decrypts with the stock age CLI to exactly the recorded clips
    files = age_files(h.publisher.messages, make_job("", jti=JTI))
    delivered = h.entries("request_delivered")[0]
    assert [f["clip"] for f in delivered["files"]] == [clip_a[0], clip_b[0]]
    assert list(files) == [f["id"] for f in delivered["files"]]
    for (_clip_id, data), blob in zip((clip_a, clip_b), files.values(), strict=True):
        assert age_decrypt_cli(h.tmp, h.identity, blob) == data


def test_deny_sends_nothing_and_releases_the_hold(h: Harness) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    with h.coordinator() as c:
        assert c.decide(JTI, "deny", Channel.APP).status is Status.DENIED
        assert c.wait_idle(10)
    assert h.status(JTI) == "denied"
    assert h.responses == [(JTI, "denied", {"channel": "app"})]
    assert h.publisher.messages == []
    assert h.vault.holds() == []
    assert h.events() == ["request_denied"]


def test_fail_closed_when_the_approval_cannot_be_audited(h: Harness) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.audit.fail.add("request_approved")
    with h.coordinator() as c:
        with pytest.raises(AuditWriteError, match="disk full"):
            c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(10)
    # nothing happened: still pending, no response, nothing published, still held
    assert h.status(JTI) == "pending"
    assert h.responses == [] and h.publisher.messages == []
    assert {hold.holder for hold in h.vault.holds()} == {JTI}
    assert h.events() == []


@pytest.mark.parametrize("event", ["release_started", "request_delivered"])
def test_unauditable_release_fails_the_delivery_without_manifest(
    h: Harness, event: str
) -> None:
    """§7: release_started is durable before the first chunk, request_delivered before the
    manifest; either failing ends the delivery failed/delivery_error with no manifest."""
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.audit.fail.add(event)
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    record = h.store.get_request(JTI)
    assert (record.status, record.error) == ("failed", "delivery_error")
    assert f"{event} cannot be audited" in (record.detail or "")
    assert h.responses[-1] == (JTI, "failed", {"error": "delivery_error"})
    assert not any(t.endswith("/manifest") for t, _ in h.publisher.messages)
    if event == "release_started":
        assert h.publisher.messages == []  # not one chunk left
    else:
        assert h.publisher.messages  # the chunks went; nothing vouches for them
    assert h.store.newest_manifest(JTI) is None
    assert event not in h.events() and "request_failed" in h.events()


def test_errors_for_unknown_not_pending_and_disabled_channel(h: Harness) -> None:
    h.add_request(JTI)
    c = h.coordinator(channels=("button", "app"))
    with pytest.raises(RequestNotFoundError, match="no request 'nope-0000000000000000'"):
        c.decide("nope-0000000000000000", "approve", Channel.APP)
    with pytest.raises(ApprovalError, match="cli channel is not enabled"):
        c.decide(JTI, "approve", Channel.CLI)
    assert h.status(JTI) == "pending"
    c.decide(JTI, "deny", Channel.APP)
    with pytest.raises(ApprovalError, match=f"request {JTI} is not pending \\(it is denied\\)"):
        c.decide(JTI, "approve", Channel.APP)
    assert h.events() == ["request_denied"]


def test_revoked_meanwhile_cannot_be_approved(h: Harness) -> None:
    h.add_request(JTI)
    c = h.coordinator()
    h.store.revoke_requester(REQUESTER)
    with pytest.raises(ApprovalError, match="not pending: it was rejected \\(revoked\\)"):
        c.decide(JTI, "approve", Channel.CLI)
    assert h.responses == [] and h.events() == []


def test_timeout_expires_on_tick_and_late_decisions_are_refused(h: Harness) -> None:
    h.add_request(JTI)
    h.add_request(JTI2, exp=timedelta(hours=1))
    c = h.coordinator()
    c.recover()
    h.clock.now = T0 + timedelta(hours=1)
    c.tick()
    assert h.status(JTI2) == "expired" and h.status(JTI) == "pending"
    h.clock.now = T0 + timedelta(hours=24)
    with pytest.raises(ApprovalError, match=f"request {JTI} expired at 2026-03-02T12:00:00Z"):
        c.decide(JTI, "approve", Channel.CLI)
    assert h.status(JTI) == "expired"
    assert h.responses == [(JTI2, "expired", {}), (JTI, "expired", {})]
    causes = [e["cause"] for e in h.entries("request_expired")]
    assert causes == ["exp", "approval.timeout"]
    assert h.vault.holds() == []
    assert h.led[-1] is False


def test_button_press_approves_the_oldest_and_hold_denies_the_oldest(h: Harness) -> None:
    h.add_request(JTI, received=T0)
    h.add_request(JTI2, received=T0 + timedelta(seconds=30))
    with h.coordinator() as c:
        result = c.button_press()
        assert result is not None and result.jti == JTI and result.status is Status.APPROVED
        denied = c.button_hold()
        assert denied is not None and denied.jti == JTI2 and denied.status is Status.DENIED
        assert c.wait_idle(30)
        assert c.button_press() is None
        assert c.button_hold() is None
    assert h.status(JTI) == "delivered" and h.status(JTI2) == "denied"
    ignored = h.entries("button_ignored")
    assert [(e["action"], e["reason"]) for e in ignored] == [
        ("approve", "nothing pending"),
        ("deny", "nothing pending"),
    ]
    assert h.entries("request_approved")[0]["channel"] == "button"


def test_require_all_two_factors_survive_a_restart(h: Harness) -> None:
    h.add_request(JTI)
    c = h.coordinator("all")
    c.recover()
    # the button alone does nothing but an audited, ignored press
    assert c.button_press() is None
    assert h.entries("button_ignored")[0]["reason"] == (
        "no request was approved in the app or CLI within the confirmation window"
    )
    first = c.decide(JTI, "approve", Channel.CLI)
    assert first.status is Status.PENDING and first.awaiting_confirmation
    assert h.responses == [] and h.status(JTI) == "pending"
    c.close()
    # a restart inside the window keeps the first factor
    h.clock.now += timedelta(minutes=4)
    with h.coordinator("all") as again:
        result = again.button_press()
        assert result is not None and result.status is Status.APPROVED
        assert again.wait_idle(30)
    approved = h.entries("request_approved")[0]
    assert approved["channel"] == "button"
    assert [f["channel"] for f in approved["factors"]] == ["cli", "button"]
    assert h.responses[0] == (JTI, "approved", {"channel": "button", "clips": 0})


def test_require_all_button_after_the_window_is_ignored(h: Harness) -> None:
    h.add_request(JTI)
    c = h.coordinator("all")
    c.decide(JTI, "approve", Channel.APP)
    h.clock.now += timedelta(minutes=6)
    assert c.button_press() is None
    assert h.status(JTI) == "pending"
    # a hold still denies with one factor: refusing is always safe
    result = c.button_hold()
    assert result is not None and result.status is Status.DENIED


def test_stored_decisions_are_applied_at_start_as_of_when_they_were_made(h: Harness) -> None:
    h.add_request(JTI, exp=timedelta(hours=1))
    h.add_request(JTI2)
    c = h.coordinator()
    c.decisions.queue(JTI, "deny", Channel.CLI, T0 + timedelta(minutes=30))
    c.decisions.queue(JTI2, "approve", Channel.CLI, T0 + timedelta(minutes=31))
    c.decisions.queue("gone-0000000000000000", "approve", Channel.CLI, T0)
    # the daemon comes back after JTI's deadline: the owner decided in time, so it counts
    h.clock.now = T0 + timedelta(hours=2)
    with c:
        assert c.wait_idle(30)
    assert h.status(JTI) == "denied" and h.status(JTI2) == "delivered"
    assert h.entries("request_denied")[0]["made_at"] == "2026-03-01T12:30:00Z"
    settled = {d.jti: (d.state, d.note) for d in c.decisions.for_request("gone-0000000000000000")}
    assert settled["gone-0000000000000000"][0] == "refused"
    assert c.decisions.queued() == []


def test_approved_request_found_at_start_is_delivered_again(h: Harness) -> None:
    clip = add_clip(h, 20, 150_000, 5)
    h.add_request(JTI)
    c = h.coordinator()
    c.decide(JTI, "approve", Channel.CLI)  # not started: the delivery never runs ("crash")
    assert h.status(JTI) == "approved"
    # the crashed run had published part of an attempt
    h.publisher.messages.append(
        (f"doorbell/{DEVICE}/deliveries/{REQUESTER}/{JTI}/{clip[0]}/0", b"x")
    )
    h.responses.clear()
    with h.coordinator() as again:
        assert again.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert [s for _, s, _ in h.responses] == ["approved", "delivered"]
    files = age_files(h.publisher.messages, make_job("", jti=JTI))
    (released,) = h.entries("request_delivered")[0]["files"]
    # the new attempt has its own file id: the crashed run's chunk cannot be spliced in
    assert released["id"] != clip[0] and released["clip"] == clip[0]
    assert age_decrypt_cli(h.tmp, h.identity, files[released["id"]]) == clip[1]


def test_delivery_that_keeps_failing_ends_failed_and_audited(h: Harness) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.publisher.fail_at = set(range(1, 100))
    h.retries = 2
    with h.coordinator() as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    assert h.status(JTI) == "failed"
    assert [(s, c) for _, s, c in h.responses][1] == ("failed", {"error": "delivery_error"})
    failed = h.entries("request_failed")[0]
    assert failed["error"] == "delivery_error"
    assert "failed after 3 attempts" in failed["detail"]
    assert h.vault.holds() == []
    record = h.store.get_request(JTI)
    assert (record.error, record.detail is not None) == ("delivery_error", True)


def test_unanswered_final_responses_are_sent_again_at_start(h: Harness) -> None:
    h.add_request(JTI)
    c = h.coordinator()
    c.decide(JTI, "deny", Channel.CLI)
    assert h.store.get_request(JTI).responded is None  # nobody acknowledged it
    h.responses.clear()
    h.coordinator().recover()
    assert h.responses == [(JTI, "denied", {"channel": "cli"})]
    h.store.mark_responded(JTI, "denied")
    h.responses.clear()
    h.coordinator().recover()
    assert h.responses == []
