"""The transparency report's pure parts: release seconds from the request log and the tallies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.audit import AuditEntry
from agent.report import build_report, released_seconds, seconds_text
from agent.requests.store import Requester, RequestRecord

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def entry(seq: int, event: str, **fields: Any) -> AuditEntry:
    return AuditEntry(seq, "2026-12-06T12:00:00Z", event, fields, "0" * 64, "", b"")


def files(*spans: tuple[str, str]) -> list[dict[str, str]]:
    return [{"id": f"f{i}", "start": a, "end": b} for i, (a, b) in enumerate(spans)]


def test_released_seconds_counts_file_spans_once_per_request() -> None:
    log = [
        entry(1, "clip_recorded", start="2026-12-06T11:00:00Z", end="2026-12-06T11:10:00Z"),
        entry(2, "request_delivered", jti="a", files=files(
            ("2026-12-06T11:00:00Z", "2026-12-06T11:00:30Z"),
            ("2026-12-06T11:05:00Z", "2026-12-06T11:05:15.500Z"),
        )),
        entry(3, "request_delivered", jti="b", clips=0, files=[]),
        # a re-delivery sends the same window again: it replaces, it does not add
        entry(4, "request_redelivered", jti="a", files=files(
            ("2026-12-06T11:00:00Z", "2026-12-06T11:00:30Z"),
            ("2026-12-06T11:05:00Z", "2026-12-06T11:05:15.500Z"),
        )),
        entry(5, "request_delivered", jti="c", clips=2),  # no spans recorded
        entry(6, "request_delivered", jti="d", files=[{"start": "garbage"}]),
    ]
    assert released_seconds(log) == {"a": 45.5, "b": 0.0, "d": 0.0}


def record(jti: str, rid: str, status: str, minute: int, clips: int | None = None) -> RequestRecord:
    at = T0 + timedelta(minutes=minute)
    return RequestRecord(
        jti=jti, requester_id=rid, requester_name=rid.title(), kind="neighbor", kid="k",
        window_start=at - timedelta(minutes=10), window_end=at, reason="r",
        legal_basis="consent", legal_ref=None, case=None, recipient=None, iat=at,
        exp=at + timedelta(days=1), received_at=at, status=status, error=None, detail=None,
        channel=None, decided_at=None, clips=clips, finished_at=None, correlation=None,
        responded=None, updated_at=at,
    )


def test_tallies_per_requester_kind_and_since() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    enrolled = [Requester("police", "City Police", "law-enforcement", key, "k", None, T0, None),
                Requester("acme", "Acme", "insurer", key, "k", None, T0, None)]
    records = [
        record("1", "police", "delivered", 1, clips=1),
        record("2", "police", "denied", 2),
        record("3", "police", "failed", 3, clips=1),
        record("4", "bob", "expired", 4),  # no longer enrolled: kept, shown as revoked
        record("5", "bob", "rejected", 5),
    ]
    report = build_report(records, enrolled, {"1": 30.0})
    police, bob, acme = report.requesters
    assert (police.id, bob.id, acme.id) == ("police", "bob", "acme")
    assert (police.tally.received, police.tally.approved, police.tally.denied) == (3, 2, 1)
    assert police.tally.seconds_released == 30.0  # a failed delivery released nothing
    assert bob.revoked and (bob.tally.expired, bob.tally.rejected) == (1, 1)
    assert acme.tally.received == 0 and acme.tally.last_request is None
    assert list(report.kinds) == ["law-enforcement", "neighbor", "insurer"]
    assert report.kinds["neighbor"].received == 2
    assert report.total.received == 5 and report.total.last_request == T0 + timedelta(minutes=5)
    later = build_report(records, enrolled, {}, since=T0 + timedelta(minutes=3))
    assert later.total.received == 3 and later.requesters[0].id == "bob"
    # without logged spans, a release that sent a clip counts its approved window
    assert build_report(records[:1], enrolled, {}).total.seconds_released == 600.0


def test_seconds_text() -> None:
    assert [seconds_text(s) for s in (0, 45.4, 60, 600, 605, 3600, 3900)] == [
        "0 s", "45 s", "1 min", "10 min", "10 min 5 s", "1 h", "1 h 5 min",
    ]
