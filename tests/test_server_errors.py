"""Bad input gets a clear 4xx and the server keeps serving."""

from __future__ import annotations

import aiohttp

from avatar_rtc.testing.receiver import CallReceiver

VALID_HEADER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


async def _post(http: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, dict]:
    async with http.post(url, **kwargs) as resp:
        return resp.status, await resp.json()


async def test_bad_requests_get_clear_errors_and_server_keeps_serving(server) -> None:
    async with aiohttp.ClientSession() as http:
        offer = f"{server.url}/offer"
        status, body = await _post(http, offer, data="sdp", headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in body["error"]
        status, body = await _post(http, offer, data="{nope", headers={"Content-Type": "application/json"})
        assert status == 400 and "not valid JSON" in body["error"]
        status, body = await _post(http, offer, json=["sdp"])
        assert status == 400 and "JSON object" in body["error"]
        status, body = await _post(http, offer, json={"sdp": "", "type": "offer"})
        assert status == 400 and "sdp" in body["error"]
        status, body = await _post(http, offer, json={"sdp": VALID_HEADER, "type": "answer"})
        assert status == 400 and "'offer'" in body["error"]
        for garbage in (
            "hello",
            "v=0\r\nm=audio x y\r\n",
            VALID_HEADER + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
        ):
            status, body = await _post(http, offer, json={"sdp": garbage, "type": "offer"})
            assert status == 400, (garbage, status, body)
            assert "SDP" in body["error"]
        status, body = await _post(
            http, offer, data=b"x" * (300 * 1024), headers={"Content-Type": "application/json"}
        )
        assert status == 413

        say = f"{server.url}/api/sessions/no-such-session/say"
        status, body = await _post(http, say, json={"text": "hi"}, headers={"X-Session-Key": "k"})
        assert status == 404 and body["error"] == "unknown session"
        assert server.services.sessions.sessions == {}

        receiver = CallReceiver()
        await receiver.connect_http(server.url, http)
        say = f"{server.url}/api/sessions/{receiver.session_id}/say"
        key = receiver.session_headers
        status, body = await _post(http, say, json={"text": ""}, headers=key)
        assert status == 400 and "non-empty" in body["error"]
        status, body = await _post(http, say, json={"text": 42}, headers=key)
        assert status == 400
        status, body = await _post(http, say, json={"text": "a" * 5000}, headers=key)
        assert status == 413 and "longer than" in body["error"]

        async with http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["sessions"] == 1
        await receiver.close()
