"""Fifty answers in one call, none of them cut: every final assistant transcript holds the whole reply
and none is marked "interrupted" (the page shows "interrupted" from that flag).

Before the fix, about one answer in eight lost its last word and was marked interrupted although no
one interrupted: the end of the last sentence in seconds (start + length / rate) and the played-until
time (a sample index / rate) could differ by a rounding step. Speech lengths here are odd numbers of
samples at rates that do not divide the 48 kHz playout rate evenly, from every start point a call
reaches, through the real speaker, playout, audio track and data channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from avatar_rtc.conversation.llm import ChatMessage
from avatar_rtc.conversation.phonemes import SpeechChunk
from avatar_rtc.media.spoken_text import join_spoken
from avatar_rtc.testing.receiver import CallReceiver, is_final_answer

TURNS = 50
REPLIES = [
    "Yes.",
    "Paris is the capital of France.",
    "Seven. That is a prime number.",
    "Drink some water, then rest for a while.",
    "A spider has eight legs, and an ant has six.",
]


class OddLengthTTS:
    """Speech of a random odd length (0.1-0.35 s) per sentence at 22,050 Hz, piper's rate."""

    name = "odd-length"
    sample_rate = 22050

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    async def synthesize(self, text: str, *, session: str = "") -> AsyncIterator[np.ndarray]:
        samples = int(self._rng.integers(1_100, 3_900)) * 2 + 1
        yield np.full(samples, 3000, np.int16)

    async def synthesize_timed(self, text: str, *, session: str = "") -> AsyncIterator[SpeechChunk]:
        async for pcm in self.synthesize(text, session=session):
            yield SpeechChunk(pcm)  # no phonemes: the face follows the sound


class CyclingLLM:
    """Answers each question with the next canned reply, streamed word by word."""

    name = "cycling"

    def __init__(self) -> None:
        self.turn = 0

    async def stream(self, messages: list[ChatMessage], *, session: str = "") -> AsyncIterator[str]:
        reply = REPLIES[self.turn % len(REPLIES)]
        self.turn += 1
        for word in reply.split(" "):
            yield word + " "

    async def prefill(self, messages: list[ChatMessage], *, session: str = "") -> None:
        return None

    def forget(self, session: str) -> None:
        return None


async def test_fifty_answers_are_heard_whole_and_none_is_marked_interrupted(make_server) -> None:
    server = await make_server(tts=OddLengthTTS(seed=13), llm=CyclingLLM())
    receiver = CallReceiver()
    await receiver.join(server.url)
    answers: list[dict] = []
    for turn in range(TURNS):
        seen = len(receiver.events)
        receiver.send({"type": "chat", "text": f"Question number {turn + 1}?"})
        answers.append(await receiver.wait_event(is_final_answer, wait_s=20, after=seen))
        # The turn's metrics come after its audio has played out: the next question never cuts it.
        await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=20, after=seen)
    await receiver.close()

    expected = [REPLIES[n % len(REPLIES)] for n in range(TURNS)]
    cut = [(n, a["text"]) for n, a in enumerate(answers) if a["text"] != _spoken(expected[n])]
    marked = [n for n, a in enumerate(answers) if a["interrupted"]]
    assert not cut, f"answers that lost words: {cut}"
    assert not marked, f"answers marked interrupted: {marked}"


def _spoken(reply: str) -> str:
    """The reply as the transcript shows it: its sentences joined as spoken."""
    from avatar_rtc.conversation.sentences import split_sentences

    text = ""
    for sentence in split_sentences(reply):
        text = join_spoken(text, sentence)
    return text
