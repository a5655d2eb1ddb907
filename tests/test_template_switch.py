"""Switching avatars in a live call: the received video shows the new face within 100 ms when the
template is warm and 1 s from disk, with no frozen or torn frames."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import cv2
import numpy as np
import pytest

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.photo import default_photo, prepare_photo
from avatar_rtc.testing.receiver import CallReceiver


def blue_share(image: np.ndarray) -> float:
    """How blue the picture is: the tinted template is much bluer than the default one."""
    small = cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    return float(small[..., 0].mean() - small[..., 2].mean())


@pytest.fixture(scope="module")
def tinted_template_id(template_library: TemplateLibrary) -> str:
    photo = cv2.flip(default_photo(), 1)
    photo[..., 0] = np.clip(photo[..., 0].astype(np.int16) + 90, 0, 255).astype(np.uint8)
    template = prepare_photo(photo, "tinted", seconds=2.0)
    template.extras.clear()
    template_library.store.save(template)
    template_library.update_info("tinted", name="Tinted", welcome="Hello, I am the blue one.")
    return "tinted"


@pytest.fixture(scope="module")
def tinted_presenter_id(template_library: TemplateLibrary) -> str:
    """A full-frame 720x1280 portrait template (the tinted face on a tall canvas): switching to it
    changes the call's picture size, so the encoder starts again at the new size."""
    photo = cv2.flip(default_photo(), 1)
    photo[..., 0] = np.clip(photo[..., 0].astype(np.int16) + 90, 0, 255).astype(np.uint8)
    tall = cv2.copyMakeBorder(photo, 384, 384, 104, 104, cv2.BORDER_REFLECT_101)
    template = prepare_photo(tall, "tinted_presenter", seconds=2.0)
    assert template.size == (720, 1280)
    template.extras.clear()
    template_library.store.save(template)
    return "tinted_presenter"


async def _switch_and_watch(server, template_id: str) -> tuple[float, CallReceiver, float]:
    receiver = CallReceiver(probe=blue_share)
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    await asyncio.sleep(1.0)
    before = float(np.median(receiver.received.video_probe[-10:]))
    requested = time.monotonic()
    receiver.send({"type": "select_template", "id": template_id})
    switched = await receiver.wait_event(lambda e: e["type"] == "template", wait_s=5)
    assert switched["id"] == template_id and switched["switch_ms"] < 1000
    await asyncio.sleep(1.5)
    await receiver.close()
    return requested, receiver, before


def _first_new_frame(receiver: CallReceiver, requested: float, before: float) -> tuple[float, int]:
    rec = receiver.received
    for i, (arrival, value) in enumerate(zip(rec.video_arrival, rec.video_probe, strict=True)):
        if arrival >= requested and value > before + 30:
            return arrival - requested, i
    raise AssertionError("the new face never arrived")


@pytest.mark.parametrize("shape", ["square", "presenter-720p"])
async def test_warm_switch_shows_the_new_face_within_100_ms(
    server, template_library, tinted_template_id, tinted_presenter_id, shape: str
) -> None:
    if shape != "square":
        tinted_template_id = tinted_presenter_id  # 512x512 <-> 720x1280: a new size each switch
    await asyncio.to_thread(template_library.warm, tinted_template_id)
    receiver = CallReceiver(probe=blue_share)
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    await asyncio.sleep(1.0)
    rec = receiver.received
    delays: list[float] = []
    for target in (tinted_template_id, "default", tinted_template_id, "default"):
        seen = len(receiver.events)
        before = float(np.median(rec.video_probe[-10:]))
        first_index = len(rec.video_probe)
        requested = time.monotonic()
        receiver.send({"type": "select_template", "id": target})
        await receiver.wait_event(
            lambda e, target=target: e["type"] == "template" and e["id"] == target, wait_s=5, after=seen
        )
        await asyncio.sleep(1.2)
        probe = np.asarray(rec.video_probe[first_index:])
        changed = np.nonzero(np.abs(probe - before) > 30)[0]
        assert len(changed), f"the face did not change to {target}"
        delays.append(rec.video_arrival[first_index + changed[0]] - requested)
        # No torn frames (half old, half new) and no return to the old face: every later frame is new.
        assert np.all(np.abs(probe[changed[0] :] - before) > 30)
        gaps = np.diff(rec.video_arrival[first_index:]) * 1000
        assert gaps.max() < 200, "video froze during the switch"  # a freeze is several frame periods
    await receiver.close()
    print(
        f"warm switches ({shape}): first new frame {[round(d * 1000) for d in delays]} ms after the request"
    )
    assert float(np.median(delays)) <= 0.1


async def test_cold_switch_from_disk_within_a_second(server, template_library, tinted_template_id) -> None:
    template_library.unload(tinted_template_id)  # out of RAM: the switch must read it from disk
    assert tinted_template_id not in template_library.in_ram()
    requested, receiver, before = await _switch_and_watch(server, tinted_template_id)
    delay, _ = _first_new_frame(receiver, requested, before)
    print(f"cold switch: first new frame {delay * 1000:.0f} ms after the request")
    assert delay <= 1.0


async def test_unknown_template_is_an_error_and_the_call_goes_on(server) -> None:
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    receiver.send({"type": "select_template", "id": "nobody"})
    error = await receiver.wait_event(lambda e: e["type"] == "error")
    receiver.send({"type": "say", "text": "Still here."})
    await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=10)
    await receiver.close()
    assert "nobody" in error["message"]


async def test_a_templates_language_switches_speech_to_that_language(server, template_library) -> None:
    from avatar_rtc.conversation.asr import FasterWhisperASR, find_whisper_model
    from avatar_rtc.conversation.tts import EspeakTTS, espeak_voice

    if not template_library.store.exists("mandarin"):
        template = prepare_photo(default_photo(), "mandarin", seconds=1.0)
        template.extras.clear()
        template_library.store.save(template)
    template_library.update_info("mandarin", name="Mandarin", language="zh")
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    session = server.services.sessions.get(receiver.session_id)
    receiver.send({"type": "select_template", "id": "mandarin"})
    switched = await receiver.wait_event(lambda e: e["type"] == "template", wait_s=10)
    assert switched["language"] == "zh" and session.language == "zh"
    # Voice input in Mandarin on the multilingual Whisper base that scripts/setup.sh assembles into
    # models/ (without it, voice input says it is unavailable); speech is espeak-ng's Mandarin voice,
    # as no piper zh_CN voice ships in a package.
    multilingual = find_whisper_model(language="zh")
    if multilingual is None:
        assert session.conversation.asr is None
    else:
        assert isinstance(session.conversation.asr, FasterWhisperASR)
        assert session.conversation.asr.language == "zh"
        assert session.conversation.asr.model_source == str(multilingual.resolve())
    assert isinstance(session.conversation.speaker.tts, EspeakTTS)
    assert session.conversation.speaker.tts._voice == espeak_voice("zh")
    # The model is told to answer in Mandarin, and its replies are judged as Mandarin.
    assert session.conversation.history.language == "zh"
    assert "简体中文" in session.conversation.history.messages()[0]["content"]
    receiver.send({"type": "say", "text": "你好，欢迎光临。"})
    said = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "say", wait_s=10)
    assert said["speech_ms"] > 500
    receiver.send({"type": "select_template", "id": "default"})
    back = await receiver.wait_event(lambda e: e["type"] == "template" and e["id"] == "default", wait_s=10)
    await receiver.close()
    assert back["language"] == "en" and session.conversation.asr is not None
    assert session.conversation.history.language == "en"
