"""A server that can face a public URL: per-route body limits, calls that never connect (or go
silent) reaped, sessions that only their caller can drive, an atomic session limit, origins judged
without trusting the Host header, bounded JSON, no secrets in logs, and the smaller defects (pings,
abandoned renders, raw streams, upload names, slow clients)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from test_templates import make_moving_face_video

from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.video import MediaLimits, SourceMediaError, iter_video_frames, probe_source
from avatar_rtc.metrics import METRICS
from avatar_rtc.rtc.ice import host_candidates
from avatar_rtc.testing.receiver import LOOPBACK, CallReceiver

TOKEN = "admin-token-for-hardening"
PAGE_TOKEN = "page-token-for-hardening"
DEEP = "[" * 10_000 + "]" * 10_000


async def _send(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.read()
        return resp.status, body


async def _half_open_offer() -> dict[str, str]:
    """A real browser-like offer with its candidates stripped: the server answers, then waits for a
    peer that never shows up (the answer is never applied, no candidate ever arrives)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("events")
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    with host_candidates(LOOPBACK):
        await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    stripped = "".join(
        line
        for line in sdp.splitlines(keepends=True)
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    )
    return {"sdp": stripped, "type": "offer"}


def _reaped(reason: str) -> float:
    return METRICS.registry.get_sample_value("avatar_sessions_reaped_total", {"reason": reason}) or 0.0


