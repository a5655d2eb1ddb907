"""The ``<avatar-call>`` embed element end to end: a host page on another origin (a second little
aiohttp server on another loopback port) loads static/embed.js from the avatar server and holds
``<avatar-call mode="kiosk">``. Headless Chromium opens the host page; the element must put an iframe
on the avatar server's origin, and the kiosk inside it must connect by itself, carrying the element's
``token`` attribute to a server that wants one (and showing its token error for a wrong one). The
token travels in the iframe URL's fragment, never its query, so it never reaches the server's log."""

from __future__ import annotations

import html
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from browser_support import (
    BROWSER_TEST_MARKS,
    CHROMIUM,
    NO_MODELS_ENV,
    RunningServer,
    chromium_args,
    host_server,
    make_silence_wav,
    run_server,
)

pytestmark = BROWSER_TEST_MARKS

# Distinctive, so that finding it in the server's log means it was sent there.
TOKEN = "embed-token-7c41d9e2"
KIOSK_PATH = "/static/kiosk.html"


# ---------------------------------------------------------------- the two servers


@contextmanager
def avatar_server(work_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """The real avatar server as a process on a free loopback port, without ASR or LLM so it starts
    in seconds; yields it once /healthz answers."""
    with run_server(work_dir, extra_env={**NO_MODELS_ENV, **(extra_env or {})}) as server:
        yield server


def host_page(avatar_base: str, token: str | None) -> str:
    token_attr = f' token="{html.escape(token)}"' if token is not None else ""
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Host page</title>
  <script src="{avatar_base}/static/embed.js" defer></script>
</head>
<body>
  <h1>Somebody else's site</h1>
  <avatar-call src="{avatar_base}" mode="kiosk"{token_attr} style="width: 320px; height: 320px"></avatar-call>
</body>
</html>
"""


def host_pages(avatar_base: str) -> AbstractContextManager[str]:
    """A second origin: ``/?token=...`` serves the host page with that token attribute; ``/`` serves
    it without one."""
    return host_server(lambda request: host_page(avatar_base, request.query.get("token")))


# ---------------------------------------------------------------- the browser side


@contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    wav = make_silence_wav(tmp_path, 10.0)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=chromium_args(wav)
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def iframe_src(page: Any) -> str:
    """The element's iframe, found through its open shadow root, once it has a src."""
    page.wait_for_function(
        "() => document.querySelector('avatar-call')?.shadowRoot?.querySelector('iframe')?.src",
        timeout=10_000,
    )
    return str(
        page.evaluate("() => document.querySelector('avatar-call').shadowRoot.querySelector('iframe').src")
    )


def kiosk_frame(page: Any, url: str, timeout_s: float = 20) -> Any:
    """The page's frame showing ``url`` (the iframe's src), once its kiosk script has run."""
    deadline = time.monotonic() + timeout_s
    while True:
        for frame in page.frames:
            if frame.url == url and frame.evaluate("() => Boolean(window.avatarKiosk)"):
                return frame
        if time.monotonic() > deadline:
            raise AssertionError(f"no frame at {url}: {[f.url for f in page.frames]}")
        time.sleep(0.1)


def server_sessions(avatar_base: str) -> int:
    with urllib.request.urlopen(f"{avatar_base}/healthz", timeout=2) as response:
        return int(json.load(response)["sessions"])


def kiosk_state(frame: Any) -> dict[str, Any] | None:
    return frame.evaluate(
        "() => { const k = window.avatarKiosk; const v = document.getElementById('avatar');"
        " return k && {connectionState: k.connectionState, state: k.state, sessionId: k.sessionId,"
        " connects: k.connects, attempts: k.attempts, lastError: k.lastError,"
        " status: document.getElementById('text').textContent,"
        " videoWidth: v.videoWidth, currentTime: v.currentTime, paused: v.paused}; }"
    )


def wait_kiosk(
    frame: Any, what: str, check: Callable[[dict[str, Any]], bool], timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        kiosk = kiosk_state(frame)
        if kiosk and check(kiosk):
            return kiosk
        if time.monotonic() > deadline:
            raise AssertionError(f"embedded kiosk never {what}: {kiosk}")
        time.sleep(0.2)


def assert_embedded_kiosk_plays(page: Any, host_base: str, avatar_base: str, token: str | None) -> None:
    assert page.evaluate("() => location.origin") == host_base
    src = iframe_src(page)
    assert src.startswith(f"{avatar_base}{KIOSK_PATH}"), src
    if token is not None:
        # In the fragment, which the browser keeps to itself; not in the query, which it sends.
        parts = urlsplit(src)
        assert parse_qs(parts.fragment).get("token") == [token], src
        assert "token" not in parse_qs(parts.query), src
    frame = kiosk_frame(page, src)
    assert frame.evaluate("() => location.origin") == avatar_base
    wait_kiosk(frame, "connected", lambda k: k["connectionState"] == "connected" and k["sessionId"], 30)
    played = wait_kiosk(frame, "played video", lambda k: k["videoWidth"] > 0 and k["currentTime"] > 0.5, 15)
    assert not played["paused"]
    assert played["lastError"] == ""
    assert server_sessions(avatar_base) == 1


# ---------------------------------------------------------------- the tests


def test_embed_element_runs_the_kiosk_from_another_origin(tmp_path: Path) -> None:
    with avatar_server(tmp_path / "avatar") as avatar, host_pages(avatar.base_url) as host_base:
        avatar_base = avatar.base_url
        assert host_base != avatar_base
        with chromium(tmp_path) as page:
            page.goto(f"{host_base}/")
            assert_embedded_kiosk_plays(page, host_base, avatar_base, token=None)

            # Taking the element off the page hangs up: the server's session goes away.
            page.evaluate("() => document.querySelector('avatar-call').remove()")
            deadline = time.monotonic() + 15
            while server_sessions(avatar_base):
                assert time.monotonic() < deadline, "the call outlived the element"
                time.sleep(0.2)


def test_embed_element_passes_its_token_through(tmp_path: Path) -> None:
    env = {"AVATAR_RTC_SECURITY__API_TOKEN": TOKEN}
    with avatar_server(tmp_path / "avatar", env) as avatar, host_pages(avatar.base_url) as host_base:
        avatar_base = avatar.base_url
        with chromium(tmp_path) as page:
            page.goto(f"{host_base}/?token={TOKEN}")
            assert_embedded_kiosk_plays(page, host_base, avatar_base, token=TOKEN)

            # A wrong token: the kiosk says so and does not connect (it waits a minute to retry).
            # Changing the attribute on the live element reloads its iframe with the new token.
            page.evaluate("() => document.querySelector('avatar-call').setAttribute('token', 'wrong')")
            page.wait_for_function(
                "() => document.querySelector('avatar-call').shadowRoot.querySelector('iframe')"
                ".src.endsWith('#token=wrong')",
                timeout=5_000,
            )
            src = iframe_src(page)
            frame = kiosk_frame(page, src)
            refused = wait_kiosk(
                frame, "showed its token error", lambda k: k["lastError"] == "token rejected", 15
            )
            assert "token rejected" in refused["status"]
            time.sleep(3)
            after = kiosk_state(frame)
            assert after is not None
            assert after["connectionState"] != "connected" and after["connects"] == 0, after
            assert after["sessionId"] is None and after["attempts"] == 1, after
            # The old iframe document, with its call, is gone.
            assert server_sessions(avatar_base) == 0
        # The server saw the kiosk's requests, and none of them carried the token where it logs.
        log = avatar.log_path.read_text(errors="replace")
        assert '"POST /offer HTTP/1.1" 200' in log and f"{KIOSK_PATH} HTTP" in log, log[-4000:]
        assert TOKEN not in log, "the token reached the server's log"
