"""The owner's flow end to end in headless Chromium (Debian's ``chromium``, driven by
Playwright) against the real, running agent.

``doorbell-agent run`` runs in a subprocess on a real mosquitto (see
``tests/web/agent_harness.py``): its file camera records a real clip into the encrypted vault,
and its own app worker serves the local app over HTTPS with the certificate and argon2 password
``init`` made. Requesters are ``doorbell-request send`` subprocesses that sign their requests and
send them over MQTT. While the page is open a request arrives (without a reload), the owner
approves it in the browser, the requester receives the footage over MQTT, verifies it and exits
0, the page shows ``delivered``, and the clip the requester decrypted is the recorded video
(OpenCV plays it). A second request is denied in the browser: its requester gets ``denied``
(exit 1) and not one delivery message. The owner then plays the clip in the browser. (Each page on
its own, on a phone and a desktop, and the README's screenshots: ``test_web_screens.py``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import pytest
from playwright.sync_api import Page, ViewportSize, sync_playwright

from agent.audit import verify_file
from agent.keys import load_device_key, load_storage_key
from agent.vault import Vault
from tests.mosquitto import Collector, Mosquitto
from tests.web.agent_harness import (
    DEVICE,
    REQUESTER,
    REQUESTER_NAME,
    RunningAgent,
    recent_window,
    running_agent,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE: ViewportSize = {"width": 390, "height": 844}
WAIT_MS = 30_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.browser,
]


def packet_payloads(path: Path) -> list[bytes]:
    """The video packets of a file, as FFmpeg demuxes them."""
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]


@pytest.fixture
def agent(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[RunningAgent]:
    """``doorbell-agent run`` with its app, camera and MQTT (stopped with SIGTERM after)."""
    with running_agent(tmp_path / "agent", mosquitto) as running:
        yield running


@pytest.fixture
def page(agent: RunningAgent) -> Iterator[Page]:
    """A phone-sized Chromium page (HTTPS errors ignored: the certificate is self-signed)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(
            ignore_https_errors=True, viewport=PHONE, device_scale_factor=1, is_mobile=True,
            has_touch=True,
        )
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        context.close()
        browser.close()
        # A CSP violation or a script error would show up here.
        assert errors == []


