"""The size of the video a call sends: the template's own frame size, capped by a configured long side,
and stepped down one level at a time while the call's video sender cannot keep up (and back up once it
clearly can again). Resolution goes first so that frames are dropped only as a last resort."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

import cv2

Size = tuple[int, int]  # (width, height)

# Scale of each level against the base output size, and the name its quality event carries. The names
# start with "video_" so a page that shows the renderer's quality levels (full, short_wait, ...) can
# tell the two apart.
LEVELS: tuple[tuple[str, float], ...] = (("video_full", 1.0), ("video_reduced", 0.75), ("video_low", 0.5))
# Below this long side a face in a full frame is too small to read; the ladder stops here.
MIN_LONG_SIDE = 360


def _even_below(value: int) -> int:
    return max(2, value - value % 2)


def output_size(frame_size: Size, max_long_side: int) -> Size:
    """What a frame of ``frame_size`` is sent at when its long side may be at most ``max_long_side``
    (0: no cap): scaled down (never up) with its aspect kept, both sides even (I420 needs that)."""
    width, height = frame_size
    longest = max(width, height)
    if max_long_side <= 0 or max_long_side >= longest:
        return _even_below(width), _even_below(height)
    long_side = _even_below(max_long_side)
    scale = long_side / longest

    def side(value: int) -> int:
        # The long side is the cap itself; the other, the nearest even size to the exact aspect.
        return long_side if value == longest else max(2, 2 * int(value * scale / 2 + 0.5))

    return side(width), side(height)


def interpolation(source: Size, target: Size) -> int:
    """How to scale ``source`` down to ``target``. Bilinear up to half size: there its 2x2 footprint
    covers every source pixel, and it comes within 50 dB PSNR of area averaging at a quarter of the cost
    (OpenCV's INTER_AREA takes 15 ms for 1920x1080 to 1280x720, as much as encoding the 720p frame
    saves; scripts/bench_encode.py). Further down bilinear would alias: area averaging."""
    return cv2.INTER_AREA if max(source) > 2 * max(target) else cv2.INTER_LINEAR


def ladder_sizes(base: Size) -> list[tuple[str, Size]]:
    """The levels for output size ``base``: each with a long side at least 10% shorter than the one
    before (a smaller step saves too little to be worth a new keyframe), none under
    :data:`MIN_LONG_SIDE` (a ``base`` that small has no other level)."""
    longest = max(base)
    levels: list[tuple[str, Size]] = [(LEVELS[0][0], base)]
    for name, scale in LEVELS[1:]:
        long_side = max(MIN_LONG_SIDE, int(longest * scale))
        if long_side > 0.9 * max(levels[-1][1]):
            continue
        levels.append((name, output_size(base, long_side)))
    return levels


@dataclass(frozen=True)
class LadderTuning:
    """When the ladder moves. Lateness is how long after its due time the sender asked for a frame;
    busy is how long the sender took between handing a frame over and asking for the next (encoding
    and sending it, and waiting for a CPU to do so)."""

    # A frame sent later than this share of a frame interval (or one that made the track skip frames)
    # counts against the current level. One stall (a GC pause, a model loading) that skips many frames
    # is one late frame: it is sustained lateness that says the call needs more CPU than it gets.
    late_share: float = 0.4
    # Step down when half of the frames in this window were late.
    down_window_s: float = 0.5
    # The first frames of a call are late anyway (connection set-up, encoder start, first keyframe):
    # no step down before this much video has been sent.
    warmup_s: float = 1.0
    # Step up only after this long without a late frame, and only if the sender's median busy time,
    # scaled by the next level's pixel count, would still leave this share of the interval idle.
    up_after_s: float = 4.0
    up_headroom: float = 0.3
    # A level that was left within twice the wait after stepping up to it was too much: the wait for the
    # next attempt doubles, up to this.
    up_max_wait_s: float = 60.0


class ResolutionLadder:
    """One call's output level. Fed one observation per frame; counts frames, not wall time, so its
    decisions depend only on what the sender did."""

    def __init__(self, fps: int, levels: int, tuning: LadderTuning | None = None) -> None:
        self.tuning = tuning or LadderTuning()
        self.fps = fps
        self.levels = levels
        self.level = 0
        self._interval = 1.0 / fps
        self._window = max(2, math.ceil(self.tuning.down_window_s * fps))
        self._late: deque[bool] = deque(maxlen=self._window)
        self._busy: deque[float] = deque(maxlen=max(1, math.ceil(self.tuning.up_after_s * fps)))
        self._up_wait = max(1, math.ceil(self.tuning.up_after_s * fps))
        self._calm = 0  # frames in a row without lateness
        # Counts from minus the warm-up, so the first step down waits for it as well as for a window.
        self._since_change = -math.ceil(self.tuning.warmup_s * fps)
        self._stepped_up = False  # the current level was reached by stepping up

    def set_levels(self, levels: int) -> None:
        """A new base size (another template) may have fewer levels; the level is kept where it can be."""
        self.levels = levels
        self.level = min(self.level, levels - 1)

    def observe(self, late_s: float, skipped: int, busy_s: float | None, area_ratio_up: float) -> int | None:
        """One frame: how late it was asked for, how many frames were skipped to catch up, how long the
        sender was busy since the frame before (None when unknown), and how many times more pixels the
        next level up has. Returns the new level when it changes."""
        tuning = self.tuning
        late = skipped > 0 or late_s > tuning.late_share * self._interval
        self._late.append(late)
        if busy_s is not None:
            self._busy.append(busy_s)
        self._since_change += 1
        self._calm = 0 if late else self._calm + 1

        if (
            self.level < self.levels - 1
            and self._since_change >= self._window
            and sum(self._late) * 2 >= self._window
        ):
            if self._stepped_up and self._since_change < 2 * self._up_wait:
                max_wait = max(1, round(tuning.up_max_wait_s * self.fps))
                self._up_wait = min(max_wait, 2 * self._up_wait)
            return self._change(self.level + 1, stepped_up=False)

        if self.level > 0 and self._calm >= self._up_wait and len(self._busy) == self._busy.maxlen:
            predicted = statistics.median(self._busy) * area_ratio_up
            if predicted <= (1 - tuning.up_headroom) * self._interval:
                return self._change(self.level - 1, stepped_up=True)
        return None

    def _change(self, level: int, stepped_up: bool) -> int:
        self.level = level
        self._stepped_up = stepped_up
        self._since_change = 0
        self._calm = 0
        self._late.clear()
        self._busy.clear()  # measured at the old size
        return level
