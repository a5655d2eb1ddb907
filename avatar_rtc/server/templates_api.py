"""HTTP API for avatar templates and offline rendering.

- ``GET /api/templates``: every template (id, name, thumbnail URL, state, ...).
- ``POST /api/templates``: multipart with ``id`` and ``file`` (a video or photo), optionally ``name``,
  ``welcome`` and ``language``. Uploads that cannot work are refused with a 4xx JSON error before
  anything streams: bad id, not a video or photo, too long, too large, no face. Then the answer streams
  NDJSON progress lines ``{"stage", "done", "total"}`` and a last line, ``{"state": "ready", ...}`` or
  ``{"state": "failed", "error"}``.
- ``GET /api/templates/{id}/thumbnail.jpg``, ``PATCH /api/templates/{id}`` (name, welcome, language),
  ``DELETE /api/templates/{id}`` (409 while a live call shows it).
- ``POST /api/render``: JSON ``{"template", "text"}`` or multipart ``template`` + ``audio`` file; answers
  an MP4 (H.264 + AAC) rendered as a live call would show it.

Preparation and rendering each run one at a time, off the event loop; a second request while one runs
gets 429. Uploads are streamed to a work file in the cache directory (never read into memory) and
removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

from aiohttp import BodyPartReader, web

from avatar_rtc.avatar.face import FaceNotFoundError
from avatar_rtc.avatar.library import (
    PreparationBusyError,
    TemplateBudgetError,
    TemplateInUseError,
    TemplateLibrary,
    TemplateNotFoundError,
)
from avatar_rtc.avatar.store import INFO_KEYS, TemplateCacheError, validate_template_id
from avatar_rtc.avatar.video import NotMediaError, SourceMediaError, SourceTooLargeError
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.media import executors
from avatar_rtc.render.base import RendererEngine
from avatar_rtc.server.responses import ApiError, json_error, read_json_body, read_part_chunk

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_FIELD_BYTES = 2000
_MAX_NAME_CHARS = 200
# How often a render checks that its client is still there.
_CLIENT_CHECK_S = 0.25
_UPLOAD_CHUNK = 1 << 16
# Progress lines are sent at most this often (and at every stage change and stage end).
_PROGRESS_INTERVAL_S = 0.1


class PreparationCancelledError(RuntimeError):
    """The client went away while its template was being prepared."""


@dataclass
class TemplatesApi:
    """What the template routes need; one per app."""

    library: TemplateLibrary
    tts: TextToSpeech
    engine: RendererEngine
    max_text_chars: int = 2000
    max_render_audio_s: float = 120.0
    max_render_audio_bytes: int = 50 * 1024 * 1024
    # A request body that sends nothing for this long is abandoned (408).
    body_timeout_s: float = 30.0
    # Told (event, template id) after a template is prepared ("ready"), changed or deleted: a cluster
    # node announces it to the others, which share the template directory.
    on_change: Callable[[str, str], Awaitable[None]] | None = None
    _render_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def work_dir(self) -> Path:
        return self.library.store.cache_dir

    def work_file(self, kind: str, suffix: str = "") -> Path:
        """A new empty file in the cache directory, named like the store's work directories so an
        abandoned one is cleaned up by :meth:`TemplateStore.remove_stale`."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-{kind}-", suffix=suffix, dir=self.work_dir)
        os.close(fd)
        return Path(name)


TEMPLATES_API = web.AppKey("templates_api", TemplatesApi)


def setup_templates_api(app: web.Application, api: TemplatesApi) -> None:
    app[TEMPLATES_API] = api
    app.router.add_get("/api/templates", list_templates)
    app.router.add_post("/api/templates", upload_template)
    app.router.add_get("/api/templates/{template_id}/thumbnail.jpg", thumbnail)
    app.router.add_patch("/api/templates/{template_id}", update_template)
    app.router.add_delete("/api/templates/{template_id}", delete_template)
    app.router.add_post("/api/render", render)


def _api(request: web.Request) -> TemplatesApi:
    return request.app[TEMPLATES_API]


def _template_id(value: str) -> str:
    try:
        return validate_template_id(value)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


