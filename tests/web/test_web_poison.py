"""The app's request pages over stored records with absurd values (issue 10, item 1): rows an
older agent wrote from a requester's ``iat`` 99999999999999 or ``exp`` 2**70 still render."""

from __future__ import annotations

import sqlite3

from tests.web.harness import REQUESTER, WebHarness


def test_request_pages_render_records_with_absurd_stored_values(web: WebHarness) -> None:
    web.login()
    web.submit_request("a normal one")
    conn = sqlite3.connect(web.state / "requests.db", timeout=30)
    with conn:
        for n, (iat, exp, status) in enumerate(
            [(99999999999999, 2**62, "rejected"), (-(2**62), "soon", "pending")]
        ):
            conn.execute(
                "INSERT INTO requests (jti, requester, kid, iat, exp, received_at, status, error,"
                " window_start, updated_at) VALUES (?, ?, 'k', ?, ?, ?, ?, 'bad_claims', ?, ?)",
                (f"poisoned-record-{n:04d}", REQUESTER, iat, exp,
                 "2026-01-31T12:00:00.000000Z", status, "not a time",
                 "2026-01-31T12:00:00.000000Z"),
            )
    conn.close()
    for path in ("/requests", "/requests/fragment", "/api/requests",
                 "/api/requests/poisoned-record-0000"):
        r = web.client.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        assert "poisoned-record-0000" in r.text
