"""Every page of the app in headless Chromium, on a 390 px phone and a desktop, asserting what a
person sees (the rendered text, what is hidden until asked, layout), and saving the README's
screenshots into ``docs/screenshots/`` (``NAME.png`` phone, ``NAME-desktop.png`` desktop).

The app runs in its real HTTPS server (uvicorn, the ``init`` certificate) over a real device
state (:mod:`tests.web.harness`): a 300-frame clip recorded at 10 fps, a request approved with
the button and sent, one denied in the app, one waiting, and a second requester enrolled.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.sync_api import Browser, Page, ViewportSize, sync_playwright

from agent.keys import kid_for
from agent.vocabulary import Channel
from agent.web.server import AppServer
from tests.web.harness import PASSWORD, WebHarness, close_harness, make_harness
from tests.web.test_web_browser import CHROMIUM, CHROMIUM_ARGS, wait_js

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PHONE: ViewportSize = {"width": 390, "height": 844}
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
ZONE = ZoneInfo("Europe/Berlin")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.browser,
]


@dataclass
class Scene:
    """The app being served, and what the device holds."""

    web: WebHarness
    base: str
    clip_id: str
    sent: str
    denied: str
    waiting: str


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    web = make_harness(tmp_path_factory.mktemp("screens"), with_tls=True)
    web.web.tz = ZONE
    now = web.clock()
    clip = web.record_clip(now - timedelta(minutes=20), frames=300, fps=10.0)
    sent = web.submit_request(
        "Package stolen from the porch around 14:00; checking who came to the door.",
        window=(now - timedelta(minutes=25), now - timedelta(minutes=5)),
    )
    web.coordinator.decide(sent, "approve", Channel.BUTTON)
    denied = web.submit_request("Neighbour dispute, want to see the street.",
                                legal_basis="consent", legal_ref=None, case=None)
    web.coordinator.decide(denied, "deny", Channel.APP)
    waiting = web.submit_request(
        'Hit-and-run on the street <b>silver car</b>', legal_ref="W-2026-0099", case="2026-0815"
    )
    assert web.coordinator.wait_idle(30)
    web.store.add_requester("acme-insurance", "Acme Insurance", "insurer",
                            Ed25519PrivateKey.generate().public_key(), audit=web.audit)
    server = AppServer(web.web, host="127.0.0.1", port=0, certfile=web.state / "tls" / "cert.pem",
                       keyfile=web.state / "tls" / "key.pem")
    stop = threading.Event()
    runner = threading.Thread(target=server.run, args=(stop,))
    runner.start()
    try:
        for _ in range(600):
            if server.serving:
                break
            stop.wait(0.05)
        assert server.serving
        yield Scene(web, f"https://localhost:{server.port}", clip.id, sent, denied, waiting)
    finally:
        stop.set()
        runner.join(30)
        close_harness(web)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(params=["phone", "desktop"])
def page(request: pytest.FixtureRequest, browser: Browser, scene: Scene) -> Iterator[Page]:
    """A logged-in page at the viewport; fails the test on any console error or CSP report."""
    phone = request.param == "phone"
    context = browser.new_context(
        ignore_https_errors=True, viewport=PHONE if phone else DESKTOP, device_scale_factor=1,
        is_mobile=phone, has_touch=phone, timezone_id="Europe/Berlin",
    )
    page = context.new_page()
    page.viewport_name = request.param  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{scene.base}/login")
    shot(page, "login")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{scene.base}/requests")
    yield page
    context.close()
    assert errors == []


def shot(page: Page, name: str) -> None:
    """Save the README screenshot of this page at this viewport."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if page.viewport_name == "phone" else "-desktop"  # type: ignore[attr-defined]
    page.screenshot(path=str(SCREENSHOTS / f"{name}{suffix}.png"), full_page=True)


def visit(page: Page, scene: Scene, path: str) -> str:
    """Open ``path`` and return the text a person sees in the main area."""
    page.goto(f"{scene.base}{path}")
    fits(page)
    return page.inner_text("main")


