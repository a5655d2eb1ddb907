"""Language-model back-ends behind one small protocol: llama.cpp in-process, or any OpenAI-compatible server.

Both stream text deltas as an async generator, and both stop generating as soon as the consumer stops
listening (``aclose()``, or cancellation of the task iterating them), so a barge-in costs no more than
one token of wasted work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from avatar_rtc.conversation.hygiene import reply_for_history

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

    def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]: ...

    async def prefill(self, messages: list[ChatMessage]) -> None:
        """Read the conversation so far ahead of the next question, while nobody waits for it, so the
        next answer only has to read the new message. A no-op where the model is remote."""


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


# The llama.cpp worker thread's last item on the queue: generation is over and the model is free again.
_GENERATION_OVER = object()


@dataclass
class _LoadedLlama:
    llama: Llama
    # One generation at a time per model: a Llama object holds one KV cache, and two generations on
    # two cores would only slow both (and the media threads with them).
    generation_lock: threading.Lock = field(default_factory=threading.Lock)


# Models already loaded in this process, by (file, n_ctx, n_threads): every session shares one copy.
_loaded_llamas: dict[tuple[Path, int, int], _LoadedLlama] = {}
_loading_guard = threading.Lock()


class LlamaCppLLM:
    """A GGUF model run in-process by llama-cpp-python, loaded once per process and shared by sessions.

    Generation runs in a worker thread. llama.cpp releases the GIL while it computes, so the event loop
    and the media threads keep running; the worker checks a stop flag at every token.
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
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._loaded: _LoadedLlama | None = None

    @classmethod
    async def open(cls, model_path: Path, **options: Any) -> LlamaCppLLM:
        """Construct and load off the event loop: the load reads the whole model file."""
        llm = cls(model_path, **options)
        await llm.load()
        return llm

    async def load(self) -> None:
        await asyncio.to_thread(self.load_blocking)

    def load_blocking(self) -> None:
        """Load the model unless this process already has it (with the same n_ctx and n_threads)."""
        self._loaded_llama()

    @property
    def is_generating(self) -> bool:
        return self._loaded is not None and self._loaded.generation_lock.locked()

    def _loaded_llama(self) -> _LoadedLlama:
        if self._loaded is not None:
            return self._loaded
        if not self.model_path.is_file():
            raise LlmError(f"LLM model file not found: {self.model_path}")
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
                loaded = _loaded_llamas[key] = _LoadedLlama(llama)
                log.info("loaded %s (n_ctx=%d, n_threads=%d)", self.model_path.name, *key[1:])
        self._loaded = loaded
        return loaded

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, item)
            except RuntimeError:
                # The event loop is closed: nobody is listening any more.
                stop.set()

        worker = threading.Thread(
            target=self._generate_blocking,
            args=([dict(message) for message in messages], stop, emit),
            name="llm-llama-cpp",
            daemon=True,
        )
        worker.start()
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

    async def prefill(self, messages: list[ChatMessage]) -> None:
        await asyncio.to_thread(self.prefill_blocking, [dict(m) for m in messages])

    def prefill_blocking(self, messages: list[ChatMessage]) -> None:
        try:
            loaded = self._loaded_llama()
            with loaded.generation_lock:
                # One generated token is the cheapest way through the public API to evaluate the
                # prompt; llama-cpp-python then reuses that evaluated prefix for the next prompt.
                loaded.llama.create_chat_completion(messages=messages, max_tokens=1)  # type: ignore[arg-type]
        except Exception as error:  # a failed warm-up only costs the next answer its head start
            log.warning("llama.cpp prefill failed: %s", error)

    def _generate_blocking(
        self, messages: list[ChatMessage], stop: threading.Event, emit: Callable[[object], None]
    ) -> None:
        try:
            loaded = self._loaded_llama()
            with loaded.generation_lock:
                if stop.is_set():
                    return
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
            emit(_GENERATION_OVER)


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

    async def prefill(self, messages: list[ChatMessage]) -> None:
        return None  # the server keeps (or not) its own prompt cache

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

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
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
