"""The caller's microphone: WebRTC audio frames to 16 kHz mono PCM, then webrtcvad into utterances.

Everything here is synchronous and cheap so that it can run on the event loop for every received frame
(one ``is_speech`` call costs a few microseconds per 20 ms frame).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import av
import numpy as np
import webrtcvad

from avatar_rtc.config import VadSettings

VAD_SAMPLE_RATE = 16000
__all__ = [
    "MicResampler",
    "SpeechDropped",
    "SpeechStarted",
    "UtteranceEnded",
    "VadSettings",
    "VoiceActivitySegmenter",
]


class MicResampler:
    """Received ``av.AudioFrame``s (aiortc: 48 kHz, stereo or mono, s16, 960 samples) to 16 kHz mono int16.

    One resampler lives for the whole stream: libswresample keeps its filter history between frames,
    so consecutive chunks join without the clicks that resampling each frame on its own would cause.
    """

    def __init__(self, rate: int = VAD_SAMPLE_RATE) -> None:
        self.rate = rate
        self._resampler = self._new_resampler()
        self._input_signature: tuple[str, str, int] | None = None

    def _new_resampler(self) -> av.AudioResampler:
        return av.AudioResampler(format="s16", layout="mono", rate=self.rate)

    def push(self, frame: av.AudioFrame) -> np.ndarray:
        """The 16 kHz mono samples this frame yields (the resampler's delay makes the count vary a little)."""
        signature = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._input_signature is not None and signature != self._input_signature:
            # A renegotiated track can change layout or rate mid-call; av refuses frames that do not
            # match its first one, so start over (losing only a few samples of filter history).
            self._resampler = self._new_resampler()
        self._input_signature = signature
        parts = [out.to_ndarray().reshape(-1) for out in self._resampler.resample(frame)]
        if not parts:
            return np.zeros(0, np.int16)
        pcm = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # The passthrough case (input already 16 kHz mono s16) hands back the caller's own frame.
        return pcm.astype(np.int16, copy=False)


@dataclass(frozen=True)
class SpeechStarted:
    """Onset confirmed; ``at_s`` is the first voiced frame of the confirming window (stream seconds)."""

    at_s: float


@dataclass(frozen=True, eq=False)
class UtteranceEnded:
    """One utterance, padded on both sides; ``vad_end_at`` is ``time.monotonic()`` when the end was
    detected, so later stages can measure their latency from it."""

    pcm: np.ndarray
    started_at_s: float
    ended_at_s: float
    vad_end_at: float

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / VAD_SAMPLE_RATE


@dataclass(frozen=True)
class SpeechDropped:
    """A SpeechStarted that produced no utterance (shorter than ``min_speech_ms``): a barge-in that
    paused the avatar for it may resume."""

    started_at_s: float
    ended_at_s: float


VadEvent = SpeechStarted | UtteranceEnded | SpeechDropped


class VoiceActivitySegmenter:
    """16 kHz mono int16 in (any chunk size), speech events out; times are seconds of the input stream."""

    def __init__(self, settings: VadSettings | None = None) -> None:
        self.settings = settings or VadSettings()
        s = self.settings
        self._vad = webrtcvad.Vad(s.aggressiveness)
        self._frame_len = VAD_SAMPLE_RATE * s.frame_ms // 1000
        self._frame_s = s.frame_ms / 1000
        self._padding_frames = s.start_padding_ms // s.frame_ms
        self._onset_frames = max(1, s.onset_ms // s.frame_ms)
        self._onset_needed = max(1, round(s.onset_ratio * self._onset_frames))
        self._end_frames = max(2, s.end_silence_ms // s.frame_ms)
        # A few voiced frames inside the end window (breath, noise) do not hold an utterance open.
        self._end_voiced_allowed = self._end_frames // 10
        self._max_frames = round(s.max_utterance_s / self._frame_s)
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, np.int16)
        self._frames_seen = 0
        # Idle: recent frames as (pcm, voiced), enough for the onset window plus the padding before it.
        self._history: deque[tuple[np.ndarray, bool]] = deque(
            maxlen=self._padding_frames + self._onset_frames
        )
        self._in_speech = False
        self._utterance: list[np.ndarray] = []
        self._utterance_first_frame = 0  # stream index of the first frame in _utterance
        self._speech_first_frame = 0  # stream index of the first voiced frame (the onset)
        self._last_voiced_frame = 0
        self._recent_voiced: deque[bool] = deque(maxlen=self._end_frames)

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def silence_s(self) -> float:
        """Inside an utterance: how long since its last voiced frame ended (0 outside speech)."""
        if not self._in_speech:
            return 0.0
        return (self._frames_seen - self._last_voiced_frame - 1) * self._frame_s

    @property
    def last_voiced_frame(self) -> int:
        return self._last_voiced_frame

    def speech_so_far(self) -> np.ndarray | None:
        """The open utterance's audio up to now (start padding included), or None outside speech."""
        if not self._in_speech or not self._utterance:
            return None
        return np.concatenate(self._utterance)

    @property
    def stream_s(self) -> float:
        """Seconds of input classified so far."""
        return self._frames_seen * self._frame_s

    def push(self, pcm16k: np.ndarray) -> list[VadEvent]:
        if pcm16k.dtype != np.int16 or pcm16k.ndim != 1:
            raise ValueError("expected mono int16 PCM at 16 kHz")
        samples = np.concatenate([self._pending, pcm16k]) if len(self._pending) else pcm16k
        whole = len(samples) // self._frame_len * self._frame_len
        self._pending = samples[whole:].copy()
        events: list[VadEvent] = []
        for start in range(0, whole, self._frame_len):
            frame = samples[start : start + self._frame_len]
            voiced = self._vad.is_speech(frame.tobytes(), VAD_SAMPLE_RATE)
            self._step(frame, voiced, events)
            self._frames_seen += 1
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: an utterance still open is ended (or dropped) now."""
        events: list[VadEvent] = []
        if self._in_speech:
            self._finish(self._frames_seen, events)
        self._pending = np.zeros(0, np.int16)
        self._history.clear()
        return events

    def _step(self, frame: np.ndarray, voiced: bool, events: list[VadEvent]) -> None:
        index = self._frames_seen
        if not self._in_speech:
            self._history.append((frame, voiced))
            history = list(self._history)
            onset_window = history[-self._onset_frames :]
            if sum(v for _, v in onset_window) < self._onset_needed:
                return
            # The onset is the window's first voiced frame; the padding is counted back from there.
            onset_position = len(history) - len(onset_window)
            onset_position += next(i for i, (_, v) in enumerate(onset_window) if v)
            kept = history[max(0, onset_position - self._padding_frames) :]
            self._in_speech = True
            self._utterance = [pcm for pcm, _ in kept]
            self._utterance_first_frame = index + 1 - len(kept)
            self._speech_first_frame = index + 1 - (len(history) - onset_position)
            self._last_voiced_frame = index
            self._recent_voiced.clear()
            self._recent_voiced.extend(v for _, v in onset_window)
            self._history.clear()
            events.append(SpeechStarted(at_s=self._speech_first_frame * self._frame_s))
            return

        self._utterance.append(frame)
        self._recent_voiced.append(voiced)
        if voiced:
            self._last_voiced_frame = index
        if len(self._utterance) >= self._max_frames:
            # Cut the monologue here. All of its audio goes out (no trailing trim: the speaker has not
            # paused), and if they are still talking the rest becomes a new utterance from the cut,
            # with no padding since that audio is already in the one just emitted.
            recent_voiced = list(self._recent_voiced)
            self._finish(index + 1, events, keep_until_frame=index + 1)
            if any(recent_voiced[-self._onset_frames :]):
                self._in_speech = True
                self._utterance_first_frame = index + 1
                self._speech_first_frame = index + 1
                self._last_voiced_frame = index
                self._recent_voiced.extend(recent_voiced)
                events.append(SpeechStarted(at_s=self._speech_first_frame * self._frame_s))
            return
        silent_window = len(self._recent_voiced) == self._end_frames and (
            sum(self._recent_voiced) <= self._end_voiced_allowed
        )
        if silent_window:
            self._finish(index + 1, events)

    def _finish(self, end_frame: int, events: list[VadEvent], keep_until_frame: int | None = None) -> None:
        """Close the open utterance, whose audio runs up to (not including) stream frame ``end_frame``."""
        speech_end_frame = max(self._speech_first_frame, min(self._last_voiced_frame + 1, end_frame))
        if keep_until_frame is None:
            # As much silence after the last voiced frame as was kept before the onset: webrtcvad's
            # last voiced frame often falls before a word's final fricative dies away.
            keep_until_frame = min(end_frame, speech_end_frame + self._padding_frames)
        utterance = self._utterance[: max(0, keep_until_frame - self._utterance_first_frame)]
        started_at_s = self._speech_first_frame * self._frame_s
        ended_at_s = speech_end_frame * self._frame_s
        self._in_speech = False
        self._utterance = []
        self._recent_voiced.clear()
        speech_ms = (speech_end_frame - self._speech_first_frame) * self.settings.frame_ms
        if speech_ms < self.settings.min_speech_ms:
            events.append(SpeechDropped(started_at_s=started_at_s, ended_at_s=ended_at_s))
            return
        events.append(
            UtteranceEnded(
                pcm=np.concatenate(utterance),
                started_at_s=started_at_s,
                ended_at_s=ended_at_s,
                vad_end_at=time.monotonic(),
            )
        )
