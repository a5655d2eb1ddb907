#!/usr/bin/env python3
"""Score the conversation's answers: everyday questions asked over a real call, through the `chat` path.

  python scripts/eval_answers.py                                     # the default model, server started here
  python scripts/eval_answers.py --model-path models/llm/x.gguf      # another GGUF (AVATAR_RTC_LLM__MODEL_PATH)
  python scripts/eval_answers.py --limit 10                          # a quick look
  python scripts/eval_answers.py --url http://127.0.0.1:8080 --name mine   # a server already running

Each item is a fresh call (so no item sees another's history); a multi-turn item sends its messages one
after the other in that call, and only its last answer is scored. A right answer contains, for every
group of :attr:`Item.expect`, one of the group's alternatives (case-insensitive, whole words; a trailing
``*`` allows any ending), and is clean: in the call's language and without repeating itself (the check that keeps such replies
out of the history). The answer scored is the final assistant transcript: what the caller heard.

Latency per turn, from the server's metrics event (ms after the chat message arrived): first LLM token,
first audio frame sent; and at this client, the whole answer (the final transcript, which comes once the
answer has been spoken: it includes speaking time). Medians and p90 over all turns.

Writes docs/figures/eval_answers_<name>.json (every answer, its verdict and timings; the settings; the
machine's load). Run as root it re-executes itself in a loopback-only network namespace; either way the
call uses 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.config import Settings  # noqa: E402
from avatar_rtc.conversation.hygiene import reply_for_history  # noqa: E402
from avatar_rtc.testing.netns import reexec_in_loopback_namespace  # noqa: E402
from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402


@dataclass(frozen=True)
class Item:
    kind: str  # fact, arithmetic, advice, history
    turns: tuple[str, ...]  # the caller's messages; the last one's answer is scored
    expect: tuple[tuple[str, ...], ...]  # every group must match one of its alternatives


def _q(kind: str, question: str, *groups: tuple[str, ...]) -> Item:
    return Item(kind, (question,), groups)


def _h(turns: tuple[str, ...], *groups: tuple[str, ...]) -> Item:
    return Item("history", turns, groups)


ITEMS: list[Item] = [
    # Facts.
    _q("fact", "What is the capital of France?", ("paris",)),
    _q("fact", "How many legs does a spider have?", ("eight", "8")),
    _q("fact", "What colour is the sky on a clear day?", ("blue",)),
    _q("fact", "Which planet is known as the Red Planet?", ("mars",)),
    _q("fact", "What is the largest ocean on Earth?", ("pacific",)),
    _q("fact", "Who wrote Romeo and Juliet?", ("shakespeare",)),
    _q("fact", "At what temperature in degrees Celsius does water boil at sea level?", ("100", "hundred")),
    _q("fact", "How many days are there in a week?", ("seven", "7")),
    _q("fact", "What is the capital of Japan?", ("tokyo",)),
    _q("fact", "Which gas do plants take in from the air to make their food?", ("carbon dioxide", "co2")),
    _q("fact", "How many continents are there?", ("seven", "7")),
    _q("fact", "At what temperature in Celsius does water freeze?", ("0", "zero")),
    _q("fact", "Which animal is called the king of the jungle?", ("lion", "lions")),
    _q("fact", "What is the chemical symbol for gold?", ("au",)),
    _q("fact", "How many hours are there in a day?", ("24", "twenty four")),
    _q("fact", "What is the tallest mountain in the world?", ("everest",)),
    _q("fact", "What do bees make?", ("honey",)),
    _q("fact", "In which country are the pyramids of Giza?", ("egypt",)),
    _q("fact", "What is the largest planet in our solar system?", ("jupiter",)),
    _q("fact", "How many months are there in a year?", ("twelve", "12")),
    _q("fact", "Which language do most people speak in Brazil?", ("portuguese",)),
    _q("fact", "What is the opposite of hot?", ("cold",)),
    _q("fact", "What does a caterpillar turn into?", ("butterfly", "butterflies", "moth", "moths")),
    _q("fact", "How many minutes are there in an hour?", ("sixty", "60")),
    _q("fact", "What is the common name for H2O?", ("water",)),
    _q("fact", "What is the capital of Italy?", ("rome",)),
    _q("fact", "Which season comes after winter?", ("spring",)),
    # Arithmetic.
    _q("arithmetic", "What is 7 times 8?", ("56", "fifty six")),
    _q("arithmetic", "What is 15 plus 27?", ("42", "forty two")),
    _q("arithmetic", "What is 100 minus 37?", ("63", "sixty three")),
    _q("arithmetic", "What is half of 50?", ("25", "twenty five")),
    _q("arithmetic", "What is 12 divided by 3?", ("4", "four")),
    _q("arithmetic", "What is 9 squared?", ("81", "eighty one")),
    _q("arithmetic", "I have 3 apples and buy 4 more. How many apples do I have now?", ("7", "seven")),
    _q("arithmetic", "What is 10 percent of 200?", ("20", "twenty")),
    _q("arithmetic", "How many minutes are there in two hours?", ("120", "one hundred and twenty",
                                                                  "one hundred twenty", "hundred twenty")),
    _q("arithmetic", "What is 6 plus 6 plus 6?", ("18", "eighteen")),
    # Short advice: the words any sound answer uses.
    _q("advice", "I can't sleep at night. Give me one tip.",
       ("screen*", "caffeine", "coffee", "routine", "bed*", "relax*", "dark*", "regular", "schedule",
        "exercise", "read*", "breath*", "phone*", "same time", "sleep*")),
    _q("advice", "How can I stay hydrated on a hot day?", ("water", "drink*", "fluid*")),
    _q("advice", "I cut my finger a little while cooking. What should I do?",
       ("wash*", "clean*", "rinse*", "bandage*", "plaster*", "pressure", "water")),
    _q("advice", "How can I save money on groceries?",
       ("list", "budget*", "sale*", "discount*", "plan*", "bulk", "coupon*", "compar*", "cheap*",
        "brand*", "deal*", "price*")),
    _q("advice", "I feel stressed before my exam tomorrow. Any advice?",
       ("breath*", "sleep*", "rest*", "break*", "relax*", "prepar*", "stud*", "review*", "calm*",
        "exercise*", "plan*", "confiden*")),
    _q("advice", "What is a healthy breakfast idea?",
       ("oat*", "porridge", "fruit*", "yogurt", "yoghurt", "egg*", "whole", "grain*", "banana*", "berr*",
        "toast", "muesli", "granola", "cereal*", "avocado*", "smoothie*", "nut*")),
    _q("advice", "How can I make my phone battery last longer?",
       ("bright*", "background", "saver", "saving", "low power", "close", "app*", "charg*", "setting*",
        "wifi", "wi fi", "bluetooth", "location", "screen*")),
    _q("advice", "What should I bring on a day hike?", ("water",)),
    _q("advice", "How do I keep my houseplants healthy?", ("water*", "light", "sun*")),
    _q("advice", "It is raining today. What should I take when I go out?",
       ("umbrella*", "raincoat*", "rain jacket*", "coat*", "jacket*")),
    _q("advice", "How do I say thank you politely in an email?", ("thank*", "appreciat*", "grateful")),
    _q("advice", "I feel bored at home. What could I do?",
       ("read*", "book*", "walk*", "exercis*", "cook*", "bak*", "hobby", "hobbies", "music", "game*",
        "movie*", "film*", "learn*", "call*", "draw*", "paint*", "puzzle*", "clean*", "garden*", "write*")),
    # Follow-ups that need the conversation so far.
    _h(("My name is Anna.", "What is my name?"), ("anna",)),
    _h(("I live in Madrid.", "Which country do I live in?"), ("spain",)),
    _h(("I have two dogs and one cat.", "How many pets do I have in total?"), ("three", "3")),
    _h(("My favourite colour is green.", "What is my favourite colour?"), ("green",)),
    _h(("Let's talk about Paris.", "Which country is that city in?"), ("france",)),
    _h(("I'm planning a trip to Japan.", "What is the capital of the country I am visiting?"), ("tokyo",)),
    _h(("Think of the number 12.", "Now add 5 to it. What number do you get?"), ("17", "seventeen")),
    _h(("My sister is called Maria and my brother is called Tom.", "What is my brother's name?"), ("tom",)),
    _h(("I am allergic to peanuts.", "Should I eat a peanut butter sandwich?"),
       ("no", "not", "shouldn't", "avoid*", "don't"), ("allerg*", "peanut*")),
    _h(("I was born in 1990.", "How old will I be in 2030?"), ("40", "forty")),
    _h(("The meeting is on Tuesday.", "On which day is the meeting?"), ("tuesday",)),
]  # fmt: skip


def _normalize(text: str) -> str:
    # NFKC: CO₂ -> CO2; hyphens and apostrophes to one form, so "fifty-six" matches "fifty six".
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    return re.sub(r"[-‐‑–—]", " ", text)


def _alternative_pattern(alternative: str) -> re.Pattern[str]:
    stem = _normalize(alternative)
    prefix = stem.endswith("*")
    body = re.escape(stem.rstrip("*")).replace(r"\ ", r"\s+")
    end = "" if prefix else r"(?!\w)"
    return re.compile(rf"(?<!\w){body}{end}")


def missing_groups(answer: str, expect: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """The groups of ``expect`` that ``answer`` matches no alternative of."""
    text = _normalize(answer)
    return [group for group in expect if not any(_alternative_pattern(a).search(text) for a in group)]


@dataclass
class TurnResult:
    text: str
    first_token_ms: float | None
    first_audio_ms: float | None
    answer_ms: float  # at this client: sent -> final transcript (after the answer was spoken)
    error: str | None = None
    # The page's "interrupted" mark on the final transcript; nobody interrupts here, so any is false.
    interrupted: bool = False


@dataclass
class ItemResult:
    kind: str
    turns: list[str]
    answer: str
    passed: bool
    missing: list[list[str]] = field(default_factory=list)
    unclean: bool = False  # drifted into another language or repeated itself
    timings: list[TurnResult] = field(default_factory=list)


async def ask(receiver: CallReceiver, text: str, timeout_s: float) -> TurnResult:
    start = len(receiver.events)
    sent = time.monotonic()
    receiver.send({"type": "chat", "text": text})

    def final_or_error(event: dict[str, Any]) -> bool:
        return (event["type"] == "transcript" and event["role"] == "assistant" and event["final"]) or (
            event["type"] == "error"
        )

    try:
        done = await receiver.wait_event(final_or_error, wait_s=timeout_s, after=start)
    except TimeoutError:
        # An answer that rambles on for minutes: a wrong one. Cut it off so the call can close.
        receiver.send({"type": "interrupt"})
        return TurnResult("", None, None, timeout_s * 1000, error=f"no whole answer within {timeout_s:g} s")
    # By identity: an earlier turn's transcript may be equal to this one.
    arrived = next(t for e, t in zip(receiver.events, receiver.event_times, strict=True) if e is done)
    answer_ms = (arrived - sent) * 1000
    metrics = next(
        (e for e in receiver.events[start:] if e["type"] == "metrics" and e.get("turn") == "chat"), {}
    )
    if done["type"] == "transcript" and not done["text"]:
        # A turn that failed before a word was spoken: its final (empty) transcript comes first, then
        # the error that says why.
        with contextlib.suppress(TimeoutError):
            done = await receiver.wait_event(lambda e: e["type"] == "error", wait_s=2, after=start)
    if done["type"] == "error":
        return TurnResult("", None, None, answer_ms, error=done["message"])
    return TurnResult(
        done["text"],
        metrics.get("llm_first_token_ms"),
        metrics.get("first_audio_frame_ms"),
        answer_ms,
        interrupted=bool(done.get("interrupted")),
    )


async def run_item(
    url: str, http: aiohttp.ClientSession, item: Item, language: str, timeout_s: float
) -> ItemResult:
    receiver = CallReceiver()
    for attempt in range(10):
        try:
            await receiver.connect_http(url, http)
            break
        except aiohttp.ClientResponseError as error:
            if error.status != 429 or attempt == 9:
                raise
            # A server with a per-address call limit (security.offers_per_minute): wait for a slot.
            await receiver.close()
            receiver = CallReceiver()
            await asyncio.sleep(6)
    try:
        await receiver.wait_event(lambda e: e["type"] == "hello")
        timings = []
        for index, text in enumerate(item.turns):
            if index:
                await asyncio.sleep(1.0)  # a caller reads the answer before typing the next message
            timings.append(await ask(receiver, text, timeout_s))
    finally:
        await receiver.close()
    answer = timings[-1].text
    missing = missing_groups(answer, item.expect)
    # Drifted into another language or repeated itself: what the history would not keep verbatim.
    unclean = reply_for_history(answer, language) != answer.strip()
    passed = not missing and not unclean and timings[-1].error is None
    return ItemResult(
        item.kind, list(item.turns), answer, passed, [list(g) for g in missing], unclean, timings
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(results: list[ItemResult]) -> dict[str, Any]:
    turns = [t for r in results for t in r.timings if t.error is None]

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"median": None, "p90": None, "max": None}
        return {
            "median": round(statistics.median(values), 1),
            "p90": round(percentile(values, 0.9) or 0.0, 1),
            "max": round(max(values), 1),
        }

    by_kind = {}
    for kind in sorted({r.kind for r in results}):
        of_kind = [r for r in results if r.kind == kind]
        by_kind[kind] = f"{sum(r.passed for r in of_kind)}/{len(of_kind)}"
    words = [len(t.text.split()) for t in turns]
    return {
        "passed": sum(r.passed for r in results),
        "items": len(results),
        "score": sum(r.passed for r in results) / len(results) if results else 0.0,
        "by_kind": by_kind,
        "unclean": sum(r.unclean for r in results),
        "errors": sum(1 for r in results for t in r.timings if t.error is not None),
        "turns": len(turns),
        "falsely_interrupted": sum(t.interrupted for t in turns),
        "first_token_ms": stats([t.first_token_ms for t in turns if t.first_token_ms is not None]),
        "first_audio_ms": stats([t.first_audio_ms for t in turns if t.first_audio_ms is not None]),
        "answer_spoken_ms": stats([t.answer_ms for t in turns]),
        "answer_words": stats([float(w) for w in words]),
    }


def model_metadata(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    info: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
    with contextlib.suppress(Exception):  # metadata is a nicety: the score stands without it
        from llama_cpp import Llama

        meta = Llama(model_path=str(path), vocab_only=True, verbose=False).metadata
        info.update(
            {k: meta[k] for k in ("general.name", "general.file_type", "general.size_label") if k in meta}
        )
    return info


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server_process(model_path: Path | None, port: int, log_file: BinaryIO) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AVATAR_RTC_ICE_HOST_ADDRESSES": '["127.0.0.1"]',
        # Typed chat needs no recogniser: leave its memory and start-up time out of the measurement.
        "AVATAR_RTC_ASR__ENGINE": "none",
        "AVATAR_RTC_SECURITY__OFFERS_PER_MINUTE": "0",
    }
    if model_path is not None:
        env["AVATAR_RTC_LLM__MODEL_PATH"] = str(model_path)
    return subprocess.Popen(
        [sys.executable, "-m", "avatar_rtc.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextlib.asynccontextmanager
async def local_server(model_path: Path | None, log_path: Path) -> AsyncIterator[str]:
    port = free_port()
    log_file = await asyncio.to_thread(log_path.open, "wb")
    process = await asyncio.to_thread(start_server_process, model_path, port, log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(900):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                if process.poll() is not None:
                    raise SystemExit(f"server exited during start; see {log_path}")
                await asyncio.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            await asyncio.to_thread(process.wait, 15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log_file.close()


def resolved_model(model_path: Path | None) -> Path | None:
    if model_path is not None:
        return model_path
    from avatar_rtc.conversation.gguf_models import find_gguf_model

    return find_gguf_model(Settings().llm.models_dir)


async def evaluate(args: argparse.Namespace) -> int:
    # Stopped from outside (also when started in the background, where SIGINT is ignored): cancel, so
    # the server this started is stopped on the way out.
    main_task = asyncio.current_task()
    assert main_task is not None
    for stop in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(stop, main_task.cancel)
    items = ITEMS[: args.limit] if args.limit else ITEMS
    settings = Settings()
    language = settings.conversation.language
    model = None if args.url else resolved_model(args.model_path)
    name = args.name or (model.stem if model else "server")
    out = args.out or ROOT / "docs" / "figures" / f"eval_answers_{name}.json"
    load_before = os.getloadavg()
    started = time.monotonic()
    results: list[ItemResult] = []
    print(f"model: {model or args.url}  ({len(items)} items, language {language!r})", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        url = args.url or await stack.enter_async_context(
            local_server(args.model_path, Path(args.server_log))
        )
        http = await stack.enter_async_context(aiohttp.ClientSession())
        for number, item in enumerate(items, 1):
            result = await run_item(url, http, item, language, args.timeout)
            results.append(result)
            last = result.timings[-1]
            verdict = "PASS" if result.passed else "FAIL"
            why = (
                ""
                if result.passed
                else f"  missing {result.missing}" + (" unclean" if result.unclean else "")
            )
            if last.error:
                why += f"  error: {last.error}"
            print(
                f"{number:3d} {verdict} [{item.kind:10s}] {item.turns[-1]!r} -> {result.answer!r}{why}  "
                f"(first token {last.first_token_ms} ms, first audio {last.first_audio_ms} ms, "
                f"spoken {last.answer_ms:.0f} ms)",
                flush=True,
            )
    totals = summary(results)
    ft, fa, sp = totals["first_token_ms"], totals["first_audio_ms"], totals["answer_spoken_ms"]
    print(
        f"\nscore {totals['passed']}/{totals['items']} = {totals['score']:.0%}  by kind {totals['by_kind']}  "
        f"unclean {totals['unclean']}  errors {totals['errors']}  answers marked interrupted "
        f"{totals['falsely_interrupted']} of {totals['turns']}\n"
        f"first token ms median {ft['median']} p90 {ft['p90']} | first audio ms median {fa['median']} "
        f"p90 {fa['p90']} | whole answer spoken ms median {sp['median']} p90 {sp['p90']} | "
        f"words median {totals['answer_words']['median']}"
    )
    llm = settings.llm
    record = {
        "model": name,
        "model_file": model_metadata(model),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "system_prompt": settings.conversation.system_prompt,
            "language": language,
            "n_threads": llm.n_threads,
            "temperature": llm.temperature,
            "max_tokens": llm.max_tokens,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "wall_s": round(time.monotonic() - started, 1),
            "note": args.note,
        },
        "summary": totals,
        "items": [asdict(r) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", type=Path, help="GGUF to serve (default: the server's own choice)")
    parser.add_argument("--url", help="a running server instead of starting one")
    parser.add_argument("--name", help="name in the output file (default: the model file's stem)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for one whole (spoken) answer"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON to write (default docs/figures/eval_answers_<name>.json)"
    )
    parser.add_argument("--server-log", default="/tmp/eval_answers_server.log")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    args = parser.parse_args()
    reexec_in_loopback_namespace()
    return asyncio.run(evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
