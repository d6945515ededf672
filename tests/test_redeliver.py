"""What a release records (§7), the owner's redeliver (§5.2) and ``delivery.max_bytes`` (§5.1),
through the approval coordinator over the real store, audit log and vault."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.audit import verify_file
from agent.errors import ApprovalError
from agent.release.manifest import verify_manifest
from agent.vocabulary import Channel, Status
from tests.test_approval_coordinator import (
    DEVICE,
    JTI,
    JTI2,
    REQUESTER,
    Harness,
    add_clip,
    close_harness,
    open_harness,
)
from tests.test_release_deliver import age_decrypt_cli, age_files, make_job


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = open_harness(tmp_path)
    yield harness
    close_harness(harness)


def manifests(h: Harness) -> list[bytes]:
    return [p for t, p in h.publisher.messages if t.endswith("/manifest")]


def deliver(h: Harness, jti: str = JTI) -> None:
    with h.coordinator() as c:
        c.decide(jti, "approve", Channel.CLI)
        assert c.wait_idle(30)
    assert h.status(jti) == "delivered"


def test_release_entries_say_what_left_and_open_the_commitments(h: Harness) -> None:
    clip_id, data = add_clip(h, 20, 90_000, 1)
    h.add_request(JTI)
    deliver(h)
    started = h.entries("release_started")[0]
    delivered = h.entries("request_delivered")[0]
    (token,) = manifests(h)
    manifest = verify_manifest(
        token, h.key.public_key(), device_id=DEVICE, requester_id=REQUESTER, jti=JTI
    )
    (entry,) = manifest.clips
    assert started["attempt"] == delivered["attempt"] == manifest.attempt == 1
    assert started["files"] == [{"id": entry.id, "start": delivered["files"][0]["start"],
                                 "end": delivered["files"][0]["end"]}]
    (file,) = delivered["files"]
    assert file["id"] == entry.id and file["sha256"] == entry.sha256
    assert file["plaintext_sha256"] == entry.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert file["source"] == {"commitment": entry.source}
    assert delivered["manifest_sha256"] == hashlib.sha256(token).hexdigest()
    # the owner's entry opens the commitment: salt, clip id and the clip's hash
    assert file["clip"] == clip_id and file["clip_sha256"] == hashlib.sha256(data).hexdigest()
    opened = hmac.new(
        bytes.fromhex(delivered["salt"]), f"{clip_id}\n{file['clip_sha256']}".encode(),
        hashlib.sha256,
    ).hexdigest()
    assert opened == entry.source
    # the manifest itself names neither the clip nor the salt
    assert clip_id.encode() not in token and delivered["salt"].encode() not in token
    events = h.events()
    assert events.index("release_started") < events.index("request_delivered")
    assert h.store.newest_manifest(JTI) is not None
    assert verify_file(h.tmp / "audit.jsonl", h.key.public_key()).ok


def test_redeliver_sends_the_same_window_again_with_fresh_ids(h: Harness) -> None:
    _, data = add_clip(h, 20, 70_000, 2)
    h.add_request(JTI)
    deliver(h)
    first = h.entries("request_delivered")[0]
    with h.coordinator() as c:
        h.responses.clear()  # (the harness never marks a response sent: start resends it)
        result = c.redeliver(JTI, Channel.CLI)
        assert result.status is Status.APPROVED
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"
    again = h.entries("request_redelivered")[0]
    assert again["attempt"] == 2
    assert [f["plaintext_sha256"] for f in again["files"]] == [
        f["plaintext_sha256"] for f in first["files"]
    ]
    assert not {f["id"] for f in again["files"]} & {f["id"] for f in first["files"]}
    assert again["salt"] == first["salt"]
    token = manifests(h)[-1]
    manifest = verify_manifest(
        token, h.key.public_key(), device_id=DEVICE, requester_id=REQUESTER, jti=JTI
    )
    assert manifest.attempt == 2
    assert again["manifest_sha256"] == hashlib.sha256(token).hexdigest()
    newest = h.store.newest_manifest(JTI)
    assert newest is not None and newest.attempt == 2
    # only the delivered response again (no second "approved")
    assert [s for _, s, _ in h.responses] == ["delivered"]
    files = age_files(h.publisher.messages, make_job("", jti=JTI))
    assert age_decrypt_cli(h.tmp, h.identity, files[again["files"][0]["id"]]) == data
    # only a receipt for attempt 2's manifest acknowledges it
    def record(attempt: int) -> None:
        h.audit.append("delivery_acknowledged", jti=JTI, attempt=attempt)

    assert not h.store.acknowledge(JTI, REQUESTER, first["manifest_sha256"], record)
    assert h.store.acknowledge(JTI, REQUESTER, again["manifest_sha256"], record)
    assert h.status(JTI) == "acknowledged"
    assert h.entries("delivery_acknowledged")[0]["attempt"] == 2
    # an acknowledged request can be sent again too: attempt 3
    with h.coordinator() as c:
        c.redeliver(JTI, Channel.APP)
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert h.entries("request_redelivered")[-1]["attempt"] == 3


def test_redeliver_after_a_delivery_error(h: Harness) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.audit.fail.add("request_delivered")
    deliver_fails = h.coordinator()
    with deliver_fails as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    assert (h.status(JTI), h.store.get_request(JTI).error) == ("failed", "delivery_error")
    h.audit.fail.clear()
    with h.coordinator() as c:
        c.redeliver(JTI, Channel.CLI)
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert h.entries("request_redelivered")[0]["attempt"] == 2


def test_redeliver_refusals_say_why_and_change_nothing(h: Harness) -> None:
    clip_id, _ = add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    h.add_request(JTI2)
    c = h.coordinator()
    with pytest.raises(ApprovalError, match=f"request {JTI} cannot be redelivered: it is pending"):
        c.redeliver(JTI, Channel.CLI)
    deliver(h, JTI)
    deliver(h, JTI2)
    events = h.events()
    # footage of the window shredded since it was released
    h.vault.delete_clip(clip_id, "owner")
    with pytest.raises(ApprovalError, match=f"footage of its window was shredded.*{clip_id}"):
        c.redeliver(JTI, Channel.CLI)
    # a revoked requester
    h.store.revoke_requester(REQUESTER)
    with pytest.raises(ApprovalError, match=f"its requester {REQUESTER} was revoked"):
        c.redeliver(JTI2, Channel.CLI)
    assert h.status(JTI) == h.status(JTI2) == "delivered"
    assert h.events() == events
    assert len(manifests(h)) == 2


def test_redeliver_with_require_all_needs_the_button(h: Harness) -> None:
    add_clip(h, 20, 10_000, 1)
    h.add_request(JTI)
    with h.coordinator(require="all") as c:
        assert c.decide(JTI, "approve", Channel.APP).awaiting_confirmation
        assert c.button_press() is not None
        assert c.wait_idle(30)
        assert h.status(JTI) == "delivered"
        # the first approval's factor does not count for the redelivery
        with pytest.raises(ApprovalError, match="redeliver"):
            c.redeliver(JTI, Channel.BUTTON)
        h.clock.now += timedelta(minutes=1)
        first = c.redeliver(JTI, Channel.CLI)
        assert first.awaiting_confirmation and h.status(JTI) == "delivered"
        h.clock.now += timedelta(minutes=1)
        pressed = c.button_press()
        assert pressed is not None and pressed.status is Status.APPROVED
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"
    assert h.entries("request_redelivered")[0]["attempt"] == 2


def test_approval_over_delivery_max_bytes_is_refused(h: Harness) -> None:
    add_clip(h, 20, 300_000, 1)
    h.add_request(JTI)
    with h.coordinator(max_bytes=100_000) as c:
        with pytest.raises(ApprovalError, match=r"more than delivery.max_bytes \(100000 bytes\)"):
            c.decide(JTI, "approve", Channel.CLI)
        assert h.status(JTI) == "pending"
        assert h.events() == [] and h.publisher.messages == []
    with h.coordinator(max_bytes=10_000_000) as c:
        c.decide(JTI, "approve", Channel.CLI)
        assert c.wait_idle(30)
    assert h.status(JTI) == "delivered"


def test_redeliver_over_delivery_max_bytes_is_refused(h: Harness) -> None:
    add_clip(h, 20, 300_000, 1)
    h.add_request(JTI)
    deliver(h)
    events = h.events()
    with (
        h.coordinator(max_bytes=100_000) as c,
        pytest.raises(ApprovalError, match=r"more than delivery.max_bytes"),
    ):
        c.redeliver(JTI, Channel.CLI)
    assert h.status(JTI) == "delivered" and h.events() == events
    assert len(manifests(h)) == 1
