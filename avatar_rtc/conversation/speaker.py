"""Speak sentences on one session: TTS, then the same samples to the playout and the renderer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TypeVar

import numpy as np

from avatar_rtc.conversation.audio import resample_pcm
from avatar_rtc.conversation.fair import NO_SESSION
from avatar_rtc.conversation.phonemes import SpeechChunk, TimedPhoneme
from avatar_rtc.conversation.sentences import RunOnChunk
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.media.playout import Playout, SpokenSentence, Utterance
from avatar_rtc.render.base import Renderer
from avatar_rtc.render.visemes import visemes_from_phonemes

T = TypeVar("T")
log = logging.getLogger(__name__)


# Quieter than this (RMS over 10 ms, full scale 32768) is the pause a TTS ends every utterance with.
_PAUSE_RMS = 200.0
_KEPT_PAUSE_S = 0.03


def without_trailing_pause(chunk: SpeechChunk, sample_rate: int) -> SpeechChunk:
    """``chunk`` less the pause after its last sound (but ``_KEPT_PAUSE_S``): the TTS ends every
    text as if it were a sentence, and a chunk cut mid-sentence must run on into the next one."""
    window = sample_rate // 100
    whole = len(chunk.pcm) // window * window
    if not whole:
        return chunk
    levels = np.sqrt(np.mean(np.square(chunk.pcm[:whole].reshape(-1, window), dtype=np.float64), axis=1))
    loud = np.flatnonzero(levels > _PAUSE_RMS)
    if not len(loud):
        return chunk
    end = min(len(chunk.pcm), (int(loud[-1]) + 1) * window + round(_KEPT_PAUSE_S * sample_rate))
    if end >= len(chunk.pcm):
        return chunk
    end_s = end / sample_rate
    phonemes = None
    if chunk.phonemes is not None:
        phonemes = tuple(
            dataclasses.replace(p, end_s=min(p.end_s, end_s)) for p in chunk.phonemes if p.start_s < end_s
        )
    return SpeechChunk(chunk.pcm[:end], phonemes)


class StageTimeoutError(RuntimeError):
    """A back-end went quiet mid-stream; the message names it and is safe to show the caller."""


async def stall_timeout(stream: AsyncIterator[T], timeout_s: float, what: str) -> AsyncIterator[T]:
    """``stream``, failing with StageTimeoutError when it yields nothing for ``timeout_s``: a hung
    back-end (a wedged model thread, a stalled HTTP stream) fails its turn instead of the session."""
    try:
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    item = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise StageTimeoutError(f"{what} produced nothing for {timeout_s:g} s") from None
            yield item
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


class Speaker:
    """Sentence-level streaming: each sentence is queued as soon as it is synthesised, so the first
    one plays while later ones are still being made."""

    def __init__(
        self,
        tts: TextToSpeech,
        playout: Playout,
        renderer: Renderer,
        piece_s: float = 0.4,
        stall_timeout_s: float = 20.0,
        session: str = NO_SESSION,
    ) -> None:
        if playout.sample_rate % renderer.sample_rate:
            raise ValueError("renderer sample rate must divide the playout sample rate")
        self.tts = tts
        self.playout = playout
        self.renderer = renderer
        self.stall_timeout_s = stall_timeout_s
        # Whose sentences these are, for the TTS engine's turn-taking between sessions.
        self.session = session
        self._ratio = playout.sample_rate // renderer.sample_rate
        self._piece = int(piece_s * playout.sample_rate) // self._ratio * self._ratio

    async def speak(self, sentences: Iterable[str] | AsyncIterable[str], utterance: Utterance) -> None:
        try:
            if isinstance(sentences, AsyncIterable):
                async for sentence in sentences:
                    await self.speak_sentence(sentence, utterance)
            else:
                for sentence in sentences:
                    await self.speak_sentence(sentence, utterance)
        finally:
            self.renderer.flush()
            if not utterance.finished:
                self.playout.complete(utterance)

    async def speak_sentence(self, sentence: str, utterance: Utterance) -> None:
        synthesis = stall_timeout(
            self.tts.synthesize_timed(sentence, session=self.session),
            self.stall_timeout_s,
            "speech synthesis",
        )
        joins_next = isinstance(sentence, RunOnChunk)
        async for chunk in synthesis:
            if joins_next:
                chunk = without_trailing_pause(chunk, self.tts.sample_rate)
            if utterance.first_tts_audio_at is None:
                utterance.first_tts_audio_at = time.monotonic()
            await self._schedule(chunk.pcm, self.tts.sample_rate, utterance, sentence, chunk.phonemes)
        # A sentence boundary ends a renderer segment: its last frames need not wait for the next
        # sentence's audio as lookahead.
        self.renderer.flush()

    async def _schedule(
        self,
        pcm: np.ndarray,
        rate: int,
        utterance: Utterance,
        sentence: str,
        phonemes: tuple[TimedPhoneme, ...] | None = None,
    ) -> None:
        """Queue one chunk of a sentence's speech, piece by piece as the playout makes room."""
        out_rate, render_rate = self.playout.sample_rate, self.renderer.sample_rate
        playout_pcm = resample_pcm(pcm, rate, out_rate)
        # Whole renderer samples per chunk, so the playout and the renderer agree on where speech ends.
        padding = -len(playout_pcm) % self._ratio
        if padding:
            playout_pcm = np.concatenate([playout_pcm, np.zeros(padding, np.int16)])
        render_pcm = resample_pcm(pcm, rate, render_rate)
        want = len(playout_pcm) // self._ratio
        render_pcm = np.pad(render_pcm, (0, max(0, want - len(render_pcm))))[:want]
        first_start = 0.0
        for lo in range(0, len(playout_pcm), self._piece):
            piece = playout_pcm[lo : lo + self._piece]
            start = await self.playout.schedule_audio(piece, utterance)
            if lo == 0:
                # The renderer gets the chunk (a whole sentence from our TTS engines) at once: MuseTalk's
                # features of a frame depend on all of its clip, so they are exact only for audio handed
                # over whole. The playout places the later pieces right after it while speech is queued.
                first_start = start
                self.renderer.push_audio(render_pcm, start)
                if phonemes:
                    # Timed from the chunk's first sample, like the audio: the lips shape what is said.
                    visemes = visemes_from_phonemes((p.phoneme, p.start_s, p.end_s) for p in phonemes)
                    self.renderer.push_visemes(visemes, start)
            elif abs(start - (first_start + lo / out_rate)) > 0.5 / out_rate:
                log.warning(
                    "speech piece placed %.3f s late: the face runs ahead of the voice",
                    start - first_start - lo / out_rate,
                )
            if lo == 0:
                # Known as soon as the chunk's first piece is placed, so a cut while later pieces wait
                # for room still tells how much of this sentence was heard.
                start_sample = round(start * out_rate)  # the playout places speech on whole samples
                end_sample = start_sample + len(playout_pcm)
                spoken = utterance.sentences[-1] if utterance.sentences else None
                if spoken is not None and spoken.text == sentence and spoken.end_sample == start_sample:
                    spoken.end_sample = end_sample  # a later chunk of the same sentence
                else:
                    utterance.sentences.append(SpokenSentence(sentence, start_sample, end_sample, out_rate))
