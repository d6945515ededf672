"""Issue 10, item 7 in the app: login attempts counted before the password check (concurrent
requests), key fields that never read a path on the device, and requester text with bidi and
control characters shown escaped."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.testclient import TestClient

from agent.web.auth import PasswordFile
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
