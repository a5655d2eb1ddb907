"""Turn-taking for one session: the caller's voice and typed text in, the avatar's answers out.

Every request becomes a job, and one job runs at a time: a `say` speaks its text as given, a chat or
voice turn streams an LLM answer sentence by sentence into the speaker. Caller speech while the avatar
talks (a barge-in) and `interrupt` take the same single path: cancel the running job, drop the queued
ones, clear the renderer and the playout. The history keeps only what the caller actually heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avatar_rtc.conversation.asr import SpeechRecognizer, Transcript
from avatar_rtc.conversation.echo import EchoGuard
from avatar_rtc.conversation.fair import NO_SESSION
from avatar_rtc.conversation.llm import ChatMessage, ConversationHistory, LanguageModel
from avatar_rtc.conversation.sentences import SentenceChunker
from avatar_rtc.conversation.speaker import Speaker, StageTimeoutError, stall_timeout
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.conversation.vad import SpeechDropped, SpeechStarted, UtteranceEnded, VoiceActivitySegmenter
from avatar_rtc.media.playout import Playout, Utterance
from avatar_rtc.media.spoken_text import join_spoken
from avatar_rtc.render.base import Renderer

log = logging.getLogger(__name__)

MAX_PENDING_JOBS = 8
_turn_ids = itertools.count(1)
Emit = Callable[[dict[str, Any]], None]


class ConversationError(ValueError):
    """A request the conversation refuses; the message is safe to show the caller."""


@dataclass(eq=False)
class Turn:
    """Timing of one answer, measured from ``origin``: the end of the caller's speech for a voice
    turn, the arrival of the request for typed text."""

    source: str  # "voice", "chat" or "say"
    origin: float
    id: str = field(default_factory=lambda: f"t{next(_turn_ids)}")
    user_text: str = ""
    vad_end_at: float | None = None
    asr_done_at: float | None = None
    llm_first_token_at: float | None = None
    utterance: Utterance | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        def since(t: float | None) -> float | None:
            return None if t is None else round((t - self.origin) * 1000, 1)

        u = self.utterance
        event: dict[str, Any] = {
            "type": "metrics",
            "turn_id": self.id,
            "turn": self.source,
            "since": "speech_end" if self.source == "voice" else "request",
            "vad_end_ms": since(self.vad_end_at),
            "asr_ms": since(self.asr_done_at),
            "llm_first_token_ms": since(self.llm_first_token_at),
            "tts_first_audio_ms": since(u.first_tts_audio_at if u else None),
            "first_audio_frame_ms": since(u.first_audio_at if u else None),
        }
        if u is not None:
            event.update({k: v for k, v in u.metrics().items() if k != "type"})
        event.update(self.extra)
        return event


_ANSWER_OVER = object()  # the early answer's stream has ended (normally or not)


@dataclass(eq=False)
class _EarlyAnswer:
    """The LLM's answer to an early transcript, read while the caller might still go on: deltas are
    kept (not spoken) until the turn takes them over, or dropped with the task if it never does."""

    messages: list[ChatMessage]  # what the model was asked: the history plus the early transcript
    deltas: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    first_delta_at: float | None = None
    task: asyncio.Task[None] | None = None

    async def read(self, stream: AsyncIterator[str]) -> None:
        try:
            async for delta in stream:
                if self.first_delta_at is None:
                    self.first_delta_at = time.monotonic()
                self.deltas.put_nowait(delta)
        except Exception as error:  # handed to the turn, which fails the way a live stream would
            self.deltas.put_nowait(error)
        finally:
            self.deltas.put_nowait(_ANSWER_OVER)

    async def stream(self) -> AsyncIterator[str]:
        while True:
            item = await self.deltas.get()
            if item is _ANSWER_OVER:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, str)
            yield item

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


@dataclass(eq=False)
class _EarlyTurn:
    """Work started on a pause inside the caller's utterance, before the VAD has decided that it
    ended: the transcript of the speech so far and, once that is in and the avatar is silent, the
    LLM's answer to it. If the caller says nothing more it becomes the turn's, and the recogniser's
    and the model's time is hidden behind the end-of-speech wait; keyed by the utterance's last
    voiced VAD frame, so any further speech makes it stale."""

    key: int
    transcript: asyncio.Task[Transcript]
    answer: _EarlyAnswer | None = None

    def cancel(self) -> None:
        self.transcript.cancel()
        if self.answer is not None:
            self.answer.cancel()


@dataclass
class _Job:
    turn: Turn
    text: str = ""
    audio: np.ndarray | None = None  # the caller's utterance, for a voice turn
    early: _EarlyTurn | None = None  # already started on a pause in that utterance

    def drop(self) -> None:
        if self.early is not None:
            self.early.cancel()


class Conversation:
    def __init__(
        self,
        *,
        speaker: Speaker,
        playout: Playout,
        renderer: Renderer,
        history: ConversationHistory,
        emit: Emit,
        llm: LanguageModel | None,
        asr: SpeechRecognizer | None,
        vad: VoiceActivitySegmenter,
        echo_guard: EchoGuard,
        llm_unavailable: str = "",
        asr_unavailable: str = "",
        first_clause_chars: int = 40,
        first_chunk_words: int = 0,
        barge_in_confirm_s: float = 0.24,
        speculative_asr_pause_s: float = 0.15,
        stage_timeout_s: float = 20.0,
        language: str = "en",
        session: str = NO_SESSION,
    ) -> None:
        self.speaker = speaker
        # The key the shared engines serve sessions in turn by, and the LLM keeps this call's
        # evaluated prompt under.
        self.session = session
        # What the caller speaks and the avatar answers in; every transcript event carries it, so the
        # page can mark its lines (a Chinese line wants Chinese fonts and line breaking).
        self.language = language
        self.playout = playout
        self.renderer = renderer
        self.history = history
        self.llm = llm
        self.asr = asr
        self.vad = vad
        self.echo_guard = echo_guard
        self.state = "idle"
        self._emit = emit
        self._llm_unavailable = llm_unavailable
        self._asr_unavailable = asr_unavailable
        self._first_clause_chars = first_clause_chars
        self._first_chunk_words = first_chunk_words
        self._stage_timeout_s = stage_timeout_s
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue(MAX_PENDING_JOBS)
        self._current: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._utterance_done: dict[Utterance, asyncio.Event] = {}
        self._barge_in_confirm_s = barge_in_confirm_s
        # Wall time the caller started talking over the avatar, until that is confirmed or dismissed.
        self._overlap_since: float | None = None
        self._ignoring_echo = False
        # Transcription (then the answer) started on a short pause, before the VAD has decided the
        # utterance ended (see _EarlyTurn).
        self._speculative_asr_pause_s = speculative_asr_pause_s
        self._speculation: _EarlyTurn | None = None
        self._prefill_task: asyncio.Task[None] | None = None
        self.barge_ins = 0
        self.echoes_ignored = 0
        playout.on_started = self._on_speech_started
        playout.on_finished = self._on_speech_finished

    # -- requests ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.ensure_future(self._run_jobs())

    def say(self, text: str) -> Turn:
        """Speak ``text`` as given, after whatever is already queued."""
        turn = Turn("say", time.monotonic(), user_text=text)
        self._enqueue(_Job(turn, text))
        return turn

    def chat(self, text: str) -> Turn:
        """Answer typed text with the LLM; like speaking up, it cuts off the avatar."""
        if self.llm is None:
            raise ConversationError(f"no language model: {self._llm_unavailable}")
        if self.busy:
            self.interrupt(cut=False)
        turn = Turn("chat", time.monotonic(), user_text=text)
        self._emit(
            {"type": "transcript", "role": "user", "text": text, "final": True, "language": self.language}
        )
        self._enqueue(_Job(turn, text))
        return turn

    def interrupt(self, cut: bool = True) -> None:
        """The one cancel path: stop the running job, drop queued ones, clear renderer and playout."""
        while not self._jobs.empty():
            self._jobs.get_nowait().drop()
        if self._current is not None:
            self._current.cancel()
        self.renderer.clear()
        self.playout.clear()
        if cut:
            self._set_state("idle")

    def set_speech_engines(
        self, tts: TextToSpeech, asr: SpeechRecognizer | None, asr_unavailable: str, language: str
    ) -> None:
        """Another language: recognise and speak it with these (call after :meth:`interrupt`)."""
        self._drop_speculation()
        self.speaker.tts = tts
        self.asr = asr
        self._asr_unavailable = asr_unavailable
        self.language = language

    def set_renderer(self, renderer: Renderer) -> None:
        """A new face: speech from now on goes to ``renderer`` (call after :meth:`interrupt`)."""
        self.renderer = renderer
        self.speaker.renderer = renderer

    @property
    def busy(self) -> bool:
        return self.playout.speaking or self._current is not None or not self._jobs.empty()

    def hear(self, pcm16k: np.ndarray, at: float) -> None:
        """Microphone audio (16 kHz mono) that arrived at wall time ``at``."""
        self.echo_guard.mic_audio(at, pcm16k)
        for event in self.vad.push(pcm16k):
            if isinstance(event, SpeechStarted):
                onset = at - (self.vad.stream_s - event.at_s)
                if self.busy:
                    self._overlap_since = onset  # decided once there is enough to judge echo by
                else:
                    self._set_state("listening")
            elif isinstance(event, UtteranceEnded):
                if self._overlap_since is not None:
                    self._decide_barge_in()
                speech_end = at - (self.vad.stream_s - event.ended_at_s)
                self._on_caller_finished(event, speech_end)
            elif isinstance(event, SpeechDropped):
                self._overlap_since = None
                self._ignoring_echo = False
                if self.state == "listening" and not self.busy:
                    self._set_state("idle")
        if self._overlap_since is not None and at - self._overlap_since >= self._barge_in_confirm_s:
            self._decide_barge_in()
        if self._speculation is not None and self._speculation.key != self.vad.last_voiced_frame:
            self._drop_speculation()  # the caller went on: what was started on the pause is stale
        self._maybe_transcribe_early()

    def _maybe_transcribe_early(self) -> None:
        if self.asr is None or self._ignoring_echo or self._speculative_asr_pause_s <= 0:
            return
        if self.vad.silence_s < self._speculative_asr_pause_s:
            return
        key = self.vad.last_voiced_frame
        if self._speculation is not None and self._speculation.key == key:
            return
        audio = self.vad.speech_so_far()
        if audio is None:
            return
        self._drop_speculation()
        early = _EarlyTurn(key, asyncio.ensure_future(self.asr.transcribe(audio, session=self.session)))
        early.transcript.add_done_callback(lambda _task: self._on_early_transcript(early))
        self._speculation = early

    def _on_early_transcript(self, early: _EarlyTurn) -> None:
        """The speech up to a pause is transcribed: show it as the caller's partial line and, if the
        avatar is silent, let the model start answering it."""
        if early is not self._speculation or early.transcript.cancelled():
            return
        if early.transcript.exception() is not None:
            return  # the turn awaits the same task and reports the error
        transcript = early.transcript.result()
        text = transcript.text.strip()
        if not text or self.busy:
            return  # over the avatar it may be echo or a barge-in: that is decided at its end
        language = transcript.language
        self._emit({"type": "transcript", "role": "user", "text": text, "final": False, "language": language})
        if self.llm is None:
            return
        if self._prefill_task is not None:
            self._prefill_task.cancel()  # the answer reads the whole prompt anyway
        answer = _EarlyAnswer(self._history_with_user(text))
        stream = self.llm.stream(answer.messages, session=self.session)
        answer.task = asyncio.ensure_future(answer.read(stream))
        early.answer = answer

    def _history_with_user(self, text: str) -> list[ChatMessage]:
        """The messages the model would be sent if ``text`` were the caller's next message."""
        history = copy.deepcopy(self.history)
        history.add_user(text)
        return history.messages()

    def _drop_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.cancel()
            self._speculation = None

    async def close(self) -> None:
        self._drop_speculation()
        tasks = [t for t in (self._current, self._worker, self._prefill_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.llm is not None:
            self.llm.forget(self.session)  # its saved prompt would only take memory from live calls

    # -- voice ------------------------------------------------------------------------------------
    def _decide_barge_in(self) -> None:
        """The caller has talked over the avatar for a moment: cut the avatar off, unless what the
        microphone hears is the avatar's own voice coming back."""
        since, self._overlap_since = self._overlap_since, None
        assert since is not None
        verdict = self.echo_guard.assess(self.playout.sent_audio, self.playout.sample_rate, since)
        log.debug("speech over the avatar: %s", verdict)
        if verdict.is_echo:
            self._ignoring_echo = True
            self.echoes_ignored += 1
            log.info("speech over the avatar ignored as echo (correlation %.2f)", verdict.correlation)
            return
        self.barge_ins += 1
        self.interrupt(cut=False)
        self._emit({"type": "barge_in", "echo_correlation": round(verdict.correlation, 2)})
        self._set_state("listening")

    def _on_caller_finished(self, event: UtteranceEnded, speech_end: float) -> None:
        if self._ignoring_echo:
            self._ignoring_echo = False
            return
        turn = Turn("voice", speech_end, vad_end_at=event.vad_end_at)
        turn.extra["speech_s"] = round(event.ended_at_s - event.started_at_s, 2)
        if self.asr is None:
            self._emit(
                {"type": "error", "message": f"speech recognition unavailable: {self._asr_unavailable}"}
            )
            self._set_state("idle")
            return
        early = None
        if self._speculation is not None and self._speculation.key == self.vad.last_voiced_frame:
            early = self._speculation  # nothing was said after the pause it was started on
            self._speculation = None
            turn.extra["early_asr"] = True
        self._drop_speculation()
        self.interrupt(cut=False)
        self._enqueue(_Job(turn, audio=event.pcm, early=early))

    # -- jobs -------------------------------------------------------------------------------------
    def _enqueue(self, job: _Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            job.drop()
            raise ConversationError(f"more than {MAX_PENDING_JOBS} requests are waiting") from None

    async def _run_jobs(self) -> None:
        while True:
            job = await self._jobs.get()
            task = asyncio.ensure_future(self._run(job))
            self._current = task
            await asyncio.wait({task})
            self._current = None
            job.drop()  # an early answer the turn did not take (it failed, or was cut) stops here
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                log.warning("%s turn failed: %s", job.turn.source, error, exc_info=error)
                self._emit({"type": "error", "message": f"{job.turn.source} failed: {error}"})
            if not self.busy and self.state != "listening":
                self._set_state("idle")

    async def _run(self, job: _Job) -> None:
        turn = job.turn
        if turn.source == "say":
            chunker = SentenceChunker(
                first_clause_chars=self._first_clause_chars, first_chunk_words=self._first_chunk_words
            )
            chunks = chunker.push(job.text) + chunker.flush()
            await self._speak(turn, _iterate(chunks), keep_history=False)
            return
        self._set_state("thinking")
        text = job.text
        if turn.source == "voice":
            assert self.asr is not None and job.audio is not None
            recognising = (
                job.early.transcript
                if job.early is not None
                else self.asr.transcribe(job.audio, session=self.session)
            )
            try:
                transcript = await asyncio.wait_for(recognising, self._stage_timeout_s)
            except TimeoutError:
                raise StageTimeoutError(
                    f"speech recognition produced nothing for {self._stage_timeout_s:g} s"
                ) from None
            turn.asr_done_at = time.monotonic()
            text = transcript.text.strip()
            self._emit(
                {
                    "type": "transcript",
                    "role": "user",
                    "text": text,
                    "final": True,
                    "language": transcript.language,
                }
            )
            if not text:
                return
        turn.user_text = text
        early_answer = job.early.answer if job.early is not None else None
        await self._speak(turn, self._answer(turn, text, early_answer), keep_history=True)

    async def _answer(self, turn: Turn, text: str, early: _EarlyAnswer | None = None) -> AsyncIterator[str]:
        """The LLM's answer as sentences, the first one cut early at a comma so speech starts sooner.
        ``early``: the answer already started on this text at a pause, taken over if it was asked
        exactly what the model would be asked now."""
        if self.llm is None:
            raise ConversationError(f"no language model: {self._llm_unavailable}")
        self.history.add_user(text)
        messages = self.history.messages()
        if self._prefill_task is not None:
            # The answer reads the whole prompt anyway: a prefill still waiting for the model is
            # skipped (one already running finishes, and the answer reuses what it read).
            self._prefill_task.cancel()
        if early is not None and early.messages == messages:
            deltas = early.stream()
            turn.extra["early_llm"] = True
        else:
            if early is not None:
                early.cancel()  # the history changed since (an answer ended): ask again
            deltas = self.llm.stream(messages, session=self.session)
        chunker = SentenceChunker(
            first_clause_chars=self._first_clause_chars, first_chunk_words=self._first_chunk_words
        )
        stream = stall_timeout(deltas, self._stage_timeout_s, "the language model")
        said = ""
        try:
            async for delta in stream:
                if turn.llm_first_token_at is None:
                    # An early answer's first token may have come before the caller stopped speaking.
                    arrived = early.first_delta_at if early is not None else None
                    turn.llm_first_token_at = max(arrived or time.monotonic(), turn.origin)
                for sentence in chunker.push(delta):
                    said = join_spoken(said, sentence)
                    self._emit_answer(said, final=False)
                    yield sentence
            for sentence in chunker.flush():
                said = join_spoken(said, sentence)
                self._emit_answer(said, final=False)
                yield sentence
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _speak(self, turn: Turn, sentences: AsyncIterator[str], keep_history: bool) -> None:
        utterance = Utterance(text=turn.user_text, requested_at=turn.origin)
        turn.utterance = utterance
        done = asyncio.Event()
        self._utterance_done[utterance] = done
        failure: Exception | None = None
        try:
            try:
                await self.speaker.speak(sentences, utterance)
            except Exception as error:
                # A back-end failing mid-answer (the LLM's stream broke off): the sentences already
                # queued still play out, so the history and the final transcript hold what the caller
                # heard, and the error follows the words instead of arriving while they play.
                failure = error
            await done.wait()
        finally:
            self._utterance_done.pop(utterance, None)
            if utterance.finished:
                self._emit(turn.metrics())
            if keep_history:
                heard = utterance.heard_text()
                if heard:
                    self.history.add_assistant(heard)
                # The page shows "interrupted" from this flag, not by comparing texts.
                self._emit_answer(heard, final=True, interrupted=utterance.interrupted)
                self._prefill()
        if failure is not None:
            raise failure

    def _emit_answer(self, text: str, final: bool, **extra: Any) -> None:
        self._emit(
            {
                "type": "transcript",
                "role": "assistant",
                "text": text,
                "final": final,
                "language": self.language,
                **extra,
            }
        )

    def _prefill(self) -> None:
        """While the caller thinks of a reply, let the model read the conversation so far."""
        if self.llm is None:
            return
        if self._prefill_task is not None:
            self._prefill_task.cancel()
        # Cancelling it (the next turn, or the call's end) skips it if it has not started yet.
        self._prefill_task = asyncio.ensure_future(
            self.llm.prefill(self.history.messages(), session=self.session)
        )

    # -- playout callbacks ------------------------------------------------------------------------
    def _on_speech_started(self, utterance: Utterance) -> None:
        self._set_state("speaking")

    def _on_speech_finished(self, utterance: Utterance) -> None:
        done = self._utterance_done.get(utterance)
        if done is not None:
            done.set()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit({"type": "state", "state": state})


async def _iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
