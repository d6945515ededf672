"""The app's pages and JSON API over a real device state: requests decided through the real
approval coordinator (delivered through the real Deliverer), clips recorded by the camera's
recorder into the real vault and played back, the audit log, requesters, status."""

from __future__ import annotations

import hashlib
import html
import json
import re
from datetime import timedelta
from pathlib import Path

from pyrage import decrypt

from agent.audit import read_entries
from agent.camera.media import iter_jpegs
from agent.keys import kid_for, public_jwk
from tests.clips import jpeg_frame
from tests.web.harness import REQUESTER, WebHarness, close_harness, make_harness

MARKUP_REASON = (
    '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"\n'
    "second line <b>not bold</b>"
)


def test_reason_with_markup_renders_as_text(web: WebHarness) -> None:
    web.login()
    web.submit_request(MARKUP_REASON, case="<i>case</i>", legal_ref="<u>W-1</u>")
    page = web.client.get("/requests").text
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>not" not in page
    shown = re.findall(r'<p class="reason">(.*?)</p>', page, re.S)
    # Verbatim, as text; the newline shown as \n (issue 10: requester text cannot break lines).
    assert [html.unescape(text) for text in shown] == [MARKUP_REASON.replace("\n", "\\n")]
    assert "&lt;script&gt;" in shown[0]
    assert "&lt;i&gt;case&lt;/i&gt;" in page and "&lt;u&gt;W-1&lt;/u&gt;" in page
    fragment = web.client.get("/requests/fragment").text
    assert "&lt;script&gt;" in fragment and "<script>alert" not in fragment
    # The API returns the reason verbatim (JSON); pages render it as text.
    api = web.client.get("/api/requests?status=pending").json()
    assert api["requests"][0]["reason"] == MARKUP_REASON


def test_requests_page_shows_pending_first_with_every_detail(web: WebHarness) -> None:
    token = web.login()
    old = web.submit_request("older one", legal_basis="consent", legal_ref=None, case=None)
    new = web.submit_request("Porch theft", legal_basis="warrant", legal_ref="W-9", case="C-1")
    web.client.post(f"/api/requests/{old}/deny", headers={"x-csrf-token": token})
    page = web.client.get("/requests").text
    pending, history = page.split('id="history-title"')
    assert f'id="req-{new}"' in pending and f'id="req-{old}"' not in pending
    for text in (
        "City Police Dept.", "Law enforcement", "Porch theft", "on warrant W-9", "C-1",
        kid_for(web.requester_key.public_key()), "Time left", "23 h 59 min",
    ):
        assert text in pending, text
    assert f'id="req-{old}"' in history and "Denied in the app" in history
    assert "nothing was sent" in history


def test_approve_through_the_api_delivers_through_the_engine(web: WebHarness) -> None:
    token = web.login()
    clip = web.record_clip(web.clock() - timedelta(minutes=10))
    jti = web.submit_request()
    r = web.client.post(f"/api/requests/{jti}/approve", headers={"x-csrf-token": token})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request"]["status"] == "approved" and body["request"]["channel"] == "app"
    assert body["message"] == "Approved the request of City Police Dept.: sending 1 clip."
    assert web.coordinator.wait_idle(30)
    record = web.request(jti)
    assert record.status == "delivered" and record.clips == 1 and record.channel == "app"
    # The release really happened: age-encrypted chunks of the clip, then the manifest.
    # (the released file has an opaque id, never the stored clip's)
    assert not any(f"/{clip.id}/" in t for t, _ in web.publisher.messages)
    chunks = [p for t, p in web.publisher.messages if not t.endswith("/manifest")]
    assert chunks and any(t.endswith("/manifest") for t, _ in web.publisher.messages)
    plain = decrypt(b"".join(chunks), [web.identity])
    # What left is the cut of the stored clip to the window (the whole clip lies inside it
    # here): the owner's entry names the file, its hash and the clip it came from.
    (released,) = next(
        e for e in read_entries(web.audit.path) if e.event == "request_delivered"
    ).fields["files"]
    assert hashlib.sha256(plain).hexdigest() == released["plaintext_sha256"]
    assert (released["clip"], released["clip_sha256"]) == (clip.id, clip.sha256)
    assert released["frames"] == clip.frames
    assert [s for j, s, _ in web.responses if j == jti] == ["approved", "delivered"]
    approved = [e for e in read_entries(web.audit.path) if e.event == "request_approved"]
    assert approved[-1].fields["channel"] == "app" and approved[-1].fields["jti"] == jti
    history = web.client.get("/requests").text.split('id="history-title"')[1]
    assert "Sent 1 clip" in history and "approved in the app" in history


