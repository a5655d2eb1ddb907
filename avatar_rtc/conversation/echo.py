"""A server-side guard against the avatar's own voice coming back through the caller's microphone.

The page asks the browser for echo cancellation; what leaks through it is a delayed, attenuated copy
of what the avatar said, filtered by the speaker and the room. So once the caller has spoken over the
avatar for a moment, the guard looks for the avatar's outgoing waveform in the microphone's: the
normalised cross-correlation of the two (both band-passed to the telephone band, where every speaker,
microphone and codec keeps the signal) at every round-trip delay up to ``max_delay_s``. An echo is a
filtered copy, so at its delay the two correlate strongly; a caller talking over the avatar says other
sounds, which correlate with the avatar's only by chance, and weakly.

A browser's jitter buffer that runs dry or catches up moves the echo's delay by a frame or a few in
the middle of the window, so each 60 ms block may also take its own delay within 50 ms of the best
one (:func:`_piecewise_correlation`). Measured on 260 ms windows, the moment a barge-in is decided:
the echo in tests/test_voice.py's call (two Opus passes, a speaker playing out of a jitter buffer,
both cores busy) 0.72-0.96 over 30 runs; espeak-ng callers against an espeak-ng avatar (the same
synthetic voice, so a hard case) median 0.38, p90 0.52, 4 windows of 144 above 0.7, and those were
as loud as the avatar, which the attenuation check refuses as echo. Loudness contours were not
enough: the echo's missed the avatar's by 4-7 dB at its best delay, as much as a caller's did; band
levels per 10 ms did not separate the two either (0.8 for both).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from avatar_rtc.conversation.audio import resample_pcm

RATE = 16000
_BAND_HZ = (300.0, 3400.0)
_ACTIVE_RMS = 30.0  # quieter than this (of 32768) is silence: no evidence either way
# Blocks the microphone's window is split into when the echo's delay may move within it, and how far.
_BLOCK_S = 0.06
_BLOCK_SLACK_S = 0.05


@cache
def _band_pass() -> np.ndarray:
    return butter(4, _BAND_HZ, btype="bandpass", fs=RATE, output="sos")


def _stream(chunks: Sequence[tuple[float, np.ndarray]], rate: int) -> tuple[np.ndarray, float]:
    """The chunks ((wall time stamped on the first sample, int16 mono at ``rate``), consecutive pieces
    of one stream) joined at 16 kHz, and the wall time of its first sample.

    The stream is taken as continuous, not placed chunk by chunk at its stamps: on a busy machine a
    chunk is stamped late by tens of ms (when it was handled, not when it was played or heard), while
    a speaker plays, and a microphone records, sample after sample. The median of the stamps (less
    each chunk's place in the stream) anchors it in time."""
    pieces = [_at_16k(pcm, rate) for _, pcm in chunks]
    starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]])
    origin = float(
        np.median([stamp - start / RATE for (stamp, _), start in zip(chunks, starts, strict=True)])
    )
    return np.concatenate(pieces).astype(np.float32), origin


def _between(stream: np.ndarray, origin: float, start: float, end: float) -> np.ndarray:
    """The part of ``stream`` (first sample at wall time ``origin``) from wall time ``start`` to
    ``end``; silence where the stream does not reach."""
    lo, hi = round((start - origin) * RATE), round((end - origin) * RATE)
    out = np.zeros(max(hi - lo, 0), np.float32)
    a, b = max(lo, 0), min(hi, len(stream))
    if b > a:
        out[a - lo : b - lo] = stream[a:b]
    return out


