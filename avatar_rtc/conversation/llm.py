"""Language-model back-ends behind one small protocol: llama.cpp in-process, or any OpenAI-compatible server.

Both stream text deltas as an async generator, and both stop generating as soon as the consumer stops
listening (``aclose()``, or cancellation of the task iterating them), so a barge-in costs no more than
one token of wasted work.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import numpy as np

from avatar_rtc.conversation.fair import NO_SESSION, FairLock, run_exclusive
from avatar_rtc.conversation.hygiene import reply_for_history
from avatar_rtc.media import executors

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

# One chat message in the OpenAI shape: {"role": "system" | "user" | "assistant", "content": "..."}.
ChatMessage = dict[str, str]

# How much of an error body goes into an LlmError message: enough to read the server's reason.
_ERROR_BODY_CHARS = 500


class LlmError(RuntimeError):
    pass


class LanguageModel(Protocol):
    """A chat model that answers the conversation so far, one text delta at a time."""

    name: str

    def stream(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> AsyncIterator[str]:
        """The answer to ``messages`` for ``session`` (the key that sessions are served in turn by
        and that a model's saved state belongs to; NO_SESSION for work of no session)."""
        ...

    async def prefill(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> None:
        """Read the conversation so far ahead of the next question, while nobody waits for it, so the
        next answer only has to read the new message. A no-op where the model is remote."""

    def forget(self, session: str) -> None:
        """The session has ended: drop whatever the model keeps for it."""


# How the system prompt names the call's language, written in that language: the instruction then also
# shows the model the language it asks for.
LANGUAGE_INSTRUCTIONS = {
    "en": "Always reply in English.",
    "zh": "请始终只用简体中文回答。",
    "de": "Antworte immer auf Deutsch.",
    "fr": "Réponds toujours en français.",
    "es": "Responde siempre en español.",
}


def language_instruction(language: str) -> str:
    return LANGUAGE_INSTRUCTIONS.get(language, f"Always reply in the language whose code is {language!r}.")


class ConversationHistory:
    """One session's conversation, bounded so the prompt (and its prefill time) cannot grow without end.

    A turn is a user message and the assistant's reply to it. The oldest turns go first once there are
    more than ``max_turns`` or the messages (system prompt included) exceed ``max_chars``; the newest
    message is always kept, whatever its length.

    With a ``language`` the system prompt tells the model to answer in it, and a reply that drifts into
    another script or repeats itself is remembered only up to its last clean sentence
    (:func:`~avatar_rtc.conversation.hygiene.reply_for_history`).
    """

    def __init__(
        self, system_prompt: str, max_turns: int = 8, max_chars: int = 6000, language: str | None = None
    ) -> None:
        if max_turns < 1 or max_chars < 1:
            raise ValueError("max_turns and max_chars must be at least 1")
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.language = language
        self._turn_messages: list[ChatMessage] = []

    def add_user(self, text: str) -> None:
        self._append("user", text)

    def add_assistant(self, text: str) -> None:
        """Record what the user actually heard (after a barge-in, only the part that was spoken), less
        any drift or repetition that would lead the model astray on the next turn."""
        kept = reply_for_history(text, self.language)
        if kept != text.strip():
            # Lengths only: what callers say and hear stays out of the logs.
            log.info(
                "reply kept for the history only in part (drift or repetition): %d of %d characters",
                len(kept),
                len(text.strip()),
            )
        self._append("assistant", kept)

    def clear(self) -> None:
        self._turn_messages.clear()

    @property
    def system_content(self) -> str:
        if self.language is None:
            return self.system_prompt
        return f"{self.system_prompt} {language_instruction(self.language)}".strip()

    def messages(self) -> list[ChatMessage]:
        system = self.system_content
        head = [{"role": "system", "content": system}] if system else []
        return head + [dict(message) for message in self._turn_messages]

    def _append(self, role: str, text: str) -> None:
        text = text.strip()
        if not text:
            # An answer interrupted before any of it was heard leaves nothing to remember.
            return
        if self._turn_messages and self._turn_messages[-1]["role"] == role:
            # Two user messages in a row (the reply was cut off before a word of it played) become one:
            # several chat templates insist on user/assistant alternation.
            self._turn_messages[-1]["content"] += "\n" + text
        else:
            self._turn_messages.append({"role": role, "content": text})
        self._drop_oldest_turns()

    def _drop_oldest_turns(self) -> None:
        def over(turns: int, chars: int) -> bool:
            user_turns = sum(1 for message in self._turn_messages if message["role"] == "user")
            used = len(self.system_content) + sum(len(m["content"]) for m in self._turn_messages)
            return user_turns > turns or used > chars

        if not over(self.max_turns, self.max_chars):
            return
        # Trim well below the limit, not just under it: every trim changes the prompt's beginning, so
        # an in-process model re-reads the whole prompt instead of reusing its cached prefix. Halving
        # makes that happen once every few turns instead of on every turn past the limit.
        while len(self._turn_messages) > 1 and over(self.max_turns // 2, self.max_chars // 2):
            del self._turn_messages[0]
            # Never start on an orphaned reply: drop the assistant half of the turn that just went.
            while len(self._turn_messages) > 1 and self._turn_messages[0]["role"] == "assistant":
                del self._turn_messages[0]


# The llama.cpp worker's last item on the queue: generation is over and the model is free again.
_GENERATION_OVER = object()


@dataclass(frozen=True)
class SavedPrompt:
    """One session's evaluated prompt, saved when another session's turn takes the model: the KV
    cache cells of llama.cpp's sequence 0 and the token ids they hold.

    Not Llama.save_state(): that also copies the logits of up to n_batch prompt tokens (512 x the
    vocabulary in floats: 100 MB for SmolLM2, 311 MB for Qwen2.5), which nobody reads when logits_all
    is off, while the KV cells cost about 23 KB a token for SmolLM2-135M (measured; 12 KB by its shape
    for Qwen2.5-0.5B, whose 2 KV heads are shared by 14 query heads)."""

    tokens: np.ndarray
    kv_cells: bytes

    @property
    def nbytes(self) -> int:
        return len(self.kv_cells) + self.tokens.nbytes


_CLOSED_SESSIONS_KEPT = 1024


class SavedPrompts:
    """Saved prompts by session, least recently saved dropped first once they pass a memory budget.

    Also knows which session's prompt the model's KV cache holds now (``resident``). Engine work
    touches both only while holding the model's FairLock; ``forget`` comes from the event loop at any
    time, hence the guard.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._saved: OrderedDict[str, SavedPrompt] = OrderedDict()
        # Sessions that have closed (the newest ones): a prefill of theirs still queued or running
        # when they closed makes them resident again afterwards, and must not save their prompt then.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self.resident: str = NO_SESSION

    @property
    def nbytes(self) -> int:
        with self._guard:
            return sum(saved.nbytes for saved in self._saved.values())

    def __contains__(self, session: object) -> bool:
        with self._guard:
            return session in self._saved

    def put(self, session: str, saved: SavedPrompt, budget_bytes: int) -> None:
        with self._guard:
            if self.resident != session or session in self._closed:
                return  # forgotten while it was being saved, or before: the session has closed
            self._saved.pop(session, None)
            if saved.nbytes > budget_bytes:
                return
            self._saved[session] = saved
            used = sum(s.nbytes for s in self._saved.values())
            while used > budget_bytes:
                _, dropped = self._saved.popitem(last=False)
                used -= dropped.nbytes

    def take(self, session: str) -> SavedPrompt | None:
        """The session's saved prompt, no longer kept here: it is about to live in the model again."""
        with self._guard:
            return self._saved.pop(session, None)

    def forget(self, session: str) -> None:
        with self._guard:
            self._saved.pop(session, None)
            if self.resident == session:
                self.resident = NO_SESSION
            self._closed[session] = None
            while len(self._closed) > _CLOSED_SESSIONS_KEPT:
                self._closed.popitem(last=False)


@dataclass
class _LoadedLlama:
    llama: Llama
    # One job (prefill or answer) at a time per model, sessions served in turn: a Llama object holds
    # one KV cache, and two generations on two cores would only slow both (and the media with them).
    engine: FairLock
    prompts: SavedPrompts = field(default_factory=SavedPrompts)
    # Tokens that llama.cpp actually evaluated for prompts (the part not reused from the KV cache),
    # and tokens generated: what a turn cost, for tests and benchmarks.
    prompt_tokens_evaluated: int = 0
    tokens_generated: int = 0
    reading_prompt: bool = False


# Models already loaded in this process, by (file, n_ctx, n_threads): every session shares one copy.
_loaded_llamas: dict[tuple[Path, int, int], _LoadedLlama] = {}
_loading_guard = threading.Lock()


def _count_prompt_evaluation(loaded: _LoadedLlama) -> None:
    """Count the tokens of each prompt that llama.cpp evaluates. Llama.generate evaluates what is left
    of the prompt after its cached prefix in its first eval() call, then one token per step; the
    flag set before each completion marks that first call."""
    llama = loaded.llama
    evaluate = llama.eval

    def counting_eval(tokens: Any) -> None:
        if loaded.reading_prompt:
            loaded.reading_prompt = False
            loaded.prompt_tokens_evaluated += len(tokens)
        evaluate(tokens)

    llama.eval = counting_eval  # type: ignore[method-assign]


class LlamaCppLLM:
    """A GGUF model run in-process by llama-cpp-python, loaded once per process and shared by sessions.

    Jobs run on the model executor, one at a time, sessions served in turn (FairLock); llama.cpp
    releases the GIL while it computes, so the event loop and the media threads keep running. The
    worker checks a stop flag at every token, so an abandoned answer stops within a token.

    Each session keeps its own evaluated prompt: when another session's job takes the model, the KV
    cache of the session that had it is saved (up to ``session_state_mb`` for all sessions, least
    recently used dropped first) and restored at its next job, so its next turn evaluates only its new
    message instead of its whole history.
    """

    name = "llama-cpp"

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 2048,
        # One thread by default: on a 2-core host the media threads need the other core. With both
        # cores, llama.cpp's threads wait on each other at every layer, and when the renderer holds
        # one core decoding drops below the single-thread speed (scripts/bench_llm.py measures it).
        n_threads: int = 1,
        max_tokens: int = 200,
        temperature: float = 0.7,
        session_state_mb: float = 256,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.session_state_bytes = int(session_state_mb * 1024 * 1024)
        self._loaded: _LoadedLlama | None = None

    @classmethod
    async def open(cls, model_path: Path, **options: Any) -> LlamaCppLLM:
        """Construct and load off the event loop: the load reads the whole model file."""
        llm = cls(model_path, **options)
        await llm.load()
        return llm

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(executors.models(), self._loaded_llama)

    def load_blocking(self) -> None:
        """Load the model unless this process already has it (with the same n_ctx and n_threads)."""
        self._loaded_llama()

    @property
    def is_generating(self) -> bool:
        return self._loaded is not None and self._loaded.engine.locked()

    @property
    def prompt_tokens_evaluated(self) -> int:
        """Prompt tokens this model (shared by every LlamaCppLLM of the same file) has evaluated."""
        return self._loaded_llama().prompt_tokens_evaluated

    @property
    def tokens_generated(self) -> int:
        return self._loaded_llama().tokens_generated

    @property
    def saved_prompts(self) -> SavedPrompts:
        return self._loaded_llama().prompts

    def count_tokens(self, text: str) -> int:
        return len(self._loaded_llama().llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def forget(self, session: str) -> None:
        if self._loaded is not None:  # a model never loaded holds nothing for anyone
            self._loaded.prompts.forget(session)

    def _loaded_llama(self) -> _LoadedLlama:
        if self._loaded is not None:
            return self._loaded
        if not self.model_path.is_file():
            raise LlmError(f"LLM model file not found: {self.model_path}")
        # llama.cpp's OpenMP threads spin while they wait for each other at every layer. On a host whose
        # cores the calls' media also need, a spinning thread holds a core a descheduled one is waiting
        # for: a 15-token prompt read 1035 ms with the default policy and 775 ms passive, beside one
        # busy core (no difference on an idle host). libgomp reads this when llama.cpp loads it, so it
        # only applies where nothing loaded the system libgomp before (an explicit setting wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            from llama_cpp import Llama
        except ImportError as error:
            raise LlmError(
                f"llama-cpp-python is not installed ({error}); pip install llama-cpp-python"
            ) from error
        key = (self.model_path.resolve(), self.n_ctx, self.n_threads)
        with _loading_guard:
            loaded = _loaded_llamas.get(key)
            if loaded is None:
                try:
                    llama = Llama(
                        model_path=str(self.model_path),
                        n_ctx=self.n_ctx,
                        n_threads=self.n_threads,
                        # Reading the prompt happens while the avatar is silent, so it may use every
                        # core; decoding overlaps speech and keeps to n_threads.
                        n_threads_batch=max(self.n_threads, os.cpu_count() or 1),
                        verbose=False,
                    )
                except (ValueError, RuntimeError, OSError) as error:
                    raise LlmError(f"llama.cpp could not load {self.model_path}: {error}") from error
                loaded = _loaded_llamas[key] = _LoadedLlama(llama, FairLock(f"llm {self.model_path.name}"))
                _count_prompt_evaluation(loaded)
                log.info("loaded %s (n_ctx=%d, n_threads=%d)", self.model_path.name, *key[1:])
        self._loaded = loaded
        return loaded

    # -- one session's prompt in the model --------------------------------------------------------
    def _make_resident(self, loaded: _LoadedLlama, session: str) -> None:
        """Give the KV cache to ``session``: save the previous session's prompt, restore this one's.

        A session with nothing saved (its first turn, or dropped for the budget) starts from
        whatever the cache holds: every session's prompt begins with the same system prompt, and
        llama-cpp-python reuses the longest common prefix."""
        prompts = loaded.prompts
        previous = prompts.resident
        if previous == session:
            return
        llama = loaded.llama
        if previous != NO_SESSION and self.session_state_bytes > 0 and llama.n_tokens > 0:
            try:
                prompts.put(previous, _save_prompt(llama), self.session_state_bytes)
            except LlmError as error:
                log.warning("%s; that session's next turn reads its history again", error)
        prompts.resident = session
        saved = prompts.take(session) if session != NO_SESSION else None
        if saved is not None:
            try:
                _restore_prompt(llama, saved)
            except LlmError as error:
                log.warning("%s; reading the session's history again", error)
                llama.reset()

    # -- answering --------------------------------------------------------------------------------
    async def stream(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        loaded = self._loaded or await loop.run_in_executor(executors.models(), self._loaded_llama)
        deltas: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:
                # The event loop is closed: nobody is listening any more.
                stop.set()

        # Waiting for this session's turn on the model happens here, on the event loop: a consumer
        # that gives up meanwhile leaves the queue and nothing is computed for it.
        await loaded.engine.acquire(session)
        try:
            # From here the worker owns the model and releases it when it is done.
            # With the caller's context variables, as asyncio.to_thread does (the session id in logs).
            loop.run_in_executor(
                executors.models(),
                contextvars.copy_context().run,
                self._generate_holding,
                loaded,
                session,
                [dict(message) for message in messages],
                stop,
                emit,
            )
        except BaseException:
            loaded.engine.release()
            raise
        generation_over = False
        try:
            while True:
                item = await deltas.get()
                if item is _GENERATION_OVER:
                    generation_over = True
                    return
                if isinstance(item, LlmError):
                    raise item
                assert isinstance(item, str)
                yield item
        finally:
            stop.set()
            # Wait for the worker to notice (one token, or one prompt batch at most), so that when
            # aclose() returns the model is free and no core is still spent on an unwanted answer.
            while not generation_over:
                generation_over = await deltas.get() is _GENERATION_OVER

    async def prefill(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> None:
        """Skipped if cancelled before its turn on the model; once started it runs to its end (one
        llama.cpp decode call, which cannot be interrupted)."""
        loop = asyncio.get_running_loop()
        loaded = self._loaded or await loop.run_in_executor(executors.models(), self._loaded_llama)
        copied = [dict(m) for m in messages]
        await run_exclusive(
            loaded.engine,
            session,
            executors.models(),
            lambda _: self._prefill_holding(loaded, session, copied),
        )

    def prefill_blocking(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> None:
        """The same from a thread (start-up warm-up, benchmarks)."""
        try:
            loaded = self._loaded_llama()
        except LlmError as error:
            log.warning("llama.cpp prefill failed: %s", error)
            return
        with loaded.engine.hold_blocking(session):
            self._prefill_holding(loaded, session, [dict(m) for m in messages])

    def _prefill_holding(self, loaded: _LoadedLlama, session: str, messages: list[ChatMessage]) -> None:
        try:
            self._make_resident(loaded, session)
            loaded.reading_prompt = True
            # One generated token is the cheapest way through the public API to evaluate the
            # prompt; llama-cpp-python then reuses that evaluated prefix for the next prompt.
            loaded.llama.create_chat_completion(messages=messages, max_tokens=1)  # type: ignore[arg-type]
        except Exception as error:  # a failed warm-up only costs the next answer its head start
            log.warning("llama.cpp prefill failed: %s", error)
        finally:
            loaded.reading_prompt = False

    def _generate_holding(
        self,
        loaded: _LoadedLlama,
        session: str,
        messages: list[ChatMessage],
        stop: threading.Event,
        emit: Callable[[object], None],
    ) -> None:
        """Runs in the model executor holding ``loaded.engine``, which it releases when done."""
        try:
            if stop.is_set():
                return  # abandoned while waiting for a thread: nothing to compute
            self._make_resident(loaded, session)
            loaded.reading_prompt = True
            chunks = loaded.llama.create_chat_completion(
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
            )
            try:
                # One chunk per decoded token (llama-cpp-python holds text back only while it could
                # be the start of a stop string), so the flag is seen within a token or two.
                for chunk in chunks:
                    loaded.tokens_generated += 1
                    if stop.is_set():
                        break
                    content = chunk["choices"][0]["delta"].get("content")  # type: ignore[typeddict-item]
                    if content:
                        emit(content)
            finally:
                chunks.close()  # type: ignore[union-attr]
        except LlmError as error:
            emit(error)
        except Exception as error:
            # e.g. "Requested tokens exceed context window": the caller sees an LlmError, not a crash.
            log.exception("llama.cpp generation failed")
            emit(LlmError(f"llama.cpp generation failed: {error}"))
        finally:
            loaded.reading_prompt = False
            loaded.engine.release()
            emit(_GENERATION_OVER)


def _save_prompt(llama: Llama) -> SavedPrompt:
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llama.ctx, 0)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llama.ctx, buffer, size, 0)
    if written == 0 or written > size:
        raise LlmError("llama.cpp could not save the session's prompt")
    return SavedPrompt(
        tokens=np.array(llama.input_ids[: llama.n_tokens]), kv_cells=ctypes.string_at(buffer, written)
    )


def _restore_prompt(llama: Llama, saved: SavedPrompt) -> None:
    import llama_cpp

    memory = llama_cpp.llama_get_memory(llama.ctx)
    if memory is not None:
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
    source = (ctypes.c_uint8 * len(saved.kv_cells)).from_buffer_copy(saved.kv_cells)
    if llama_cpp.llama_state_seq_set_data(llama.ctx, source, len(saved.kv_cells), 0) == 0:
        raise LlmError("llama.cpp could not restore the session's prompt")
    count = len(saved.tokens)
    llama.input_ids[:count] = saved.tokens
    llama.n_tokens = count
    # The logits in the context are the previous session's: make generate() decode the last prompt
    # token again before sampling, as Llama.load_state() does.
    llama._requires_eval = True


class OpenAICompatibleLLM:
    """Any server with an OpenAI-style ``/chat/completions`` (llama.cpp server, vLLM, Ollama, OpenAI).

    ``timeout`` bounds connecting and each wait for the next piece of the stream, not the whole answer.
    One HTTP session (keep-alive) per instance: call ``close()`` when done with it.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_tokens: int = 200,
        temperature: float = 0.7,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._api_key = api_key
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    async def prefill(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> None:
        return None  # the server keeps (or not) its own prompt cache

    def forget(self, session: str) -> None:
        return None  # nothing is kept here per session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_read=self._timeout)
            )
        return self._session

    async def stream(self, messages: list[ChatMessage], *, session: str = NO_SESSION) -> AsyncIterator[str]:
        # The server does its own scheduling between requests; the session is not needed here.
        payload = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = self.url
        try:
            async with self._http_session().post(url, json=payload, headers=headers) as response:
                if response.status != 200:
                    body = await _body_snippet(response)
                    raise LlmError(
                        f"LLM server {url} answered HTTP {response.status} {response.reason}: {body}"
                    )
                finished = False
                try:
                    if response.content_type == "application/json":
                        # A server that ignores "stream": the whole answer as one delta.
                        content = _message_content(await response.text(), url)
                        if content:
                            yield content
                    else:
                        async for delta in _sse_deltas(response, url):
                            yield delta
                    finished = True
                finally:
                    if not finished:
                        # Closing (not releasing) drops the connection: the server sees the disconnect
                        # and stops generating instead of finishing an answer nobody will hear.
                        response.close()
        except aiohttp.ClientConnectorError as error:
            raise LlmError(f"LLM server unreachable at {url}: {error}") from error
        except TimeoutError as error:
            raise LlmError(f"LLM server {url} sent nothing for {self._timeout} s") from error
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as error:
            raise LlmError(f"LLM stream from {url} broke off: {error!r}") from error
        except aiohttp.ClientError as error:
            raise LlmError(f"LLM request to {url} failed: {error!r}") from error


async def _body_snippet(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.content.read(_ERROR_BODY_CHARS * 4)
    except aiohttp.ClientError:
        return "(no body)"
    return body.decode("utf-8", errors="replace")[:_ERROR_BODY_CHARS].strip() or "(empty body)"


async def _sse_deltas(response: aiohttp.ClientResponse, url: str) -> AsyncIterator[str]:
    """Text deltas from an OpenAI server-sent-event stream, up to its ``data: [DONE]``."""
    data_lines: list[str] = []
    saw_finish_reason = False
    try:
        async for raw_line in response.content:
            line = raw_line.decode("utf-8").rstrip("\r\n")
            if line:
                field_name, _, value = line.partition(":")
                if field_name == "data":
                    data_lines.append(value.removeprefix(" "))
                # Comments (": keep-alive"), "event:", "id:" and "retry:" lines carry no text.
                continue
            if not data_lines:
                continue
            event_data = "\n".join(data_lines)
            data_lines.clear()
            if event_data == "[DONE]":
                return
            content, finish_reason = _delta_content(event_data, url)
            saw_finish_reason = saw_finish_reason or finish_reason is not None
            if content:
                yield content
    except UnicodeDecodeError as error:
        raise LlmError(f"malformed stream from {url}: not UTF-8 ({error})") from error
    except ValueError as error:  # aiohttp: "Line is too long"
        raise LlmError(f"malformed stream from {url}: {error}") from error
    if data_lines and "\n".join(data_lines) == "[DONE]":
        return
    if not saw_finish_reason:
        raise LlmError(f"LLM stream from {url} ended before its answer was finished (no data: [DONE])")


def _delta_content(event_data: str, url: str) -> tuple[str | None, str | None]:
    """(text delta, finish reason) of one ``chat.completion.chunk``."""
    chunk = _json_object(event_data, url)
    if "error" in chunk:
        raise LlmError(f"LLM server {url} reported an error mid-stream: {chunk['error']}")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise LlmError(f"malformed stream chunk from {url}: no choices in {event_data[:200]!r}")
    if not choices:
        return None, None  # e.g. the usage summary that some servers send last
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        raise LlmError(f"malformed stream chunk from {url}: no delta in {event_data[:200]!r}")
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise LlmError(f"malformed stream chunk from {url}: content is not text in {event_data[:200]!r}")
    return content, choice.get("finish_reason")


def _message_content(body: str, url: str) -> str | None:
    try:
        content = _json_object(body, url)["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise LlmError(f"malformed answer from {url}: {body[:200]!r}") from error
    return content if isinstance(content, str) else None


def _json_object(text: str, url: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LlmError(f"malformed JSON from {url}: {error} in {text[:200]!r}") from error
    if not isinstance(value, dict):
        raise LlmError(f"malformed JSON from {url}: expected an object, got {text[:200]!r}")
    return value
