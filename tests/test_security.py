"""Token, CORS allow-list and limits: refused early, with a clear status and JSON body."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web

from avatar_rtc.server.security import AccessPolicy, SecuritySettings, middlewares, turn_rest_credentials
from avatar_rtc.testing.receiver import CallReceiver

TOKEN = "s3cret-token"
ALLOWED = "https://shop.example.com"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def tiny_app() -> AsyncIterator[Callable[..., Awaitable[tuple[str, AccessPolicy]]]]:
    """An app with the security middlewares in front of stand-in handlers."""
    runners: list[web.AppRunner] = []

    async def start(
        sessions: int = 0, clock: FakeClock | None = None, **settings: Any
    ) -> tuple[str, AccessPolicy]:
        policy = AccessPolicy(
            SecuritySettings(**settings),
            max_sessions=2,
            session_count=lambda: sessions,
            clock=clock or FakeClock(),
        )
        app = web.Application(middlewares=middlewares(policy))

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app.router.add_post("/offer", ok)
        app.router.add_get("/api/config", ok)
        app.router.add_get("/healthz", ok)
        app.router.add_get("/static/kiosk.html", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}", policy

    yield start
    for runner in runners:
        await runner.cleanup()


async def _status(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, resp.headers  # type: ignore[return-value]


async def test_token_guards_api_but_not_page_or_health(tiny_app) -> None:
    url, _ = await tiny_app(api_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        status, body, headers = await _status(http, "POST", f"{url}/offer", json={})
        assert status == 401 and "token" in body["error"] and headers["WWW-Authenticate"] == "Bearer"
        status, *_ = await _status(http, "GET", f"{url}/api/config", headers={"Authorization": "Bearer nope"})
        assert status == 401
        status, *_ = await _status(
            http, "GET", f"{url}/api/config", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
        # Only the header counts: a token in the query string would land in access logs.
        status, *_ = await _status(http, "POST", f"{url}/offer?token={TOKEN}", json={})
        assert status == 401
        for open_path in ("/healthz", "/static/kiosk.html"):
            status, *_ = await _status(http, "GET", url + open_path)
            assert status == 200, open_path


async def test_no_token_configured_means_open(tiny_app) -> None:
    url, _ = await tiny_app()
    async with aiohttp.ClientSession() as http:
        status, *_ = await _status(http, "POST", f"{url}/offer", json={})
        assert status == 200


async def test_cors_allow_list(tiny_app) -> None:
    url, _ = await tiny_app(api_token=TOKEN, cors_allow_origins=[ALLOWED])
    preflight = {"Origin": ALLOWED, "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as http:
        # A preflight carries no token, and needs none.
        status, _, headers = await _status(http, "OPTIONS", f"{url}/offer", headers=preflight)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == ALLOWED
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        status, _, headers = await _status(
            http, "OPTIONS", f"{url}/offer", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        status, _, headers = await _status(
            http,
            "POST",
            f"{url}/offer",
            json={},
            headers={"Origin": ALLOWED, "Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED
        # Refusals an allowed page receives are readable by it.
        status, _, headers = await _status(http, "POST", f"{url}/offer", json={}, headers={"Origin": ALLOWED})
        assert status == 401 and headers["Access-Control-Allow-Origin"] == ALLOWED
        status, body, _ = await _status(
            http,
            "POST",
            f"{url}/offer",
            json={},
            headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"},
        )
        assert status == 403 and "not allowed" in body["error"]
        # Same origin is always allowed.
        status, *_ = await _status(
            http, "POST", f"{url}/offer", json={}, headers={"Origin": url, "Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200


async def test_offer_rate_per_address_and_window(tiny_app) -> None:
    clock = FakeClock()
    url, policy = await tiny_app(clock=clock, offers_per_minute=3)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            status, *_ = await _status(http, "POST", f"{url}/offer", json={})
            assert status == 200
        status, body, headers = await _status(http, "POST", f"{url}/offer", json={})
        assert status == 429 and "at most 3 a minute" in body["error"] and int(headers["Retry-After"]) >= 1
        # Other routes are not rate limited.
        status, *_ = await _status(http, "GET", f"{url}/api/config")
        assert status == 200
        clock.now += 61
        status, *_ = await _status(http, "POST", f"{url}/offer", json={})
        assert status == 200
    assert policy.refused == {429: 1}


def test_rate_limiter_memory_is_bounded() -> None:
    policy = AccessPolicy(SecuritySettings(offers_per_minute=1))
    policy.MAX_TRACKED_ADDRESSES = 100
    for n in range(1000):
        assert policy.take_offer(f"10.0.{n // 256}.{n % 256}") is None
    assert len(policy._offers) == 100


def test_forwarded_for_only_when_trusted() -> None:
    class Req:
        remote = "10.0.0.1"
        headers: ClassVar[dict[str, str]] = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}

    assert AccessPolicy(SecuritySettings()).client_address(Req()) == "10.0.0.1"  # type: ignore[arg-type]
    trusted = AccessPolicy(SecuritySettings(trust_forwarded_for=True))
    assert trusted.client_address(Req()) == "203.0.113.9"  # type: ignore[arg-type]


async def test_session_limit_and_body_size(tiny_app) -> None:
    url, _ = await tiny_app(sessions=2, max_body_bytes=2048)
    async with aiohttp.ClientSession() as http:
        status, body, headers = await _status(http, "POST", f"{url}/offer", json={})
        assert status == 503 and "limit of 2 sessions" in body["error"] and headers["Retry-After"]
        status, body, _ = await _status(
            http, "POST", f"{url}/offer", data=b"x" * 4096, headers={"Content-Type": "application/json"}
        )
        assert status == 413 and "larger than 2048" in body["error"]


def test_turn_rest_credentials_match_coturn_scheme() -> None:
    username, credential = turn_rest_credentials("shared", "avatar", 600, now=1_700_000_000)
    assert username == "1700000600:avatar"
    expected = base64.b64encode(hmac.new(b"shared", username.encode(), hashlib.sha1).digest()).decode()
    assert credential == expected
    policy = AccessPolicy(SecuritySettings(turn_secret="shared"))
    servers = policy.ice_servers_for_client(
        [
            {"urls": ["stun:stun.example.com"]},
            {"urls": ["turn:turn.example.com:3478"]},
            {"urls": ["turns:turn.example.com:5349"], "username": "fixed", "credential": "pw"},
        ]
    )
    assert "username" not in servers[0]
    assert servers[1]["username"].endswith(":avatar") and servers[1]["credential"]
    assert servers[2]["username"] == "fixed"


# -- needs the wiring: Settings.security, create_app adds security.middlewares(policy) ---------------
async def test_real_server_refuses_without_token_and_serves_with_it(make_server) -> None:
    server = await make_server(settings={"security": {"api_token": TOKEN}, "limits": {"max_sessions": 1}})
    async with aiohttp.ClientSession() as http:
        status, *_ = await _status(http, "GET", f"{server.url}/api/config")
        assert status == 401
        status, *_ = await _status(http, "GET", f"{server.url}/healthz")
        assert status == 200
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as authed:
            receiver = CallReceiver()
            await receiver.connect_http(server.url, authed)
            status, body, _ = await _status(
                authed, "POST", f"{server.url}/offer", json={"sdp": "x", "type": "offer"}
            )
            assert status == 503 and "limit" in body["error"]
            status, *_ = await _status(
                http, "POST", f"{server.url}/api/sessions/{receiver.session_id}/say", json={"text": "hi"}
            )
            assert status == 401
            status, *_ = await _status(
                authed,
                "POST",
                f"{server.url}/api/sessions/{receiver.session_id}/say",
                json={"text": "hi"},
                headers=receiver.session_headers,
            )
            assert status == 202
            await receiver.close()
