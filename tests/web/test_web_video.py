"""Playback of an H.264 clip in the app: fragmented MP4 remuxed in memory for ``<video>``, with
pause and seek, in headless Chromium (Debian's ``chromium``). Fails, never skips, without it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Page, sync_playwright

from agent.camera.frame import Frame
from agent.camera.pipeline import FrameEncoder
from agent.camera.recorder import Recorder, RecordingParams
from agent.keys import load_storage_key
from agent.timeutil import utcnow
from agent.vault import ClipInfo, Vault
from tests.mosquitto import Mosquitto
from tests.web.agent_harness import RunningAgent, running_agent
from tests.web.harness import WebHarness
from tests.web.test_web_browser import CHROMIUM, CHROMIUM_ARGS, wait_js

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(180)]


@pytest.fixture
def agent(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[RunningAgent]:
    with running_agent(tmp_path / "agent", mosquitto) as running:
        yield running


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM.exists(), f"the browser tests need Debian's chromium at {CHROMIUM}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        context.close()
        browser.close()
        assert errors == []


def record_h264_clip(target: Path | Vault, seconds: float = 4.0) -> ClipInfo:
    """A moving bar, recorded as H.264 into a vault (or the running agent's, by its state)."""
    made: list[object] = []
    start = utcnow() - timedelta(minutes=5)
    with contextlib.ExitStack() as stack:
        vault = target if isinstance(target, Vault) else stack.enter_context(
            Vault(target, load_storage_key(target))
        )
        recorder = Recorder(
            vault, RecordingParams(pre_roll=0.0, post_roll=0.0, max_clip=60.0, merge_gap=0.0),
            FrameEncoder([], 85, codec="h264", fps=10.0, hardware=False), fps=10.0,
            on_clip=made.append,
        )
        frames = round(seconds * 10)
        for n in range(frames):
            image = np.full((240, 320, 3), 50, np.uint8)
            image[:, (n * 7) % 280 : (n * 7) % 280 + 40] = 230
            recorder.push(Frame(n + 1, n / 10, start + timedelta(seconds=n / 10), 320, 240,
                                image=image), n < frames - 1)
        recorder.close()
    (info,) = made
    assert isinstance(info, ClipInfo) and info.codec == "h264"
    return info


def test_h264_clip_plays_pauses_and_seeks_in_the_browser(
    agent: RunningAgent, page: Page
) -> None:
    clip = record_h264_clip(agent.state)
    base = agent.url
    assert clip.duration is not None
    page.goto(f"{base}/login")
    page.fill("#password", agent.password)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    page.goto(f"{base}/clips/{clip.id}")
    video = page.locator("video#video")
    assert video.count() == 1
    # Chromium decodes the stream: metadata, a duration, frames.
    wait_js(page, "document.querySelector('#video').readyState >= 2")
    duration = page.evaluate("document.querySelector('#video').duration")
    assert duration == pytest.approx(clip.duration, abs=0.25)
    assert page.evaluate("document.querySelector('#video').videoWidth") == 320
    # Pause, then seek (byte ranges make the whole clip seekable), then play on.
    page.evaluate("document.querySelector('#video').pause()")
    assert page.evaluate("document.querySelector('#video').paused")
    seekable_end = page.evaluate("document.querySelector('#video').seekable.end(0)")
    assert seekable_end >= clip.duration - 0.3
    page.evaluate(
        "(() => { const v = document.querySelector('#video'); v.dataset.seeked = '';"
        " v.addEventListener('seeked', () => { v.dataset.seeked = 'yes'; });"
        " v.currentTime = 2.0; })()"
    )
    wait_js(page, "document.querySelector('#video').dataset.seeked === 'yes'")
    assert page.evaluate("document.querySelector('#video').currentTime") == pytest.approx(
        2.0, abs=0.15
    )
    assert page.evaluate("document.querySelector('#video').paused")
    page.evaluate("document.querySelector('#video').play()")
    wait_js(page, "document.querySelector('#video').currentTime > 2.2")


def test_video_endpoint_serves_ranges_and_refuses_other_codecs(web: WebHarness) -> None:
    web.login()
    clip = record_h264_clip(web.vault, seconds=2.0)
    whole = web.client.get(f"/api/clips/{clip.id}/video")
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes" and whole.content[4:8] == b"ftyp"
    part = web.client.get(f"/api/clips/{clip.id}/video", headers={"range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == whole.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(whole.content)}"
    tail = web.client.get(f"/api/clips/{clip.id}/video", headers={"range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == whole.content[-16:]
    bad = web.client.get(f"/api/clips/{clip.id}/video",
                         headers={"range": f"bytes={len(whole.content)}-"})
    assert bad.status_code == 416
    page = web.client.get(f"/clips/{clip.id}")
    assert f'src="/api/clips/{clip.id}/video"' in page.text
    # H.264 clips also play as JPEG frames (the fallback inside <video>).
    stream = web.client.get(f"/api/clips/{clip.id}/stream")
    assert len(stream.content.split(b"--frame\r\n")[1:]) == clip.frames
    mjpeg = web.record_clip(web.clock())
    assert web.client.get(f"/api/clips/{mjpeg.id}/video").status_code == 415
    assert "<video" not in web.client.get(f"/clips/{mjpeg.id}").text
    # Nothing in plaintext on disk: the state holds the encrypted clip only.
    for path in web.state.rglob("*"):
        if path.is_file():
            assert whole.content[200:260] not in path.read_bytes(), path
