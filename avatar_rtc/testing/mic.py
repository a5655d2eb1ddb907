"""A scripted microphone for a test caller: silence, and on request a clip, sent in real time as
48 kHz mono 20 ms frames, as a browser's microphone track would be."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48000
FRAME = 960


class ScriptedMic(MediaStreamTrack):
    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[np.ndarray] = deque()
        self._current: np.ndarray | None = None
        self._offset = 0
        self._sent = 0
        self._start: float | None = None
        self.clip_started_at: list[float] = []
        self.clip_ended_at: list[float] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def play(self, pcm48k: np.ndarray) -> None:
        """Queue a clip (mono int16 at 48 kHz) to be spoken after what is already queued."""
        self._queue.append(pcm48k.astype(np.int16))
        self._idle.clear()

    async def finished(self) -> None:
        """Wait until every queued clip has been sent."""
        await self._idle.wait()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        delay = self._start + self._sent / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        out = np.zeros(FRAME, np.int16)
        filled = 0
        while filled < FRAME:
            if self._current is None:
                if not self._queue:
                    break
                self._current, self._offset = self._queue.popleft(), 0
                self.clip_started_at.append(time.monotonic())
            take = min(FRAME - filled, len(self._current) - self._offset)
            out[filled : filled + take] = self._current[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset >= len(self._current):
                self._current = None
                self.clip_ended_at.append(time.monotonic())
                if not self._queue:
                    self._idle.set()
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self._sent, fractions.Fraction(1, RATE)
        self._sent += FRAME
        return frame
