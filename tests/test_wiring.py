"""The server as `avatar-rtc serve` builds it: ``wiring.build_services`` from settings alone, with the
embedded defaults (the offline models from the installed packages), and one real call through it.
Every other server in the tests is wired by hand in conftest.py, so only this one checks the wiring."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np
from aiohttp import web

from avatar_rtc.config import Settings
from avatar_rtc.conversation.asr import FasterWhisperASR
from avatar_rtc.conversation.llm import LlamaCppLLM
from avatar_rtc.conversation.tts import PiperTTS
from avatar_rtc.render.warp import WarpEngine
from avatar_rtc.server.app import create_app, server_options
from avatar_rtc.testing.receiver import CallReceiver
from avatar_rtc.wiring import build_services


async def test_build_services_from_default_settings_serves_a_call(tmp_path: Path) -> None:
    # Only what a test must pin: loopback candidates, and directories of its own. The models dirs are
    # empty, so every engine comes from the installed packages, as on a fresh install.
    models = tmp_path / "models"
    models.mkdir()
    settings = Settings(
        ice_host_addresses=["127.0.0.1"],
        avatar={"cache_dir": tmp_path / "template_cache"},
        tts={"models_dir": models},
        asr={"models_dir": models},
        llm={"models_dir": models},
        renderer={"musetalk": {"models_dir": models}},
    )
    services = build_services(settings)
    deps = services.sessions.deps
    assert isinstance(deps.tts, PiperTTS)
    assert isinstance(deps.asr, FasterWhisperASR) and deps.asr_unavailable == ""
    assert isinstance(deps.llm, LlamaCppLLM) and deps.llm_unavailable == ""
    assert isinstance(deps.renderer, WarpEngine)
    assert services.library.default_id in services.library.in_ram()  # prepared and warmed up front

    runner = web.AppRunner(create_app(services), **server_options(settings))
    await runner.setup()
    receiver = CallReceiver()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as http:
            await receiver.connect_http(url, http)
        hello = await receiver.wait_event(lambda e: e["type"] == "hello")
        assert hello["asr"] is True and hello["llm"] is True and hello["renderer"] == "warp"
        receiver.send({"type": "say", "text": "The wiring works."})
        await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "speaking", wait_s=15)
        metrics = await receiver.wait_event(
            lambda e: e["type"] == "metrics" and e["turn"] == "say", wait_s=15
        )
    finally:
        await receiver.close()
        await runner.cleanup()  # on_shutdown closes the sessions, the renderer and the library
    assert services.sessions.count == 0
    assert metrics["speech_ms"] > 500 and metrics["interrupted"] is False
    speech = np.concatenate(receiver.received.audio_pcm).astype(np.float64)
    assert np.sqrt(np.mean(speech**2)) > 300
