"""Voice conversation over a real call: a caller speaks (an espeak-ng clip as its microphone), the avatar
transcribes, thinks with the embedded LLM and answers aloud; the caller can cut in; failures of the
back-ends give an error event and leave the session usable."""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import av
import numpy as np
import pytest

from avatar_rtc.conversation.asr import word_error_rate
from avatar_rtc.conversation.audio import resample_pcm
from avatar_rtc.conversation.echo import EchoGuard, EchoVerdict
from avatar_rtc.conversation.llm import OpenAICompatibleLLM
from avatar_rtc.testing.mic import ScriptedMic
from avatar_rtc.testing.receiver import CallReceiver, Received
from avatar_rtc.testing.speech import spoken_clip

QUESTION = "What colour is the sky on a clear summer day?"
LONG_SPEECH = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman. "
    "Every morning he rowed out before sunrise, and every evening he came home with a story. "
    "The children of the village gathered around him to listen, and he never ran out of tales."
)


def _is_final_user(event: dict[str, Any]) -> bool:
    """The caller's transcript once the utterance has ended (partial ones come at its pauses)."""
    return event["type"] == "transcript" and event["role"] == "user" and event["final"]


def _rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


def _audio_between(rec: Received, start: float, end: float) -> np.ndarray:
    chunks = [pcm for t, pcm in zip(rec.audio_arrival, rec.audio_pcm, strict=True) if start <= t < end]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def _last_loud_arrival(rec: Received, before: float, threshold: float = 300.0) -> float | None:
    last = None
    for t, pcm in zip(rec.audio_arrival, rec.audio_pcm, strict=True):
        if t < before and _rms(pcm) > threshold:
            last = t
    return last


async def _join(server, mic: ScriptedMic | None = None) -> CallReceiver:
    receiver = CallReceiver(mic=mic)
    await receiver.join(server.url)
    return receiver


async def test_spoken_question_gets_a_transcript_and_a_spoken_answer(server) -> None:
    mic = ScriptedMic()
    receiver = await _join(server, mic)
    await asyncio.sleep(1.0)
    mic.play(spoken_clip(QUESTION))
    user = await receiver.wait_event(_is_final_user, wait_s=15)
    wer = word_error_rate(QUESTION, user["text"])
    print(f"heard {user['text']!r}, WER {wer:.2f}")
    assert wer <= 0.3
    answer = await receiver.wait_event(
        lambda e: e["type"] == "transcript" and e["role"] == "assistant" and e["final"], wait_s=30
    )
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "voice")
    await receiver.close()
    print(f"answer {answer['text']!r}; metrics {metrics}")
    assert answer["text"].strip()
    assert {"listening", "thinking", "speaking", "idle"} <= {
        e["state"] for e in receiver.events if e["type"] == "state"
    }
    for stage in ("vad_end_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_frame_ms"):
        assert metrics[stage] is not None and metrics[stage] > 0, stage
    assert (
        metrics["vad_end_ms"]
        < metrics["asr_ms"]
        < metrics["llm_first_token_ms"]
        < metrics["tts_first_audio_ms"]
        < metrics["first_audio_frame_ms"]
    )
    rec = receiver.received
    spoken = _audio_between(rec, mic.clip_ended_at[0], rec.audio_arrival[-1])
    assert _rms(spoken) > 500, "no speech energy in the avatar's answer"
    # Frame pacing held while ASR, the LLM and TTS ran: no stall. A model run on the event loop stops
    # the frames for hundreds of ms (tiny.en on this clip: 1.1 s); a busy machine (CI shares its
    # cores) delays a frame now and then, so the bounds are stalls, not pacing figures (bench_voice.py
    # measures those).
    gaps = np.diff([t for t in rec.video_arrival if t >= mic.clip_started_at[0]]) * 1000
    print(f"inter-frame gap p99 {np.percentile(gaps, 99):.1f} ms, longest {gaps.max():.1f} ms")
    assert np.percentile(gaps, 99) <= 100, f"inter-frame gap p99 {np.percentile(gaps, 99):.1f} ms"
    assert gaps.max() <= 200, f"the video stalled for {gaps.max():.0f} ms"