def test_send_again_from_the_history(web: WebHarness) -> None:
    """§5.2: "Send again" redelivers a delivered request as a new attempt; refused (and said
    why) for a request that was never delivered."""
    token = web.login()
    web.record_clip(web.clock() - timedelta(minutes=10))
    jti = web.submit_request()
    other = web.submit_request("denied one")
    web.client.post(f"/api/requests/{jti}/approve", headers={"x-csrf-token": token})
    web.client.post(f"/api/requests/{other}/deny", headers={"x-csrf-token": token})
    assert web.coordinator.wait_idle(30)
    history = web.client.get("/requests").text.split('id="history-title"')[1]
    assert f'action="/requests/{jti}/redeliver"' in history
    assert f'action="/requests/{other}/redeliver"' not in history
    r = web.client.post(f"/requests/{jti}/redeliver", data={"csrf_token": token})
    assert r.status_code == 200
    assert "Sending the footage to City Police Dept. again" in r.text
    assert web.coordinator.wait_idle(30)
    assert web.request(jti).status == "delivered"
    manifests = [t for t, _ in web.publisher.messages if t.endswith("/manifest")]
    assert len(manifests) == 2
    events = [e.event for e in read_entries(web.audit.path) if e.fields.get("jti") == jti]
    assert events.count("release_started") == 2 and "request_redelivered" in events
    r = web.client.post(f"/api/requests/{other}/redeliver", headers={"x-csrf-token": token})
    assert r.status_code == 409 and "cannot be redelivered: it is denied" in r.json()["error"]
    # without the CSRF token nothing happens
    r = web.client.post(f"/requests/{jti}/redeliver", data={})
    assert r.status_code == 403
    assert web.coordinator.wait_idle(30)
    assert len([t for t, _ in web.publisher.messages if t.endswith("/manifest")]) == 2


def test_deny_through_the_page_form(web: WebHarness) -> None:
    token = web.login()
    jti = web.submit_request()
    r = web.client.post(f"/requests/{jti}/deny", data={"csrf_token": token})
    assert r.status_code == 200
    assert "Denied the request of City Police Dept.: nothing is sent." in r.text
    assert web.request(jti).status == "denied" and web.request(jti).channel == "app"
    assert web.publisher.messages == []
    # A second decision is refused by the engine and said so; nothing changes.
    r = web.client.post(f"/requests/{jti}/approve", data={"csrf_token": token})
    assert "is not pending (it is denied)" in r.text
    assert web.request(jti).status == "denied"
    r = web.client.post(f"/api/requests/{jti}/approve", headers={"x-csrf-token": token})
    assert r.status_code == 409 and "not pending" in r.json()["error"]


def test_expired_request_cannot_be_approved(web: WebHarness) -> None:
    jti = web.submit_request()
    web.clock.advance(timedelta(hours=24))
    token = web.login()  # the session lifetime (1 h) is shorter than the wait
    r = web.client.post(f"/api/requests/{jti}/approve", headers={"x-csrf-token": token})
    assert r.status_code == 409 and "expired" in r.json()["error"]
    assert web.request(jti).status == "expired"
    assert web.publisher.messages == []


def test_unknown_or_malformed_request_ids(web: WebHarness) -> None:
    token = web.login()
    assert web.client.get("/api/requests/abcdefghijklmnopqrst").status_code == 404
    r = web.client.post("/api/requests/no%20such/approve", headers={"x-csrf-token": token})
    assert r.status_code == 404
    r = web.client.post("/api/requests/abcdefghijklmnop/launch", headers={"x-csrf-token": token})
    assert r.status_code == 404
    assert web.client.get("/api/requests?status=bogus").status_code == 400


