"""A real call over WebRTC on loopback: an aiortc client negotiates through POST /offer and checks
what arrives: 25 fps video, audio, speech energy after `say`, a moving mouth, and lip sync."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from avatar_rtc.avatar.template import Template
from avatar_rtc.testing.lipsync import LipSync, MouthDarkness, lip_offset, mouth_box
from avatar_rtc.testing.receiver import CallReceiver
from avatar_rtc.testing.synthetic import SyntheticSender, syllable_signal

SPEECH = (
    "Hello, and welcome to the avatar. I can speak any sentence you type. "
    "My lips should move in time with my voice."
)


def _mouth_probe(template: Template) -> MouthDarkness:
    return MouthDarkness(mouth_box(template.landmarks[0], template.size))


@pytest.fixture(scope="module")
def receiver_bias(default_template: Template) -> LipSync:
    """The receiver's own A/V bias, measured on a sender whose picture follows its audio exactly."""

    async def measure() -> LipSync:
        box = mouth_box(default_template.landmarks[0], default_template.size)
        sender = SyntheticSender(syllable_signal(6.0), box)
        receiver = CallReceiver(probe=MouthDarkness(box))
        try:
            await receiver.connect(sender.answer)
            await asyncio.sleep(6.5)
            return lip_offset(receiver.received)
        finally:
            await receiver.close()
            await sender.close()

    bias = asyncio.run(measure())
    assert bias.correlation > 0.8, f"calibration sender not recognised: {bias}"
    assert abs(bias.offset_s) < 0.12, f"receiver bias implausibly large: {bias}"
    return bias


async def test_call_streams_speech_with_lips_in_sync(make_server, default_template, receiver_bias) -> None:
    # The frame size must stay the template's: the mouth probe reads template pixel coordinates, and on
    # a loaded test machine the resolution ladder could rightly shrink the picture mid-call (the ladder
    # has its own tests in test_video_output.py).
    server = await make_server(settings={"media": {"adaptive_resolution": False}})
    receiver = CallReceiver(probe=_mouth_probe(default_template))
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e["type"] == "hello")
        await asyncio.sleep(2.0)
        said_at = len(receiver.received.audio_pcm)
        receiver.send({"type": "say", "text": SPEECH})
        await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "speaking")
        metrics = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=20)
        await asyncio.sleep(1.5)  # idle again at the end
    await receiver.close()
    rec = receiver.received

    duration = rec.video_arrival[-1] - rec.video_arrival[0]
    assert duration >= 9.0, f"call too short to judge: {duration:.1f} s"
    fps = (len(rec.video_arrival) - 1) / duration
    assert 24 <= fps <= 26, f"video at {fps:.2f} fps"
    assert rec.video_size == default_template.size
    audio_seconds = sum(len(p) for p in rec.audio_pcm) / rec.audio_rate
    assert audio_seconds >= 9.0

    # Speech energy after `say`, silence before it.
    before = np.concatenate(rec.audio_pcm[5:said_at]).astype(np.float64)
    after = np.concatenate(rec.audio_pcm[said_at:]).astype(np.float64)
    assert np.sqrt(np.mean(before**2)) < 50
    assert np.sqrt(np.mean(after**2)) > 1000

    # The mouth moves while speaking and rests when idle.
    openness = np.asarray(rec.video_probe)
    speech_frames = openness[-int(25 * 4.5) : -int(25 * 2.0)]
    idle_frames = openness[10:45]
    assert speech_frames.std() > 5 * max(idle_frames.std(), 1e-3), (speech_frames.std(), idle_frames.std())
    # The opening is a natural one (issue 16): at 512 px the astronaut's lips part at most 9 px beyond
    # her smile, a few hundred dark pixels in the probe's box.
    assert speech_frames.max() > idle_frames.max() + 0.015
    assert abs(openness[-10:].mean() - idle_frames.mean()) < 0.01, "mouth did not close after speech"

    sync = lip_offset(rec)
    corrected = sync.offset_s - receiver_bias.offset_s
    print(f"lip offset {sync.offset_s * 1000:.1f} ms, receiver bias {receiver_bias.offset_s * 1000:.1f} ms")
    assert sync.correlation > 0.5, sync
    assert abs(corrected) <= 0.040, f"lip offset {corrected * 1000:.1f} ms (raw {sync}, bias {receiver_bias})"

    assert metrics["request_to_first_audio_ms"] is not None
    assert metrics["frames_late"] <= 0.02 * metrics["frames"]
    assert metrics["interrupted"] is False


