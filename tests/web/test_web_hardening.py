"""Issue 10, item 7 in the app: login attempts counted before the password check (concurrent
requests), key fields that never read a path on the device, and requester text with bidi and
control characters shown escaped."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from agent.cli import main as agent_main
from agent.keys import kid_for, public_jwk
from agent.logtext import OneLineFormatter
from agent.web.auth import PasswordFile
from agent.web.server import snapshot_items
from tests.web.harness import PASSWORD, WebHarness


class GatedPassword(PasswordFile):
    """The app's real password file, holding every check at a gate until the test opens it:
    makes "all these logins are in flight at once" a fact instead of a hope."""

    def __init__(self, real: PasswordFile) -> None:
        super().__init__(real.path)
        self.gate = threading.Event()
        self.checked: list[str] = []
        self._lock = threading.Lock()

    def verify(self, password: str) -> str | None:
        with self._lock:
            self.checked.append(password)
        assert self.gate.wait(30)
        return super().verify(password)


def _login_forms(web: WebHarness, n: int) -> list[tuple[TestClient, str]]:
    forms = []
    for _ in range(n):
        client = TestClient(web.web.asgi(), base_url="https://testserver")
        page = client.get("/login")
        match = re.search(r'name="login_token" value="([^"]+)"', page.text)
        assert match
        forms.append((client, match.group(1)))
    return forms


def _post(form: tuple[TestClient, str], password: str) -> Any:
    client, token = form
    return client.post(
        "/login", data={"password": password, "login_token": token}, follow_redirects=False
    )


def _wait(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_parallel_wrong_passwords_all_count_and_the_right_one_then_does_not_clear_the_lock(
    web: WebHarness,
) -> None:
    gated = GatedPassword(web.web.password)
    web.web.password = gated
    forms = _login_forms(web, 10)
    with ThreadPoolExecutor(10) as pool:
        # Eight wrong passwords at once: five are let in (and held at the gate), three refused.
        wrong = [pool.submit(_post, f, "wrong password") for f in forms[:8]]
        _wait(lambda: len(gated.checked) + sum(f.done() for f in wrong) == 8)
        # The right password while those five are still being checked: the address is locked.
        pending = pool.submit(_post, forms[8], PASSWORD)
        _wait(lambda: len(gated.checked) + sum(f.done() for f in [*wrong, pending]) == 9)
        gated.gate.set()
        codes = sorted(f.result().status_code for f in wrong)
        right = pending.result()
    assert right.status_code == 429 and "Too many failed attempts" in right.text
    assert codes == [401] * 5 + [429] * 3
    assert gated.checked == ["wrong password"] * 5  # the right one was never even checked
    failed = [e for e in web.audit_events() if e == "app_login_failed"]
    assert len(failed) == 5
    # The lock holds for the right password afterwards too, until it runs out.
    assert _post(forms[9], PASSWORD).status_code == 429
    assert forms[8][0].get("/api/requests").status_code == 401


# --- key fields: key text or an uploaded file's content, never a path on the device -------------


def test_key_fields_refuse_paths_on_the_device_and_read_nothing(
    web: WebHarness, tmp_path: Path
) -> None:
    token = web.login()
    headers = {"x-csrf-token": token}
    # A valid key in a file on the device: if the app read paths, these would succeed.
    planted = Ed25519PrivateKey.generate().public_key()
    jwk_file = tmp_path / "planted.jwk"
    jwk_file.write_text(json.dumps(public_jwk(planted)))
    device_key = web.state / "device.key"
    device_kid = kid_for(web.key.public_key())
    events_before = web.audit_events()
    for path in ("/etc/passwd", str(device_key), str(jwk_file), "file:" + str(jwk_file)):
        r = web.client.post("/api/requesters/preview", json={"key": path}, headers=headers)
        assert r.status_code == 400 and "never read" in r.json()["error"], (path, r.text)
        body = {"id": "sneaky", "name": "S", "kind": "other", "key": path}
        r = web.client.post("/api/requesters", json=body, headers=headers)
        assert r.status_code == 400, (path, r.text)
        page = web.client.post(
            "/requesters/preview",
            data={"csrf_token": token, "id": "sneaky", "name": "S", "kind": "other", "key": path},
        )
        assert page.status_code == 400 and "never read" in page.text
        for text in (r.text, page.text):
            assert kid_for(planted) not in text and device_kid not in text
            assert "root:" not in text
    assert "sneaky" not in [q.id for q in web.store.list_requesters()]
    assert web.audit_events() == events_before


def test_key_fields_take_pasted_text_or_an_uploaded_files_content(web: WebHarness) -> None:
    token = web.login()
    headers = {"x-csrf-token": token}
    key = Ed25519PrivateKey.generate().public_key()
    jwk = json.dumps(public_jwk(key)).encode()
    # The form: an uploaded file, previewed, then enrolled from the confirm page's hidden field.
    page = web.client.post(
        "/requesters/preview",
        data={"csrf_token": token, "id": "n-1", "name": "Neighbour", "kind": "neighbor"},
        files={"key_file": ("alice.jwk", jwk, "application/json")},
    )
    assert page.status_code == 200 and kid_for(key) in page.text, page.text
    both = web.client.post(
        "/requesters/preview",
        data={"csrf_token": token, "id": "n-1", "name": "N", "kind": "neighbor", "key": "x"},
        files={"key_file": ("alice.jwk", jwk, "application/json")},
    )
    assert both.status_code == 400 and "not both" in both.text
    # The API: JSON key text, or a multipart form with the key file.
    r = web.client.post(
        "/api/requesters/preview", files={"key": ("k.jwk", jwk, "application/json")},
        headers=headers,
    )
    assert r.status_code == 200 and r.json()["kid"] == kid_for(key)
    r = web.client.post(
        "/api/requesters",
        data={"id": "n-2", "name": "Neighbour", "kind": "neighbor"},
        files={"key_file": ("k.jwk", jwk, "application/json")},
        headers=headers,
    )
    assert r.status_code == 201 and r.json()["requester"]["kid"] == kid_for(key)
    big = web.client.post(
        "/api/requesters/preview", files={"key": ("k.jwk", b"{" * 20000, "text/plain")},
        headers=headers,
    )
    assert big.status_code == 400 and "too large" in big.json()["error"]


# --- requester text: bidi and control characters shown escaped ------------------------------------

RLO = "\u202e"
TRICK = f"parcel {RLO}gnissim\nFORGED: approved by owner"
SHOWN = "parcel \\u202egnissim\\nFORGED: approved by owner"


def test_bidi_and_control_characters_in_requester_text_are_shown_escaped(
    web: WebHarness,
) -> None:
    token = web.login()
    web.submit_request(TRICK, case=f"C-{RLO}1\n2", legal_ref=f"W-{RLO}9")
    # A jti like this is rejected (bad_claims) but still named in the request log.
    web.audit.append("request_rejected", jti=f"abc{RLO}def\nghijklmnop", error="bad_claims")
    body = {"id": "n-1", "name": f"Nice {RLO}rohgien", "kind": "neighbor",
            "key": json.dumps(public_jwk(Ed25519PrivateKey.generate().public_key()))}
    r = web.client.post("/api/requesters", json=body, headers={"x-csrf-token": token})
    assert r.status_code == 400 and "printable" in r.json()["error"]  # names never hold them
    pages = {
        path: web.client.get(path).text
        for path in ("/requests", "/requests/fragment", "/audit", "/requesters")
    }
    for path, page in pages.items():
        assert RLO not in page, path
    assert SHOWN in pages["/requests"] and SHOWN in pages["/requests/fragment"]
    assert "C-\\u202e1\\n2" in pages["/requests"] and "W-\\u202e9" in pages["/requests"]
    assert "abc\\u202edef\\nghijklmnop" in pages["/audit"]
    # The JSON API keeps the text exactly (JSON escapes what needs escaping).
    api = web.client.get("/api/requests?status=pending").json()
    assert api["requests"][0]["reason"] == TRICK


def test_cli_listings_and_logs_show_requester_text_escaped(
    web: WebHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web.submit_request(TRICK)
    web.audit.append("request_rejected", jti=f"abc{RLO}def\nghijklmnop", error="bad_claims")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(web.cfg.model_dump(mode="json", exclude_none=True)))
    for args in (["requests", "list"], ["pending"], ["audit", "show"]):
        assert agent_main(["--config", str(config), *args]) == 0
    out = capsys.readouterr().out
    assert RLO not in out and "FORGED" not in out.replace(SHOWN, "")
    assert SHOWN in out and "abc\\u202edef\\nghijklmnop" in out
    # Log lines quoting requester text stay one line each.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.visible")
    logger.addHandler(handler)
    try:
        logger.warning("rejected request %s", f"abc{RLO}def\nWARNING forged")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "WARNING rejected request abc\\u202edef\\nWARNING forged\n"


def test_status_page_item_says_when_another_client_uses_the_client_id() -> None:
    conflict = {
        "client_id": "doorbell-agent-front-door", "conflicts": 3,
        "last": "2026-12-06T17:00:00Z", "detail": "another client probably uses this client id",
    }
    stats = {"connected": False, "received": 0, "client_id_conflict": conflict}
    items = snapshot_items({"workers": {"requests": {"state": "running", "stats": stats}}})
    assert [i.label for i in items] == ["MQTT"]
    assert items[0].value.startswith(
        "ANOTHER CLIENT USES THIS CLIENT ID (doorbell-agent-front-door)"
    )
    assert items[0].ok is False
    calm = snapshot_items(
        {"workers": {"requests": {"state": "running", "stats": {"connected": True}}}}
    )
    assert calm[0].ok is True and "ANOTHER" not in calm[0].value
