"""A server-side guard against the avatar's own voice coming back through the caller's microphone.

The page asks the browser for echo cancellation; what leaks through it is a delayed, attenuated copy
of what the avatar said, so its loudness contour in dB is the avatar's outgoing contour shifted in time
and offset by a constant (the room and the canceller's attenuation). A caller talking over the avatar
has a contour of its own. So once the caller has spoken for a moment, the guard looks for a round-trip
delay at which the microphone's level minus the avatar's level stays nearly constant, explains most of
the microphone's own variation, and is below zero (an echo returns weaker than it was sent): that is echo.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FLOOR_DB = -80.0
_ACTIVE_DB = -62.0  # below this a level is silence: no evidence either way


def _db(rms: np.ndarray) -> np.ndarray:
    return np.maximum(20 * np.log10(np.maximum(rms, 1e-9) / 32768.0), _FLOOR_DB)


def _smooth(values: np.ndarray) -> np.ndarray:
    # Levels of 20 ms frames jitter from frame to frame; comparing them at a delay that falls between
    # two frames would count that jitter as mismatch.
    if len(values) < 3:
        return values
    padded = np.concatenate([values[:1], values, values[-1:]])
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


@dataclass(frozen=True)
class EchoVerdict:
    is_echo: bool
    spread_db: float  # std of mic-minus-avatar level at the best delay (inf: no evidence)
    delay_s: float
    points: int


class EchoGuard:
    def __init__(
        self,
        max_spread_db: float = 3.0,
        max_delay_s: float = 0.6,
        min_points: int = 30,
        step_s: float = 0.005,
        min_attenuation_db: float = 3.0,
    ) -> None:
        self.max_spread_db = max_spread_db
        self.min_attenuation_db = min_attenuation_db
        self.max_delay_s = max_delay_s
        self.min_points = min_points
        self.step_s = step_s
        self._mic: deque[tuple[float, float]] = deque(maxlen=800)

    def mic_level(self, at: float, pcm: np.ndarray, sample_rate: int = 16000) -> None:
        """Record the levels (per 5 ms) of a chunk of microphone audio whose end arrived at ``at``."""
        block = sample_rate // 200
        whole = len(pcm) // block * block
        if not whole:
            return
        levels = np.sqrt(np.mean(np.square(pcm[:whole].reshape(-1, block), dtype=np.float32), axis=1))
        start = at - len(pcm) / sample_rate
        self._mic.extend((start + i * 0.005, float(v)) for i, v in enumerate(levels))

    def assess(self, sent_levels: Sequence[tuple[float, float]], since: float) -> EchoVerdict:
        """Is the microphone audio since wall time ``since`` the avatar's own voice?
        ``sent_levels`` are (wall time, RMS) of what the avatar sent."""
        mic = [(t, level) for t, level in self._mic if t >= since]
        if len(mic) < self.min_points or len(sent_levels) < 2:
            return EchoVerdict(False, float("inf"), 0.0, len(mic))
        mic_t = np.array([t for t, _ in mic])
        mic_db = _smooth(_db(np.array([level for _, level in mic])))
        sent_t = np.array([t for t, _ in sent_levels])
        sent_db = _smooth(_db(np.array([level for _, level in sent_levels])))
        best = EchoVerdict(False, float("inf"), 0.0, 0)
        for delay in np.arange(0.0, self.max_delay_s + 1e-9, self.step_s):
            echo_db = np.interp(mic_t - delay, sent_t, sent_db, left=_FLOOR_DB, right=_FLOOR_DB)
            both = (mic_db > _ACTIVE_DB) & (echo_db > _ACTIVE_DB)
            # Mic speech while the avatar was silent at that delay cannot be its echo.
            lone = (mic_db > _ACTIVE_DB) & (echo_db <= _ACTIVE_DB)
            if np.count_nonzero(both) < self.min_points or np.count_nonzero(lone) > len(mic) // 4:
                continue
            difference = mic_db[both] - echo_db[both]
            spread = float(np.std(difference))
            # A flat contour matches anything flat: the avatar's contour must explain most of the
            # microphone's own variation before the audio counts as echo.
            explains = spread <= 0.5 * float(np.std(mic_db[both]))
            # And an echo comes back weaker than it was sent (the room, the speaker, the canceller);
            # a caller talking into the microphone is not held to that.
            attenuated = float(np.mean(difference)) <= -self.min_attenuation_db
            if spread < best.spread_db:
                is_echo = spread <= self.max_spread_db and explains and attenuated
                best = EchoVerdict(is_echo, spread, float(delay), int(np.count_nonzero(both)))
        return best