async def test_barge_in_stops_the_avatar_and_keeps_only_what_was_heard(server) -> None:
    mic = ScriptedMic()
    receiver = await _join(server, mic)
    session = server.services.sessions.get(receiver.session_id)
    receiver.send({"type": "say", "text": LONG_SPEECH})
    await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "speaking")
    await asyncio.sleep(2.0)
    mic.play(spoken_clip("Wait, stop please."))
    barge = await receiver.wait_event(lambda e: e["type"] == "barge_in", wait_s=5)
    detected_at = receiver.event_times[receiver.events.index(barge)]
    cut = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "say")
    user = await receiver.wait_event(_is_final_user, wait_s=15)
    user_at = receiver.event_times[receiver.events.index(user)]
    rec = receiver.received
    last_loud = _last_loud_arrival(rec, before=user_at)
    await receiver.close()

    assert cut["interrupted"] is True
    assert 1000 < cut["speech_ms"] < 6000
    stop_ms = (last_loud - detected_at) * 1000
    print(f"avatar audio stopped {stop_ms:.0f} ms after the barge-in was detected")
    assert stop_ms <= 100
    # No stale audio: silence from then until the answer to the caller's new turn begins.
    stale = _audio_between(rec, detected_at + 0.1, user_at)
    assert _rms(stale) < 50
    assert session is not None and session.conversation.barge_ins == 1


async def test_chat_uses_the_llm_and_history_keeps_the_exchange(server) -> None:
    receiver = await _join(server)
    session = server.services.sessions.get(receiver.session_id)
    receiver.send({"type": "chat", "text": "Say hello in three words."})
    answer = await receiver.wait_event(
        lambda e: e["type"] == "transcript" and e["role"] == "assistant" and e["final"], wait_s=30
    )
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "chat")
    await receiver.close()
    assert answer["text"]
    assert answer["interrupted"] is False  # the page shows "interrupted" from this flag
    assert metrics["llm_first_token_ms"] is not None and metrics["interrupted"] is False
    history = session.conversation.history.messages()
    assert history[-2] == {"role": "user", "content": "Say hello in three words."}
    assert history[-1] == {"role": "assistant", "content": answer["text"]}


async def test_llm_server_down_gives_an_error_and_the_session_stays_usable(make_server) -> None:
    unreachable = OpenAICompatibleLLM("http://127.0.0.1:9/v1", "none", timeout=2.0)
    server = await make_server(llm=unreachable)
    receiver = await _join(server)
    receiver.send({"type": "chat", "text": "Hello?"})
    error = await receiver.wait_event(lambda e: e["type"] == "error", wait_s=10)
    await receiver.wait_event(lambda e: e["type"] == "state" and e["state"] == "idle")
    receiver.send({"type": "say", "text": "I am still here."})
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "say", wait_s=10)
    await receiver.close()
    await unreachable.close()
    assert "127.0.0.1:9" in error["message"]
    assert metrics["speech_ms"] > 300


