"""Seeded fuzzing of what strangers can send: data-channel messages and the JSON routes. Bounded in
count and time, on loopback. Whatever arrives, the server answers with a 4xx or an error event, never
a 5xx or an exception, and the call it arrived on keeps working."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import string
from typing import Any

import aiohttp
import pytest

from avatar_rtc.testing.receiver import CallReceiver

SEED = 20261201
MESSAGES = 400
REQUESTS = 300
MESSAGE_TYPES = ("say", "chat", "interrupt", "select_template", "ping", "hello", "", None, 7, "SAY")


def _text(rng: random.Random, longest: int = 40) -> str:
    alphabet = string.printable + "äß汉字🙂\u202e\x00"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, nesting at most a few levels (deep nesting has its own cases)."""
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, 1e308, -0.5, rng.randint(-(10**6), 10**6)])
    if kind in (3, 4):
        return _text(rng)
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_text(rng, 8): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _nested(rng: random.Random) -> str:
    depth = rng.choice([31, 33, 100, 5000, 20000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = opener * depth + "1" + closer * depth
    return inner if rng.random() < 0.8 else inner[: len(inner) // 2]


def _message(rng: random.Random) -> str | bytes:
    """One data-channel message. Speech requests never carry usable text: the fuzz is about parsing
    and dispatch, not about making the avatar talk 400 times."""
    roll = rng.random()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if roll < 0.2:
        return _nested(rng)
    if roll < 0.3:
        return json.dumps(_value(rng))[: rng.randint(0, 60)]  # truncated
    if roll < 0.4:
        return json.dumps(_value(rng))
    message: dict[str, Any] = {"type": rng.choice(MESSAGE_TYPES)}
    if message["type"] in ("say", "chat"):
        message["text"] = rng.choice([None, "", "   ", 5, [], {"t": "x"}, "x" * 2001, _value(rng)])
    elif message["type"] == "select_template":
        message["id"] = rng.choice(["../../etc/passwd", "", "x" * 300, "no-such-avatar", 3, None, _text(rng)])
    elif message["type"] == "ping":
        message["t"] = _value(rng)
    for _ in range(rng.randint(0, 3)):
        message[_text(rng, 6)] = _value(rng)
    return json.dumps(message)


async def test_data_channel_fuzz_leaves_the_call_working(
    make_server, caplog: pytest.LogCaptureFixture
) -> None:
    server = await make_server(settings={"limits": {"pings_per_second": 1000}})
    rng = random.Random(SEED)
    caplog.set_level(logging.ERROR)
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e.get("type") == "hello")
        for n in range(MESSAGES):
            message = _message(rng)
            receiver.channel.send(message)
            if n % 20 == 19:
                await asyncio.sleep(0.05)  # let the channel drain: SCTP buffers are finite
        await asyncio.sleep(1.0)
        # Still the same call, still answering.
        assert receiver.session_id in server.services.sessions.sessions
        assert receiver.channel.readyState == "open"
        mark = len(receiver.events)
        receiver.send({"type": "ping", "t": 42})
        pong = await receiver.wait_event(lambda e: e.get("type") == "pong" and e.get("t") == 42, after=mark)
        assert pong["t"] == 42
        receiver.send({"type": "say", "text": "Still here."})
        await receiver.wait_event(
            lambda e: e.get("type") == "state" and e.get("state") == "speaking", after=mark
        )
        errors = [e for e in receiver.events if e.get("type") == "error"]
        assert errors, "malformed messages should have been answered with error events"
        await receiver.pc.close()
    unexpected = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("avatar_rtc", "aiortc"))
    ]
    assert not unexpected, [r.getMessage() for r in unexpected]


def _body(rng: random.Random) -> tuple[bytes, str]:
    roll = rng.random()
    if roll < 0.15:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))), "application/json"
    if roll < 0.3:
        return _nested(rng).encode(), "application/json"
    if roll < 0.4:
        return json.dumps(_value(rng)).encode(), rng.choice(
            ["text/plain", "application/x-www-form-urlencoded", ""]
        )
    if roll < 0.55:
        return json.dumps(_value(rng)).encode(), "application/json"
    fields: dict[str, Any] = {
        rng.choice(["sdp", "type", "text", "name", "welcome", "language", "template", "record", "x"]): _value(
            rng
        )
        for _ in range(rng.randint(0, 4))
    }
    if rng.random() < 0.3:
        fields["type"] = "offer"
        fields["sdp"] = "v=0\r\n" + _text(rng, 200)
    if "text" in fields and isinstance(fields["text"], str) and fields["text"].strip():
        fields["text"] = [fields["text"]]  # never usable: no rendering or speaking from the fuzz
    return json.dumps(fields).encode(), "application/json"


async def test_json_routes_fuzz_never_answer_5xx(make_server) -> None:
    server = await make_server(settings={"security": {"offers_per_minute": 0}})
    rng = random.Random(SEED + 1)
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        session = f"/api/sessions/{receiver.session_id}"
        routes = [
            ("POST", "/offer"),
            ("POST", f"{session}/say"),
            ("POST", f"{session}/chat"),
            ("POST", f"{session}/interrupt"),
            ("PATCH", "/api/templates/no-such-avatar"),
            ("PATCH", "/api/templates/..%2F..%2Fetc"),
            ("POST", "/api/render"),
        ]
        statuses: dict[int, int] = {}
        for _ in range(REQUESTS):
            method, path = rng.choice(routes)
            data, content_type = _body(rng)
            headers = {"X-Session-Key": receiver.session_key or ""}
            if content_type:
                headers["Content-Type"] = content_type
            async with http.request(method, server.url + path, data=data, headers=headers) as resp:
                body = await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                assert resp.status < 500, (method, path, data[:200], resp.status, body[:200])
                if resp.status >= 400:
                    assert "error" in json.loads(body), body[:200]
        assert receiver.session_id in server.services.sessions.sessions
        assert len(server.services.sessions.sessions) == 1, "a fuzzed offer made a session"
        assert sum(v for k, v in statuses.items() if 400 <= k < 500) > REQUESTS // 2, statuses
        await receiver.pc.close()