# -- 1. body limits per route ------------------------------------------------------------------------------
async def test_uploads_and_render_audio_get_their_own_limits_json_routes_stay_small(make_server) -> None:
    server = await make_server(
        settings={"avatar": {"max_upload_mb": 2}, "limits": {"max_render_audio_mb": 1}}
    )
    big = b"\x00not a video" * (1_300_000 // 12)  # 1.3 MB: far past the 256 KiB JSON limit
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("id", "big")
        form.add_field("file", io.BytesIO(big), filename="big.mp4")
        status, body = await _send(http, "POST", f"{server.url}/api/templates", data=form)
        # Read whole and judged on its content (not a video), not refused for its size.
        assert status == 415, (status, body)
        over = aiohttp.FormData()
        over.add_field("id", "big")
        over.add_field("file", io.BytesIO(big * 2), filename="big.mp4")
        status, body = await _send(http, "POST", f"{server.url}/api/templates", data=over)
        assert status == 413, (status, body)
        audio = aiohttp.FormData()
        audio.add_field("template", "default")
        audio.add_field("audio", io.BytesIO(big[:900_000]), filename="speech.wav")
        status, body = await _send(http, "POST", f"{server.url}/api/render", data=audio)
        assert status == 415, (status, body)
        status, body = await _send(
            http,
            "POST",
            f"{server.url}/offer",
            data=b"{" + b" " * 300_000 + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert status == 413 and "262144" in body["error"]


# -- 2. calls that never connect, or go silent, are reaped -------------------------------------------------
async def test_twenty_half_open_offers_cannot_lock_out_a_real_caller(make_server) -> None:
    server = await make_server(
        settings={
            "limits": {"max_sessions": 3, "connect_timeout_s": 1.0},
            "security": {"offers_per_minute": 0},
        }
    )
    reaped_before = _reaped("connect_timeout")
    offer = await _half_open_offer()
    async with aiohttp.ClientSession() as http:
        codes = await asyncio.gather(
            *(_send(http, "POST", f"{server.url}/offer", json=offer) for _ in range(20))
        )
        statuses = sorted(status for status, _ in codes)
        assert statuses.count(200) == 3 and statuses.count(503) == 17, statuses
        # A real caller tries as a page would (the kiosk retries on 503): it gets in once the deadline
        # has freed the slots, well within a few seconds.
        started = time.monotonic()
        while True:
            receiver = CallReceiver()
            try:
                await receiver.connect_http(server.url, http)
                break
            except aiohttp.ClientResponseError as error:
                await receiver.pc.close()
                assert error.status == 503
                assert time.monotonic() - started < 5, "the half-open offers kept every slot"
                await asyncio.sleep(0.25)
        await receiver.wait_event(lambda e: e.get("type") == "hello")
        assert set(server.services.sessions.sessions) == {receiver.session_id}
        await receiver.pc.close()
    assert _reaped("connect_timeout") - reaped_before == 3


async def test_a_caller_that_goes_silent_is_reaped(make_server) -> None:
    server = await make_server(settings={"limits": {"media_timeout_s": 1.5}})
    reaped_before = _reaped("media_timeout")
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e.get("type") == "hello")
        await asyncio.sleep(2.0)  # RTCP and consent checks keep a live call alive past the timeout
        assert receiver.session_id in server.services.sessions.sessions
        # The caller's machine drops off the network: nothing it sends arrives any more, and it says
        # no goodbye.
        for transceiver in receiver.pc.getTransceivers():
            connection = transceiver.receiver.transport.transport._connection
            for protocol in connection._protocols:
                protocol.transport.sendto = lambda *args: None
        deadline = time.monotonic() + 6
        while receiver.session_id in server.services.sessions.sessions:
            assert time.monotonic() < deadline, "a silent caller kept its slot"
            await asyncio.sleep(0.1)
        await receiver.pc.close()
    assert _reaped("media_timeout") - reaped_before == 1


# -- 3. only the caller drives its call; /metrics names no session -----------------------------------------
async def test_session_routes_need_the_callers_key(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        victim = CallReceiver()
        await victim.connect_http(server.url, http)
        assert victim.session_key and len(victim.session_key) >= 24
        base = f"{server.url}/api/sessions/{victim.session_id}"
        for route in ("say", "chat", "interrupt"):
            status, body = await _send(http, "POST", f"{base}/{route}", json={"text": "I am not the caller"})
            assert status == 401 and "X-Session-Key" in body["error"], (route, status, body)
            status, body = await _send(
                http, "POST", f"{base}/{route}", json={"text": "hi"}, headers={"X-Session-Key": "guess"}
            )
            assert status == 404 and body == {"error": "unknown session"}
        status, _ = await _send(http, "GET", f"{base}/stats", headers={"X-Session-Key": "guess"})
        assert status == 404
        await asyncio.sleep(0.3)
        assert not any(e.get("type") == "state" and e.get("state") == "speaking" for e in victim.events)
        status, body = await _send(
            http, "POST", f"{base}/say", json={"text": "Only I can."}, headers=victim.session_headers
        )
        assert status == 202, body
        async with http.get(f"{server.url}/metrics") as resp:
            exposition = await resp.text()
        assert victim.session_id not in exposition and "session_id=" not in exposition
        assert re.search(r"^avatar_session_frames_sent_total \d", exposition, re.MULTILINE), exposition
        await victim.pc.close()


async def test_session_ids_on_metrics_only_when_asked(make_server) -> None:
    server = await make_server(settings={"observability": {"session_metrics": True}})
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        async with http.get(f"{server.url}/metrics") as resp:
            assert f'session_id="{receiver.session_id}"' in await resp.text()
        await receiver.pc.close()


async def test_page_token_starts_calls_but_cannot_change_templates(make_server) -> None:
    server = await make_server(settings={"security": {"api_token": TOKEN, "page_token": PAGE_TOKEN}})
    page = {"Authorization": f"Bearer {PAGE_TOKEN}"}
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=page) as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        for method, path in (("GET", "/api/config"), ("GET", "/api/templates")):
            status, _ = await _send(http, method, server.url + path)
            assert status == 200, path
        status, _ = await _send(http, "GET", f"{server.url}/api/templates/default/thumbnail.jpg")
        assert status == 200
        for method, path in (
            ("GET", "/metrics"),
            ("DELETE", "/api/templates/x"),
            ("PATCH", "/api/templates/x"),
        ):
            status, body = await _send(http, method, server.url + path, json={})
            assert status == 403 and "admin token" in body["error"], (path, status)
        status, _ = await _send(http, "GET", f"{server.url}/metrics", headers=admin)
        assert status == 200
        await receiver.pc.close()


# -- 4. the session limit holds when offers arrive together ------------------------------------------------
class _SlowLibrary:
    """The shared library, but every acquire takes a while (as when the default is not in RAM)."""

    def __init__(self, library: Any) -> None:
        self._library = library

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)

    async def acquire_async(self, template_id: str) -> Template:
        await asyncio.sleep(0.3)
        return await self._library.acquire_async(template_id)