async def _announce(request: web.Request, event: str, template_id: str) -> None:
    on_change = _api(request).on_change
    if on_change is not None:
        await on_change(event, template_id)


# -- listing, thumbnails, settings, deletion ------------------------------------------------------------
async def list_templates(request: web.Request) -> web.Response:
    library = _api(request).library
    infos = await executors.run_media(library.list)
    listed = [info.as_json() | {"default": info.id == library.default_id} for info in infos]
    return web.json_response({"templates": listed, "default": library.default_id})


async def thumbnail(request: web.Request) -> web.Response:
    try:
        template_id = _template_id(request.match_info["template_id"])
        data = await executors.run_media(_api(request).library.thumbnail, template_id)
    except ApiError as exc:
        return json_error(exc.status, exc.message)
    except TemplateNotFoundError as exc:
        return json_error(404, str(exc))
    except TemplateCacheError as exc:
        return json_error(500, str(exc))
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-cache"})


async def update_template(request: web.Request) -> web.Response:
    try:
        template_id = _template_id(request.match_info["template_id"])
        data = await read_json_body(request, _api(request).body_timeout_s)
        if not isinstance(data, dict) or set(data) - set(INFO_KEYS):
            raise ApiError(400, f"body must be a JSON object with only {list(INFO_KEYS)}")
        for key, value in data.items():
            if value is not None and (not isinstance(value, str) or len(value) > _MAX_FIELD_BYTES):
                raise ApiError(
                    400, f"field {key!r} must be a string of at most {_MAX_FIELD_BYTES} characters"
                )
        info = await executors.run_media(_api(request).library.update_info, template_id, **data)
        await _announce(request, "updated", template_id)
    except ApiError as exc:
        return json_error(exc.status, exc.message)
    except TemplateNotFoundError as exc:
        return json_error(404, str(exc))
    except TemplateCacheError as exc:
        return json_error(409, str(exc))
    return web.json_response(info.as_json())


async def delete_template(request: web.Request) -> web.Response:
    try:
        template_id = _template_id(request.match_info["template_id"])
        if template_id == _api(request).library.default_id:
            raise ApiError(409, "the default template is what every call starts with: it cannot be deleted")
        await executors.run_media(_api(request).library.delete, template_id)
        await _announce(request, "deleted", template_id)
    except ApiError as exc:
        return json_error(exc.status, exc.message)
    except TemplateNotFoundError as exc:
        return json_error(404, str(exc))
    except TemplateInUseError as exc:
        return json_error(409, str(exc))
    return web.json_response({"deleted": template_id})


# -- uploads ----------------------------------------------------------------------------------------------
async def _read_field(part: BodyPartReader, timeout_s: float) -> str:
    data = bytearray()
    while chunk := await read_part_chunk(part, _UPLOAD_CHUNK, timeout_s):
        data += chunk
        if len(data) > _MAX_FIELD_BYTES:
            raise ApiError(400, f"field {part.name!r} is longer than {_MAX_FIELD_BYTES} bytes")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ApiError(400, f"field {part.name!r} is not UTF-8 text") from None


async def _save_upload(part: BodyPartReader, path: Path, max_bytes: int, what: str, timeout_s: float) -> int:
    size = 0
    with path.open("wb") as f:
        while chunk := await read_part_chunk(part, _UPLOAD_CHUNK, timeout_s):
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"the {what} is larger than the limit of {max_bytes / 1e6:.1f} MB")
            f.write(chunk)
    if size == 0:
        raise ApiError(400, f"the {what} is empty")
    return size


async def _multipart(request: web.Request) -> Any:
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "Content-Type must be multipart/form-data")
    try:
        return await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None


def _media_error(exc: Exception) -> ApiError:
    # The server's own file paths (the upload's temporary name) are no business of the client's.
    message = re.sub(r":?\s*'?/[^'\s]*'?", "", str(exc))
    if isinstance(exc, SourceTooLargeError):
        return ApiError(413, message)
    if isinstance(exc, NotMediaError | SourceMediaError):
        return ApiError(415, message)
    if isinstance(exc, FaceNotFoundError):
        return ApiError(422, message)
    raise exc


