"""A prepared avatar: its frames and the per-frame face data renderers need."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Template:
    """An avatar ready to render.

    ``frames`` is (N, H, W, 3) uint8 BGR; ``landmarks`` is (N, 478, 2) float32 pixel coordinates
    (MediaPipe face-mesh topology), one row per frame. ``extras`` holds renderer-specific per-frame
    arrays computed at preparation (e.g. a renderer's rig), keyed by name.
    """

    id: str
    fps: int
    frames: np.ndarray
    landmarks: np.ndarray
    source: str = ""
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"template frames must be (N, H, W, 3) uint8, got {self.frames.shape}")
        if self.landmarks.shape[0] != self.frames.shape[0]:
            raise ValueError("template needs one landmark set per frame")

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def loop_index(self, frame_index: int) -> int:
        """Template frame shown at media frame ``frame_index``: forward then back (ping-pong),
        so the idle loop never jumps from the last frame to the first."""
        n = self.frame_count
        if n == 1:
            return 0
        period = 2 * n - 2
        i = frame_index % period
        return i if i < n else period - i

    def idle_frame(self, frame_index: int) -> np.ndarray:
        return self.frames[self.loop_index(frame_index)]
