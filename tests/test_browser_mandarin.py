"""The call page in a Mandarin call: headless Chromium against a server whose conversation language is
zh. Transcript lines carry lang="zh-Hans", so the browser picks simplified-Chinese fonts and Chinese
line breaking, while the page's own labels stay English."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser_support import BROWSER_TEST_MARKS, RunningServer, chromium_page, make_silence_wav, run_server

pytestmark = BROWSER_TEST_MARKS

QUESTION = "你好，你叫什么名字？"
SAID = "欢迎光临。"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    # No speech recognition (the microphone is silent): the server starts faster, and typing is tested.
    env = {"AVATAR_RTC_CONVERSATION__LANGUAGE": "zh", "AVATAR_RTC_ASR__ENGINE": "none"}
    with run_server(tmp_path / "server", extra_env=env) as running:
        yield running


def test_chinese_lines_are_marked_simplified_chinese(server: RunningServer, tmp_path: Path) -> None:
    page_errors: list[str] = []
    viewport = {"width": 1280, "height": 800}
    with chromium_page(tmp_path / "profile", make_silence_wav(tmp_path), viewport, page_errors) as page:
        page.goto(f"{server.base_url}/")
        page.click("#call-btn")
        page.wait_for_function("() => window.avatarCall.hello !== null", timeout=20_000)
        assert page.evaluate("window.avatarCall.language") == "zh"
        assert page.get_attribute("#talk-text", "lang") == "zh-Hans"
        if not page.is_enabled("#ask-btn"):
            pytest.skip(f"the server has no language model: {page.evaluate('window.avatarCall.hello')}")

        page.fill("#talk-text", QUESTION)
        page.click("#ask-btn")
        page.wait_for_function(
            "() => window.avatarCall.transcript.some((e) => e.role === 'assistant' && e.final)",
            timeout=90_000,
        )
        page.fill("#talk-text", SAID)
        page.click("#say-btn")
        lines = page.eval_on_selector_all(
            ".transcript .line",
            """(items) => items.map((li) => ({
                 role: li.classList.contains("user") ? "user" : "assistant",
                 lang: li.querySelector(".text").lang,
                 whoLang: li.querySelector(".who").closest("[lang]")?.lang,
                 text: li.querySelector(".text").textContent,
               }))""",
        )
        page.screenshot(path=str(tmp_path / "mandarin_call.png"))
    print(lines)
    assert page_errors == []
    assert [line["role"] for line in lines] == ["user", "assistant", "assistant"], lines
    assert lines[0]["text"] == QUESTION and lines[2]["text"] == SAID
    assert all(line["lang"] == "zh-Hans" for line in lines), lines
    # The "You" / "Avatar" labels are the page's English, not Chinese.
    assert all(line["whoLang"] == "en" for line in lines), lines
