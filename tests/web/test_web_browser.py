"""End to end in headless Chromium (Debian's ``chromium``, driven by Playwright) over HTTPS.

The app runs in :class:`agent.web.server.AppServer` (uvicorn, TLS with a certificate made like
``init`` makes it) over a real device state. While the page is open, requests arrive through
the real verifier and store; the owner approves one (the real approval coordinator releases the
clip through the real Deliverer, age-encrypted, to an in-memory publisher) and watches it become
``delivered``, denies another, plays a clip recorded into the real vault, and every page is
saved as a phone-sized screenshot into ``docs/screenshots/``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, ViewportSize, sync_playwright

from agent.web.server import AppServer
from tests.web.harness import PASSWORD, WebHarness, close_harness, make_harness

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
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PHONE: ViewportSize = {"width": 390, "height": 844}
WAIT_MS = 20_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[WebHarness, AppServer]]:
    """The harness behind a real HTTPS server on a free loopback port."""
    harness = make_harness(tmp_path, sleep=asyncio.sleep, poll_interval=0.3, with_tls=True)
    server = AppServer(
        harness.web,
        host="127.0.0.1",
        port=0,
        certfile=harness.state / "tls" / "cert.pem",
        keyfile=harness.state / "tls" / "key.pem",
    )
    server.start()
    yield harness, server
    server.close()
    close_harness(harness)


@pytest.fixture
def page(served: tuple[WebHarness, AppServer]) -> Iterator[Page]:
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


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_owner_flow_in_chromium(served: tuple[WebHarness, AppServer], page: Page) -> None:
    h, server = served
    base = f"https://127.0.0.1:{server.port}"
    clip = h.record_clip(h.clock() - timedelta(minutes=12), frames=20)
    h.record_clip(h.clock() - timedelta(minutes=40), frames=12)
    h.record_clip(h.clock() - timedelta(days=1), frames=12)

    # Log in.
    page.goto(f"{base}/requests")
    assert page.url == f"{base}/login"
    shot(page, "login")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/requests")
    assert page.locator("article.request.pending").count() == 0

    # A request arrives while the page is open: it appears without a reload.
    first = h.submit_request(
        "Package stolen from the porch around 14:00; checking who came to the door."
    )
    card = page.locator(f"#req-{first}")
    card.wait_for(timeout=WAIT_MS)
    assert "City Police Dept." in card.inner_text() and "W-2026-0042" in card.inner_text()
    wait_js(page, "document.getElementById('pending-badge').textContent === '1'")

    # Approve it (two taps: the confirmation is part of the card) and watch it get delivered.
    card.locator("summary").click()
    card.locator("button[data-action=approve]").click()
    page.wait_for_url(f"{base}/requests")
    assert "Approved the request of City Police Dept.: sending 1 clip." in page.inner_text(
        ".flash"
    )
    page.locator(f'#req-{first}[data-status="delivered"]').wait_for(timeout=WAIT_MS)
    record = h.request(first)
    assert record.status == "delivered" and record.channel == "app" and record.clips == 1
    assert any(t.endswith("/manifest") for t, _ in h.publisher.messages)
    assert any(f"/{clip.id}/" in t for t, _ in h.publisher.messages)

    # Another one arrives; deny it.
    second = h.submit_request(
        "Neighbour dispute, want to see the street.", legal_basis="consent", legal_ref=None,
        case=None,
    )
    page.locator(f"#req-{second}").wait_for(timeout=WAIT_MS)
    page.locator(f"#req-{second} button[data-action=deny]").click()
    page.wait_for_url(f"{base}/requests")
    page.locator(f'#req-{second}[data-status="denied"]').wait_for(timeout=WAIT_MS)
    assert h.request(second).status == "denied" and h.request(second).channel == "app"

    # A third, with markup in its reason, stays pending: it is shown as text.
    reason = 'Hit-and-run on the street <b>silver car</b> <script>alert("x")</script>'
    third = h.submit_request(reason, case="2026-0815")
    page.locator(f"#req-{third}").wait_for(timeout=WAIT_MS)
    assert page.locator(f"#req-{third} .reason").inner_text() == reason
    assert page.locator(f"#req-{third} .reason b").count() == 0
    shot(page, "requests")

    # Clips: thumbnails by day, then play one in the browser.
    page.click("nav a[href='/clips']")
    page.wait_for_url(f"{base}/clips")
    wait_js(
        page,
        "[...document.querySelectorAll('.thumb img')].every(i => i.complete && i.naturalWidth > 0)",
    )
    assert page.locator(".day").count() == 2 and page.locator(".thumb").count() == 3
    shot(page, "clips")
    page.click(f"a[href='/clips/{clip.id}']")
    page.wait_for_url(f"{base}/clips/{clip.id}")
    wait_js(page, "document.getElementById('player').naturalWidth === 320")
    # The frames are replaced in place as the MJPEG stream plays (about 2 s at 10 fps).
    page.wait_for_timeout(800)
    shot(page, "clip")

    # Audit, requesters, status.
    page.click("nav a[href='/audit']")
    page.wait_for_url(f"{base}/audit")
    assert "audit log OK" in page.inner_text("#audit-verify")
    assert "request_delivered" in page.inner_text("main")
    shot(page, "audit")
    page.click("nav a[href='/requesters']")
    page.wait_for_url(f"{base}/requesters")
    assert "City Police Dept." in page.inner_text("main")
    shot(page, "requesters")
    page.click("nav a[href='/status']")
    page.wait_for_url(f"{base}/status")
    assert "front-door" in page.inner_text("main")
    shot(page, "status")

    # Log out: the pages are closed again.
    page.click("header .logout button")
    page.wait_for_url(f"{base}/login")
    page.goto(f"{base}/requests")
    assert page.url == f"{base}/login"
