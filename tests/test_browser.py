"""End to end: the real server, the real call page, headless Chromium as the caller.

One test walks the whole path a user takes (Call, video plays, type a sentence, Say, hear it) and
checks what the browser itself measured: decoded video frame rate, received audio energy, and the
events the server sent over the data channel.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    BROWSER_TEST_MARKS,
    RunningServer,
    chromium_page,
    make_silence_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

SENTENCE = "Hello there. I am your avatar, and I can speak to you over WebRTC."
VIDEO_SIZE = 512
EXPECTED_FPS = 25

# Reads the page's own peer connection stats; the page exposes it as window.avatarCall.pc.
INBOUND_STATS_JS = """
async () => {
  const pc = window.avatarCall.pc;
  if (!pc) return null;
  const out = {audio: null, video: null};
  (await pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp" || !(s.kind in out)) return;
    out[s.kind] = {
      timestamp: s.timestamp,
      packetsReceived: s.packetsReceived ?? 0,
      framesDecoded: s.framesDecoded ?? 0,
      frameWidth: s.frameWidth ?? 0,
      totalAudioEnergy: s.totalAudioEnergy ?? 0,
      audioLevel: s.audioLevel ?? 0,
    };
  });
  return out;
}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path / "server") as running:
        yield running


def _inbound(page: Any) -> dict[str, Any]:
    stats = page.evaluate(INBOUND_STATS_JS)
    assert stats and stats["audio"] and stats["video"], f"no inbound audio/video RTP stats: {stats}"
    return stats


def _events_of(page: Any, kind: str) -> list[dict[str, Any]]:
    return page.evaluate("(kind) => window.avatarCall.events.filter((e) => e.type === kind)", kind)


def test_call_speak_and_hear(server: RunningServer, tmp_path: Path) -> None:

    # The microphone is there but silent: the server answers what it hears, and a voice turn would cut
    # the Say off (tests/test_browser_voice.py covers talking to the avatar).
    wav = make_silence_wav(tmp_path)
    page_errors: list[str] = []
    screenshot = tmp_path / "call_desktop.png"

    viewport = {"width": 1280, "height": 800}
    with chromium_page(tmp_path / "chromium-profile", wav, viewport, page_errors) as page:
        page.goto(f"{server.base_url}/")

        page.click("#call-btn")
        # Playing means frames keep arriving, not just that metadata came: wait for the
        # clock to move well past its first value.
        page.wait_for_function(
            f"""() => {{
              const v = document.getElementById("remote-video");
              return v.videoWidth === {VIDEO_SIZE} && !v.paused && v.currentTime > 1.0;
            }}""",
            timeout=20_000,
        )
        assert page.evaluate("window.avatarCall.connectionState") == "connected"
        assert page.evaluate("document.getElementById('remote-video').videoHeight") == VIDEO_SIZE
        assert page.is_enabled("#say-btn"), "Say stays disabled although the data channel is open"
        page.wait_for_function("() => window.avatarCall.hello !== null")
        hello = _events_of(page, "hello")[-1]
        assert page.is_enabled("#ask-btn") == bool(hello.get("llm")), f"Ask button disagrees with {hello}"
        mic_note = page.text_content("#mic-note") or ""
        assert page.is_hidden("#mic-note"), f"fake microphone was not used: {mic_note}"

        # An idle window first: the audio energy received while the avatar is silent is the
        # yardstick the speech has to clear.
        idle_start = _inbound(page)
        page.wait_for_timeout(1500)
        before_say = _inbound(page)
        said_at = time.monotonic()
        idle_energy = before_say["audio"]["totalAudioEnergy"] - idle_start["audio"]["totalAudioEnergy"]

        page.fill("#talk-text", SENTENCE)
        page.click("#say-btn")
        assert page.input_value("#talk-text") == "", "the text box is cleared once the text is sent"
        said = page.evaluate("window.avatarCall.transcript.filter((e) => e.source === 'say')")
        assert [e["text"] for e in said] == [SENTENCE], f"said text not in the transcript: {said}"

        page.wait_for_function(
            "() => window.avatarCall.events.some((e) => e.type === 'state' && e.state === 'speaking')",
            timeout=15_000,
        )

        # Poll stats until the speech shows up in what the browser decoded; keep the loudest
        # instantaneous level seen as a second, independent signal.
        peak_level = 0.0
        spoken_energy = 0.0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = _inbound(page)
            peak_level = max(peak_level, now["audio"]["audioLevel"])
            spoken_energy = now["audio"]["totalAudioEnergy"] - before_say["audio"]["totalAudioEnergy"]
            if spoken_energy > max(10 * idle_energy, 1e-3) and peak_level > 0.01:
                break
            page.wait_for_timeout(100)
        assert spoken_energy > max(10 * idle_energy, 1e-3), (
            f"no speech energy received after say: {spoken_energy=} {idle_energy=}"
        )
        assert peak_level > 0.01, f"received audio level never rose: {peak_level=}"

        # Frame rate over at least 3 s that include the speech, when the renderer works hardest.
        page.wait_for_timeout(max(0.0, 3000 - (time.monotonic() - said_at) * 1000))
        after = _inbound(page)
        frames = after["video"]["framesDecoded"] - before_say["video"]["framesDecoded"]
        seconds = (after["video"]["timestamp"] - before_say["video"]["timestamp"]) / 1000
        fps = frames / seconds
        assert 20 <= fps <= 30, f"decoded {frames} frames in {seconds:.2f} s = {fps:.1f} fps"
        assert after["video"]["frameWidth"] == VIDEO_SIZE

        page.wait_for_function(
            "() => window.avatarCall.events.some((e) => e.type === 'metrics')", timeout=20_000
        )
        metrics = _events_of(page, "metrics")[-1]
        assert isinstance(metrics.get("request_to_first_audio_ms"), int | float), metrics
        assert metrics["request_to_first_audio_ms"] >= 0, metrics
        for key in ("frames_late", "frames_repeated"):
            assert isinstance(metrics.get(key), int) and metrics[key] >= 0, metrics
        assert isinstance(metrics.get("speech_ms"), int | float) and metrics["speech_ms"] > 0, metrics
        # The page shows every field it received.
        table = page.text_content("#metrics") or ""
        for key in metrics:
            if key != "type":
                assert key in table, f"metrics table lacks {key!r}: {table!r}"

        page.screenshot(path=str(screenshot), full_page=True)
        errors = _events_of(page, "error")
        assert not errors, f"server sent errors: {errors}"
        print(
            f"\nvideo {fps:.1f} fps; speech energy {spoken_energy:.4f} (idle {idle_energy:.5f}), "
            f"peak level {peak_level:.3f}; metrics {metrics}; screenshot {screenshot}"
        )

        page.click("#hangup-btn")
        assert page.evaluate("window.avatarCall.pc") is None

    assert not page_errors, f"uncaught errors in the page: {page_errors}"