def fits(page: Page) -> None:
    """Nothing is wider than the screen (no sideways scrolling on a phone)."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"] if page.viewport_size else True, width


def test_requests_page(page: Page, scene: Scene) -> None:
    text = visit(page, scene, "/requests")
    card = page.locator(f"#req-{scene.waiting}")
    seen = card.inner_text()
    for part in ("City Police Dept.", "Law enforcement",
                 "Hit-and-run on the street <b>silver car</b>", "on warrant W-2026-0099",
                 "2026-0815", "Time left", "23 h 59 min"):
        assert part in seen, part
    assert kid_for(scene.web.requester_key.public_key()) in seen
    assert " CET" in seen or " CEST" in seen
    history = page.locator(f"#req-{scene.sent}").inner_text()
    assert "Sent 1 clip" in history and "approved with the button" in history
    assert "Denied in the app" in page.locator(f"#req-{scene.denied}").inner_text()
    assert "Pending" in text and "History" in text
    # Deny asks first: one tap only opens the question; nothing is decided yet.
    deny = card.locator("button[data-action=deny]")
    assert not deny.is_visible()
    card.locator("summary", has_text="Deny").click()
    assert deny.is_visible()
    assert "Deny City Police Dept.'s request? Nothing is sent" in card.inner_text()
    assert scene.web.request(scene.waiting).status == "pending"
    shot(page, "requests")
    # Log out sits on the device name's line.
    brand = page.locator("header .brand").bounding_box()
    logout = page.locator("header .logout button").bounding_box()
    assert brand is not None and logout is not None
    assert abs((brand["y"] + brand["height"] / 2) - (logout["y"] + logout["height"] / 2)) <= 3


def test_clips_and_clip_pages(page: Page, scene: Scene) -> None:
    visit(page, scene, "/clips")
    wait_js(page, "[...document.querySelectorAll('.thumb img')].every(i => i.complete)")
    caption = page.locator(".thumb .caption").first.inner_text()
    assert caption.endswith("· 0:30") and ("CET" in caption or "CEST" in caption)
    shot(page, "clips")
    text = visit(page, scene, f"/clips/{scene.clip_id}")
    assert "0:30 · 300 frames" in text and "29 s" not in text
    shot(page, "clip")


def test_audit_page(page: Page, scene: Scene) -> None:
    text = visit(page, scene, "/audit")
    assert "audit log OK" in text
    assert "— you approved it with the button." in text
    assert "— you denied it in the app; nothing was sent." in text
    assert "You enrolled Acme Insurance (Insurer) as a requester." in text
    assert "request_approved" not in text  # raw names only under "Details as recorded"
    # filter by kind in the form, as a person would
    page.select_option("#kind", "decisions")
    page.click("form.filter button[type=submit]")
    page.wait_for_url(f"{scene.base}/audit?kind=decisions*")
    filtered = page.inner_text("main")
    assert "you approved it" in filtered and "You enrolled" not in filtered
    assert page.locator("li.entry").count() == 2
    page.goto(f"{scene.base}/audit")
    shot(page, "audit")


def test_requesters_page(page: Page, scene: Scene) -> None:
    text = visit(page, scene, "/requesters")
    assert "City Police Dept." in text and "Acme Insurance" in text and "Insurer" in text
    rid = page.locator("#rid")
    # the pattern is a valid v-flag regular expression, so the browser checks it
    assert page.evaluate(
        "(() => { new RegExp(document.getElementById('rid').pattern, 'v'); return true })()"
    )
    rid.fill("Bad_Id")
    assert page.evaluate("document.getElementById('rid').validity.patternMismatch")
    rid.fill("neighbor-bob")
    assert not page.evaluate("document.getElementById('rid').validity.patternMismatch")
    rid.fill("")
    shot(page, "requesters")


def test_report_page(page: Page, scene: Scene) -> None:
    text = visit(page, scene, "/report")
    assert "Transparency report" in text and "never what the camera recorded" in text
    police = page.locator("#report-city-police").inner_text()
    # The approved window is 20 minutes, but only the 30-second clip inside it left: the
    # report counts the released files' spans (request_delivered), not the window asked for.
    for label, value in (("Received", "3"), ("Approved", "1"), ("Denied", "1"),
                         ("Expired", "0"), ("Footage sent", "30 s")):
        assert f"{label}\n{value}" in police, (label, police)
    acme = page.locator("#report-acme-insurance").inner_text()
    assert "Received\n0" in acme and "Last request: never" in acme
    kinds = page.locator("#report-kinds").inner_text()
    assert "Law enforcement" in kinds and "Insurer" in kinds
    shot(page, "report")


def test_status_page(page: Page, scene: Scene) -> None:
    text = visit(page, scene, "/status")
    assert "front-door · doorbell-agent" in text
    assert "clips are kept for 7 days" in text and text.count("Retention") == 0
    assert "bytes" not in text.replace("MiB", "").replace("GiB", "").replace("KiB", "")
    assert "entries, newest" in text and "checked: intact" in text
    shot(page, "status")