async def test_interrupt_stops_audio_within_two_frames(server, default_template) -> None:
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e["type"] == "hello")
        receiver.send({"type": "say", "text": SPEECH * 2})
        await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "speaking")
        await asyncio.sleep(1.0)
        receiver.send({"type": "interrupt"})
        cut = await receiver.wait_event(lambda e: e["type"] == "metrics")
        await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "idle")
        n = len(receiver.received.audio_pcm)
        await asyncio.sleep(1.5)
    await receiver.close()
    assert cut["interrupted"] is True
    # Allow for frames already in flight (receiver jitter buffer); after that, only silence.
    tail = np.concatenate(receiver.received.audio_pcm[n + 10 :]).astype(np.float64)
    assert len(tail) > 0.5 * 48000
    assert np.sqrt(np.mean(tail**2)) < 50, "speech kept arriving after the interrupt"


async def test_say_over_http_api_and_bad_messages(server) -> None:
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e["type"] == "hello")
        receiver.send({"type": "dance"})
        receiver.channel.send("not json {")
        receiver.send({"type": "say", "text": "   "})
        await asyncio.sleep(0.5)
        errors = [e["message"] for e in receiver.events if e["type"] == "error"]
        assert any("unknown message type" in m for m in errors)
        assert any("not valid JSON" in m for m in errors)
        assert any("non-empty" in m for m in errors)
        async with http.post(
            f"{server.url}/api/sessions/{receiver.session_id}/say",
            json={"text": "Hi from the API."},
            headers=receiver.session_headers,
        ) as resp:
            assert resp.status == 202
            assert (await resp.json())["turn_id"]
        metrics = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=10)
        assert metrics["speech_ms"] > 300
    await receiver.close()


async def test_shutdown_closes_every_peer_connection(server) -> None:
    receivers = [CallReceiver(), CallReceiver()]
    async with aiohttp.ClientSession() as http:
        for receiver in receivers:
            await receiver.connect_http(server.url, http)
    sessions = list(server.services.sessions.sessions.values())
    assert len(sessions) == 2
    await server.stop()
    assert server.services.sessions.sessions == {}
    assert all(s.pc.connectionState == "closed" for s in sessions)
    for receiver in receivers:
        await receiver.close()


async def test_a_renderer_failing_mid_utterance_costs_that_utterance_only(make_server) -> None:
    from avatar_rtc.render.warp import WarpEngine, WarpRenderer

    class FlakyRenderer(WarpRenderer):
        failures = 1

        def render_batch(self, jobs):  # type: ignore[no-untyped-def]
            if FlakyRenderer.failures:
                FlakyRenderer.failures -= 1
                raise RuntimeError("the GPU fell off the bus")
            return super().render_batch(jobs)

    class FlakyEngine(WarpEngine):
        def open(self, template):  # type: ignore[no-untyped-def]
            return FlakyRenderer(template, self.rigs(template))

    server = await make_server(renderer=FlakyEngine())
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    receiver.send({"type": "say", "text": "First try."})
    error = await receiver.wait_event(lambda e: e["type"] == "error", wait_s=10)
    first = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=10)
    seen = len(receiver.events)
    receiver.send({"type": "say", "text": "Second try, with a working renderer."})
    second = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=10, after=seen)
    await receiver.close()
    assert "rendering failed" in error["message"]
    assert first["speech_ms"] > 300  # the voice went on
    assert second["frames_late"] <= 1, second  # and the next utterance rendered again