async def upload_template(request: web.Request) -> web.StreamResponse:
    api = _api(request)
    library = api.library
    limits = library.prepare_settings.limits
    upload: Path | None = None
    source_name = "upload"
    claimed: str | None = None
    try:
        reader = await _multipart(request)
        template_id: str | None = None
        info: dict[str, str] = {}
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "nested multipart bodies are not supported")
            if part.name == "id":
                template_id = _template_id(await _read_field(part, api.body_timeout_s))
            elif part.name in INFO_KEYS:
                info[str(part.name)] = await _read_field(part, api.body_timeout_s)
            elif part.name == "file":
                if upload is not None:
                    raise ApiError(400, "send one file")
                upload = api.work_file("upload")
                source_name = _upload_name(part.filename)
                await _save_upload(part, upload, limits.max_bytes, "file", api.body_timeout_s)
            else:
                raise ApiError(
                    400, f"unknown field {part.name!r}: send id, file, and optionally {list(INFO_KEYS)}"
                )
        if template_id is None:
            raise ApiError(400, "field 'id' is required")
        if upload is None:
            raise ApiError(400, "field 'file' (a video or photo) is required")
        try:
            library.begin_prepare(template_id, wait=False)
        except PreparationBusyError as exc:
            raise ApiError(429, str(exc)) from None
        except TemplateInUseError as exc:
            raise ApiError(409, str(exc)) from None
        claimed = template_id
        from avatar_rtc.avatar.prepare import check_face_visible

        try:
            await executors.run_media(check_face_visible, upload, library.prepare_settings)
        except (SourceMediaError, FaceNotFoundError) as exc:
            raise _media_error(exc) from None
        response = await _stream_preparation(request, library, upload, source_name, template_id, info)
    except ApiError as exc:
        return json_error(exc.status, exc.message)
    finally:
        if claimed is not None:
            library.end_prepare(claimed)
        if upload is not None:
            upload.unlink(missing_ok=True)
    return response


