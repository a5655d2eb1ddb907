"""Landmarks of a video, frame by frame as they are tracked, smoothed over time as soon as enough later
frames are known.

Frames where no face was found (or the mesh did not run) get landmarks interpolated from their
neighbours (indices never shift), and landmarks and face boxes are smoothed with a centred Gaussian
(zero lag: an offline clip can look ahead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from avatar_rtc.avatar.face import portrait_box

if TYPE_CHECKING:  # annotations only: prepare imports this module
    from avatar_rtc.avatar.prepare import PrepareSettings


def gaussian_taps(sigma_frames: float) -> np.ndarray:
    """Normalised centred Gaussian taps, radius ``int(4 sigma + 0.5)``: the kernel of scipy's
    ``gaussian_filter1d`` (truncate=4.0), so streamed smoothing equals filtering the whole clip."""
    if sigma_frames <= 0:
        return np.ones(1)
    radius = int(4.0 * sigma_frames + 0.5)
    return cv2.getGaussianKernel(2 * radius + 1, sigma_frames, cv2.CV_64F).reshape(-1)


class VideoTracker:
    """Per-frame landmarks as they are tracked, and which frames can already be finalised.

    A frame's smoothed crop box needs the landmarks of the frames within both smoothing radii after it,
    and a frame with no face needs the next frame that has one. Frames are finalised (handed to the crop
    worker) as soon as that much is known, so cropping runs alongside tracking instead of after it, and
    each result equals smoothing the whole clip at once (same taps, same edge rule).
    """

    def __init__(self, settings: PrepareSettings) -> None:
        self.settings = settings
        self.landmark_taps = gaussian_taps(settings.landmark_smoothing_s * settings.fps)
        self.box_taps = gaussian_taps(settings.box_smoothing_s * settings.fps)
        self.reach = len(self.landmark_taps) // 2 + len(self.box_taps) // 2
        self.raw: list[np.ndarray | None] = []
        self.skipped: set[int] = set()  # frames the mesh did not run on (see landmark_stride)
        self.filled: list[np.ndarray] = []  # raw landmarks with gaps interpolated, float64
        # Smoothed landmarks and the unsmoothed box they give, by frame, while later boxes still need them.
        self.smoothed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.finalised = 0
        self.ended = False

    def add(self, points: np.ndarray | None, tracked: bool = True) -> None:
        """The next frame's landmarks: None where no face was found, or where the mesh did not run on
        it (``tracked=False``); both are interpolated from the frames around them."""
        if not tracked:
            self.skipped.add(len(self.raw))
        self.raw.append(points)
        if points is None:
            return
        points = points.astype(np.float64)
        # Fill the gap since the last frame with a face, linearly (held before the first face).
        last = self.filled[-1] if self.filled else points
        gap = len(self.raw) - 1 - len(self.filled)
        for k in range(1, gap + 1):
            weight = k / (gap + 1) if len(self.filled) else 1.0
            self.filled.append(last * (1.0 - weight) + points * weight)
        self.filled.append(points)

    def face_found(self) -> np.ndarray:
        """Per frame: the mesh found the face there; a skipped frame counts as found when the tracked
        frames on both sides of it found it."""
        found = np.array([points is not None for points in self.raw], dtype=bool)
        for index in sorted(self.skipped):
            after = next((i for i in range(index + 1, len(self.raw)) if i not in self.skipped), None)
            found[index] = index > 0 and bool(found[index - 1]) and after is not None and bool(found[after])
        return found

    def end(self) -> None:
        """No more frames: trailing frames without a face hold the last landmarks found."""
        self.ended = True
        if self.filled:
            while len(self.filled) < len(self.raw):
                self.filled.append(self.filled[-1])

    def _smoothed(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self.smoothed.get(index)
        if cached is None:
            last = len(self.raw) - 1
            radius = len(self.landmark_taps) // 2
            points = np.zeros_like(self.filled[0])
            for k, tap in enumerate(self.landmark_taps):
                points += tap * self.filled[min(max(index + k - radius, 0), last)]
            cached = (points, np.array(portrait_box(points, self.settings.face_fraction)))
            self.smoothed[index] = cached
        return cached

    def _box(self, index: int) -> np.ndarray:
        last = len(self.raw) - 1
        radius = len(self.box_taps) // 2
        box = np.zeros(3)
        for k, tap in enumerate(self.box_taps):
            box += tap * self._smoothed(min(max(index + k - radius, 0), last))[1]
        return box

    def ready(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(index, smoothed source landmarks, smoothed box (left, top, side)) of each newly final frame."""
        limit = len(self.raw) if self.ended else len(self.filled) - self.reach
        out = []
        while self.finalised < limit:
            index = self.finalised
            out.append((index, self._smoothed(index)[0], self._box(index)))
            self.finalised += 1
        # Landmark sets no later box will read again.
        for stale in [i for i in self.smoothed if i < self.finalised - self.reach]:
            del self.smoothed[stale]
        return out
