"""Engines for tests that script what a back-end answers and record what it was asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np

from avatar_rtc.conversation.asr import Transcript
from avatar_rtc.conversation.llm import ChatMessage


class ScriptedLLM:
    """A language model that answers with the given replies in turn and remembers what it was sent."""

    name = "scripted"

    def __init__(self, replies: list[str], word_delay_s: float = 0.0) -> None:
        self.replies = list(replies)
        self.word_delay_s = word_delay_s
        self.requests: list[list[ChatMessage]] = []
        # Per request: when its stream was closed before the reply's last word (None if it ran out).
        self.stopped_at: list[float | None] = []
        # The session keys each call was made for, and those the model was told to forget.
        self.sessions: list[str] = []
        self.forgotten: list[str] = []

    async def stream(self, messages: list[ChatMessage], *, session: str = "") -> AsyncIterator[str]:
        self.requests.append([dict(m) for m in messages])
        self.sessions.append(session)
        self.stopped_at.append(None)
        request = len(self.stopped_at) - 1
        words = self.replies.pop(0).split(" ")
        try:
            for word in words:
                if self.word_delay_s:
                    await asyncio.sleep(self.word_delay_s)
                yield word + " "
                words = words[1:]
        finally:
            if words:
                self.stopped_at[request] = time.monotonic()

    async def prefill(self, messages: list[ChatMessage], *, session: str = "") -> None:
        self.sessions.append(session)

    def forget(self, session: str) -> None:
        self.forgotten.append(session)


class ScriptedASR:
    """A recogniser that hears, in an utterance of a given length, the text scripted for the longest
    length it reaches: the turn logic can then be tested at any machine speed."""

    name = "scripted"

    def __init__(self, texts_by_seconds: dict[float, str]) -> None:
        self.texts_by_seconds = sorted(texts_by_seconds.items())
        self.heard_seconds: list[float] = []

    async def transcribe(self, pcm16k: np.ndarray, *, session: str = "") -> Transcript:
        seconds = len(pcm16k) / 16000
        self.heard_seconds.append(seconds)
        text = ""
        for at_least, scripted in self.texts_by_seconds:
            if seconds >= at_least:
                text = scripted
        return Transcript(text=text, language="en", duration_s=seconds, processing_s=0.0)
