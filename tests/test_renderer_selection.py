"""Settings pick the renderer; MuseTalk runs behind the same seam in a live call."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from avatar_rtc.config import Settings
from avatar_rtc.render.warp import WarpEngine
from avatar_rtc.testing.receiver import CallReceiver
from avatar_rtc.wiring import build_renderer


def test_musetalk_without_weights_falls_back_to_warp_and_says_why(tmp_path: Path, caplog) -> None:
    settings = Settings(renderer={"engine": "musetalk", "musetalk": {"models_dir": tmp_path}})
    with caplog.at_level(logging.WARNING):
        engine = build_renderer(settings)
    assert isinstance(engine, WarpEngine)
    assert "musetalkV15/unet.pth" in caplog.text and "download_models.py musetalk" in caplog.text


def test_musetalk_on_a_missing_gpu_falls_back_to_warp_and_says_why(tmp_path: Path, caplog) -> None:
    import torch
    from musetalk_fixtures import write_tiny_models

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    models = write_tiny_models(tmp_path / "models")
    settings = Settings(renderer={"engine": "musetalk", "musetalk": {"models_dir": models, "device": "cuda"}})
    with caplog.at_level(logging.WARNING):
        engine = build_renderer(settings)
    assert isinstance(engine, WarpEngine)
    assert "no CUDA device" in caplog.text


@pytest.mark.parametrize(
    ("field", "value"), [("device", "gpu"), ("device", "cuda:x"), ("dtype", "half"), ("compile", "fast")]
)
def test_bad_musetalk_device_settings_are_refused(field: str, value: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        Settings(renderer={"engine": "musetalk", "musetalk": {field: value}})


@pytest.fixture(scope="module")
def tiny_musetalk(tmp_path_factory: pytest.TempPathFactory):
    from musetalk_fixtures import write_tiny_models

    models = write_tiny_models(tmp_path_factory.mktemp("musetalk_models"))
    settings = Settings(renderer={"engine": "musetalk", "musetalk": {"models_dir": models, "device": "cpu"}})
    engine = build_renderer(settings)
    yield engine
    engine.close()


async def test_a_call_on_the_musetalk_renderer(
    make_server, tiny_musetalk, default_template, tmp_path
) -> None:
    from musetalk_library import musetalk_library

    from avatar_rtc.render.musetalk import MuseTalkEngine

    assert isinstance(tiny_musetalk, MuseTalkEngine)
    # Wired as the server wires it: the library's engine is the renderer, the default template's data
    # computed and cached before the first call.
    library = await asyncio.to_thread(musetalk_library, tmp_path, tiny_musetalk, [default_template])
    server = await make_server(renderer=tiny_musetalk, library=library)
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    hello = await receiver.wait_event(lambda e: e["type"] == "hello")
    receiver.send({"type": "say", "text": "Hello from the other renderer."})
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=30)
    await receiver.close()
    assert hello["renderer"] == "musetalk" and hello["quality"] in ("full", "short_wait", "half_rate")
    assert metrics["speech_ms"] > 500
    rec = receiver.received
    fps = (len(rec.video_arrival) - 1) / (rec.video_arrival[-1] - rec.video_arrival[0])
    assert 23 <= fps <= 27
    assert np.sqrt(np.mean(np.concatenate(rec.audio_pcm).astype(np.float64) ** 2)) > 300
