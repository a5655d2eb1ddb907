"""One media clock per session: media time t of every track leaves at wall time start + t."""

from __future__ import annotations

import asyncio
import time


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