async def test_llm_failing_mid_stream_gives_an_error_after_the_words_already_said(make_server) -> None:
    from aiohttp import web

    async def half_answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        # One whole sentence, then half of the next: only the first can have been spoken.
        for word in ("Hello there. ", "I am about to ", "fail"):
            chunk = {"choices": [{"delta": {"content": word}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.05)
        request.transport.close()  # the server dies mid-answer
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", half_answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    llm = OpenAICompatibleLLM(f"http://127.0.0.1:{runner.addresses[0][1]}/v1", "test", timeout=2.0)
    server = await make_server(llm=llm)
    receiver = await _join(server)
    session = server.services.sessions.get(receiver.session_id)
    asked = len(receiver.events)
    receiver.send({"type": "chat", "text": "Hi"})
    error = await receiver.wait_event(lambda e: e["type"] == "error", wait_s=15, after=asked)
    failed = receiver.events.index(error)
    await receiver.wait_event(
        lambda e: e["type"] == "state" and e["state"] == "idle", wait_s=10, after=failed
    )
    error_at = receiver.event_times[failed]
    spoken = _audio_between(receiver.received, 0.0, error_at)
    history = session.conversation.history.messages()
    receiver.send({"type": "say", "text": "Recovered."})
    await receiver.wait_event(lambda e: e["type"] == "metrics" and e["turn"] == "say", wait_s=10)
    await receiver.close()
    await llm.close()
    await runner.cleanup()

    assert error["message"]
    before = receiver.events[asked:failed]

    def first(predicate: Any) -> int:
        found = next((i for i, e in enumerate(before) if predicate(e)), None)
        assert found is not None, f"missing before the error: {before}"
        return found

    # The words were shown, spoken and finished before the error came: transcript, speaking, metrics.
    shown = first(lambda e: e["type"] == "transcript" and e["role"] == "assistant" and not e["final"])
    speaking = first(lambda e: e["type"] == "state" and e["state"] == "speaking")
    metrics = before[first(lambda e: e["type"] == "metrics" and e["turn"] == "chat")]
    final = before[first(lambda e: e["type"] == "transcript" and e["role"] == "assistant" and e["final"])]
    assert before[shown]["text"] == "Hello there."
    assert shown < speaking
    assert metrics["interrupted"] is False and metrics["speech_ms"] > 300
    assert _rms(spoken) > 300, "no speech reached the caller before the error"
    # What was heard, exactly: the whole first sentence, nothing of the one the failure cut off.
    assert final["text"] == "Hello there." and final["interrupted"] is False
    assert history[-2:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
    ]


async def test_without_asr_voice_reports_an_error_and_text_chat_still_works(make_server) -> None:
    server = await make_server(asr=None, asr_unavailable="no Whisper model found")
    mic = ScriptedMic()
    receiver = await _join(server, mic)
    hello = next(e for e in receiver.events if e["type"] == "hello")
    assert hello["asr"] is False and "Whisper" in hello["asr_unavailable"]
    mic.play(spoken_clip("Can you hear me?"))
    error = await receiver.wait_event(lambda e: e["type"] == "error", wait_s=10)
    assert "speech recognition unavailable" in error["message"]
    receiver.send({"type": "chat", "text": "Say yes."})
    answer = await receiver.wait_event(
        lambda e: e["type"] == "transcript" and e["role"] == "assistant" and e["final"], wait_s=30
    )
    await receiver.close()
    assert answer["text"]


class EchoingMic(ScriptedMic):
    """A caller's microphone that picks up the avatar's own voice from the speakers, as weak echo
    cancellation would let it through.

    The speaker plays what the call received the way a browser does: one 20 ms frame per frame of time,
    from a jitter buffer ``buffer_frames`` deep. When nothing has arrived it plays silence and the rest
    comes later (the delay grows); a burst that fills the buffer past ``max_buffer_frames`` is caught
    up (WebRTC's NetEq compresses time to do that). The microphone hears the speaker ``delay_frames``
    later (device and room), quieter, with a weaker second reflection. A speaker never jumps to the
    newest frame, so on a busy machine the echo keeps its delay between underruns."""

    def __init__(
        self,
        receiver: CallReceiver,
        delay_frames: int = 4,
        gain: float = 0.15,
        reflection_frames: int = 2,
        reflection_gain: float = 0.05,
        buffer_frames: int = 3,
        max_buffer_frames: int = 10,
    ) -> None:
        super().__init__()
        self.receiver, self.delay_frames, self.gain = receiver, delay_frames, gain
        self.reflection_frames, self.reflection_gain = reflection_frames, reflection_gain
        self.buffer_frames, self.max_buffer_frames = buffer_frames, max_buffer_frames
        self._next: int | None = None  # the received frame the speaker plays next
        self._played: list[np.ndarray | None] = []  # what the speaker played, one entry per frame
        self._index = 0

    def _play(self) -> None:
        received = self.receiver.received.audio_pcm
        if self._next is None and len(received) >= self.buffer_frames:
            self._next = len(received) - self.buffer_frames
        if self._next is not None and len(received) - self._next > self.max_buffer_frames:
            self._next = len(received) - self.buffer_frames
        if self._next is not None and self._next < len(received):
            self._played.append(received[self._next])
            self._next += 1
        else:
            self._played.append(None)

    async def recv(self):  # type: ignore[override]
        frame = await super().recv()
        self._play()
        i = len(self._played) - 1 - self.delay_frames
        heard = self._played[i] if i >= 0 else None
        if heard is not None:
            echo = heard.astype(np.float32) * self.gain
            j = i - self.reflection_frames
            reflected = self._played[j] if j >= 0 else None
            if reflected is not None and len(reflected) == len(echo):
                echo += reflected.astype(np.float32) * self.reflection_gain
            frame = av.AudioFrame.from_ndarray(
                echo.astype(np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate, frame.pts, frame.time_base = (
                48000,
                self._index * 960,
                fractions.Fraction(1, 48000),
            )
        self._index += 1
        return frame


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """Two processes that keep this machine's cores busy (as a CI neighbour or a second call's models
    would), beside the server and the caller."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


async def test_the_avatars_own_echo_does_not_interrupt_it(server, cpu_hog) -> None:
    """The avatar talks on while its own voice comes back through the caller's speaker and microphone,
    with both cores kept busy: the echo must not cut it off. (With loudness contours the guard failed
    this with and without the load; with waveform correlation, blocks allowed their own delay, it
    passed 20 runs in a row under the load, correlations 0.78-0.96.)"""
    receiver = CallReceiver()
    mic = EchoingMic(receiver)
    receiver.pc.getTransceivers()[0].sender.replaceTrack(mic)
    receiver.pc.getTransceivers()[0].direction = "sendrecv"
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    await receiver.wait_event(lambda e: e["type"] == "hello")
    session = server.services.sessions.get(receiver.session_id)
    receiver.send({"type": "say", "text": LONG_SPEECH})
    metrics = await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=40)
    await receiver.close()
    print(f"echo onsets ignored: {session.conversation.echoes_ignored}")
    assert not any(e["type"] == "barge_in" for e in receiver.events)
    assert metrics["interrupted"] is False
    assert session.conversation.echoes_ignored >= 1, "the echo never reached the VAD: the test proves nothing"


def _echo_guard_heard(
    delay_s: float, mic_parts: dict[str, float], onset_s: float = 1.6, window_s: float = 0.26
) -> EchoVerdict:
    """The avatar says a sentence (sent in 20 ms reads at 48 kHz from wall time 0); the microphone
    (16 kHz) hears a mix of ``mic_parts``: "echo" (the avatar's voice ``delay_s`` later, through a
    speaker that cuts the lows and a room reflection 30 ms behind) and "caller" (someone else talking),
    each at its gain. The guard's verdict on the ``window_s`` of microphone audio from ``onset_s`` on
    (how much a barge-in is decided on)."""
    avatar = spoken_clip("Seven green lanterns swayed gently above the crowded market square.", rate=48000)
    sent = [(i / 50, avatar[i * 960 : (i + 1) * 960]) for i in range(len(avatar) // 960)]
    heard = resample_pcm(avatar, 48000, 16000).astype(np.float32)
    shift = round(delay_s * 16000)
    echo = np.concatenate([np.zeros(shift, np.float32), heard])[: len(heard)]
    echo = echo - 0.6 * np.concatenate([echo[:1], echo[:-1]])  # a small speaker: less bass
    echo = echo + 0.4 * np.concatenate([np.zeros(480, np.float32), echo[:-480]])  # the room
    caller = spoken_clip("Excuse me, can I ask you something about the weather?", "en-gb", rate=16000)
    caller = np.pad(caller.astype(np.float32), (16000, max(0, len(heard) - len(caller))))[: len(heard)]
    mic = mic_parts.get("echo", 0.0) * echo + mic_parts.get("caller", 0.0) * caller
    guard = EchoGuard()
    for i in range(round((onset_s + window_s) / 0.02)):
        guard.mic_audio((i + 1) * 0.02, np.clip(mic[i * 320 : (i + 1) * 320], -32768, 32767).astype(np.int16))
    return guard.assess(sent, 48000, since=onset_s)


@pytest.mark.parametrize("delay_s", [0.05, 0.2, 0.45])
def test_echo_guard_tells_echo_from_a_caller(delay_s: float) -> None:
    echo = _echo_guard_heard(delay_s, {"echo": 0.1})
    assert echo.is_echo and abs(echo.delay_s - delay_s) <= 0.03, echo
    caller = _echo_guard_heard(delay_s, {"caller": 1.0})
    assert not caller.is_echo, caller
    # Told apart by what is said, not only by how loud: a caller as quiet as the echo is still a caller.
    quiet_caller = _echo_guard_heard(delay_s, {"caller": 0.1})
    assert quiet_caller.attenuation_db >= 3.0 and not quiet_caller.is_echo, quiet_caller
    # A caller talking over the echo is a barge-in, even though the echo is there too.
    both = _echo_guard_heard(delay_s, {"caller": 1.0, "echo": 0.1})
    assert not both.is_echo, both
    print(f"delay {delay_s}: echo {echo}, caller {caller}, both {both}")
