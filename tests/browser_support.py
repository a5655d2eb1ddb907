"""Helpers for the end-to-end browser tests: a real server subprocess, speech or silence WAVs for
Chromium's fake microphone, and the Chromium flags that make a headless WebRTC call work on loopback.

Kept out of conftest.py so that file stays free for shared fixtures written by others.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# Every browser test module's marks: slow, and skipped where the Debian chromium is not installed.
BROWSER_TEST_MARKS = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not found at {CHROMIUM}"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no server log>"


def _healthz_ok(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=1) as response:
            return response.status == 200 and json.load(response).get("status") == "ok"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and anything it spawned: SIGINT first so aiohttp closes peer connections
    cleanly, then harder. The server runs in its own process group, started by us, so signalling the
    group reaches its children and nothing else."""
    if process.poll() is not None:
        return
    for sig, grace_s in ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# A server without ASR and LLM starts in seconds: enough for pages that only need media and the VAD.
NO_MODELS_ENV = {"AVATAR_RTC_ASR__ENGINE": "none", "AVATAR_RTC_LLM__ENGINE": "none"}


@contextmanager
def run_server(
    work_dir: Path,
    start_timeout_s: float = 45.0,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    cache_dir: Path | None = None,
) -> Iterator[RunningServer]:
    """Start ``avatar_rtc.cli serve`` on a loopback port (free unless given) and yield once /healthz
    answers.

    The avatar template cache goes to ``cache_dir`` (default: under ``work_dir``) so the test leaves the
    checkout untouched, and ICE is pinned to 127.0.0.1 so no media leaves the machine.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cache_dir = cache_dir or work_dir / "template_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = work_dir / "server.log"
    env = {
        **os.environ,
        "AVATAR_RTC_ICE_HOST_ADDRESSES": '["127.0.0.1"]',
        "AVATAR_RTC_AVATAR__CACHE_DIR": str(cache_dir),
        # The log is read while the server runs, so it must not sit in a pipe buffer.
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "avatar_rtc.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(base_url=base_url, process=process, log_path=log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthz_ok(base_url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {process.returncode} before answering /healthz:\n"
                    f"{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server did not answer /healthz within {start_timeout_s:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.2)
        yield server
    finally:
        _stop(process)


def _require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is required to build the fake microphone input")


def make_speech_wav(
    work_dir: Path, text: str, lead_silence_s: float = 0.0, tail_silence_s: float = 0.0
) -> Path:
    """A 48 kHz mono WAV of ``text`` for Chromium's fake microphone (which loops the file), with
    optional silence before and after: a long tail keeps the loop to one utterance per test."""
    _require_tools("espeak-ng", "sox")
    raw = work_dir / "speech_raw.wav"
    out = work_dir / "speech_48k.wav"
    # A US voice, a little slower than the default: the clearest espeak-ng gives Whisper tiny.en.
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text],
        check=True,
        capture_output=True,
        timeout=30,
    )
    pad = ["pad", f"{lead_silence_s:g}", f"{tail_silence_s:g}"] if lead_silence_s or tail_silence_s else []
    subprocess.run(
        ["sox", str(raw), "-r", "48000", "-c", "1", str(out), *pad],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out


def make_silence_wav(work_dir: Path, seconds: float = 5.0) -> Path:
    """A 48 kHz mono WAV of digital silence: a microphone that is there but never speaks."""
    _require_tools("sox")
    out = work_dir / "silence_48k.wav"
    subprocess.run(
        ["sox", "-n", "-r", "48000", "-c", "1", "-b", "16", str(out), "trim", "0", f"{seconds:g}"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out


def chromium_args(fake_audio_wav: Path) -> list[str]:
    """Flags for a headless Chromium that joins a loopback WebRTC call without prompts."""
    return [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Grant getUserMedia without a prompt and feed it a file instead of a real microphone.
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio_wav}",
        # The remote <video> is unmuted; without this Chromium would refuse to autoplay it.
        "--autoplay-policy=no-user-gesture-required",
        # Chromium drops loopback ICE candidates by default; the test server offers only 127.0.0.1.
        "--allow-loopback-in-peer-connection",
    ]


@contextmanager
def chromium_page(
    profile_dir: Path, fake_mic_wav: Path, viewport: dict[str, int], page_errors: list[str]
) -> Iterator[Any]:
    """Debian's headless Chromium, driven by Playwright, with ``fake_mic_wav`` as its microphone;
    yields its page, whose uncaught errors are collected in ``page_errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(CHROMIUM),
            headless=True,
            args=chromium_args(fake_mic_wav),
            viewport=viewport,
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("pageerror", lambda err: page_errors.append(str(err)))
            page.set_default_timeout(20_000)
            yield page
        finally:
            context.close()


@contextmanager
def host_server(page_html: Callable[[Any], str]) -> Iterator[str]:
    """A second origin for pages that embed the avatar: an aiohttp app on its own loopback port, run on
    an event loop in a thread, answering ``/`` with ``page_html(request)``; yields its base URL.

    A real server, not a browser-side route: Chromium lets a page load the avatar server's scripts from
    the loopback address space only when the page itself came from there."""
    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=page_html(request), content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    thread = threading.Thread(target=loop.run_forever, name="embed-host-page", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
