"""The approve step in headless Chromium against the running agent: before deciding, the owner
reads what approving would release (seconds, files, spans, recipient) and can Cancel, which is
not Deny: the request stays pending, nothing is audited or sent, and it can be approved after.
(The agent, page and helpers are those of ``test_web_browser.py``.)"""

from __future__ import annotations

import json
import re

from playwright.sync_api import Page

from tests.mosquitto import Mosquitto
from tests.web.agent_harness import DEVICE, REQUESTER_NAME, RunningAgent, recent_window
from tests.web.test_web_browser import WAIT_MS, agent, page, pytestmark, wait_js

__all__ = ["agent", "page", "pytestmark"]

SENTENCE = re.compile(
    r"^Release \d+:\d\d of footage \((\d+) files?, (\d\d:\d\d:\d\d)-\d\d:\d\d:\d\d.*\) to "
    + re.escape(REQUESTER_NAME.rstrip("."))
    + r"\.$"
)


def test_the_approve_step_shows_the_preview_and_cancel_is_not_deny(
    agent: RunningAgent, page: Page, mosquitto: Mosquitto
) -> None:
    base = agent.url
    deliveries = mosquitto.client()
    deliveries.subscribe(f"doorbell/{DEVICE}/deliveries/#")
    page.goto(f"{base}/login")
    page.fill("#password", agent.password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/requests")
    clip = agent.wait_for_clip()
    sender = agent.send("previewed", "Parcel taken from the porch.", recent_window(),
                        legal_ref="W-2026-0042", wait=False)
    jti = sender.jti()
    assert sender.result() == 0, sender.stdout + sender.stderr
    card = page.locator(f"#req-{jti}")
    card.wait_for(timeout=WAIT_MS)

    # The confirm step says what leaves and to whom before anything is decided.
    card.locator("summary", has_text="Approve").click()
    preview = card.locator(".preview")
    preview.wait_for(timeout=WAIT_MS)
    text = preview.inner_text().strip()
    match = SENTENCE.match(text)
    assert match, text
    assert int(match.group(1)) >= 1
    assert match.group(2) == f"{clip.start.astimezone():%H:%M:%S}"  # the clip's first frame
    detail = card.locator(".preview-detail").inner_text()
    assert "law-enforcement" in detail.lower().replace(" ", "-") or "police" in detail.lower()
    assert "estimate" in detail
    assert card.locator("button[data-action=approve]").is_visible()

    # Cancel closes the step: no decision, the request stays pending, nothing is sent.
    card.locator("[data-action=cancel]").click()
    page.wait_for_url(re.compile(re.escape(f"{base}/requests")))
    card = page.locator(f"#req-{jti}")
    card.wait_for(timeout=WAIT_MS)
    assert page.locator(f"#req-{jti}.pending").count() == 1
    assert not card.locator("button[data-action=approve]").is_visible()
    wait_js(page, "document.getElementById('pending-badge').textContent === '1'")
    entries = [json.loads(line) for line in (agent.state / "audit.jsonl").read_text().splitlines()]
    assert not any(
        e.get("jti") == jti and e["event"] in ("request_approved", "request_denied")
        for e in entries
    )
    assert list(deliveries.drain()) == []

    # Opened again, the same preview; approving it now sends the footage.
    card.locator("summary", has_text="Approve").click()
    assert card.locator(".preview").inner_text().strip() == text
    card.locator("button[data-action=approve]").click()
    page.wait_for_url(f"{base}/requests")
    assert f"Approved the request of {REQUESTER_NAME}" in page.inner_text(".flash")
    page.locator(f'#req-{jti}[data-status="delivered"]').wait_for(timeout=WAIT_MS)
    entries = [json.loads(line) for line in (agent.state / "audit.jsonl").read_text().splitlines()]
    (approved,) = [e for e in entries if e["event"] == "request_approved" and e["jti"] == jti]
    assert approved["channel"] == "app" and approved["preview"]["files"] == int(match.group(1))
    page.goto("about:blank")
    deliveries.close()