def test_clips_thumbnails_playback_and_download(web: WebHarness) -> None:
    web.login()
    clip = web.record_clip(web.clock() - timedelta(minutes=5), frames=12)
    page = web.client.get("/clips").text
    assert f'href="/clips/{clip.id}"' in page and f"/api/clips/{clip.id}/thumbnail" in page
    thumb = web.client.get(f"/api/clips/{clip.id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert web.client.get(f"/clips/{clip.id}").status_code == 200
    stream = web.client.get(f"/api/clips/{clip.id}/stream")
    assert stream.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
    parts = stream.content.split(b"--frame\r\n")[1:]
    assert len(parts) == clip.frames == 12
    head, _, body = parts[3].partition(b"\r\n\r\n")
    assert b"Content-Type: image/jpeg" in head
    assert body.rstrip(b"\r\n") == jpeg_frame(3)
    download = web.client.get(f"/api/clips/{clip.id}/download")
    assert 'filename="clip-' in download.headers["content-disposition"]
    assert hashlib.sha256(download.content).hexdigest() == clip.sha256
    frames = list(iter_jpegs(_Bytes(download.content)))
    assert [round(t, 1) for t, _ in frames] == [round(i / 10, 1) for i in range(12)]
    listed = web.client.get("/api/clips").json()["clips"]
    assert [c["id"] for c in listed] == [clip.id] and listed[0]["duration_s"] > 1.0
    # Nothing in plaintext was written anywhere in the state directory.
    for path in web.state.rglob("*"):
        if path.is_file():
            assert jpeg_frame(3)[200:260] not in path.read_bytes(), path


def test_playback_is_paced_at_the_clip_frame_rate(tmp_path: Path) -> None:
    delays: list[float] = []

    async def record_sleep(seconds: float) -> None:
        delays.append(seconds)

    h = make_harness(tmp_path, sleep=record_sleep)
    try:
        h.login()
        clip = h.record_clip(h.clock() - timedelta(minutes=5), frames=10)
        h.client.get(f"/api/clips/{clip.id}/stream")
        # Without real sleeping each wait is what is left until the frame's time: 0.1 s apart.
        assert len(delays) == 9
        assert sum(delays) > 0.8
    finally:
        close_harness(h)


def test_delete_clip_asks_first_then_shreds_and_audits(web: WebHarness) -> None:
    token = web.login()
    clip = web.record_clip(web.clock() - timedelta(minutes=5))
    web.submit_request()  # a pending request holds the clip's time
    confirm = web.client.get(f"/clips/{clip.id}/delete").text
    assert "Delete this clip?" in confirm and "A request covers this clip" in confirm
    assert web.vault.get_clip(clip.id).state == "final"
    r = web.client.post(f"/clips/{clip.id}/delete", data={"csrf_token": token})
    assert r.status_code == 200 and f"Clip {clip.id} was deleted." in r.text
    assert web.client.get(f"/api/clips/{clip.id}").status_code == 404
    entry = [e for e in read_entries(web.audit.path) if e.event == "clip_deleted"][-1]
    assert entry.fields == {"clip": clip.id, "reason": "owner"}
    other = web.record_clip(web.clock() - timedelta(minutes=2))
    r = web.client.delete(f"/api/clips/{other.id}", headers={"x-csrf-token": token})
    assert r.json() == {"deleted": other.id}
    again = web.client.delete(f"/api/clips/{other.id}", headers={"x-csrf-token": token})
    assert again.status_code == 404


def test_audit_page_verifies_filters_and_exports(web: WebHarness) -> None:
    web.login()
    web.submit_request()
    web.audit.append("agent_started", version="test")
    page = web.client.get("/audit").text
    assert "audit log OK" in page and "request_pending" in page and "agent_started" in page
    assert page.index("agent_started") < page.index("request_pending")  # newest first
    filtered = web.client.get(f"/audit?requester={REQUESTER}").text
    assert "request_pending" in filtered and "agent_started" not in filtered
    api = web.client.get("/api/audit").json()
    assert api["verify"]["ok"] and api["verify"]["entries"] == len(web.audit_events())
    assert api["entries"][0]["event"] == "agent_started"
    export = web.client.get(f"/api/audit/export?requester={REQUESTER}")
    assert "attachment" in export.headers["content-disposition"]
    exported = json.loads(export.content)
    assert exported and all(e["requester"] == REQUESTER for e in exported)
    everything = json.loads(web.client.get("/api/audit/export").content)
    lines = web.audit.path.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == everything
    assert web.client.get("/api/audit?requester=<x>").status_code == 400


def test_audit_page_reports_a_broken_chain(web: WebHarness) -> None:
    web.login()
    web.submit_request()
    lines = web.audit.path.read_bytes().splitlines()
    assert web.client.get("/api/audit").json()["verify"]["ok"]
    tampered = lines[0].replace(b"City Police", b"City Polite")
    assert tampered != lines[0]
    web.audit.path.write_bytes(b"\n".join([tampered, *lines[1:]]) + b"\n")
    page = web.client.get("/audit").text
    assert "audit log broken at seq 1" in page
    assert web.client.get("/api/audit").json()["verify"]["first_bad_seq"] == 1


def test_audit_paging_with_before(web: WebHarness) -> None:
    web.login()
    for i in range(105):
        web.audit.append("agent_started", version=f"v{i}")
    first = web.client.get("/api/audit").json()
    assert len(first["entries"]) == 100 and first["more"]
    oldest_shown = first["entries"][-1]["seq"]
    second = web.client.get(f"/api/audit?before={oldest_shown}").json()
    assert second["entries"][0]["seq"] == oldest_shown - 1 and not second["more"]


def test_enroll_shows_the_kid_before_confirming(web: WebHarness) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    token = web.login()
    key = Ed25519PrivateKey.generate().public_key()
    form = {
        "csrf_token": token, "id": "neighbor-bob", "name": "Bob <next door>",
        "kind": "neighbor", "contact": "", "key": json.dumps(public_jwk(key)),
    }
    preview = web.client.post("/requesters/preview", data=form)
    assert preview.status_code == 200 and kid_for(key) in preview.text
    assert "Bob &lt;next door&gt;" in preview.text
    assert [r.id for r in web.store.list_requesters()] == [REQUESTER]  # not yet
    done = web.client.post("/requesters/enroll", data=form)
    assert done.status_code == 200 and "was enrolled" in done.text
    assert web.store.get_requester("neighbor-bob").kid == kid_for(key)
    assert "requester_added" in web.audit_events()
    again = web.client.post("/requesters/enroll", data={**form, "id": "bob-2"})
    assert again.status_code == 400 and "already enrolled" in again.text
    bad = web.client.post("/requesters/preview", data={**form, "key": "not a key"})
    assert bad.status_code == 400 and "flash-error" in bad.text


def test_enroll_and_preview_through_the_api(web: WebHarness) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    token = web.login()
    key = Ed25519PrivateKey.generate().public_key()
    headers = {"x-csrf-token": token}
    r = web.client.post(
        "/api/requesters/preview", json={"key": json.dumps(public_jwk(key))}, headers=headers
    )
    assert r.json() == {"kid": kid_for(key), "public_jwk": public_jwk(key)}
    body = {"id": "ins-1", "name": "Insurer", "kind": "insurer", "key": json.dumps(public_jwk(key))}
    r = web.client.post("/api/requesters", json=body, headers=headers)
    assert r.status_code == 201 and r.json()["requester"]["kid"] == kid_for(key)
    r = web.client.post("/api/requesters", content=b"id=x", headers=headers)
    assert r.status_code == 400 and "application/json" in r.json()["error"]
    r = web.client.post("/api/requesters", json={**body, "kind": "spy"}, headers=headers)
    assert r.status_code == 400
    listed = web.client.get("/api/requesters").json()["requesters"]
    assert sorted(q["id"] for q in listed) == ["city-police", "ins-1"]


def test_revoke_cancels_pending_requests(web: WebHarness) -> None:
    token = web.login()
    jti = web.submit_request()
    r = web.client.post(f"/requesters/{REQUESTER}/revoke", data={"csrf_token": token})
    assert "1 pending request(s) cancelled" in r.text
    assert web.request(jti).status == "rejected" and web.request(jti).error == "revoked"
    assert web.store.get_requester(REQUESTER).revoked
    r = web.client.post(f"/api/requesters/{REQUESTER}/revoke", headers={"x-csrf-token": token})
    assert r.json()["already_revoked"] is True
    assert "revoked" in web.client.get("/requesters").text


def test_status_page_and_api(web: WebHarness) -> None:
    web.login()
    web.record_clip(web.clock() - timedelta(minutes=5))
    page = web.client.get("/status").text
    for text in ("front-door", "recording at 10 fps", "connected to", "clips are kept for 7 days",
                 "entries, newest", "checked: intact", "<meter"):
        assert text in page, text
    api = web.client.get("/api/status").json()
    assert api["clips"] == 1 and 0 < api["stored_bytes"] <= api["max_bytes"]
    assert api["audit_head"]["seq"] == len(web.audit_events())
    labels = [i["label"] for i in api["items"]]
    assert labels[:3] == ["Device", "Camera", "MQTT"]


class _Bytes:
    """A read(n) source over bytes, as the vault's reader is."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1, /) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos : end]
        self._pos += len(out)
        return out


def test_pending_time_left_counts_down(web: WebHarness) -> None:
    web.submit_request()
    web.clock.advance(timedelta(hours=23, minutes=30))
    web.login()
    page = web.client.get("/requests").text
    assert re.search(r'class="time-left">(29|30) min<', page), page
