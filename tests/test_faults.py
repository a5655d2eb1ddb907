"""A back-end that raises or hangs mid-utterance fails that turn with an error event; the session
goes back to idle and answers the next request; the other sessions never notice.

The fakes wrap the real engines and fail on cue. A hang is ended by the product's stall timeout
(``conversation.stage_timeout_s``), set short here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import numpy as np
import pytest

from avatar_rtc.avatar.template import Template
from avatar_rtc.conversation.llm import LanguageModel
from avatar_rtc.conversation.phonemes import SpeechChunk
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.render.base import RenderedFrame, Renderer
from avatar_rtc.render.visemes import TimedViseme
from avatar_rtc.render.warp import WarpEngine
from avatar_rtc.testing.receiver import CallReceiver

pytestmark = pytest.mark.slow

STALL_TIMEOUT_S = 1.5
# A raising back-end must fail its turn with its own error, not by a timeout: the model's first token
# can take over 1.5 s on a busy machine (another session's history is being read), so the raise
# variants run with a stage timeout that only a real stall would reach.
RAISE_TIMEOUT_S = 15.0


def _stage_timeout(mode: str) -> float:
    return STALL_TIMEOUT_S if mode == "hang" else RAISE_TIMEOUT_S


TWO_SENTENCES = "This first sentence is fine. The second one is where it breaks."
FAILING_TEXT_MARK = "breaks"
HANG_S = 60.0  # far past the stall timeout: only the product's timeout can end it


class Cue:
    """What the next faulty call does: None (work), "raise" or "hang". Used once, then cleared."""

    def __init__(self) -> None:
        self.mode: str | None = None

    def take(self) -> str | None:
        mode, self.mode = self.mode, None
        return mode


async def _misbehave(mode: str | None, what: str) -> None:
    if mode == "raise":
        raise RuntimeError(f"{what} exploded")
    if mode == "hang":
        await asyncio.sleep(HANG_S)


class FaultyTTS:
    """The real TTS, except that a sentence containing FAILING_TEXT_MARK fails on cue after its
    first chunk (so earlier audio is already playing: mid-utterance)."""

    def __init__(self, real: TextToSpeech, cue: Cue) -> None:
        self.real, self.cue = real, cue
        self.sample_rate = real.sample_rate

    async def synthesize(self, text: str, *, session: str = "") -> AsyncIterator[np.ndarray]:
        async for chunk in self.synthesize_timed(text, session=session):
            yield chunk.pcm

    async def synthesize_timed(self, text: str, *, session: str = "") -> AsyncIterator[SpeechChunk]:
        mode = self.cue.take() if FAILING_TEXT_MARK in text else None
        async for chunk in self.real.synthesize_timed(text, session=session):
            half = len(chunk.pcm) // 2
            yield SpeechChunk(chunk.pcm[:half], chunk.phonemes)  # timed from the first sample on
            await _misbehave(mode, "speech synthesis")
            yield SpeechChunk(chunk.pcm[half:])


class FaultyLLM:
    """The real model, failing on cue after its first few tokens."""

    def __init__(self, real: LanguageModel, cue: Cue) -> None:
        self.real, self.cue = real, cue

    async def stream(self, messages: list[Any], *, session: str = "") -> AsyncIterator[str]:
        mode = self.cue.take()
        count = 0
        async for token in self.real.stream(messages, session=session):
            yield token
            count += 1
            if count == 3:
                await _misbehave(mode, "the language model")

    async def prefill(self, messages: list[Any], *, session: str = "") -> None:
        await self.real.prefill(messages, session=session)

    def forget(self, session: str) -> None:
        self.real.forget(session)


class FaultyRenderer:
    """``armed``: this renderer raises on its second push when cued (the victim's, not a bystander's:
    the speaker hands over a sentence, or a first clause, per push, so both sessions push twice)."""

    def __init__(self, real: Renderer, cue: Cue, armed: bool = True) -> None:
        self.real, self.cue, self.armed = real, cue, armed
        self.template, self.sample_rate, self.lookahead_s = real.template, real.sample_rate, real.lookahead_s
        self._pushes = 0

    @property
    def quality_level(self) -> str:
        return self.real.quality_level

    def attach(self, media_clock: Callable[[], float], emit_event: Callable[[dict[str, Any]], None]) -> None:
        self.real.attach(media_clock, emit_event)

    def push_audio(self, pcm: np.ndarray, media_time: float) -> None:
        self._pushes += 1
        if self.armed and self._pushes > 1 and self.cue.mode == "raise":
            self.cue.take()
            raise RuntimeError("renderer exploded")
        self.real.push_audio(pcm, media_time)

    def push_visemes(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        self.real.push_visemes(visemes, media_time)

    def flush(self) -> None:
        self.real.flush()

    def clear(self) -> None:
        self.real.clear()

    async def frames(self) -> AsyncIterator[RenderedFrame]:
        async for frame in self.real.frames():
            if self.cue.mode == "hang":
                # A wedged renderer: the playout repeats the last frame, audio keeps time.
                self.cue.take()
                await asyncio.sleep(2.0)
            yield frame

    async def aclose(self) -> None:
        await self.real.aclose()


class FaultyRendererEngine(WarpEngine):
    """The warp engine in every respect of the engine protocol, but its renderers misbehave on cue."""

    name = "faulty-warp"

    def __init__(self, cue: Cue) -> None:
        super().__init__()
        self.cue = cue
        self.opened: list[FaultyRenderer] = []

    def open(self, template: Template) -> Renderer:
        # The first session opened is the victim (it connects first).
        renderer = FaultyRenderer(super().open(template), self.cue, armed=not self.opened)
        self.opened.append(renderer)
        return renderer


def _longest_gap_ms(arrivals: list[float]) -> float:
    gaps = np.diff(np.asarray(arrivals)) * 1000
    return float(gaps.max()) if len(gaps) else float("inf")


async def _fault_and_recover(server: Any, cue: Cue, mode: str, kind: str) -> dict[str, Any]:
    """One session hits the fault, a bystander talks at the same time; returns what happened."""
    async with aiohttp.ClientSession() as http:
        victim, bystander = CallReceiver(), CallReceiver()
        await victim.connect_http(server.url, http)
        await bystander.connect_http(server.url, http)
        await asyncio.sleep(0.5)
        cue.mode = mode
        if kind == "chat":
            victim.send({"type": "chat", "text": "Tell me a long story about a lighthouse keeper."})
        else:
            victim.send({"type": "say", "text": TWO_SENTENCES})
        bystander_start = len(bystander.received.video_arrival)
        bystander.send({"type": "say", "text": "I am the other caller, and I keep talking."})
        error = await victim.wait_event(lambda e: e.get("type") == "error", STALL_TIMEOUT_S + 10)
        await victim.wait_event(lambda e: e.get("type") == "state" and e.get("state") == "idle", 10)
        # The bystander's turn completes and its video keeps its pace through the fault.
        other_metrics = await bystander.wait_event(lambda e: e.get("type") == "metrics", 20)
        bystander_gap = _longest_gap_ms(bystander.received.video_arrival[bystander_start:])
        # The victim answers its next request normally.
        seen = len(victim.events)
        victim.send({"type": "say", "text": "Back to normal."})
        await victim.wait_event(lambda e: e.get("type") == "state" and e.get("state") == "speaking", 10)
        after = await victim.wait_event(
            lambda e: e.get("type") == "metrics" and e in victim.events[seen:], 20
        )
        await victim.wait_event(lambda e: e.get("type") == "state" and e.get("state") == "idle", 10)
        alive = len(server.services.sessions.sessions)
        await victim.close()
        await bystander.close()
    return {
        "error": error,
        "after": after,
        "bystander": other_metrics,
        "bystander_longest_gap_ms": bystander_gap,
        "sessions_alive": alive,
    }


def _check(result: dict[str, Any], stage_words: str) -> None:
    print(f"bystander's longest video gap {result['bystander_longest_gap_ms']:.1f} ms")
    assert stage_words in result["error"]["message"], result["error"]
    assert result["after"]["interrupted"] is False and result["after"]["frames"] > 0
    assert result["bystander"]["interrupted"] is False
    # A bystander held up by the fault would stall for the stage timeout (1.5 s) or more: one gap that
    # long. Pacing under load is not what this checks (the p99 gap it used to bound was 88-280 ms on
    # these 2 cores with two calls talking, 2026-12-01; bench_call.py measures pacing).
    assert result["bystander_longest_gap_ms"] < 1000, result["bystander_longest_gap_ms"]
    assert result["sessions_alive"] == 2


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_tts_fault_mid_utterance(make_server, piper_tts, mode: str) -> None:
    cue = Cue()
    server = await make_server(
        tts=FaultyTTS(piper_tts, cue),
        settings={
            "conversation": {"stage_timeout_s": STALL_TIMEOUT_S if mode == "hang" else RAISE_TIMEOUT_S}
        },
    )
    result = await _fault_and_recover(server, cue, mode, "say")
    _check(result, "exploded" if mode == "raise" else "speech synthesis produced nothing")


@pytest.mark.parametrize("mode", ["raise", "hang"])
async def test_llm_fault_mid_answer(make_server, language_model, mode: str) -> None:
    cue = Cue()
    server = await make_server(
        llm=FaultyLLM(language_model, cue),
        settings={
            "conversation": {"stage_timeout_s": STALL_TIMEOUT_S if mode == "hang" else RAISE_TIMEOUT_S}
        },
    )
    result = await _fault_and_recover(server, cue, mode, "chat")
    _check(result, "exploded" if mode == "raise" else "the language model produced nothing")


async def test_renderer_raising_fails_the_turn_not_the_session(make_server) -> None:
    cue = Cue()
    server = await make_server(renderer=FaultyRendererEngine(cue))
    result = await _fault_and_recover(server, cue, "raise", "say")
    _check(result, "renderer exploded")


async def test_renderer_hang_repeats_frames_and_speech_goes_on(make_server) -> None:
    """A renderer that stalls needs no timeout: audio never waits for video, late frames repeat."""
    cue = Cue()
    server = await make_server(renderer=FaultyRendererEngine(cue))
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        cue.mode = "hang"
        receiver.send({"type": "say", "text": TWO_SENTENCES})
        stalled = await receiver.wait_event(lambda e: e.get("type") == "metrics", 20)
        assert stalled["frames_repeated"] > 0 and not stalled["interrupted"]
        await receiver.wait_event(lambda e: e.get("type") == "state" and e.get("state") == "idle", 10)
        seen = len(receiver.events)
        receiver.send({"type": "say", "text": "Back to normal."})
        after = await receiver.wait_event(
            lambda e: e.get("type") == "metrics" and e in receiver.events[seen:], 20
        )
        assert after["frames_repeated"] <= 2, after
        await receiver.close()
