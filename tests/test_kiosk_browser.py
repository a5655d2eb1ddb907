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