async def test_session_limit_holds_for_simultaneous_offers(make_server, template_library) -> None:
    server = await make_server(
        library=_SlowLibrary(template_library),
        settings={"limits": {"max_sessions": 3}, "security": {"offers_per_minute": 0}},
    )
    offer = await _half_open_offer()
    async with aiohttp.ClientSession() as http:
        codes = await asyncio.gather(
            *(_send(http, "POST", f"{server.url}/offer", json=offer) for _ in range(20))
        )
    statuses = sorted(s for s, _ in codes)
    assert statuses.count(200) == 3
    # The rest are refused as the server refuses a full house: 503, with the reason.
    assert statuses.count(503) == 17
    assert all("limit of 3 sessions" in body["error"] for s, body in codes if s == 503)
    assert len(server.services.sessions.sessions) == 3


class _BrokenLibrary:
    """Every acquire fails after a moment: a session set-up that dies half way."""

    default_id = "default"

    async def acquire_async(self, template_id: str) -> Template:
        await asyncio.sleep(0.05)
        raise OSError("the template cache is gone")


async def test_a_session_set_up_that_fails_gives_its_slot_back() -> None:
    from types import SimpleNamespace

    from aiortc import RTCSessionDescription

    from avatar_rtc.config import Settings
    from avatar_rtc.rtc.manager import SessionManager, TooManySessionsError

    deps = SimpleNamespace(settings=Settings(limits={"max_sessions": 2}))
    manager = SessionManager(deps, _BrokenLibrary())  # type: ignore[arg-type]
    offer = RTCSessionDescription(sdp="", type="offer")
    outcomes = await asyncio.gather(*(manager.create(offer) for _ in range(5)), return_exceptions=True)
    # Two slots were reserved before the first await, so three offers were refused at once...
    assert sum(isinstance(outcome, TooManySessionsError) for outcome in outcomes) == 3
    assert sum(isinstance(outcome, OSError) for outcome in outcomes) == 2
    # ...and the two failed set-ups gave their slots back.
    assert manager.count == 0


# -- 5. origins: the Host header proves nothing ------------------------------------------------------------
async def test_dns_rebinding_page_cannot_change_templates(make_server) -> None:
    server = await make_server()
    port = server.url.rsplit(":", 1)[1]
    rebound = f"http://attacker.example:{port}"
    headers = {"Host": f"attacker.example:{port}", "Origin": rebound}
    async with aiohttp.ClientSession() as http:
        status, body = await _send(
            http, "PATCH", f"{server.url}/api/templates/default", json={"name": "pwned"}, headers=headers
        )
        assert status == 403, (status, body)
        status, _ = await _send(http, "DELETE", f"{server.url}/api/templates/nothing", headers=headers)
        assert status == 403
        status, _ = await _send(http, "POST", f"{server.url}/offer", json={}, headers=headers)
        assert status == 403
        # The server's own page, at an IP address, is same-origin.
        status, _ = await _send(
            http, "DELETE", f"{server.url}/api/templates/nothing", headers={"Origin": server.url}
        )
        assert status == 404


