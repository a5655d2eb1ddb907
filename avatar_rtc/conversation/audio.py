"""PCM helpers built on av's resampler (libswresample)."""

from __future__ import annotations

import av
import numpy as np


def resample_pcm(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a whole mono int16 clip; the result has round(len * to_rate / from_rate) samples."""
    if pcm.dtype != np.int16 or pcm.ndim != 1:
        raise ValueError("expected mono int16 PCM")
    target = round(len(pcm) * to_rate / from_rate)
    if from_rate == to_rate or len(pcm) == 0:
        return pcm.copy() if len(pcm) == target else np.zeros(target, np.int16)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = from_rate
    parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    out = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    # swresample's filter delay leaves the length a few samples off; pin it so both tracks and the
    # renderer agree on where a clip ends.
    if len(out) >= target:
        return out[:target]
    return np.concatenate([out, np.zeros(target - len(out), np.int16)])
