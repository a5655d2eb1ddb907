"""Lip offset at the receiving peer: how far the mouth's openness lags the audio envelope.

Each stream is placed on the receiver's clock by its RTP timestamps plus its smallest transit time
(the arrival of its least-delayed frame), which is how a player that plays each stream as early as it
can would show them. The offset is the lag that maximises the correlation between the audio
envelope and the mouth openness; positive means the picture is late.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from avatar_rtc.testing.receiver import Received


@dataclass(frozen=True)
class LipSync:
    offset_s: float
    correlation: float


class MouthDarkness:
    """Openness probe: the share of dark pixels in the mouth box, which an open mouth fills with its
    dark interior. Absolute, so it measures distance from the closed look, not frame-to-frame motion."""

    def __init__(
        self,
        box: tuple[int, int, int, int],
        threshold: int = 60,
        frame_size: tuple[int, int] | None = None,
    ) -> None:
        self.box = box
        self.threshold = threshold
        # The (width, height) ``box`` is in: a frame the sender scaled down (its resolution ladder
        # under load) is probed at the same place.
        self.frame_size = frame_size

    def __call__(self, image: np.ndarray) -> float:
        x0, y0, x1, y1 = self.box
        if self.frame_size is not None and (image.shape[1], image.shape[0]) != self.frame_size:
            sx, sy = image.shape[1] / self.frame_size[0], image.shape[0] / self.frame_size[1]
            x0, x1 = int(x0 * sx), max(int(x0 * sx) + 1, int(x1 * sx))
            y0, y1 = int(y0 * sy), max(int(y0 * sy) + 1, int(y1 * sy))
        gray = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY)
        return float(np.count_nonzero(gray < self.threshold)) / gray.size


def _timeline(arrival: list[float], pts: list[int], rate: int) -> np.ndarray:
    a = np.asarray(arrival, np.float64)
    p = (np.asarray(pts, np.int64) - pts[0]) / rate
    return p + np.min(a - p)


def audio_envelope(rec: Received, step: float = 0.005, window: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """RMS envelope on a regular grid of receiver-clock times."""
    rate = rec.audio_rate
    starts = np.asarray(rec.audio_pts, np.int64) - rec.audio_pts[0]
    total = int(starts[-1] + len(rec.audio_pcm[-1]))
    signal = np.zeros(total, np.float32)
    for start, pcm in zip(starts, rec.audio_pcm, strict=True):
        signal[start : start + len(pcm)] = pcm
    t0 = float(_timeline(rec.audio_arrival, rec.audio_pts, rate)[0])
    half = int(window * rate / 2)
    centres = np.arange(half, total - half, int(step * rate))
    power = np.concatenate([[0.0], np.cumsum(signal.astype(np.float64) ** 2)])
    rms = np.sqrt((power[centres + half] - power[centres - half]) / (2 * half))
    return t0 + centres / rate, rms


def video_openness(rec: Received, video_rate: int = 90000) -> tuple[np.ndarray, np.ndarray]:
    return _timeline(rec.video_arrival, rec.video_pts, video_rate), np.asarray(rec.video_probe, np.float64)


def lip_offset(rec: Received, max_lag: float = 0.25, step: float = 0.005) -> LipSync:
    at, env = audio_envelope(rec, step=step)
    vt, openness = video_openness(rec)
    lo, hi = max(at[0], vt[0]) + max_lag, min(at[-1], vt[-1]) - max_lag
    if hi - lo < 1.0:
        raise ValueError("need at least a second of overlapping audio and video")
    grid = np.arange(lo, hi, step)
    audio = np.interp(grid, at, env)
    audio = (audio - audio.mean()) / (audio.std() + 1e-9)
    lags = np.arange(-round(max_lag / step), round(max_lag / step) + 1)
    scores = np.empty(len(lags))
    for i, lag in enumerate(lags):
        video = np.interp(grid + lag * step, vt, openness)
        video = (video - video.mean()) / (video.std() + 1e-9)
        scores[i] = float(np.mean(audio * video))
    best = int(np.argmax(scores))
    shift = 0.0
    if 0 < best < len(lags) - 1:  # parabolic refinement between grid steps
        a, b, c = scores[best - 1], scores[best], scores[best + 1]
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if denom else 0.0
    return LipSync(offset_s=float((lags[best] + shift) * step), correlation=float(scores[best]))


def mouth_box(landmarks: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box around the mouth (478-point landmarks of one frame) with room for the jaw to drop."""
    from avatar_rtc.avatar.face import LIP_OUTER_LOWER, LIP_OUTER_UPPER

    lips = landmarks[list(LIP_OUTER_UPPER + LIP_OUTER_LOWER)]
    x0, y0 = lips.min(axis=0)
    x1, y1 = lips.max(axis=0)
    width = x1 - x0
    box = (x0 - 0.1 * width, y0 - 0.1 * width, x1 + 0.1 * width, y1 + 0.5 * width)
    w, h = size
    return (
        int(max(0, box[0])),
        int(max(0, box[1])),
        int(min(w, box[2])),
        int(min(h, box[3])),
    )
