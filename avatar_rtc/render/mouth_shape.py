"""Mouth shape from a short window of speech: how open, and how rounded versus spread.

Both come from the window as a whole, weighted towards its centre, so a window centred on a frame's
time gives that frame's shape with no lag (no attack/release smoothing, which would trail the audio).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# Level (Hann-weighted RMS, dBFS) at which the mouth starts to open and where it is fully open.
SILENCE_DBFS = -45.0
FULL_OPEN_DBFS = -12.0
# Rounded vowels (oo, oh) put their energy under ~900 Hz; spread ones (ee, eh) have a strong second
# formant at 1.5-3 kHz. The low/high band energy ratio in dB, minus the neutral point, over the scale,
# through tanh, gives roundness.
LOW_BAND_HZ = (250.0, 900.0)
HIGH_BAND_HZ = (1200.0, 3500.0)
NEUTRAL_RATIO_DB = 12.0
RATIO_SCALE_DB = 9.0


@lru_cache(maxsize=8)
def _analysis(length: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Hann window, low/high band masks of the rfft bins, and the window's power normaliser."""
    window = np.hanning(length + 2)[1:-1].astype(np.float32)
    freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
    low = (freqs >= LOW_BAND_HZ[0]) & (freqs < LOW_BAND_HZ[1])
    high = (freqs >= HIGH_BAND_HZ[0]) & (freqs < HIGH_BAND_HZ[1])
    return window, low, high, float(np.sum(window * window))


def level_dbfs(audio_window: np.ndarray) -> float:
    """Centre-weighted RMS level of float audio in [-1, 1], in dBFS (a full-scale square wave is 0)."""
    if audio_window.size == 0:
        return -np.inf
    window, _, _, power_norm = _analysis(int(audio_window.size), 16000)
    weighted = audio_window.astype(np.float32, copy=False) * window
    mean_square = float(np.dot(weighted, weighted)) / power_norm
    return 10.0 * np.log10(mean_square) if mean_square > 1e-12 else -np.inf


def mouth_shape(audio_window: np.ndarray, sample_rate: int = 16000) -> tuple[float, float]:
    """(openness in [0, 1], roundness in [-1, 1]) for the moment at the centre of ``audio_window``.

    ``audio_window`` is mono float audio in [-1, 1]. Roundness is -1 for spread lips ("ee"), +1 for
    rounded ("oo") and fades to 0 as the level falls to silence.
    """
    length = int(audio_window.size)
    if length < 16:
        return 0.0, 0.0
    window, low, high, power_norm = _analysis(length, sample_rate)
    weighted = audio_window.astype(np.float32, copy=False) * window
    mean_square = float(np.dot(weighted, weighted)) / power_norm
    if mean_square <= 1e-12:
        return 0.0, 0.0
    dbfs = 10.0 * np.log10(mean_square)
    linear = (dbfs - SILENCE_DBFS) / (FULL_OPEN_DBFS - SILENCE_DBFS)
    linear = min(max(linear, 0.0), 1.0)
    # Ease out: quiet syllables still visibly open the mouth, loud ones saturate gently.
    openness = linear * (1.6 - 0.6 * linear)
    if openness <= 0.0:
        return 0.0, 0.0
    spectrum = np.abs(np.fft.rfft(weighted)) ** 2
    low_energy = float(spectrum[low].sum()) + 1e-12
    high_energy = float(spectrum[high].sum()) + 1e-12
    ratio_db = 10.0 * np.log10(low_energy / high_energy)
    roundness = float(np.tanh((ratio_db - NEUTRAL_RATIO_DB) / RATIO_SCALE_DB))
    # Unvoiced or barely audible sound says little about lip shape.
    voicing = min(openness / 0.3, 1.0)
    return float(min(openness, 1.0)), roundness * voicing
