"""Kiosk mode end to end: headless Chromium opens static/kiosk.html and nobody touches it. It must
connect by itself, dim when nobody talks, wake when the fake microphone speaks, and come back by
itself after the server process is stopped and started again on the same port."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from browser_support import (
    BROWSER_TEST_MARKS,
    CHROMIUM,
    NO_MODELS_ENV,
    RunningServer,
    chromium_args,
    free_port,
    make_speech_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

SLEEP_S = 4  # the kiosk dims after this much quiet
LEAD_SILENCE_S = 9.0  # the fake microphone is quiet this long, then speaks


def serve_on(port: int, work_dir: Path) -> AbstractContextManager[RunningServer]:
    """The real server as a process on ``port``; no ASR or LLM, so it starts in seconds (the
    kiosk's wake-up needs only the server's VAD). Restarts share one template cache."""
    return run_server(
        work_dir, 60.0, port=port, extra_env=NO_MODELS_ENV, cache_dir=work_dir.parent / "template_cache"
    )


def _wait(page: Any, what: str, check: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        kiosk = page.evaluate(
            "() => { const k = window.avatarKiosk; const v = document.getElementById('avatar');"
            " return k && {connectionState: k.connectionState, state: k.state, awake: k.awake,"
            " sessionId: k.sessionId, connects: k.connects, attempts: k.attempts, lastError: k.lastError,"
            " videoWidth: v.videoWidth, currentTime: v.currentTime, paused: v.paused}; }"
        )
        if kiosk and check(kiosk):
            return kiosk
        if time.monotonic() > deadline:
            raise AssertionError(f"kiosk never {what}: {kiosk}")
        time.sleep(0.2)


def test_kiosk_connects_wakes_and_survives_a_server_restart(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    wav = make_speech_wav(tmp_path, "Hello there, is anybody listening?", LEAD_SILENCE_S, 40.0)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=chromium_args(wav)
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            with serve_on(port, tmp_path / "first"):
                page.goto(f"{base}/static/kiosk.html?sleep={SLEEP_S}")
                first = _wait(
                    page, "connected", lambda k: k["connectionState"] == "connected" and k["sessionId"], 30
                )
                _wait(page, "showed video", lambda k: k["videoWidth"] > 0 and k["currentTime"] > 0.5, 15)
                _wait(page, "dimmed", lambda k: not k["awake"], SLEEP_S + 6)
                woke = _wait(page, "woke on voice", lambda k: k["awake"] and k["state"] != "idle", 20)
                assert woke["state"] in ("listening", "thinking", "speaking")
            # The server is gone: the kiosk notices and keeps trying.
            _wait(page, "noticed the server left", lambda k: k["connectionState"] != "connected", 20)
            time.sleep(3)
            with serve_on(port, tmp_path / "second"):
                again = _wait(
                    page,
                    "reconnected",
                    lambda k: k["connectionState"] == "connected" and k["connects"] >= 2,
                    60,
                )
                assert again["sessionId"] and again["sessionId"] != first["sessionId"]
                played = _wait(page, "played video again", lambda k: k["currentTime"] > 0.5, 15)
                assert played["attempts"] >= 2
        finally:
            context.close()


# Distinctive, so that finding it in the server's log means it was sent there.
KIOSK_TOKEN = "kiosk-token-4e9b27a1"


def test_kiosk_token_stays_out_of_the_server_log(tmp_path: Path) -> None:
    """A server with ``security.api_token``: the kiosk with no token shows the token error; with
    ``#token=`` it connects, sending the token only as an Authorization header, so the server's access
    log never holds it; with a legacy ``?token=`` it connects too and takes the token out of the
    address bar (the server logs that one page request with the value REDACTED)."""
    from playwright.sync_api import sync_playwright

    wav = make_speech_wav(tmp_path, "Hello.", 0.0, 20.0)
    env = {**NO_MODELS_ENV, "AVATAR_RTC_SECURITY__API_TOKEN": KIOSK_TOKEN}
    sent: list[tuple[str, str, dict[str, str]]] = []  # (method, url, headers) of every request
    with run_server(tmp_path / "server", extra_env=env) as server, sync_playwright() as pw:
        base = server.base_url
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=chromium_args(wav)
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("request", lambda r: sent.append((r.method, r.url, dict(r.headers))))

            # No token: the server refuses, and the kiosk says so.
            page.goto(f"{base}/static/kiosk.html?sleep=30")
            refused = _wait(page, "showed its token error", lambda k: k["lastError"] == "token rejected", 15)
            assert refused["connects"] == 0 and refused["sessionId"] is None, refused

            # The token in the fragment: the kiosk connects and plays.
            first_sent = len(sent)
            page.goto("about:blank")  # a new document, not just a new fragment on the old one
            page.goto(f"{base}/static/kiosk.html?sleep=30#token={KIOSK_TOKEN}")
            _wait(page, "connected", lambda k: k["connectionState"] == "connected" and k["sessionId"], 30)
            played = _wait(page, "played video", lambda k: k["videoWidth"] > 0 and k["currentTime"] > 0.5, 15)
            assert played["lastError"] == "", played
            # Every API request carried the token as a header, and no request URL held it.
            api = [
                (m, u, h) for m, u, h in sent[first_sent:] if u.startswith((f"{base}/offer", f"{base}/api/"))
            ]
            assert {(m, u) for m, u, _ in api} >= {
                ("GET", f"{base}/api/config"),
                ("POST", f"{base}/offer"),
            }, api
            for method, url, headers in api:
                assert headers.get("authorization") == f"Bearer {KIOSK_TOKEN}", (method, url, headers)
            assert all(KIOSK_TOKEN not in url for _, url, _ in sent), [u for _, u, _ in sent]
            log = server.log_path.read_text(errors="replace")
            assert '"POST /offer HTTP/1.1" 200' in log, log[-4000:]
            assert KIOSK_TOKEN not in log, "the fragment's token reached the server's log"

            # A legacy ?token= in the page's URL: still connects, and is gone from the address bar
            # (the other parameters stay), so later requests' Referer does not carry it either.
            page.goto(f"{base}/static/kiosk.html?token={KIOSK_TOKEN}&sleep=30")
            _wait(page, "connected", lambda k: k["connectionState"] == "connected" and k["sessionId"], 30)
            _wait(page, "played video", lambda k: k["videoWidth"] > 0 and k["currentTime"] > 0.5, 15)
            address = page.evaluate("() => location.href")
            assert KIOSK_TOKEN not in address and "token" not in address, address
            assert address == f"{base}/static/kiosk.html?sleep=30", address
            page.close()  # hang up, so the server logs everything this page sent
            deadline = time.monotonic() + 10
            while "kiosk.html?token=REDACTED&sleep=30" not in server.log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.2)
            log = server.log_path.read_text(errors="replace")
            assert log.count('"POST /offer HTTP/1.1" 200') >= 2, log[-4000:]
            assert KIOSK_TOKEN not in log, "the legacy token reached the server's log"
        finally:
            context.close()
