"""The template HTTP API: uploads with streamed progress, refusals that leave nothing behind, listing,
thumbnails, deletion and rendering to MP4."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from test_templates import make_moving_face_video, noise_video

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.prepare import PrepareSettings
from avatar_rtc.avatar.video import MediaLimits
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.render.warp import WarpEngine
from avatar_rtc.server.app import MAX_BODY_BYTES, json_errors
from avatar_rtc.server.templates_api import TEMPLATES_API, TemplatesApi, setup_templates_api

ClientFactory = Callable[..., Any]


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_moving_face_video(tmp_path_factory.mktemp("api_video") / "face.mp4", seconds=2.0)[
        0
    ].read_bytes()


@pytest.fixture
async def make_client(tmp_path: Path, piper_tts: TextToSpeech) -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def start(limits: MediaLimits | None = None) -> TestClient[Any, Any]:
        settings = PrepareSettings(limits=limits or MediaLimits())
        library = TemplateLibrary(tmp_path / "cache", ram_budget_bytes=1 << 30, prepare_settings=settings)
        # Same body limit and error middleware as the real app: uploads must stream past the limit.
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
        setup_templates_api(app, TemplatesApi(library=library, tts=piper_tts, engine=WarpEngine()))
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


def _form(template_id: str, data: bytes, filename: str = "clip.mp4", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("id", template_id)
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("file", io.BytesIO(data), filename=filename, content_type="application/octet-stream")
    return form


def _cache_entries(client: TestClient[Any, Any]) -> list[str]:
    from avatar_rtc.server.templates_api import TEMPLATES_API

    cache = client.server.app[TEMPLATES_API].library.store.cache_dir
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


async def test_upload_streams_progress_then_lists_serves_and_deletes(
    make_client: ClientFactory, face_video: bytes
) -> None:
    client = await make_client()
    response = await client.post("/api/templates", data=_form("anna", face_video, name="Anna"))
    assert response.status == 200 and response.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await response.text()).splitlines()]
    stages = [line["stage"] for line in lines[:-1]]
    assert {"landmarks", "masks", "write"} <= set(stages)
    assert all(line["done"] <= line["total"] for line in lines[:-1] if line["total"] is not None)
    last = lines[-1]
    assert last["state"] == "ready" and not last["cache_hit"]
    assert last["template"]["id"] == "anna" and last["template"]["frame_count"] == 50

    listing = await (await client.get("/api/templates")).json()
    (entry,) = listing["templates"]
    assert (entry["id"], entry["name"], entry["state"]) == ("anna", "Anna", "warm")
    thumbnail = await client.get(entry["thumbnail"])
    assert thumbnail.status == 200 and thumbnail.content_type == "image/jpeg"
    assert (await thumbnail.read())[:2] == b"\xff\xd8"

    again = await client.post("/api/templates", data=_form("anna", face_video))
    assert json.loads((await again.text()).splitlines()[-1])["cache_hit"] is True

    patched = await client.patch("/api/templates/anna", json={"welcome": "Hi, I'm Anna."})
    assert (await patched.json())["welcome"] == "Hi, I'm Anna."

    from avatar_rtc.server.templates_api import TEMPLATES_API

    library = client.server.app[TEMPLATES_API].library
    library.acquire("anna")  # a live call shows it
    busy = await client.delete("/api/templates/anna")
    assert busy.status == 409 and "in use" in (await busy.json())["error"]
    library.release("anna")
    assert (await client.delete("/api/templates/anna")).status == 200
    assert (await client.delete("/api/templates/anna")).status == 404
    assert (await (await client.get("/api/templates")).json())["templates"] == []
    assert _cache_entries(client) == []


@pytest.mark.parametrize("bad_id", ["../x", "a/b", ".hidden", "", "x" * 65, "a b"])
async def test_unsafe_ids_are_refused(make_client: ClientFactory, face_video: bytes, bad_id: str) -> None:
    client = await make_client()
    response = await client.post("/api/templates", data=_form(bad_id, face_video))
    assert response.status == 400
    assert "invalid template id" in (await response.json())["error"]
    assert _cache_entries(client) == []


async def test_bad_uploads_get_a_clear_4xx_and_leave_nothing(
    make_client: ClientFactory, face_video: bytes, tmp_path: Path
) -> None:
    client = await make_client(MediaLimits(max_bytes=2_000_000, max_seconds=3.0))

    async def refused(form: aiohttp.FormData, status: int, words: str) -> None:
        response = await client.post("/api/templates", data=form)
        body = await response.json()
        assert response.status == status, body
        assert words in body["error"], body
        assert _cache_entries(client) == []

    await refused(_form("text", b"this is not a video at all\n" * 100, "notes.txt"), 415, "not a video")
    noise = await asyncio.to_thread(lambda: noise_video(tmp_path / "noise.mp4").read_bytes())
    await refused(_form("noise", noise), 422, "no face")
    long_video = await asyncio.to_thread(
        lambda: make_moving_face_video(tmp_path / "long.mp4", seconds=4.0, covered=())[0].read_bytes()
    )
    await refused(_form("long", long_video), 413, "the limit is 3 s")
    await refused(_form("big", b"\0" * 2_100_000), 413, "larger than the limit")
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("id", "nofile")
    await refused(form, 400, "'file'")
    response = await client.post("/api/templates", json={"id": "x"})
    assert response.status == 415
    # After all that, a good upload still works: no claim or file was left behind.
    good = await client.post("/api/templates", data=_form("good", face_video))
    assert json.loads((await good.text()).splitlines()[-1])["state"] == "ready"


async def test_render_answers_an_mp4(make_client: ClientFactory, face_video: bytes) -> None:
    client = await make_client()
    await (await client.post("/api/templates", data=_form("anna", face_video))).read()
    response = await client.post("/api/render", json={"template": "anna", "text": "Hello there."})
    assert response.status == 200 and response.content_type == "video/mp4"
    with av.open(io.BytesIO(await response.read())) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        # The uploaded video's own framing (640x480), not a face crop.
        video = container.streams.video[0].codec_context
        assert (video.width, video.height) == (640, 480)
    missing = await client.post("/api/render", json={"template": "nobody", "text": "Hi."})
    assert missing.status == 404
    too_long = await client.post("/api/render", json={"template": "anna", "text": "a" * 5000})
    assert too_long.status == 413
    unsafe = await client.post("/api/render", json={"template": "../anna", "text": "Hi."})
    assert unsafe.status == 400
    assert _cache_entries(client) == ["anna"]


async def test_the_default_template_cannot_be_deleted_and_is_marked(make_client: ClientFactory) -> None:
    client = await make_client()
    await asyncio.to_thread(client.server.app[TEMPLATES_API].library.ensure_default)
    listed = await (await client.get("/api/templates")).json()
    assert listed["default"] == "default"
    assert [t["default"] for t in listed["templates"] if t["id"] == "default"] == [True]
    resp = await client.delete("/api/templates/default")
    assert resp.status == 409 and "default" in (await resp.json())["error"]
