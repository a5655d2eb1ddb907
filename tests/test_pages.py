"""The pages as native ES modules (static/): one signalling client, shared by every page.

The static half reads the files. ``new RTCPeerConnection``, the events channel and the ``/offer``
request live in static/js/call_client.js alone; the call page and the kiosk load their entry modules
with ``<script type="module">`` and reach the shared client through their imports; every relative
import names a file that is there and names it exports; ``embed.js`` stays a classic script that loads
the ``<avatar-call>`` module, which makes no call of its own but frames those pages.

The browser half opens each page in headless Chromium against a real server: the call page (Call,
connected, hello, hang up), the kiosk (connects by itself) and a page on another origin holding
``<avatar-call>``. Every module must load (served as JavaScript, readable from another origin), with no
uncaught error and nothing logged as a console error.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import (
    BROWSER_TEST_MARKS,
    NO_MODELS_ENV,
    RunningServer,
    chromium_page,
    host_server,
    make_silence_wav,
    run_server,
)

STATIC = Path(__file__).resolve().parent.parent / "static"
CLIENT = STATIC / "js" / "call_client.js"
ELEMENT = STATIC / "js" / "avatar_call.js"
# The pages a browser opens, by URL path, and their HTML files.
PAGES = {"/": STATIC / "index.html", "/static/kiosk.html": STATIC / "kiosk.html"}

# Static imports: `import {a, b as c} from "./x.js"`, `import x from "./x.js"`, `import "./x.js"`.
IMPORT_RE = re.compile(
    r"^\s*import\s+(?:(?P<names>\{[^}]*\}|[\w$]+|\*\s+as\s+[\w$]+)\s+from\s+)?[\"'](?P<spec>[^\"']+)[\"']",
    re.MULTILINE,
)
EXPORT_RE = re.compile(r"^export\s+(?:async\s+)?(?:function\*?|class|const|let|var)\s+([\w$]+)", re.MULTILINE)
MODULE_SCRIPT_RE = re.compile(r"<script\b([^>]*)>")
# Signalling: only the shared client may do these.
SIGNALLING = {
    "new RTCPeerConnection": re.compile(r"\bnew\s+RTCPeerConnection\b"),
    "the events channel": re.compile(r"\bcreateDataChannel\s*\("),
    "the /offer URL": re.compile(r"[\"'`]/offer\b"),
}


def scripts() -> list[Path]:
    return sorted(STATIC.rglob("*.js"))


def code_of(path: Path) -> str:
    """The file without its comments, so a comment that names a thing does not count as doing it."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    return re.sub(r"(?m)^\s*//.*$|\s//\s.*$", "", text)


def imports_of(path: Path) -> list[tuple[Path, list[str]]]:
    """(imported file, imported names) for each relative static import of the module at ``path``."""
    found = []
    for match in IMPORT_RE.finditer(code_of(path)):
        spec = match["spec"]
        assert spec.startswith(("./", "../")), f"{path.name}: {spec!r} is not a relative module path"
        names = match["names"] or ""
        named = []
        if names.startswith("{"):
            for part in names.strip("{} \n").split(","):
                if part.strip():
                    named.append(part.split(" as ")[0].strip())
        found.append(((path.parent / spec).resolve(), named))
    return found


def module_graph(entry: Path) -> set[Path]:
    """Every module ``entry`` loads, itself included."""
    seen: set[Path] = set()
    todo = [entry.resolve()]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(target for target, _ in imports_of(module) if target.is_file())
    return seen


def page_entries(html: Path) -> list[Path]:
    """The page's <script> sources; each must be a module (type="module")."""
    entries = []
    for match in MODULE_SCRIPT_RE.finditer(html.read_text()):
        attributes = match[1]
        src = re.search(r'src="([^"]+)"', attributes)
        assert src, f"{html.name}: an inline script; the pages load only module files"
        assert 'type="module"' in attributes, f"{html.name}: {src[1]} is not loaded as a module"
        assert src[1].startswith("/static/"), src[1]
        entries.append(STATIC / src[1].removeprefix("/static/"))
    assert entries, f"{html.name} loads no script"
    return entries


# ---------------------------------------------------------------- static


def test_signalling_lives_in_the_shared_client_only() -> None:
    client_code = code_of(CLIENT)
    for what, pattern in SIGNALLING.items():
        assert len(pattern.findall(client_code)) == 1, f"{CLIENT.name} should do {what} exactly once"
        elsewhere = [p.relative_to(STATIC) for p in scripts() if p != CLIENT and pattern.search(code_of(p))]
        assert not elsewhere, f"{what} outside {CLIENT.name}: {elsewhere}"