def _at_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """One chunk at 16 kHz. From a multiple of it by keeping every n-th sample: a resampler's filter
    would smear each 20 ms chunk's edges, and what folds down from above 8 kHz lands above the band
    the guard compares (speech synthesised at 22 kHz has nothing above 11 kHz)."""
    if rate == RATE:
        return pcm
    if rate % RATE == 0:
        return pcm[:: rate // RATE]
    return resample_pcm(pcm, rate, RATE)


@dataclass(frozen=True)
class EchoVerdict:
    is_echo: bool
    correlation: float  # at the best delay (0..1; 0 where there was no evidence)
    delay_s: float
    window_s: float  # microphone audio judged
    attenuation_db: float  # how much weaker the microphone was than the avatar at that delay


class EchoGuard:
    def __init__(
        self,
        min_correlation: float = 0.7,
        max_delay_s: float = 0.6,
        min_window_s: float = 0.12,
        min_attenuation_db: float = 3.0,
    ) -> None:
        self.min_correlation = min_correlation
        self.min_attenuation_db = min_attenuation_db
        self.max_delay_s = max_delay_s
        self.min_window_s = min_window_s
        # The last two seconds of the microphone, 20 ms chunks: (wall time of the first sample, pcm).
        self._mic: deque[tuple[float, np.ndarray]] = deque(maxlen=100)

    def mic_audio(self, at: float, pcm16k: np.ndarray) -> None:
        """Record a chunk of microphone audio (16 kHz) whose end arrived at wall time ``at``."""
        self._mic.append((at - len(pcm16k) / RATE, pcm16k))

    def assess(self, sent: Sequence[tuple[float, np.ndarray]], sent_rate: int, since: float) -> EchoVerdict:
        """Is the microphone audio since wall time ``since`` the avatar's own voice? ``sent``: what the
        avatar sent, as (wall time it left, pcm at ``sent_rate``) chunks in order."""
        if not self._mic or not sent:
            return EchoVerdict(False, 0.0, 0.0, 0.0, 0.0)
        mic_stream, mic_origin = _stream(self._mic, RATE)
        # The window is the microphone's last samples since ``since`` by the stamps (the chunk that
        # arrived last and the onset were both measured on arrival), placed at the stream's end.
        last_stamp, last_pcm = self._mic[-1]
        count = max(min(round((last_stamp + len(last_pcm) / RATE - since) * RATE), len(mic_stream)), 0)
        end = mic_origin + len(mic_stream) / RATE
        since = end - count / RATE
        mic = mic_stream[len(mic_stream) - count :]
        window_s = len(mic) / RATE
        nothing = EchoVerdict(False, 0.0, 0.0, window_s, 0.0)
        if window_s < self.min_window_s or np.sqrt(np.mean(np.square(mic))) < _ACTIVE_RMS:
            return nothing
        # The avatar's audio that left up to max_delay_s before each microphone sample.
        avatar = _between(*_stream(sent, sent_rate), since - self.max_delay_s, end)
        mic_band = sosfilt(_band_pass(), mic)
        avatar_band = sosfilt(_band_pass(), avatar)
        # correlation[k]: the microphone against the avatar's audio from k samples after
        # since - max_delay_s, i.e. at a delay of max_delay_s - k / RATE.
        correlation, avatar_energy = _correlations(mic_band, avatar_band)
        if not correlation.any():
            return nothing
        best = int(np.argmax(correlation))
        value = max(float(correlation[best]), _piecewise_correlation(mic_band, avatar_band, best))
        delay_s = self.max_delay_s - best / RATE
        # An echo comes back weaker than it was sent (the room, the speaker, the canceller); a caller
        # talking into the microphone is not held to that.
        mic_energy = float(np.sum(np.square(mic_band, dtype=np.float64)))
        attenuation_db = float(10.0 * np.log10(max(avatar_energy[best], 1e-9) / max(mic_energy, 1e-9)))
        is_echo = value >= self.min_correlation and attenuation_db >= self.min_attenuation_db
        return EchoVerdict(is_echo, value, delay_s, window_s, attenuation_db)


def _correlations(mic: np.ndarray, avatar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normalised cross-correlation of ``mic`` with each stretch of ``avatar`` as long as it (0
    where the avatar was silent), and the avatar's energy in each stretch."""
    products = fftconvolve(avatar, mic[::-1], mode="valid")
    energy = np.concatenate([[0.0], np.cumsum(np.square(avatar, dtype=np.float64))])
    avatar_energy = energy[len(mic) :] - energy[: -len(mic)]
    mic_energy = float(np.sum(np.square(mic, dtype=np.float64)))
    active = avatar_energy > len(mic) * _ACTIVE_RMS**2 * 0.1
    if mic_energy <= 0.0 or not active.any():
        return np.zeros(len(products)), avatar_energy
    scale = np.sqrt(np.maximum(avatar_energy, 1e-9) * mic_energy)
    return np.where(active, products / scale, 0.0), avatar_energy


def _piecewise_correlation(mic: np.ndarray, avatar: np.ndarray, lag: int) -> float:
    """The correlation when each 40 ms block of ``mic`` may take its own lag within
    ``_BLOCK_SLACK_S`` of ``lag``, blocks weighted by their energy.

    A browser's jitter buffer that runs dry, or catches up, moves the echo's delay by a frame or a few
    in the middle of a window: a single lag then fits only part of it (0.74 where its two halves fit
    0.9 and better, 40 ms apart). Another voice gains little from the slack: its blocks match the
    avatar only by chance, near any one lag."""
    size, slack = round(_BLOCK_S * RATE), round(_BLOCK_SLACK_S * RATE)
    total, weight = 0.0, 0.0
    for start in range(0, len(mic) - size + 1, size):
        block = mic[start : start + size]
        block_energy = float(np.sum(np.square(block, dtype=np.float64)))
        if block_energy < size * _ACTIVE_RMS**2:
            continue
        lo = max(lag + start - slack, 0)
        hi = min(lag + start + slack + size, len(avatar))
        if hi - lo < size:
            continue
        correlation, _ = _correlations(block, avatar[lo:hi])
        total += block_energy * float(correlation.max())
        weight += block_energy
    return total / weight if weight else 0.0
