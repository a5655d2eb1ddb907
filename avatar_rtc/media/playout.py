"""The synchronized playout buffer: speech audio and rendered frames, both keyed by media time.

The audio track and the video track read from here at the same media time, so what they send is in
sync by construction. Audio never waits for video: a speech frame that is not rendered in time is
replaced by a repeat of the last frame and counted as late.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from avatar_rtc.media.spoken_text import join_spoken, leading_share

_utterance_ids = itertools.count(1)


class IdleLoop(Protocol):
    """What the playout shows when no speech frame is due: a template's idle loop (avatar.template.Template
    has it; the media timeline sits below the avatar room and knows only this much of it)."""

    @property
    def size(self) -> tuple[int, int]: ...

    def idle_frame(self, frame_index: int) -> np.ndarray: ...


@dataclass
class SpokenSentence:
    """A sentence as scheduled on the media timeline, in samples of the playout's rate: playback
    positions are whole samples, and comparing them as sample counts (not as seconds computed two ways)
    keeps a sentence that played to its last sample from counting as cut by one rounding step."""

    text: str
    start_sample: int
    end_sample: int
    sample_rate: int

    @property
    def start_time(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def end_time(self) -> float:
        return self.end_sample / self.sample_rate


@dataclass(eq=False)
class Utterance:
    """One stretch of speech the avatar says, from request to last sample played."""

    text: str
    requested_at: float = field(default_factory=time.monotonic)
    id: str = field(default_factory=lambda: f"u{next(_utterance_ids)}")
    start_time: float | None = None  # media time of its first sample
    end_time: float | None = None  # media time just after its last scheduled sample
    first_tts_audio_at: float | None = None  # wall time TTS returned its first audio
    first_audio_at: float | None = None  # wall time its first sample was handed to the audio sender
    played_until: float | None = None  # media time playback reached (end, or where it was cut)
    audio_complete: bool = False  # no more audio will be scheduled
    interrupted: bool = False
    finished: bool = False
    frames_total: int = 0
    frames_late: int = 0
    pending_spans: int = 0
    sentences: list[SpokenSentence] = field(default_factory=list)

    def heard_text(self) -> str:
        """What the caller actually heard: whole sentences played out, and of the sentence playing when
        speech was cut, the share of its words (characters, in Chinese) that its played share of time
        covers."""
        if self.played_until is None:
            return ""
        heard = ""
        for sentence in self.sentences:
            # Playback stops on a sample boundary: back to a whole sample index at this rate.
            played = round(self.played_until * sentence.sample_rate)
            if sentence.end_sample <= played:
                heard = join_spoken(heard, sentence.text)
                continue
            if sentence.start_sample < played:
                share = (played - sentence.start_sample) / (sentence.end_sample - sentence.start_sample)
                heard = join_spoken(heard, leading_share(sentence.text, share))
            break
        return heard

    def metrics(self) -> dict[str, object]:
        first_audio_ms = None
        if self.first_audio_at is not None:
            first_audio_ms = round((self.first_audio_at - self.requested_at) * 1000, 1)
        speech_ms = 0.0
        if self.start_time is not None and self.played_until is not None:
            speech_ms = round(max(0.0, self.played_until - self.start_time) * 1000, 1)
        return {
            "type": "metrics",
            "utterance_id": self.id,
            "request_to_first_audio_ms": first_audio_ms,
            "speech_ms": speech_ms,
            "frames": self.frames_total,
            "frames_late": self.frames_late,
            "frames_repeated": self.frames_late,
            "interrupted": self.interrupted,
        }


@dataclass(eq=False)
class _AudioSpan:
    start: int  # media sample index
    pcm: np.ndarray
    utterance: Utterance

    @property
    def end(self) -> int:
        return self.start + len(self.pcm)


@dataclass
class PlayoutStats:
    frames_sent: int = 0
    frames_rendered: int = 0
    frames_idle: int = 0
    frames_late: int = 0
    frames_dropped: int = 0
    audio_frames_sent: int = 0
    # seconds between a frame's scheduled send time and the moment it was handed to the sender
    video_send_lateness: deque[float] = field(default_factory=lambda: deque(maxlen=3000))


class Playout:
    def __init__(
        self,
        clock_now: Callable[[], float],
        template: IdleLoop,
        fps: int = 25,
        sample_rate: int = 48000,
        lead_s: float = 0.08,
        max_ahead_s: float = 1.0,
    ) -> None:
        if sample_rate % fps:
            raise ValueError("sample rate must hold a whole number of samples per video frame")
        self._now = clock_now
        self.template = template
        self.fps = fps
        self.sample_rate = sample_rate
        self.samples_per_frame = sample_rate // fps
        self.lead_s = lead_s
        self.max_ahead_s = max_ahead_s
        self.stats = PlayoutStats()
        self.on_started: Callable[[Utterance], None] = lambda u: None
        self.on_finished: Callable[[Utterance], None] = lambda u: None
        self._spans: deque[_AudioSpan] = deque()
        self._intervals: deque[tuple[float, float, Utterance]] = deque()
        self._speech_end = 0  # media sample just after the last scheduled speech sample
        self._frames: dict[int, np.ndarray] = {}
        self._last_image: np.ndarray | None = None
        self._next_video_index = 0
        self._generation = 0
        self._active: list[Utterance] = []
        # The last 2 s of outgoing audio as (wall time it left, pcm) reads: what the caller's
        # microphone may hear back (the echo guard compares the two).
        self.sent_audio: deque[tuple[float, np.ndarray]] = deque(maxlen=100)
        self._sent_audio_end = 0.0  # wall time the last stamped read ends at

    # -- writers (speech pipeline, renderer pump) -------------------------------------------------
    @property
    def speaking(self) -> bool:
        return bool(self._active)

    def ahead_s(self) -> float:
        """How much scheduled speech is still to be played."""
        return max(0.0, self._speech_end / self.sample_rate - self._now())

    async def schedule_audio(self, pcm: np.ndarray, utterance: Utterance) -> float:
        """Queue speech samples (mono int16 at ``sample_rate``) and return the media time of the first.

        Speech that follows speech still playing continues seamlessly after it; speech that starts from
        silence begins ``lead_s`` from now, on a video frame boundary. Waits while more than
        ``max_ahead_s`` is queued, which bounds the buffer.
        """
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("playout audio must be mono int16")
        # The queue drains at exactly real time, so one sleep is enough to make room.
        backlog = self.ahead_s() - self.max_ahead_s
        if backlog > 0:
            await asyncio.sleep(backlog)
        if utterance.finished:
            raise asyncio.CancelledError("utterance was interrupted")
        earliest = math.ceil((self._now() + self.lead_s) * self.sample_rate)
        if self._speech_end >= earliest:
            start = self._speech_end
        else:
            start = -(-earliest // self.samples_per_frame) * self.samples_per_frame
        span = _AudioSpan(start, pcm, utterance)
        self._spans.append(span)
        self._speech_end = span.end
        start_s, end_s = start / self.sample_rate, span.end / self.sample_rate
        self._intervals.append((start_s, end_s, utterance))
        if utterance.start_time is None:
            utterance.start_time = start_s
            self._active.append(utterance)
        utterance.end_time = end_s
        utterance.pending_spans += 1
        return start_s

    def complete(self, utterance: Utterance) -> None:
        """No more audio will come for ``utterance``; it finishes when its last sample has played."""
        utterance.audio_complete = True
        if utterance.pending_spans == 0:
            self._finish(utterance, utterance.end_time)

    async def put_frame(self, index: int, image: np.ndarray) -> None:
        """Store the rendered frame for media frame ``index``; waits while it is too far ahead."""
        generation = self._generation
        ahead = index / self.fps - self._now() - self.max_ahead_s
        if ahead > 0:
            await asyncio.sleep(ahead)
        if generation != self._generation or index < self._next_video_index:
            return
        self._frames[index] = image

    def clear(self) -> list[Utterance]:
        """Barge-in: drop every queued sample and frame; returns the utterances that were cut."""
        self._generation += 1
        now = self._now()
        cut = list(self._active)
        for utterance in cut:
            utterance.interrupted = True
            self._finish(utterance, min(now, utterance.end_time or now))
        self._spans.clear()
        self._intervals.clear()
        self._frames.clear()
        self._speech_end = 0
        return cut

    def set_template(self, template: IdleLoop) -> None:
        self.template = template

    # -- readers (the two tracks) -----------------------------------------------------------------
    def read_audio(self, start: int, count: int, sent: bool = True) -> np.ndarray:
        """Samples for media samples [start, start + count): speech where scheduled, else silence.
        ``sent=False``: samples consumed without being sent (a track too late to play them)."""
        out = np.zeros(count, np.int16)
        end = start + count
        for span in self._spans:
            if span.start >= end:
                break
            lo, hi = max(span.start, start), min(span.end, end)
            if hi > lo:
                out[lo - start : hi - start] = span.pcm[lo - span.start : hi - span.start]
                utterance = span.utterance
                if utterance.first_audio_at is None:
                    utterance.first_audio_at = time.monotonic()
                    self.on_started(utterance)
        while self._spans and self._spans[0].end <= end:
            span = self._spans.popleft()
            utterance = span.utterance
            utterance.pending_spans -= 1
            if utterance.pending_spans == 0 and utterance.audio_complete:
                self._finish(utterance, span.end / self.sample_rate)
        if not sent:
            return out
        self.stats.audio_frames_sent += 1
        # Each read leaves now, but the caller hears the reads one after another (its jitter buffer
        # plays a burst out in order): a burst of late reads on a busy machine is stamped back to back,
        # not all at the same moment (the echo guard anchors the stream in time by these stamps).
        now = max(time.monotonic(), self._sent_audio_end)
        self._sent_audio_end = now + count / self.sample_rate
        self.sent_audio.append((now, out))
        return out

    def frame_for(self, index: int) -> np.ndarray:
        """The picture for media frame ``index``: rendered speech, a repeat when late, or idle."""
        t = index / self.fps
        self._next_video_index = index + 1
        stale = [i for i in self._frames if i < index]
        for i in stale:
            del self._frames[i]
        while self._intervals and self._intervals[0][1] <= t:
            self._intervals.popleft()
        speech: Utterance | None = None
        for start_s, end_s, utterance in self._intervals:
            if start_s <= t < end_s:
                speech = utterance
                break
            if start_s > t:
                break
        image = self._frames.pop(index, None)
        self.stats.frames_sent += 1
        if speech is not None:
            speech.frames_total += 1
        if image is not None:
            self.stats.frames_rendered += 1
        elif speech is not None and self._last_image is not None:
            speech.frames_late += 1
            self.stats.frames_late += 1
            image = self._last_image
        else:
            image = self.template.idle_frame(index)
            self.stats.frames_idle += 1
        self._last_image = image
        return image

    # -- internals --------------------------------------------------------------------------------
    def _finish(self, utterance: Utterance, played_until: float | None) -> None:
        if utterance.finished:
            return
        utterance.finished = True
        utterance.played_until = played_until
        if utterance in self._active:
            self._active.remove(utterance)
        self.on_finished(utterance)
