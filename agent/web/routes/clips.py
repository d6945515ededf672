"""Clips: the list by day, one clip's page and playback (MJPEG stream, fragmented MP4 video),
download, thumbnail and delete, as pages and under ``/api/clips``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from agent.camera.media import BROWSER_CODECS, MediaError, fragmented_mp4, iter_jpegs
from agent.errors import AgentError, ClipNotFoundError
from agent.vault import ClipInfo
from agent.web import views
from agent.web.auth import Session
from agent.web.routes.shared import ID_RE, Site

log = logging.getLogger(__name__)

READ_CHUNK: Final = 64 * 1024


def routes(site: Site) -> list[BaseRoute]:
    """The clip pages and API."""
    return [
        Route("/clips", site.page(clips_page)),
        Route("/clips/{clip}", site.page(clip_page)),
        Route("/clips/{clip}/delete", site.page(clip_delete_confirm)),
        Route("/clips/{clip}/delete", site.page(clip_delete_form), methods=["POST"]),
        Route("/api/clips", site.api(api_clips)),
        Route("/api/clips/{clip}", site.api(api_clip)),
        Route("/api/clips/{clip}", site.api(api_clip_delete), methods=["DELETE"]),
        Route("/api/clips/{clip}/thumbnail", site.api(api_thumbnail)),
        Route("/api/clips/{clip}/stream", site.api(api_stream)),
        Route("/api/clips/{clip}/video", site.api(api_video)),
        Route("/api/clips/{clip}/download", site.api(api_download)),
    ]


async def clips_page(site: Site, request: Request, session: Session) -> Response:
    """Thumbnails grouped by day."""
    clips = await run_in_threadpool(site.services.vault.list_clips)
    days = views.clips_by_day(clips, site.tz)
    return site.render(request, session, "clips.html", {"days": days})


def _clip(site: Site, request: Request) -> ClipInfo:
    clip_id = request.path_params["clip"]
    if not ID_RE.fullmatch(clip_id):
        raise ClipNotFoundError(f"{clip_id[:40]!r} is not a valid clip id")
    return site.services.vault.get_clip(clip_id)


async def clip_page(site: Site, request: Request, session: Session) -> Response:
    """One clip: the player, its details, download and delete."""
    clip = await run_in_threadpool(_clip, site, request)
    return site.render(
        request, session, "clip.html", {"clip": clip}
    )


async def clip_delete_confirm(site: Site, request: Request, session: Session) -> Response:
    """Ask before deleting; warn when a request's hold covers the clip."""
    clip = await run_in_threadpool(_clip, site, request)
    holds = await run_in_threadpool(site.services.vault.holds)
    held = [h.holder for h in holds if h.covers(clip)]
    return site.render(request, session, "clip_delete.html", {"clip": clip, "held": held})


async def clip_delete_form(site: Site, request: Request, session: Session) -> Response:
    """Delete (audited ``clip_deleted`` with reason ``owner``) and go back to the list."""
    clip = await run_in_threadpool(_clip, site, request)
    await run_in_threadpool(site.services.vault.delete_clip, clip.id, "owner")
    site.set_flash(session, "ok", f"Clip {clip.id} was deleted.")
    return RedirectResponse("/clips", status_code=303)