async def test_public_origin_and_cors_list(make_server) -> None:
    server = await make_server(
        settings={
            "security": {
                "public_origins": ["https://avatar.example.com"],
                "cors_allow_origins": ["*"],
            }
        }
    )
    async with aiohttp.ClientSession() as http:
        own = {"Origin": "https://avatar.example.com", "Host": "avatar.example.com"}
        status, _ = await _send(http, "DELETE", f"{server.url}/api/templates/nothing", headers=own)
        assert status == 404
        # "*" lets any site start calls, never change templates or render files.
        other = {"Origin": "https://shop.example"}
        status, body = await _send(http, "DELETE", f"{server.url}/api/templates/nothing", headers=other)
        assert status == 403 and "may not change templates" in body["error"]
        status, _ = await _send(http, "POST", f"{server.url}/api/render", json={}, headers=other)
        assert status == 403
        status, _ = await _send(http, "GET", f"{server.url}/api/config", headers=other)
        assert status == 200
        preflight = {**other, "Access-Control-Request-Method": "DELETE"}
        status, _ = await _send(http, "OPTIONS", f"{server.url}/api/templates/x", headers=preflight)
        assert status == 403


# -- 6. deeply nested JSON ---------------------------------------------------------------------------------
def test_bounded_json() -> None:
    from avatar_rtc.bounded_json import JsonInputError, json_depth, parse_json

    assert json_depth('{"a": [1, {"b": "[[[[["}]}') == 3
    assert parse_json('{"type": "ping"}') == {"type": "ping"}
    for bad, why in (
        (DEEP, "deeper"),
        ("{" * 40 + "}" * 40, "deeper"),
        ("{nope", "not valid"),
        (b"\xff", "UTF-8"),
    ):
        with pytest.raises(JsonInputError, match=why):
            parse_json(bad)
    with pytest.raises(JsonInputError, match="larger"):
        parse_json("[1]" + " " * 100, max_bytes=50)


async def test_deep_json_is_refused_everywhere(make_server) -> None:
    server = await make_server()
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        json_headers = {"Content-Type": "application/json"}
        for method, path in (
            ("POST", "/offer"),
            ("PATCH", "/api/templates/default"),
            ("POST", "/api/render"),
            ("POST", f"/api/sessions/{receiver.session_id}/say"),
        ):
            status, body = await _send(
                http,
                method,
                server.url + path,
                data=DEEP,
                headers={**json_headers, **receiver.session_headers},
            )
            assert status == 400 and "deeper" in body["error"], (path, status, body)
        receiver.channel.send(DEEP)
        error = await receiver.wait_event(lambda e: e.get("type") == "error")
        assert "deeper" in error["message"]
        # The channel still works: the message did not kill aiortc's receive loop.
        receiver.send({"type": "ping", "t": 7})
        assert (await receiver.wait_event(lambda e: e.get("type") == "pong"))["t"] == 7
        await receiver.pc.close()


# -- 7. secrets stay out of the access log -----------------------------------------------------------------
def test_redacted_urls() -> None:
    from avatar_rtc.server.observability import redact_url

    assert redact_url("/static/kiosk.html?token=abc&sleep=5") == "/static/kiosk.html?token=REDACTED&sleep=5"
    assert redact_url("/x?api_key=1&SessionKey=2&a=3") == "/x?api_key=REDACTED&SessionKey=REDACTED&a=3"
    assert redact_url("/plain?x=1") == "/plain?x=1"


