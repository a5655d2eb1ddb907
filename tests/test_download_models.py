"""scripts/download_models.py against a local stand-in for the Hugging Face hub (loopback only)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from aiohttp import web

from scripts.download_models import MODELS, DownloadError, HubFile, ModelSpec, download


def _content(repo: str, path: str) -> bytes:
    return f"{repo}/{path}".encode() * 100


@pytest.fixture
async def fake_hub():
    requests: list[str] = []

    async def resolve(request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        path = request.match_info["path"]
        requests.append(f"{request.method} {repo}/{path}")
        if "missing" in repo:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        body = _content(repo, path)
        headers = {
            "X-Repo-Commit": "0" * 40,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Length": str(len(body)),
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{org}/{name}/resolve/{revision}/{path:.*}", resolve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", requests
    await runner.cleanup()


async def test_downloads_land_where_the_server_looks_and_are_not_fetched_twice(
    fake_hub, tmp_path: Path
) -> None:
    endpoint, requests = fake_hub
    paths = await asyncio.to_thread(download, ["piper-zh", "whisper-small"], tmp_path, endpoint)
    expected = [tmp_path / f.target for name in ("piper-zh", "whisper-small") for f in MODELS[name].files]
    assert paths == expected
    for spec_file, path in zip(MODELS["piper-zh"].files, paths, strict=False):
        assert path.read_bytes() == _content(spec_file.repo_id, spec_file.filename)
    assert (tmp_path / "piper" / "zh_CN-huayan-medium.onnx").is_file()
    assert not (tmp_path / ".download").exists()
    seen = len(requests)
    await asyncio.to_thread(download, ["piper-zh"], tmp_path, endpoint)
    assert len(requests) == seen, "files already present were fetched again"


async def test_unknown_names_and_missing_repositories_fail_clearly(
    fake_hub, tmp_path: Path, monkeypatch
) -> None:
    endpoint, _ = fake_hub
    with pytest.raises(DownloadError, match=r"unknown model.*known: "):
        download(["gpt-17"], tmp_path, endpoint)
    broken = ModelSpec(
        "a file that is not there", "-", (HubFile("org/missing", "model.gguf", "llm/model.gguf"),)
    )
    monkeypatch.setitem(MODELS, "broken", broken)
    with pytest.raises(DownloadError, match=r"could not fetch org/missing/model\.gguf"):
        await asyncio.to_thread(download, ["broken"], tmp_path, endpoint)
    assert not (tmp_path / "llm" / "model.gguf").exists()


async def test_a_pinned_file_with_other_contents_is_not_put_in_place(
    fake_hub, tmp_path: Path, monkeypatch
) -> None:
    endpoint, _ = fake_hub
    pinned = ModelSpec(
        "a file whose hash is pinned",
        "-",
        (HubFile("org/model", "model.gguf", "llm/model.gguf", size=1234, sha256="0" * 64),),
    )
    monkeypatch.setitem(MODELS, "pinned", pinned)
    with pytest.raises(DownloadError, match=r"org/model/model\.gguf has sha256 [0-9a-f]{64}, expected 0{64}"):
        await asyncio.to_thread(download, ["pinned"], tmp_path, endpoint)
    assert not (tmp_path / "llm" / "model.gguf").exists()

    # With the right pin it lands where the server looks for it.
    body = _content("org/model", "model.gguf")
    right = HubFile("org/model", "model.gguf", "llm/model.gguf", len(body), hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(MODELS, "pinned", ModelSpec("pinned", "-", (right,)))
    assert await asyncio.to_thread(download, ["pinned"], tmp_path, endpoint) == [
        tmp_path / "llm" / "model.gguf"
    ]


def test_the_hub_copy_of_the_default_llm_lands_where_setup_joins_it() -> None:
    from avatar_rtc.conversation.gguf_models import DEFAULT_LLM

    (item,) = MODELS["qwen2.5-coder-0.5b"].files
    assert Path("models") / item.target == DEFAULT_LLM.path(Path("models"))
    assert (item.size, item.sha256) == (DEFAULT_LLM.size, DEFAULT_LLM.sha256)
    assert item.repo_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF" and item.filename == DEFAULT_LLM.filename