async def api_clips(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips``."""
    clips = await run_in_threadpool(site.services.vault.list_clips)
    fps = site.services.camera_fps
    return JSONResponse({"clips": [views.clip_json(c, fps) for c in clips]})


async def api_clip(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips/{id}``."""
    clip = await run_in_threadpool(_clip, site, request)
    return JSONResponse({"clip": views.clip_json(clip, site.services.camera_fps)})


async def api_clip_delete(site: Site, request: Request, session: Session) -> Response:
    """``DELETE /api/clips/{id}``."""
    clip = await run_in_threadpool(_clip, site, request)
    await run_in_threadpool(site.services.vault.delete_clip, clip.id, "owner")
    return JSONResponse({"deleted": clip.id})


async def api_thumbnail(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips/{id}/thumbnail``: the decrypted JPEG, from memory."""
    clip = await run_in_threadpool(_clip, site, request)
    jpeg = await run_in_threadpool(site.services.vault.read_thumbnail, clip.id)
    if jpeg is None:
        return Response(status_code=404)
    return Response(jpeg, media_type="image/jpeg")


async def api_download(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips/{id}/download``: the owner's decrypted copy, streamed."""
    clip = await run_in_threadpool(_clip, site, request)
    reader = await run_in_threadpool(site.services.vault.open_clip, clip.id)

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                data = await run_in_threadpool(reader.read, READ_CHUNK)
                if not data:
                    return
                yield data
        except AgentError as exc:
            # Headers are gone; ending short makes the download fail visibly.
            log.error("download of clip %s stopped: %s", clip.id, exc)
        finally:
            reader.close()

    return StreamingResponse(
        body(),
        media_type=clip.content_type,
        headers={
            "content-disposition": f'attachment; filename="clip-{clip.id}.mkv"',
            "content-length": str(clip.size),
        },
    )


async def api_video(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips/{id}/video``: an H.264 clip as fragmented MP4 for ``<video>``,
    remuxed in memory (never written), with byte ranges so that the player can seek."""
    clip = await run_in_threadpool(_clip, site, request)
    if clip.codec not in BROWSER_CODECS:
        return Response(status_code=415)

    def remux() -> bytes:
        reader = site.services.vault.open_clip(clip.id)
        try:
            return fragmented_mp4(reader)
        finally:
            reader.close()

    try:
        data = await run_in_threadpool(remux)
    except MediaError as exc:
        log.error("playback of clip %s failed: %s", clip.id, exc)
        return Response(status_code=500)
    headers = {"accept-ranges": "bytes", "cache-control": "no-store"}
    span = _byte_range(request.headers.get("range"), len(data))
    if span is None:
        return Response(data, media_type="video/mp4", headers=headers)
    if span == (-1, -1):
        return Response(status_code=416, headers={"content-range": f"bytes */{len(data)}"})
    first, last = span
    headers["content-range"] = f"bytes {first}-{last}/{len(data)}"
    return Response(data[first : last + 1], status_code=206, media_type="video/mp4",
                     headers=headers)


async def api_stream(site: Site, request: Request, session: Session) -> Response:
    """``GET /api/clips/{id}/stream``: MJPEG (multipart/x-mixed-replace) at the clip's pace."""
    clip = await run_in_threadpool(_clip, site, request)
    reader = await run_in_threadpool(site.services.vault.open_clip, clip.id)
    # MJPEG clips give their stored JPEGs; H.264 and the others are decoded and re-encoded
    # frame by frame, in memory.
    frames: Iterator[tuple[float, bytes]] = iter_jpegs(reader)
    loop = asyncio.get_running_loop()

    def next_frame() -> tuple[float, bytes] | None:
        return next(frames, None)

    async def body() -> AsyncIterator[bytes]:
        started = loop.time()
        try:
            while not site.stopping.is_set():
                frame = await run_in_threadpool(next_frame)
                if frame is None:
                    return
                time, jpeg = frame
                delay = started + time - loop.time()
                if delay > 0:
                    await site.sleep(delay)
                yield (
                    b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                    + str(len(jpeg)).encode()
                    + b"\r\n\r\n"
                    + jpeg
                    + b"\r\n"
                )
        except (AgentError, MediaError) as exc:
            log.error("playback of clip %s stopped: %s", clip.id, exc)
        finally:
            reader.close()

    return StreamingResponse(body(), media_type="multipart/x-mixed-replace; boundary=frame")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes of a single ``Range: bytes=`` request; None for the whole
    body (no or unparsable header), (-1, -1) when it cannot be satisfied."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    start, _, end = header[len("bytes="):].strip().partition("-")
    try:
        if start:
            first = int(start)
            last = int(end) if end else size - 1
        else:
            first, last = max(0, size - int(end)), size - 1
    except ValueError:
        return None
    if first >= size or first > last:
        return (-1, -1)
    return first, min(last, size - 1)
