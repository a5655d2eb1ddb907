"""One media clock per session: media time t of every track leaves at wall time start + t."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class MediaClock:
    """Maps media time (seconds since the call's media started) to monotonic wall time.

    It starts when the first track asks for its first frame, so neither track begins already late.
    """

    def __init__(self) -> None:
        self._start: float | None = None

    @property
    def started(self) -> bool:
        return self._start is not None

    def start(self) -> None:
        if self._start is None:
            self._start = time.monotonic()

    def now(self) -> float:
        """Current media time; 0 before the clock starts."""
        if self._start is None:
            return 0.0
        return time.monotonic() - self._start

    def wall_time(self, media_time: float) -> float:
        if self._start is None:
            raise RuntimeError("media clock has not started")
        return self._start + media_time

    async def sleep_until(self, media_time: float) -> float:
        """Sleep until ``media_time``; return how late (seconds, >= 0) the caller is when it wakes."""
        self.start()
        delay = self.wall_time(media_time) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return max(0.0, time.monotonic() - self.wall_time(media_time))


class RemoteTimeline:
    """Wall times for a remote sender's media: each frame's own media time (its RTP timestamp) plus the
    smallest transit delay seen lately.

    Arrival times handled by this process jitter with its load: a busy event loop takes a burst of mic
    frames at once, and comparing the caller's loudness with the avatar's at those times (the echo
    guard) then sees mismatch that was never in the audio. The sender's own timestamps are regular; the
    smallest recent (arrival - media time) is the path's transit time without the queueing. The minimum
    is taken over a sliding window so the two clocks may drift apart slowly (100 ppm is 6 ms a minute),
    and a jump in the sender's timestamps (a replaced track) starts a new window at once.
    """

    def __init__(self, window_s: float = 10.0, jump_s: float = 1.0) -> None:
        self.window_s = window_s
        self.jump_s = jump_s
        # (media time, offset), offsets increasing: the front is the window's minimum.
        self._offsets: deque[tuple[float, float]] = deque()

    def wall_time(self, media_time: float | None, arrived_at: float) -> float:
        """The wall time frame media time ``media_time`` left its sender at, on this host's clock plus
        the path's smallest recent delay; ``arrived_at`` when the frame carries no media time."""
        if media_time is None:
            return arrived_at
        offset = arrived_at - media_time
        offsets = self._offsets
        if offsets and abs(offset - offsets[0][1]) > self.jump_s:
            offsets.clear()
        while offsets and offsets[-1][1] >= offset:
            offsets.pop()
        offsets.append((media_time, offset))
        while offsets[0][0] < media_time - self.window_s:
            offsets.popleft()
        return media_time + offsets[0][1]
