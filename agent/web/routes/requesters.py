"""Requesters: the enrolled list, enrolment (preview the pasted or uploaded key's kid, then
confirm) and revocation, as pages and under ``/api/requesters``. The key is always its text,
never a path on the device."""

from __future__ import annotations

import json
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from agent.errors import KeyFileError, RequestError
from agent.keys import kid_for, parse_public_key_text, public_jwk
from agent.requests.store import Requester, Revocation
from agent.requests.verify import REQUESTER_KINDS
from agent.web import views
from agent.web.auth import Session
from agent.web.routes.shared import Site, form_field, json_body, valid_id

MAX_KEY_FILE: Final = 16 * 1024
"""Largest uploaded key file read (a JWK or PEM public key is a few hundred bytes)."""

ENROL_FIELDS: Final = ("id", "name", "kind", "key", "contact")


def routes(site: Site) -> list[BaseRoute]:
    """The requester pages and API."""
    return [
        Route("/requesters", site.page(requesters_page)),
        Route("/requesters/preview", site.page(requester_preview), methods=["POST"]),
        Route("/requesters/enroll", site.page(requester_enroll), methods=["POST"]),
        Route("/requesters/{rid}/revoke", site.page(requester_revoke), methods=["POST"]),
        Route("/api/requesters", site.api(api_requesters)),
        Route("/api/requesters", site.api(api_enroll), methods=["POST"]),
        Route("/api/requesters/preview", site.api(api_preview), methods=["POST"]),
        Route("/api/requesters/{rid}/revoke", site.api(api_revoke), methods=["POST"]),
    ]


async def _requesters_page(
    site: Site,
    request: Request,
    session: Session,
    form: dict[str, str],
    error: str | None,
    *,
    status: int = 200,
) -> Response:
    """The requesters page, its enrolment form filled with ``form`` and showing ``error``."""
    requesters = await run_in_threadpool(site.services.requests.list_requesters)
    return site.render(
        request,
        session,
        "requesters.html",
        {"requesters": requesters, "kinds": REQUESTER_KINDS, "form": form, "error": error},
        status=status,
    )


async def requesters_page(site: Site, request: Request, session: Session) -> Response:
    """Enrolled requesters, revoke buttons, and the enrolment form."""
    return await _requesters_page(site, request, session, {}, None)


async def requester_preview(site: Site, request: Request, session: Session) -> Response:
    """Parse the pasted (or uploaded) key and show its kid before the owner confirms."""
    raw = await request.form()
    form = _enrol_fields(raw)
    try:
        form["key"] = await _key_text(raw)
        key = parse_public_key_text(form["key"])
    except (KeyFileError, ValueError) as exc:
        return await _requesters_page(site, request, session, form, str(exc), status=400)
    return site.render(
        request,
        session,
        "requester_confirm.html",
        {"form": form, "kid": kid_for(key), "jwk": json.dumps(public_jwk(key), indent=2)},
    )


async def requester_enroll(site: Site, request: Request, session: Session) -> Response:
    """Enrol after confirmation (audited ``requester_added``)."""
    form = _enrol_fields(await request.form())
    try:
        requester = await run_in_threadpool(_enroll, site, form)
    except (RequestError, KeyFileError) as exc:
        return await _requesters_page(site, request, session, form, exc.message, status=400)
    site.set_flash(session, "ok", f"{requester.name} ({requester.id}) was enrolled.")
    return RedirectResponse("/requesters", status_code=303)


def _enroll(site: Site, form: dict[str, str]) -> Requester:
    try:
        key = parse_public_key_text(form["key"])
    except ValueError as exc:
        raise KeyFileError(str(exc)) from exc
    return site.services.requests.add_requester(
        form["id"],
        form["name"],
        form["kind"],
        key,
        form["contact"] or None,
        audit=site.services.audit,
    )


async def requester_revoke(site: Site, request: Request, session: Session) -> Response:
    """Revoke at once (pending requests of the requester are cancelled)."""
    rid = valid_id(request.path_params["rid"])
    revocation = await run_in_threadpool(_revoke, site, rid)
    cancelled = len(revocation.cancelled)
    message = f"{rid} is revoked" + (
        f"; {cancelled} pending request(s) cancelled." if cancelled else "."
    )
    site.set_flash(session, "ok", message)
    return RedirectResponse("/requesters", status_code=303)


def _revoke(site: Site, rid: str) -> Revocation:
    return site.services.requests.revoke_requester(rid, audit=site.services.audit)


async def api_requesters(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/requesters``."""
    requesters = await run_in_threadpool(site.services.requests.list_requesters)
    return JSONResponse({"requesters": [views.requester_json(r) for r in requesters]})


async def api_preview(site: Site, request: Request, session: Session) -> Response:
    """``POST /api/requesters/preview`` ``{"key": ...}`` (or a form with the key file):
    the key's kid and JWK. The key is its text, never a path on the device."""
    text = (await _api_enrol_fields(request))["key"]
    if not text:
        raise RequestError("key is required: a JWK, a PEM public key or raw base64url")
    try:
        key = parse_public_key_text(text)
    except ValueError as exc:
        raise KeyFileError(str(exc)) from exc
    return JSONResponse({"kid": kid_for(key), "public_jwk": public_jwk(key)})


async def api_enroll(site: Site, request: Request, session: Session) -> Response:
    """``POST /api/requesters`` ``{"id","name","kind","key","contact"?}`` (or the same as a
    form, the key as text or an uploaded file)."""
    form = await _api_enrol_fields(request)
    requester = await run_in_threadpool(_enroll, site, form)
    return JSONResponse({"requester": views.requester_json(requester)}, status_code=201)


async def api_revoke(site: Site, request: Request, session: Session) -> Response:
    """``POST /api/requesters/{id}/revoke``."""
    rid = valid_id(request.path_params["rid"])
    revocation = await run_in_threadpool(_revoke, site, rid)
    return JSONResponse(
        {
            "requester": views.requester_json(revocation.requester),
            "cancelled": [r.jti for r in revocation.cancelled],
            "already_revoked": revocation.already_revoked,
        }
    )


def _enrol_fields(form: FormData) -> dict[str, str]:
    return {name: (form_field(form, name) or "").strip() for name in ENROL_FIELDS}


async def _key_text(form: FormData) -> str:
    """The key from an enrolment form: the pasted text (``key``) or the content of an uploaded
    key file (``key_file``, or ``key`` sent as a file). Never a path on the device."""
    text = (form_field(form, "key") or "").strip()
    upload = next(
        (v for n in ("key_file", "key") if isinstance(v := form.get(n), UploadFile)), None
    )
    if upload is None or not upload.filename:
        return text
    if text:
        raise KeyFileError("paste the key or upload its file, not both")
    data = await upload.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError("the uploaded file is too large to be a public key")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFileError("the uploaded file is not a text key (JWK, PEM or base64url)") from None


async def _api_enrol_fields(request: Request) -> dict[str, str]:
    """Enrolment fields of an API call: a JSON object, or a multipart form with a key file."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        fields = _enrol_fields(form)
        fields["key"] = await _key_text(form)
        return fields
    body = await json_body(request)
    return {
        name: value.strip() if isinstance(value := body.get(name), str) else ""
        for name in ENROL_FIELDS
    }
