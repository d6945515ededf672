"""Pages written for a homeowner (issue 15): playing times from frame counts, one time format
with its zone, the audit log as sentences with filters, a status page without debug output,
the transparency report in the app, the API and the CLI, and figures that agree."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.audit import AuditLog, read_entries
from agent.cli import main
from agent.paths import ACTIVITY_FILE
from agent.timeutil import format_size, parse_rfc3339
from agent.vocabulary import Channel
from agent.web import views
from agent.web.server import AppServer
from tests.web.harness import WebHarness, close_harness, make_harness

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_300_frame_clip_at_10_fps_plays_30_seconds(web: WebHarness) -> None:
    web.login()
    clip = web.record_clip(web.clock() - timedelta(minutes=5), frames=300, fps=10.0)
    assert (clip.end - clip.start).total_seconds() == pytest.approx(29.9)
    assert "0:30" in web.client.get("/clips").text
    page = web.client.get(f"/clips/{clip.id}").text
    assert "0:30 · 300 frames" in page and "29 s" not in page
    assert web.client.get(f"/api/clips/{clip.id}").json()["clip"]["duration_s"] == 30.0


def test_every_time_carries_the_zone(web: WebHarness) -> None:
    web.web.tz = BERLIN
    web.login()
    web.record_clip(web.clock() - timedelta(minutes=5))
    web.submit_request()
    for path in ("/requests", "/clips", "/audit", "/requesters", "/status", "/report"):
        page = web.client.get(path).text
        assert (" CET" in page or " CEST" in page), path
    assert views.human_time(web.clock(), BERLIN).endswith(("CET", "CEST"))


def _expected_window(web: WebHarness, jti: str) -> str:
    record = web.request(jti)
    return views.human_window(record.window_start, record.window_end, BERLIN)


def test_audit_entries_read_as_sentences_window_start_first(web: WebHarness) -> None:
    web.web.tz = BERLIN
    web.login()
    start = web.clock().replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=1)
    approved = web.submit_request(window=(start, start + timedelta(minutes=30)))
    web.coordinator.decide(approved, "approve", Channel.BUTTON)
    denied = web.submit_request("Neighbour dispute", legal_basis="consent", legal_ref=None,
                                case=None, window=(start, start + timedelta(minutes=10)))
    web.coordinator.decide(denied, "deny", Channel.APP)
    assert web.coordinator.wait_idle(30)
    page = web.client.get("/audit").text
    window = _expected_window(web, approved)
    assert window.index("13:00") < window.index("13:30")  # start first, in Berlin time
    sentence = (f"City Police Dept. asked for {window} on warrant W-2026-0042, case C-17 "
                "— you approved it with the button.")
    assert sentence in page
    assert (f"City Police Dept. asked for {_expected_window(web, denied)} with consent "
            "— you denied it in the app; nothing was sent.") in page
    assert "You enrolled City Police Dept. (Law enforcement) as a requester." in page
    assert "Request approved" in page and "Requester enrolled" in page  # human event names


def test_audit_filters_by_kind_requester_and_day(web: WebHarness) -> None:
    web.login()
    jti = web.submit_request()
    web.coordinator.decide(jti, "deny", Channel.APP)
    assert web.coordinator.wait_idle(30)
    web.audit.append("agent_started", version="test")
    decisions = web.client.get("/api/audit?kind=decisions").json()["entries"]
    assert [e["event"] for e in decisions] == ["request_denied"]
    page = web.client.get("/audit?kind=decisions").text
    assert 'data-event="request_denied"' in page and 'data-event="request_pending"' not in page
    assert '<option value="decisions" selected>Your decisions</option>' in page
    today = web.clock().astimezone().date()
    assert len(web.client.get(f"/api/audit?date={today}").json()["entries"]) == len(
        web.audit_events()
    )
    assert web.client.get(f"/api/audit?date={today - timedelta(days=1)}").json()["entries"] == []
    both = web.client.get("/audit?kind=device&requester=city-police").text
    assert "Nothing matches." in both
    assert web.client.get("/api/audit?kind=spying").status_code == 400
    assert web.client.get("/api/audit?date=yesterday").status_code == 400
    # the export follows the same filters
    export = json.loads(web.client.get("/api/audit/export?kind=decisions").content)
    assert [e["event"] for e in export] == ["request_denied"]


def test_status_page_reads_like_a_status_page(web: WebHarness) -> None:
    web.login()
    web.record_clip(web.clock() - timedelta(minutes=5))
    page = web.client.get("/status").text
    api = web.client.get("/api/status").json()
    assert page.count("Retention") == 0 and page.count("kept for 7 days") == 1
    assert "free bytes" not in page and "stored bytes" not in page
    stored = format_size(api["stored_bytes"])  # one figure, one source
    assert f"{stored} of 1.0 GiB used by 1 clip" in page
    assert f"{stored} of 1.0 GiB used." in page


def test_stats_after_stop_do_not_fail(tmp_path: Path) -> None:
    h = make_harness(tmp_path, with_tls=True)
    server = AppServer(h.web, host="127.0.0.1", port=0, certfile=h.state / "tls" / "cert.pem",
                       keyfile=h.state / "tls" / "key.pem")
    stop = threading.Event()
    runner = threading.Thread(target=server.run, args=(stop,))
    try:
        runner.start()
        for _ in range(600):
            if server.serving:
                break
            stop.wait(0.05)
        port = server.port
        assert port != 0
    finally:
        stop.set()
        runner.join(30)
        close_harness(h)
    # status.json is written once more after the stop: the closed socket must not break it
    assert server.stats() == {"url": f"https://localhost:{port}", "serving": False,
                               "sessions": 0}


def _report_scene(web: WebHarness) -> tuple[str, str, str]:
    web.record_clip(web.clock() - timedelta(minutes=20), frames=30)
    now = web.clock()
    approved = web.submit_request(window=(now - timedelta(minutes=25), now - timedelta(minutes=15)))
    web.coordinator.decide(approved, "approve", Channel.APP)
    denied = web.submit_request("second")
    web.coordinator.decide(denied, "deny", Channel.BUTTON)
    pending = web.submit_request("third")
    assert web.coordinator.wait_idle(30)
    return approved, denied, pending


def test_report_counts_requests_per_requester_and_kind(web: WebHarness) -> None:
    web.login()
    approved, _, _ = _report_scene(web)
    doc = web.client.get("/api/report").json()
    police = doc["requesters"][0]
    assert police["id"] == "city-police" and police["kind"] == "law-enforcement"
    assert (police["received"], police["approved"], police["denied"], police["expired"],
            police["pending"]) == (3, 1, 1, 0, 1)
    # the spans of the files that left, as request_delivered records them (§7)
    (delivered,) = [e for e in read_entries(web.audit.path) if e.event == "request_delivered"]
    spans = [
        (parse_rfc3339(f["start"]), parse_rfc3339(f["end"])) for f in delivered.fields["files"]
    ]
    released = sum((b - a).total_seconds() for a, b in spans)
    assert released > 0 and police["seconds_released"] == released
    assert doc["kinds"] == [{"kind": "law-enforcement", **{k: police[k] for k in (
        "received", "approved", "denied", "expired", "rejected", "pending",
        "seconds_released", "last_request")}}]
    # the same figures as the Requests page (one source: the request store)
    assert web.request(approved).status == "delivered"
    page = web.client.get("/report").text
    assert "Transparency report" in page
    assert "Law enforcement" in page and "City Police Dept." in page
    assert web.client.get("/report?since=someday").status_code == 400


def test_report_never_moves_with_camera_activity(web: WebHarness) -> None:
    web.login()
    _report_scene(web)
    before = web.client.get("/api/report").json()
    for minutes in (50, 40, 30):
        web.record_clip(web.clock() - timedelta(minutes=minutes))
    web.vault.delete_clip(web.vault.list_clips()[0].id, "owner")
    assert web.client.get("/api/report").json() == before


def test_report_cli_text_json_and_since(
    web: WebHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _report_scene(web)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"device_id: front-door\nstate_dir: {web.state}\n")
    capsys.readouterr()
    assert main(["--config", str(cfg), "report", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    web.login()
    assert doc == web.client.get("/api/report").json()  # CLI and app agree
    assert main(["--config", str(cfg), "report"]) == 0
    text = capsys.readouterr().out
    assert "City Police Dept. (city-police)" in text
    assert "law-enforcement" in text and "Total" in text
    tomorrow = (web.clock() + timedelta(days=1)).astimezone().date().isoformat()
    assert main(["--config", str(cfg), "report", "--json", "--since", tomorrow]) == 0
    later = json.loads(capsys.readouterr().out)
    assert later["total"]["received"] == 0 and later["requesters"][0]["received"] == 0
    assert main(["--config", str(cfg), "report", "--since", "last week"]) == 2
    assert "doorbell-agent: error: --since 'last week' is not a date" in capsys.readouterr().err


def test_audit_page_shows_each_log_on_its_own_tab(web: WebHarness) -> None:
    """The camera and owner log (activity.jsonl) is on the audit page too, apart from the
    request log: each has its own chain check, seq numbers, filters and export."""
    activity = AuditLog(web.state / ACTIVITY_FILE, web.key, now=web.clock)
    web.web.services.activity = activity
    web.login()  # the login goes to the activity log
    web.submit_request()
    activity.append("clip_recorded", clip="20261206T120000Z-abc", frames=300)
    requests_page = web.client.get("/audit").text
    assert "Camera and owner" in requests_page
    assert "request_pending" in requests_page and "clip_recorded" not in requests_page
    camera_page = web.client.get("/audit?log=activity").text
    assert "clip_recorded" in camera_page and "request_pending" not in camera_page
    assert "app_login" in camera_page
    api = web.client.get("/api/audit?log=activity").json()
    assert api["verify"]["ok"] and api["verify"]["entries"] == 2
    assert [e["event"] for e in api["entries"]] == ["clip_recorded", "app_login"]
    export = web.client.get("/api/audit/export?log=activity")
    assert "activity-" in export.headers["content-disposition"]
    assert [e["event"] for e in json.loads(export.content)] == ["app_login", "clip_recorded"]
    assert web.client.get("/api/audit?log=secret").status_code == 400
    # A changed activity log is reported on its own tab; the request log still checks out.
    lines = activity.path.read_bytes().splitlines()
    activity.path.write_bytes(b"\n".join([lines[0].replace(b"app_login", b"app_logon"),
                                          *lines[1:]]) + b"\n")
    assert not web.client.get("/api/audit?log=activity").json()["verify"]["ok"]
    assert web.client.get("/api/audit").json()["verify"]["ok"]
