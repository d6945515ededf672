"""Every authentication rule of the app, through HTTP: sessions, CSRF, lockout, expiry, password
change, headers. Each refusal also checks that nothing changed (request state, audit, clips)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from starlette.testclient import TestClient

from agent.web.headers import CSP
from agent.web.routes.shared import SESSION_COOKIE
from tests.web.harness import PASSWORD, TEST_HASHER, WebHarness

API_GETS = [
    "/api/session",
    "/api/requests",
    "/api/requests/abcdefghijklmnop",
    "/api/events",
    "/api/clips",
    "/api/clips/x1",
    "/api/clips/x1/thumbnail",
    "/api/clips/x1/stream",
    "/api/clips/x1/download",
    "/api/audit",
    "/api/audit/export",
    "/api/requesters",
    "/api/status",
]
API_CHANGES = [
    ("POST", "/api/requests/abcdefghijklmnop/approve"),
    ("POST", "/api/requests/abcdefghijklmnop/deny"),
    ("DELETE", "/api/clips/x1"),
    ("POST", "/api/requesters"),
    ("POST", "/api/requesters/preview"),
    ("POST", "/api/requesters/city-police/revoke"),
]
PAGES = [
    "/requests",
    "/requests/fragment",
    "/clips",
    "/clips/x1",
    "/clips/x1/delete",
    "/audit",
    "/requesters",
    "/status",
]
PAGE_FORMS = [
    "/logout",
    "/requests/abcdefghijklmnop/approve",
    "/clips/x1/delete",
    "/requesters/preview",
    "/requesters/enroll",
    "/requesters/city-police/revoke",
]


def test_api_without_session_is_401(web: WebHarness) -> None:
    for path in API_GETS:
        r = web.client.get(path)
        assert r.status_code == 401, path
        assert r.json() == {"error": "not logged in"}
    for method, path in API_CHANGES:
        r = web.client.request(method, path, json={})
        assert r.status_code == 401, path


def test_pages_without_session_redirect_to_login(web: WebHarness) -> None:
    for path in PAGES:
        r = web.client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    for path in PAGE_FORMS:
        r = web.client.post(path, data={}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    assert web.client.get("/", follow_redirects=False).headers["location"] == "/requests"


def test_a_forged_cookie_is_no_session(web: WebHarness) -> None:
    web.client.cookies.set(SESSION_COOKIE, "A" * 43, domain="testserver")
    assert web.client.get("/api/requests").status_code == 401


def test_login_sets_a_strict_secure_httponly_expiring_cookie(web: WebHarness) -> None:
    response = web.try_login(web.client, PASSWORD)
    assert response.status_code == 303 and response.headers["location"] == "/requests"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert "max-age=3600" in flags
    assert web.client.get("/api/requests").status_code == 200


def test_login_form_needs_its_double_submit_token(web: WebHarness) -> None:
    web.client.get("/login")
    r = web.client.post("/login", data={"password": PASSWORD, "login_token": "forged"})
    assert r.status_code == 403
    assert web.client.get("/api/requests").status_code == 401


def test_login_from_another_origin_is_refused(web: WebHarness) -> None:
    page = web.client.get("/login")
    token = page.text.split('name="login_token" value="')[1].split('"')[0]
    r = web.client.post(
        "/login",
        data={"password": PASSWORD, "login_token": token},
        headers={"origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert web.client.get("/api/requests").status_code == 401


def test_api_change_without_or_with_wrong_csrf_is_403_and_changes_nothing(
    web: WebHarness,
) -> None:
    token = web.login()
    jti = web.submit_request()
    clip = web.record_clip(web.clock() - timedelta(minutes=10))
    events_before = web.audit_events()
    attempts = [
        ("POST", f"/api/requests/{jti}/approve", None),
        ("POST", f"/api/requests/{jti}/approve", "wrong" + token),
        ("POST", f"/api/requests/{jti}/deny", token[:-1]),
        ("DELETE", f"/api/clips/{clip.id}", None),
        ("DELETE", f"/api/clips/{clip.id}", ""),
        ("POST", "/api/requesters/city-police/revoke", None),
    ]
    for method, path, given in attempts:
        headers = {} if given is None else {"x-csrf-token": given}
        r = web.client.request(method, path, headers=headers)
        assert r.status_code == 403, (method, path)
        assert r.json() == {"error": "missing or wrong CSRF token"}
    # The form field does not count for the API, and the session cookie alone is not enough.
    r = web.client.post(f"/api/requests/{jti}/approve", data={"csrf_token": token})
    assert r.status_code == 403
    r = web.client.post(
        "/api/requesters",
        json={"id": "n1", "name": "N", "kind": "neighbor", "key": "x"},
    )
    assert r.status_code == 403
    assert web.request(jti).status == "pending"
    assert web.vault.get_clip(clip.id).state == "final"
    assert not web.store.get_requester("city-police").revoked
    assert [r.id for r in web.store.list_requesters()] == ["city-police"]
    assert web.audit_events() == events_before
    assert web.publisher.messages == []


def test_api_change_from_another_origin_is_403(web: WebHarness) -> None:
    token = web.login()
    jti = web.submit_request()
    r = web.client.post(
        f"/api/requests/{jti}/deny",
        headers={"x-csrf-token": token, "origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert web.request(jti).status == "pending"


def test_page_form_without_or_with_wrong_csrf_is_403_and_changes_nothing(
    web: WebHarness,
) -> None:
    token = web.login()
    jti = web.submit_request()
    clip = web.record_clip(web.clock() - timedelta(minutes=10))
    events_before = web.audit_events()
    for path in (
        f"/requests/{jti}/approve",
        f"/requests/{jti}/deny",
        f"/clips/{clip.id}/delete",
        "/requesters/city-police/revoke",
        "/logout",
    ):
        for data in ({}, {"csrf_token": "nope"}):
            r = web.client.post(path, data=data, follow_redirects=False)
            assert r.status_code == 403, path
            assert "missing or wrong CSRF token" in r.text
        # The header is for the API: a page form needs the field.
        r = web.client.post(path, headers={"x-csrf-token": token}, follow_redirects=False)
        assert r.status_code == 403
    r = web.client.post(
        "/requesters/enroll",
        data={"id": "n1", "name": "N", "kind": "neighbor", "key": "x", "contact": ""},
    )
    assert r.status_code == 403
    assert web.request(jti).status == "pending"
    assert web.vault.get_clip(clip.id).state == "final"
    assert not web.store.get_requester("city-police").revoked
    assert web.audit_events() == events_before
    assert web.client.get("/api/session").status_code == 200  # logout did not happen either


def test_lockout_after_five_failures_refuses_even_the_right_password(web: WebHarness) -> None:
    for _ in range(4):
        r = web.try_login(web.client, "wrong password")
        assert r.status_code == 401 and "Wrong password." in r.text
    r = web.try_login(web.client, "wrong password")
    assert r.status_code == 401 and "locked" in r.text
    r = web.try_login(web.client, PASSWORD)
    assert r.status_code == 429 and "Too many failed attempts" in r.text
    assert web.client.get("/api/requests").status_code == 401
    failed = [e for e in web.audit_events() if e == "app_login_failed"]
    assert len(failed) == 5  # attempts while locked are not even checked, so not audited
    from agent.audit import read_entries

    last = list(read_entries(web.audit.path))[-1]
    assert last.event == "app_login_failed"
    assert last.fields["client"] == "testclient" and last.fields["failures"] == 5
    assert last.fields["locked_until"] is not None
    web.clock.advance(timedelta(minutes=5))
    web.login()
    assert web.client.get("/api/requests").status_code == 200


def test_expired_session_is_refused(web: WebHarness) -> None:
    web.login()
    web.clock.advance(timedelta(minutes=59))
    assert web.client.get("/api/requests").status_code == 200
    web.clock.advance(timedelta(minutes=1))
    assert web.client.get("/api/requests").status_code == 401
    r = web.client.get("/requests", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_changing_the_password_file_drops_every_session(web: WebHarness) -> None:
    other = TestClient(web.web.asgi(), base_url="https://testserver")
    web.login()
    web.login(other)
    tmp = web.password_path.with_suffix(".new")
    tmp.write_text(TEST_HASHER.hash("a brand new password"))
    tmp.replace(web.password_path)
    assert web.client.get("/api/requests").status_code == 401
    assert other.get("/api/requests").status_code == 401
    assert web.try_login(web.client, PASSWORD).status_code == 401
    web.login(password="a brand new password")
    assert web.client.get("/api/requests").status_code == 200
    other.close()


def test_logout_ends_the_session(web: WebHarness) -> None:
    token = web.login()
    r = web.client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert web.client.get("/api/requests").status_code == 401
    assert len(web.web.sessions) == 0


@pytest.mark.parametrize(
    "path",
    ["/login", "/api/requests", "/requests", "/static/app.css", "/nowhere", "/api/clips/x1"],
)
def test_security_headers_on_every_response(web: WebHarness, path: str) -> None:
    if path in ("/requests", "/api/clips/x1"):
        web.login()
    r = web.client.get(path, follow_redirects=False)
    assert r.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["strict-transport-security"].startswith("max-age=")
    if path != "/static/app.css":
        assert r.headers["cache-control"] == "no-store"


def test_pages_carry_no_inline_script_or_style(web: WebHarness) -> None:
    web.login()
    web.submit_request()
    for path in ("/requests", "/clips", "/audit", "/requesters", "/status"):
        html = web.client.get(path).text
        scripts = re.findall(r"<script[^>]*>", html)
        assert scripts == ['<script src="/static/app.js" defer>'], path
        assert "style=" not in html and "<style" not in html
        assert not re.search(r"\son[a-z]+\s*=", html), path
