"""End to end by voice: headless Chromium's fake microphone asks the avatar a question out loud.

The real server hears it (VAD, Whisper), answers with the local LLM and speaks the answer back over
WebRTC; the test checks the caller's words were recognised, an answer came back and was heard, the
server reported a voice turn's latency, and the page shows all of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    BROWSER_TEST_MARKS,
    RunningServer,
    chromium_page,
    make_speech_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

QUESTION = "What colour is the sky on a clear summer day?"
MAX_WER = 0.3
# Chromium loops the fake microphone file: a short lead-in, the question once, then a tail long
# enough that the question does not come round again before the answer has been heard.
LEAD_SILENCE_S = 1.5
TAIL_SILENCE_S = 30.0  # a busy machine (CI) may take 10 s and more to answer

INBOUND_AUDIO_JS = """
async () => {
  const pc = window.avatarCall.pc;
  if (!pc) return null;
  let audio = null;
  (await pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      audio = {totalAudioEnergy: s.totalAudioEnergy ?? 0, audioLevel: s.audioLevel ?? 0};
    }
  });
  return audio;
}
"""
USER_LINES_JS = "() => window.avatarCall.transcript.filter((e) => e.role === 'user' && e.final && e.text)"
ANSWER_JS = """() => window.avatarCall.transcript.find(
  (e) => e.role === 'assistant' && e.source !== 'say' && e.final) ?? null"""
VOICE_METRICS_JS = (
    "() => window.avatarCall.events.find((e) => e.type === 'metrics' && e.turn === 'voice') ?? null"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path / "server") as running:
        yield running


def _audio(page: Any) -> dict[str, float]:
    audio = page.evaluate(INBOUND_AUDIO_JS)
    assert audio, "no inbound audio RTP stats"
    return audio


def test_voice_question_gets_a_spoken_answer(server: RunningServer, tmp_path: Path) -> None:

    from avatar_rtc.conversation.asr import word_error_rate

    wav = make_speech_wav(tmp_path, QUESTION, lead_silence_s=LEAD_SILENCE_S, tail_silence_s=TAIL_SILENCE_S)
    page_errors: list[str] = []
    desktop_shot = tmp_path / "voice_desktop.png"
    phone_shot = tmp_path / "voice_phone.png"

    viewport = {"width": 1280, "height": 800}
    with chromium_page(tmp_path / "chromium-profile", wav, viewport, page_errors) as page:
        page.goto(f"{server.base_url}/")
        started = time.monotonic()
        page.click("#call-btn")

        page.wait_for_function("() => window.avatarCall.connectionState === 'connected'")
        page.wait_for_function("() => window.avatarCall.hello !== null")
        hello = page.evaluate("window.avatarCall.hello")
        assert hello["asr"] and hello["llm"], f"server cannot hold a voice conversation: {hello}"
        assert page.is_hidden("#mic-note"), f"fake microphone was not used: {page.text_content('#mic-note')}"
        assert page.is_hidden("#asr-note") and page.is_hidden("#llm-note")
        assert page.is_enabled("#ask-btn")
        before = _audio(page)

        # The question, as the server recognised it.
        page.wait_for_function(f"() => ({USER_LINES_JS})().length > 0", timeout=30_000)
        heard = page.evaluate(USER_LINES_JS)[0]["text"]
        wer = word_error_rate(QUESTION, heard)
        assert wer <= MAX_WER, f"recognised {heard!r} for {QUESTION!r}: WER {wer:.2f}"
        recognised_after_s = time.monotonic() - started

        # The answer: partials while it is produced, then what was actually spoken. Meanwhile
        # watch the audio the browser decodes for the avatar's voice.
        peak_level = 0.0
        answer = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            peak_level = max(peak_level, _audio(page)["audioLevel"])
            answer = page.evaluate(ANSWER_JS)
            if answer is not None and page.evaluate(VOICE_METRICS_JS) is not None:
                break
            page.wait_for_timeout(100)
        assert answer is not None, (
            f"no final answer; transcript {page.evaluate('window.avatarCall.transcript')}"
        )
        assert answer["text"].strip(), f"the answer was empty: {answer}"
        spoken_energy = _audio(page)["totalAudioEnergy"] - before["totalAudioEnergy"]
        assert spoken_energy > 1e-3, f"no speech energy received for the answer: {spoken_energy=}"
        assert peak_level > 0.01, f"received audio level never rose: {peak_level=}"

        metrics = page.evaluate(VOICE_METRICS_JS)
        assert metrics is not None, "no metrics event for the voice turn"
        assert metrics["since"] == "speech_end", metrics
        for key in (
            "vad_end_ms",
            "asr_ms",
            "llm_first_token_ms",
            "tts_first_audio_ms",
            "first_audio_frame_ms",
        ):
            assert isinstance(metrics.get(key), int | float) and metrics[key] >= 0, (key, metrics)
        assert metrics["vad_end_ms"] <= metrics["asr_ms"] <= metrics["first_audio_frame_ms"], metrics

        # What the page shows: both sides of the conversation and the turn's latency waterfall.
        transcript = page.text_content("#transcript") or ""
        assert heard in transcript, f"question missing from the page's transcript: {transcript!r}"
        assert answer["text"] in transcript, f"answer missing from the page's transcript: {transcript!r}"
        assert "since end of your speech" in (page.text_content("#latency-caption") or "")
        assert page.is_visible("#latency .stage-row[data-stage='asr_ms'] .stage-bar")
        latency = page.text_content("#latency") or ""
        # The page rounds as JavaScript does (halves up); Python's round() takes halves to even.
        assert f"{math.floor(metrics['asr_ms'] + 0.5)} ms" in latency, f"latency panel: {latency!r}"
        errors = page.evaluate("window.avatarCall.events.filter((e) => e.type === 'error')")
        assert not errors, f"server sent errors: {errors}"

        page.screenshot(path=str(desktop_shot), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(phone_shot), full_page=True)
        print(
            f"\nheard {heard!r} (WER {wer:.2f}) {recognised_after_s:.1f} s after Call; "
            f"answer {answer['text']!r} (interrupted: {answer['interrupted']}); "
            f"energy {spoken_energy:.4f}, peak {peak_level:.3f}; metrics {metrics}; "
            f"screenshots {desktop_shot} {phone_shot}"
        )
        page.click("#hangup-btn")

    assert not page_errors, f"uncaught errors in the page: {page_errors}"