def test_every_import_resolves_to_an_export() -> None:
    for module in scripts():
        for target, names in imports_of(module):
            assert target.is_file(), f"{module.relative_to(STATIC)} imports a missing {target}"
            exported = set(EXPORT_RE.findall(target.read_text()))
            missing = [name for name in names if name not in exported]
            assert not missing, (
                f"{module.relative_to(STATIC)} imports {missing} that {target.name} does not export"
            )


def test_pages_load_modules_that_reach_the_shared_client() -> None:
    for path, html in PAGES.items():
        graph = set().union(*(module_graph(entry) for entry in page_entries(html)))
        assert CLIENT in graph, f"{path} ({html.name}) does not load {CLIENT.name}: {sorted(graph)}"


def test_embed_frames_the_pages_that_use_the_shared_client() -> None:
    """``<script src=".../embed.js">`` keeps working: embed.js is a classic script (no import
    statement, which would be a syntax error there) that loads the element's module, and the element
    makes no call itself: it frames the kiosk or the call page, whose modules reach the client."""
    embed = code_of(STATIC / "embed.js")
    assert not IMPORT_RE.search(embed), "embed.js must stay a classic script (no import statement)"
    assert re.search(r"import\(\s*url\.href\s*\)", embed) and '"js/avatar_call.js"' in embed, embed
    element = code_of(ELEMENT)
    framed = set(re.findall(r"(?:kiosk|call):\s*\"([^\"]+)\"", element))
    assert framed == set(PAGES), f"the element frames {framed}, not the pages {set(PAGES)}"
    for what, pattern in SIGNALLING.items():
        assert not pattern.search(element), f"the element does {what} itself"


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The real server as a process, without ASR or LLM so it starts in seconds."""
    with run_server(tmp_path_factory.mktemp("pages_server"), extra_env=NO_MODELS_ENV) as running:
        yield running


def get_headers(url: str, origin: str | None = None) -> dict[str, str]:
    request = urllib.request.Request(url, headers={"Origin": origin} if origin else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200, url
        return {name.lower(): value for name, value in response.headers.items()}


@pytest.mark.slow
def test_static_scripts_are_javascript_any_origin_may_load(server: RunningServer) -> None:
    """Module scripts run only with a JavaScript Content-Type, and from another origin only with CORS
    (a host page's embed.js loads js/avatar_call.js so)."""
    base = server.base_url
    for path in (
        "/static/embed.js",
        "/static/app.js",
        "/static/js/call_client.js",
        "/static/js/avatar_call.js",
    ):
        headers = get_headers(f"{base}{path}", origin="http://somebody-else.example")
        assert headers["content-type"] == "text/javascript; charset=utf-8", (path, headers)
        assert headers["access-control-allow-origin"] == "*", (path, headers)
    # The server's own origin keeps the CORS middleware's answer, which names it.
    headers = get_headers(f"{base}/static/js/call_client.js", origin=base)
    assert headers["access-control-allow-origin"] == base, headers
    # Only scripts: a stylesheet (or page) gets nothing extra.
    headers = get_headers(f"{base}/static/style.css", origin="http://somebody-else.example")
    assert "access-control-allow-origin" not in headers, headers
    assert headers["content-type"].startswith("text/css"), headers


class PageWatch:
    """What a page logged as an error, its uncaught errors, and every script it fetched (status,
    content type), across frames."""

    def __init__(self, page: Any, page_errors: list[str]) -> None:
        self.page_errors = page_errors
        self.console_errors: list[str] = []
        self.scripts: dict[str, tuple[int, str]] = {}
        page.on("console", self._console)
        page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")

    def _response(self, response: Any) -> None:
        if response.request.resource_type == "script":
            self.scripts[response.url] = (response.status, response.headers.get("content-type", ""))

    def assert_clean(self, where: str, expected_scripts: set[str]) -> None:
        assert not self.page_errors, f"{where}: uncaught errors {self.page_errors}"
        assert not self.console_errors, f"{where}: console errors {self.console_errors}"
        fetched = {url.split("?")[0] for url in self.scripts}
        assert expected_scripts <= fetched, f"{where}: scripts never fetched {expected_scripts - fetched}"
        for url, (status, content_type) in self.scripts.items():
            # A revalidated copy (304) was checked when it first came.
            assert status in (200, 304), (where, url, status)
            assert status == 304 or content_type.startswith("text/javascript"), (where, url, content_type)


def module_urls(base: str, entries: set[Path]) -> set[str]:
    return {f"{base}/static/{p.relative_to(STATIC).as_posix()}" for p in entries}


def wait_kiosk_connected(frame: Any, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state = frame.evaluate(
            "() => window.avatarKiosk && {conn: window.avatarKiosk.connectionState,"
            " session: window.avatarKiosk.sessionId, error: window.avatarKiosk.lastError}"
        )
        if state and state["conn"] == "connected" and state["session"]:
            return
        assert time.monotonic() < deadline, f"the kiosk never connected: {state}"
        time.sleep(0.2)


PARTIAL_THEN_FINAL_JS = """
async () => {
  const { onTranscript } = await import("/static/js/app/transcript.js");
  const { avatarCall } = await import("/static/js/app/state.js");
  avatarCall.transcript.length = 0;
  document.querySelectorAll("#transcript .line").forEach((line) => line.remove());
  const user = (text, final) => ({ type: "transcript", role: "user", text, final, language: "en" });
  onTranscript(user("What is the", false));
  onTranscript(user("What is the capital", false));
  onTranscript(user("What is the capital of France?", true));
  return {
    entries: avatarCall.transcript.map(({ role, text, final }) => ({ role, text, final })),
    drawn: [...document.querySelectorAll("#transcript .line.user .text")].map((t) => t.textContent),
  };
}
"""


def browser_test(test: Callable[..., None]) -> Callable[..., None]:
    """The browser test modules' marks, on one test: the static tests here need no browser."""
    for mark in BROWSER_TEST_MARKS:
        test = mark(test)
    return test


@browser_test
def test_each_page_loads_its_modules_and_connects(server: RunningServer, tmp_path: Path) -> None:
    base = server.base_url
    call_modules = module_urls(base, set().union(*(module_graph(e) for e in page_entries(PAGES["/"]))))
    kiosk_modules = module_urls(
        base, set().union(*(module_graph(e) for e in page_entries(PAGES["/static/kiosk.html"])))
    )

    wav = make_silence_wav(tmp_path)
    page_errors: list[str] = []
    with chromium_page(tmp_path / "profile", wav, {"width": 1280, "height": 800}, page_errors) as page:
        # The call page: Call, connected, the server's hello, hang up.
        watch = PageWatch(page, page_errors)
        page.goto(f"{base}/")
        page.click("#call-btn")
        page.wait_for_function(
            "() => window.avatarCall.connectionState === 'connected' && window.avatarCall.hello !== null",
            timeout=30_000,
        )
        assert page.evaluate("window.avatarCall.sessionId"), "no session id from the answer or hello"
        page.click("#hangup-btn")
        assert page.evaluate("window.avatarCall.pc") is None
        watch.assert_clean("call page", call_modules)
        # A caller's line transcribed at a pause, then once they finished: one line, the final text.
        lines = page.evaluate(PARTIAL_THEN_FINAL_JS)
        assert lines == {
            "entries": [{"role": "user", "text": "What is the capital of France?", "final": True}],
            "drawn": ["What is the capital of France?"],
        }, lines

        # The kiosk: connects by itself.
        watch = PageWatch(page, page_errors)
        page.goto(f"{base}/static/kiosk.html?sleep=60")
        wait_kiosk_connected(page.main_frame)
        watch.assert_clean("kiosk", kiosk_modules)

        # <avatar-call> on a page of another origin, loaded the documented way.
        host_html = (
            '<!doctype html><html><head><link rel="icon" href="data:,">'
            f'<script src="{base}/static/embed.js" defer></script></head><body>'
            f'<avatar-call src="{base}" mode="kiosk" style="width: 320px; height: 320px"></avatar-call>'
            "</body></html>"
        )
        with host_server(lambda _request: host_html) as host:
            watch = PageWatch(page, page_errors)
            page.goto(f"{host}/")
            page.wait_for_function(
                "() => document.querySelector('avatar-call')?.shadowRoot?.querySelector('iframe')?.src",
                timeout=10_000,
            )
            deadline = time.monotonic() + 15
            while not (frames := [f for f in page.frames if f.url.startswith(f"{base}/static/kiosk.html")]):
                assert time.monotonic() < deadline, [f.url for f in page.frames]
                time.sleep(0.1)
            wait_kiosk_connected(frames[0])
            expected = {f"{base}/static/embed.js", f"{base}/static/js/avatar_call.js"} | kiosk_modules
            watch.assert_clean("embed", expected)
            page.goto("about:blank")  # hang up before the servers go

    health = json.load(urllib.request.urlopen(f"{base}/healthz", timeout=2))
    assert health["status"] == "ok", health