def wait_js(page: Page, expression: str) -> None:
    """Poll a JS expression until it is true.

    ``page.wait_for_function`` evaluates its predicate with ``eval``, which the app's CSP
    (rightly) forbids; ``page.evaluate`` goes through the debugger protocol instead.
    """
    for _ in range(WAIT_MS // 100):
        if page.evaluate(expression):
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {expression}")


def count_frames(path: Path) -> tuple[int, int]:
    """(frames decoded, frame width) of a video file, read with OpenCV."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), f"OpenCV cannot open {path}"
    frames, width = 0, 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames += 1
        width = int(image.shape[1])
    capture.release()
    return frames, width


def topics_until(collector: Collector, last: str, timeout: float = 30.0) -> list[str]:
    """The topics ``collector`` received up to and including ``last``, plus any already queued
    after it (a watching subscriber may lag behind the requester a little)."""
    deadline = time.monotonic() + timeout
    topics: list[str] = []
    while last not in topics:
        topics.append(collector.get(timeout=max(deadline - time.monotonic(), 0.1)).topic)
    return topics + [m.topic for m in collector.drain()]


def test_owner_flow_against_the_running_agent(
    agent: RunningAgent, page: Page, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    base = agent.url
    deliveries = mosquitto.client()
    deliveries.subscribe(f"doorbell/{DEVICE}/deliveries/#")

    # Log in with the password `init` made (the production argon2 hash).
    page.goto(f"{base}/requests")
    assert page.url == f"{base}/login"
    page.fill("#password", agent.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/requests")
    assert page.locator("article.request.pending").count() == 0

    # The camera has recorded the visitor.
    clip = agent.wait_for_clip()
    assert clip.frames > 0

    # A request arrives over MQTT while the page is open: it appears without a reload.
    page.evaluate("window.stillTheSamePage = true")
    received = tmp_path / "received"
    first = agent.send(
        "approved",
        "Package stolen from the porch around 14:00; checking who came to the door.",
        recent_window(),
        legal_ref="W-2026-0042",
        case="C-17",
        output=received,
    )
    first_jti = first.jti()
    card = page.locator(f"#req-{first_jti}")
    card.wait_for(timeout=WAIT_MS)
    assert page.evaluate("window.stillTheSamePage === true")
    assert REQUESTER_NAME in card.inner_text() and "W-2026-0042" in card.inner_text()
    wait_js(page, "document.getElementById('pending-badge').textContent === '1'")

    # Approve it (two taps: the confirmation is part of the card).
    card.locator("summary", has_text="Approve").click()
    card.locator("button[data-action=approve]").click()
    page.wait_for_url(f"{base}/requests")
    assert f"Approved the request of {REQUESTER_NAME}: sending 1 clip." in page.inner_text(
        ".flash"
    )
    # The requester receives the footage over MQTT, verifies it and exits 0 ...
    assert first.result() == 0, first.stdout + first.stderr
    assert f"{first_jti} approved clips=1 channel=app" in first.stdout
    assert f"{first_jti} delivered clips=1" in first.stdout
    # ... and its receipt makes the page show the request sent and received (§5.2).
    page.locator(f'#req-{first_jti}[data-status="acknowledged"]').wait_for(timeout=WAIT_MS)
    assert "Sent 1 clip" in page.inner_text(f"#req-{first_jti}")
    assert "sent and received" in page.inner_text(f"#req-{first_jti}")

    # What the requester decrypted is the recorded video, byte for byte, and it plays.
    # (the released file has an opaque id, not the stored clip's)
    (footage,) = received.glob("*.mkv")
    file_id = footage.stem
    assert file_id != clip.id
    assert (received / "manifest.jws").is_file() and (received / "receipt.jws").is_file()
    exported = tmp_path / "owner-copy.mkv"
    assert agent.agent("clips", "export", clip.id, "-o", str(exported)) == 0
    # The export is a remux (it adds Duration and the frame count): the same frames.
    assert packet_payloads(footage) == packet_payloads(exported)
    frames, width = count_frames(footage)
    assert frames == clip.frames and width == 320
    prefix = f"doorbell/{DEVICE}/deliveries/{REQUESTER}/{first_jti}/"
    topics = topics_until(deliveries, prefix + "manifest")
    assert all(t.startswith(prefix) for t in topics)
    assert topics.count(prefix + "manifest") == 1
    assert sum(t.startswith(f"{prefix}{file_id}/") for t in topics) > 1  # several chunks

    # A second request arrives; the owner denies it.
    refused = tmp_path / "refused"
    second = agent.send(
        "denied", "Neighbour dispute, want to see the street.", recent_window(),
        legal_basis="consent", output=refused,
    )
    second_jti = second.jti()
    page.locator(f"#req-{second_jti}").wait_for(timeout=WAIT_MS)
    page.locator(f"#req-{second_jti} summary", has_text="Deny").click()  # asks first
    page.locator(f"#req-{second_jti} button[data-action=deny]").click()
    page.wait_for_url(f"{base}/requests")
    page.locator(f'#req-{second_jti}[data-status="denied"]').wait_for(timeout=WAIT_MS)
    assert second.result() == 1, second.stdout + second.stderr
    assert f"{second_jti} denied channel=app" in second.stdout
    # Nothing was released: no file for the requester, no delivery message at all.
    # The evidence holds the request and the signed answers, and no footage.
    assert sorted(p.name for p in refused.iterdir()) == ["device.jwk", "request.jws", "responses"]
    assert [m.topic for m in deliveries.drain()] == []

    # A third, with markup in its reason, stays pending: it is shown as text.
    reason = 'Hit-and-run on the street <b>silver car</b> <script>alert("x")</script>'
    third = agent.send(
        "pending", reason, recent_window(), legal_ref="W-2026-0099", case="2026-0815",
        wait=False,
    )
    third_jti = third.jti()
    assert third.result() == 0, third.stdout + third.stderr
    page.locator(f"#req-{third_jti}").wait_for(timeout=WAIT_MS)
    assert page.locator(f"#req-{third_jti} .reason").inner_text() == reason
    assert page.locator(f"#req-{third_jti} .reason b").count() == 0

    # Clips: the recorded one as a thumbnail, then play it in the browser.
    with Vault(agent.state, load_storage_key(agent.state)) as vault:
        recorded = vault.list_clips()
    page.click("nav a[href='/clips']")
    page.wait_for_url(f"{base}/clips")
    wait_js(
        page,
        "[...document.querySelectorAll('.thumb img')].every(i => i.complete && i.naturalWidth > 0)",
    )
    assert page.locator(".thumb").count() == len(recorded) >= 1
    page.click(f"a[href='/clips/{clip.id}']")
    page.wait_for_url(f"{base}/clips/{clip.id}")
    wait_js(page, "document.getElementById('player').naturalWidth === 320")
    # The frames are replaced in place as the MJPEG stream plays at the clip's 20 fps: after
    # 2 s the visitor is in the middle of the picture.
    page.wait_for_timeout(2000)

    # Audit, requesters, status.
    page.click("nav a[href='/audit']")
    page.wait_for_url(f"{base}/audit")
    assert "audit log OK" in page.inner_text("#audit-verify")
    assert "was sent: 1 clip" in page.inner_text("main")
    page.click("nav a[href='/requesters']")
    page.wait_for_url(f"{base}/requesters")
    assert REQUESTER_NAME in page.inner_text("main")
    page.click("nav a[href='/status']")
    page.wait_for_url(f"{base}/status")
    assert DEVICE in page.inner_text("main")

    # Log out: the pages are closed again.
    page.click("header .logout button")
    page.wait_for_url(f"{base}/login")
    page.goto(f"{base}/requests")
    assert page.url == f"{base}/login"
    page.goto("about:blank")  # nothing of the app left polling while the daemon stops
    deliveries.close()

    # The daemon stops cleanly; its audit log holds every decision and verifies.
    assert agent.stop() == 0, agent.log_path.read_text()
    entries = [json.loads(line) for line in (agent.state / "audit.jsonl").read_text().splitlines()]
    by_request = {(e["event"], e.get("jti")): e for e in entries}
    assert by_request[("request_approved", first_jti)]["channel"] == "app"
    assert ("request_delivered", first_jti) in by_request
    assert ("delivery_acknowledged", first_jti) in by_request
    assert by_request[("request_denied", second_jti)]["channel"] == "app"
    assert ("request_pending", third_jti) in by_request
    assert verify_file(agent.state / "audit.jsonl", load_device_key(agent.state).public_key()).ok
