"""What approving releases (contract §5.1): the owner's preview, its binding to the approval, and
where it never appears. Real vault, real clips, real cut, the app through its ASGI client and
the CLI through ``main``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.approval.worker import previewer
from agent.audit import read_entries
from agent.cli import main
from agent.errors import ApprovalError, PreviewChangedError
from agent.release.cut import WindowCutter
from agent.release.preview import build_preview, clock_length, sentence
from agent.vault import Vault
from agent.vocabulary import Channel
from tests.test_release_cut import record_h264
from tests.web.harness import WebHarness, close_harness, make_harness


@pytest.fixture
def web(tmp_path: Path) -> Iterator[WebHarness]:
    harness = make_harness(tmp_path)
    yield harness
    close_harness(harness)


def whole_second(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def hms(moment: datetime) -> str:
    return f"{moment.astimezone():%H:%M:%S}"


def footage(web: WebHarness) -> tuple[datetime, str]:
    """A 30 s clip recorded 10 minutes ago and a pending request for 5 s of it."""
    t0 = whole_second(web.clock() - timedelta(minutes=10))
    web.record_clip(t0, frames=300, fps=10.0)
    jti = web.submit_request(window=(t0 + timedelta(seconds=13), t0 + timedelta(seconds=18)))
    return t0, jti


def test_the_preview_says_what_leaves_to_whom_like_the_issue_asks(web: WebHarness) -> None:
    t0, jti = footage(web)
    preview = web.coordinator.preview(jti)
    assert preview is not None
    (f,) = preview.files
    span = (t0 + timedelta(seconds=13), t0 + timedelta(seconds=18))
    assert (f.start, f.end, f.frames) == (*span, 51)
    assert sentence(preview) == (
        f"Release 0:05 of footage (1 file, {hms(f.start)}-{hms(f.end)}) to City Police Dept."
    )
    doc = preview.to_json()
    assert doc["recipient"]["name"] == "City Police Dept."
    assert doc["recipient"]["kind"] == "law-enforcement"
    assert doc["recipient"]["kid"] == web.request(jti).kid
    assert doc["bytes_estimate"] > 0 and doc["exceeds_max_bytes"] is False
    assert clock_length(3723) == "1:02:03" and clock_length(65.4) == "1:05"


def test_an_approval_binds_to_the_preview_and_never_leaks_it_before(web: WebHarness) -> None:
    _, jti = footage(web)
    preview = web.coordinator.preview(jti)
    assert preview is not None
    before = [e.to_dict() for e in read_entries(web.audit.path)]
    assert all("preview" not in e for e in before)
    web.coordinator.decide(jti, "approve", Channel.APP, preview=preview.fingerprint)
    assert web.coordinator.wait_idle(30)
    (approved,) = [e for e in read_entries(web.audit.path) if e.event == "request_approved"]
    assert approved.fields["preview"] == {
        "fingerprint": preview.fingerprint, "files": 1, "seconds": 5.1,
        "bytes_estimate": preview.stored_bytes,
    }
    for _, _, claims in web.responses:
        assert "preview" not in claims and preview.fingerprint not in json.dumps(claims)


def test_an_approval_of_a_preview_that_changed_is_refused(web: WebHarness) -> None:
    t0, jti = footage(web)
    shown = web.coordinator.preview(jti)
    assert shown is not None
    # More footage of the window turns up (a clip finished after the owner looked).
    web.record_clip(t0 + timedelta(seconds=16.5), frames=10, fps=10.0)
    events = web.audit_events()
    with pytest.raises(PreviewChangedError, match="changed since it was shown"):
        web.coordinator.decide(jti, "approve", Channel.APP, preview=shown.fingerprint)
    assert web.request(jti).status == "pending"
    assert web.audit_events() == events  # nothing approved, nothing written
    now = web.coordinator.preview(jti)
    assert now is not None and len(now.files) == 2
    web.coordinator.decide(jti, "approve", Channel.APP, preview=now.fingerprint)
    assert web.request(jti).status in ("approved", "delivered")


def test_an_approval_over_delivery_max_bytes_is_refused(web: WebHarness) -> None:
    _, jti = footage(web)
    # The device's setting, as the daemon wires it, at a cap below this window's footage.
    web.coordinator._previewer = previewer(web.vault, 1024)
    preview = web.coordinator.preview(jti)
    assert preview is not None and preview.exceeds
    events = web.audit_events()
    with pytest.raises(ApprovalError, match=r"more than delivery\.max_bytes") as info:
        web.coordinator.decide(jti, "approve", Channel.CLI)
    assert info.value.hint is not None and "delivery.max_bytes" in info.value.hint
    assert web.request(jti).status == "pending" and web.audit_events() == events
    web.coordinator.decide(jti, "deny", Channel.CLI)  # denying needs no preview
    assert web.request(jti).status == "denied"


def test_the_app_shows_the_preview_with_a_cancel_and_refuses_a_stale_one(
    web: WebHarness,
) -> None:
    token = web.login()
    t0, jti = footage(web)
    preview = web.coordinator.preview(jti)
    assert preview is not None
    page = web.client.get("/requests").text
    card = page.split(f'id="req-{jti}"')[1].split("</article>")[0]
    assert sentence(preview) in card
    assert f'name="preview" value="{preview.fingerprint}"' in card
    assert 'data-action="cancel"' in card and 'href="/requests?closed=' in card
    web.record_clip(t0 + timedelta(seconds=16.5), frames=10, fps=10.0)
    r = web.client.post(
        f"/requests/{jti}/approve", data={"csrf_token": token, "preview": preview.fingerprint}
    )
    assert r.status_code == 200
    assert "changed since it was shown" in r.text and "Release 0:06 of footage (2 files" in r.text
    assert web.request(jti).status == "pending" and web.publisher.messages == []
    # The page now offers the new preview; a form without one is refused the same way.
    fresh = web.coordinator.preview(jti)
    assert fresh is not None and f'value="{fresh.fingerprint}"' in r.text
    r = web.client.post(f"/requests/{jti}/approve", data={"csrf_token": token})
    assert "changed since it was shown" in r.text and web.request(jti).status == "pending"
    api = web.client.get(f"/api/requests/{jti}").json()
    assert api["preview"]["fingerprint"] == fresh.fingerprint
    r = web.client.post(f"/api/requests/{jti}/approve", headers={"x-csrf-token": token},
                        json={"preview": preview.fingerprint})
    assert r.status_code == 409 and r.json()["preview"]["fingerprint"] == fresh.fingerprint
    r = web.client.post(
        f"/requests/{jti}/approve", data={"csrf_token": token, "preview": fresh.fingerprint}
    )
    assert "Approved the request of City Police Dept.: sending 2 clips." in r.text


def write_config(web: WebHarness) -> Path:
    path = web.state.parent / "agent.yaml"
    path.write_text(f"device_id: front-door\nstate_dir: {web.state}\n")
    return path


def test_requests_show_and_pending_say_what_approving_releases(
    web: WebHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    _, jti = footage(web)
    config = write_config(web)
    preview = web.coordinator.preview(jti)
    assert preview is not None
    assert main(["--config", str(config), "requests", "show", jti]) == 0
    out = capsys.readouterr().out
    assert f"approving:   {sentence(preview)}" in out
    assert f"key {web.request(jti).kid}" in out and "estimate" in out
    assert f"preview:     {preview.fingerprint}" in out
    assert main(["--config", str(config), "requests", "show", jti, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["preview"] == preview.to_json() and doc["released"] == []
    assert doc["acknowledged"] is False
    assert main(["--config", str(config), "pending"]) == 0
    assert f"approving:   {sentence(preview)}" in capsys.readouterr().out
    assert main(["--config", str(config), "pending", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["preview"]["seconds"] == 5.1
    # Once delivered: what left, and no preview any more.
    web.coordinator.decide(jti, "approve", Channel.APP, preview=preview.fingerprint)
    assert web.coordinator.wait_idle(30)
    assert main(["--config", str(config), "requests", "show", jti, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "delivered" and doc["preview"] is None
    (delivered,) = [e for e in doc["released"] if e["event"] == "request_delivered"]
    if "files" in delivered:
        # With the files of the release in the log: they are the ones the preview announced.
        assert [(f["start"], f["end"], f["frames"]) for f in delivered["files"]] == [
            (f["start"], f["end"], f["frames"]) for f in preview.to_json()["files"]
        ]
    assert doc["acknowledged"] is False
    assert main(["--config", str(config), "requests", "show", jti]) == 0
    assert "acknowledged: no" in capsys.readouterr().out
    assert main(["--config", str(config), "requests", "show", "nosuchrequest123"]) == 1


T0 = datetime(2026, 12, 6, 13, 36, 20, tzinfo=UTC)


class _Request:
    """The request fields a preview reads."""

    jti = "property-test-0001"
    requester_id = "city-police"
    requester_name = "City Police Dept."
    kind = "law-enforcement"
    kid = "kid"
    recipient = "age1x"

    def __init__(self, start: datetime, end: datetime) -> None:
        self.window_start = start
        self.window_end = end


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    state = tmp_path_factory.mktemp("prop") / "state"
    state.mkdir(mode=0o700)
    with Vault(state, bytes(range(32))) as vault:
        record_h264(vault, T0, 30)  # 0.0 .. 2.9 s
        record_h264(vault, T0 + timedelta(seconds=5), 30, first_n=50)  # 5.0 .. 7.9 s
        yield vault


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=st.integers(0, 90), length=st.integers(1, 60))
def test_the_preview_is_what_the_cut_produces(two_clips: Vault, a: int, length: int) -> None:
    start = T0 + timedelta(seconds=a / 10 - 0.03)
    end = start + timedelta(seconds=length / 10)
    cutter = WindowCutter(two_clips)
    preview = build_preview(_Request(start, end), cutter, 1 << 30)
    made = []
    for clip in two_clips.list_clips():
        cut = cutter.cut(clip.id, start, end)
        if cut is None:
            continue
        data = b""
        while chunk := cut.stream.read(65536):
            data += chunk
        cut.close()
        with av.open(io.BytesIO(data), mode="r") as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded == cut.frames
        made.append((clip.id, cut.start, cut.end, cut.frames))
    assert [(f.clip_id, f.start, f.end, f.frames) for f in preview.files] == made