async def _stream_preparation(
    request: web.Request,
    library: TemplateLibrary,
    upload: Path,
    source_name: str,
    template_id: str,
    info: dict[str, str],
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    cancelled = threading.Event()
    last_sent = {"stage": "", "at": 0.0}

    def progress(stage: str, done: int, total: int | None) -> None:
        if cancelled.is_set():
            raise PreparationCancelledError("the client went away")
        now = time.monotonic()
        finished = total is not None and done >= total
        if (
            stage == last_sent["stage"]
            and not finished
            and now - float(last_sent["at"]) < _PROGRESS_INTERVAL_S
        ):
            return
        last_sent.update(stage=stage, at=now)
        loop.call_soon_threadsafe(events.put_nowait, {"stage": stage, "done": done, "total": total})

    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    work = asyncio.create_task(
        executors.run_media(
            library.prepare,
            upload,
            template_id,
            info=info or None,
            progress=progress,
            claimed=True,
            source_name=source_name,
        )
    )
    try:
        while True:
            getter = asyncio.create_task(events.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await response.write((json.dumps(getter.result()) + "\n").encode())
                continue
            getter.cancel()
            while not events.empty():
                await response.write((json.dumps(events.get_nowait()) + "\n").encode())
            break
        try:
            result = work.result()
            # The info was taken while this upload still held the template's preparation claim.
            template = result.info.as_json() | {"state": "ready"}
            last: dict[str, Any] = {
                "state": "ready",
                "cache_hit": result.cache_hit,
                "seconds": round(result.seconds, 3),
                "template": template,
            }
            await _announce(request, "ready", template_id)
        except (FaceNotFoundError, SourceMediaError, TemplateCacheError, ValueError, OSError) as exc:
            last = {"state": "failed", "error": str(exc)}
        except Exception as exc:  # the stream has begun: the client must still get a last line
            log.exception("preparing template %r failed", template_id)
            last = {"state": "failed", "error": f"preparation failed: {exc}"}
        await response.write((json.dumps(last) + "\n").encode())
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        cancelled.set()
        # The worker stops at its next progress call; the claim is released only once it has.
        with contextlib.suppress(BaseException):
            await asyncio.shield(work)
        raise
    return response


# -- rendering to a file ------------------------------------------------------------------------------
async def render(request: web.Request) -> web.StreamResponse:
    api = _api(request)
    audio_file: Path | None = None
    output: Path | None = None
    acquired: str | None = None
    try:
        template_id, text, audio_file = await _render_inputs(request, api)
        if api._render_lock.locked():
            raise ApiError(429, "another render is running; try again when it is done")
        async with api._render_lock:
            try:
                template = await api.library.acquire_async(template_id)
            except TemplateNotFoundError as exc:
                raise ApiError(404, str(exc)) from None
            except (TemplateCacheError, TemplateInUseError) as exc:
                raise ApiError(409, str(exc)) from None
            except TemplateBudgetError as exc:
                raise ApiError(503, str(exc)) from None
            acquired = template_id
            if api.library.needs_extras(template):
                # Computed once, on the library's extras thread, and cached for every later use.
                template = await api.library.complete_extras_async(template_id)
            from avatar_rtc.conversation.offline import AudioClipSpeech, decode_audio, render_to_file

            speech: Any = api.tts
            if audio_file is not None:
                try:
                    pcm = await executors.run_media(decode_audio, audio_file, 48000, api.max_render_audio_s)
                except SourceMediaError as exc:
                    raise _media_error(exc) from None
                speech = AudioClipSpeech(pcm, 48000)
            output = api.work_file("render", ".mp4")
            await _while_client_waits(request, render_to_file(output, template, api.engine, speech, text))
            data = await executors.run_media(output.read_bytes)
    except ApiError as exc:
        return json_error(exc.status, exc.message)
    finally:
        if acquired is not None:
            api.library.release(acquired)
        for path in (audio_file, output):
            if path is not None:
                path.unlink(missing_ok=True)
    return web.Response(
        body=data,
        content_type="video/mp4",
        headers={"Content-Disposition": f'attachment; filename="{template_id}.mp4"'},
    )


async def _while_client_waits(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` while the client is still connected; cancel it once the client has gone, so an
    abandoned render does not hold the render slot (aiohttp leaves handlers running by default)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_CLIENT_CHECK_S)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ApiError(499, "the client went away")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _upload_name(filename: str | None) -> str:
    """The upload's own file name, safe to store and show: its last path component, printable
    characters only, bounded. A form without one gives "upload". Clients percent-encode what a
    quoted header value cannot hold (Chromium: quotes and newlines; aiohttp: more), so decode first."""
    name = unquote(filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:_MAX_NAME_CHARS]
    return name or "upload"


async def _render_inputs(request: web.Request, api: TemplatesApi) -> tuple[str, str, Path | None]:
    """(template id, text, audio file or None) from a JSON or multipart request."""
    template_id: str | None = None
    text = ""
    audio_file: Path | None = None
    try:
        if request.content_type == "application/json":
            data = await read_json_body(request, api.body_timeout_s)
            if not isinstance(data, dict):
                raise ApiError(400, "body must be a JSON object")
            template_id = data.get("template")
            text = data.get("text")
            if not isinstance(template_id, str):
                raise ApiError(400, "field 'template' must be a template id")
            if not isinstance(text, str) or not text.strip():
                raise ApiError(400, "field 'text' must be a non-empty string (or send an audio file)")
        else:
            reader = await _multipart(request)
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart bodies are not supported")
                if part.name == "template":
                    template_id = await _read_field(part, api.body_timeout_s)
                elif part.name == "text":
                    text = await _read_field(part, api.body_timeout_s)
                elif part.name == "audio":
                    if audio_file is not None:
                        raise ApiError(400, "send one audio file")
                    audio_file = api.work_file("audio")
                    await _save_upload(
                        part, audio_file, api.max_render_audio_bytes, "audio file", api.body_timeout_s
                    )
                else:
                    raise ApiError(400, f"unknown field {part.name!r}: send template and text or audio")
            if template_id is None:
                raise ApiError(400, "field 'template' is required")
            if audio_file is None and not text.strip():
                raise ApiError(400, "send 'text' or an 'audio' file")
        template_id = _template_id(template_id)
        if len(text) > api.max_text_chars:
            raise ApiError(413, f"text is longer than the limit of {api.max_text_chars} characters")
    except BaseException:
        if audio_file is not None:
            audio_file.unlink(missing_ok=True)
        raise
    return template_id, text, audio_file