async def test_access_log_never_holds_the_token(make_server, caplog: pytest.LogCaptureFixture) -> None:
    server = await make_server(settings={"security": {"api_token": TOKEN}})
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with aiohttp.ClientSession() as http:
        await _send(http, "GET", f"{server.url}/static/kiosk.html?token={TOKEN}&sleep=5")
        await _send(
            http, "GET", f"{server.url}/api/config?token={TOKEN}", headers={"Referer": f"x?token={TOKEN}"}
        )
        status, _ = await _send(
            http, "GET", f"{server.url}/api/config", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == 3 and any("token=REDACTED" in line for line in lines), lines
    assert not any(TOKEN in line for line in lines), lines


# -- 8. the smaller ones -----------------------------------------------------------------------------------
async def test_ping_flood_is_answered_at_a_bounded_rate(make_server) -> None:
    server = await make_server(settings={"limits": {"pings_per_second": 10}})
    async with aiohttp.ClientSession() as http:
        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        await receiver.wait_event(lambda e: e.get("type") == "hello")
        for n in range(500):
            receiver.send({"type": "ping", "t": n})
        await asyncio.sleep(1.5)
        pongs = [e for e in receiver.events if e.get("type") == "pong"]
        assert 5 <= len(pongs) <= 30, len(pongs)
        assert server.services.sessions.get(receiver.session_id).pings_dropped >= 450
        await receiver.pc.close()


async def test_an_abandoned_render_frees_the_render_slot(make_server) -> None:
    server = await make_server()
    text = "This is a long answer that takes a while to render. " * 12
    async with aiohttp.ClientSession() as http:
        request = asyncio.ensure_future(
            _send(http, "POST", f"{server.url}/api/render", json={"template": "default", "text": text})
        )
        await asyncio.sleep(1.0)
        request.cancel()  # the client goes away mid-render
        started = time.monotonic()
        while True:
            status, _ = await _send(
                http, "POST", f"{server.url}/api/render", json={"template": "default", "text": "Hi."}
            )
            if status != 429:
                break
            assert time.monotonic() - started < 3, "the abandoned render kept the render slot"
            await asyncio.sleep(0.2)
        assert status == 200


def _raw_h264(path: Path, seconds: float, fps: int = 50) -> Path:
    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for n in range(int(seconds * fps)):
            image = np.full((64, 64, 3), n % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_a_raw_stream_without_timestamps_is_refused(tmp_path: Path) -> None:
    raw = _raw_h264(tmp_path / "clip.h264", seconds=2.0)
    with pytest.raises(SourceMediaError, match="no timestamps"):
        probe_source(raw, MediaLimits())
    with pytest.raises(SourceMediaError, match="no timestamps"):
        list(iter_video_frames(raw, 25, MediaLimits()))


async def test_upload_records_the_clients_file_name_not_the_work_file(make_server, tmp_path: Path) -> None:
    server = await make_server()
    video, _ = make_moving_face_video(tmp_path / "face.mp4", seconds=1.5)
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("id", "named")
        form.add_field("file", video.read_bytes(), filename="../holiday clip.mp4")
        async with http.post(f"{server.url}/api/templates", data=form) as resp:
            assert resp.status == 200
            last = (await resp.text()).strip().splitlines()[-1]
        assert '"ready"' in last, last
    source = server.services.library.store.read_manifest("named")["source"]
    assert source == "video holiday clip.mp4", source


async def test_slow_clients_lose_their_connections(make_server) -> None:
    server = await make_server(settings={"security": {"header_timeout_s": 1.0, "body_timeout_s": 1.0}})
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])

    def half_requests(count: int, payload: bytes) -> list[socket.socket]:
        socks = []
        for _ in range(count):
            sock = socket.create_connection((host, port))
            sock.sendall(payload)
            sock.settimeout(4.0)
            socks.append(sock)
        return socks

    loop = asyncio.get_running_loop()
    # Half a request head, never finished.
    heads = await loop.run_in_executor(None, half_requests, 30, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    # A whole head with a body that stops after a few bytes.
    body_head = (
        b"POST /offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    bodies = await loop.run_in_executor(None, half_requests, 5, body_head)
    started = time.monotonic()
    closed = await asyncio.gather(*(loop.run_in_executor(None, _read_all, s) for s in heads))
    assert time.monotonic() - started < 3.5
    assert all(reply == b"" for reply in closed), closed[0]  # closed without a word
    answered = await asyncio.gather(*(loop.run_in_executor(None, _read_all, s) for s in bodies))
    assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in answered), answered[0][:200]


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        data += b"<still open>"
    finally:
        sock.close()
    return data
