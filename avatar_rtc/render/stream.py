"""Shared streaming logic for renderers: utterance segments on the media timeline, lookahead,
flush and clear, and frames rendered off the event loop in small batches."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from avatar_rtc.avatar.template import Template
from avatar_rtc.render.base import EventSink, RenderedFrame
from avatar_rtc.render.visemes import TimedViseme


@dataclass(frozen=True)
class FrameJob:
    """What a renderer needs to draw one frame.

    ``audio`` is float32 in [-1, 1] covering [t - window_before_s, t + lookahead_s) around the frame's
    media time t, zero where the utterance has no audio.
    """

    index: int
    template_index: int
    audio: np.ndarray


class _Segment:
    """One utterance's audio, growing as chunks arrive."""

    def __init__(self, start: float, sample_rate: int, fps: int) -> None:
        self.start = start
        self.sample_rate = sample_rate
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self.flushed = False
        self.next_frame = math.ceil(start * fps - 1e-6)
        self._pcm: np.ndarray | None = None

    @property
    def end(self) -> float:
        return self.start + self.samples / self.sample_rate

    def append(self, pcm: np.ndarray) -> None:
        self.chunks.append(pcm)
        self.samples += len(pcm)
        self._pcm = None

    def pcm(self) -> np.ndarray:
        if self._pcm is None:
            self._pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
            self.chunks = [self._pcm]
        return self._pcm


class StreamingRenderer:
    """Base class for renderers that draw each frame from a window of audio around its time.

    Subclasses set ``window_before_s`` and ``lookahead_s`` and implement :meth:`render_batch`, which runs
    in a worker thread, or override :meth:`render_jobs` (a renderer whose work happens elsewhere awaits
    it there rather than holding a thread while it waits).
    """

    sample_rate = 16000
    window_before_s = 0.04
    lookahead_s = 0.04
    max_batch = 4

    def __init__(self, template: Template) -> None:
        self.template = template
        self.fps = template.fps
        self._segments: list[_Segment] = []
        self._changed = asyncio.Event()
        self._generation = 0
        self._closed = False
        # Set by attach(): media time now (MediaClock.now; may be called from worker threads) and where
        # events for the caller go. Without a clock a renderer schedules by wall time alone.
        self.media_clock: Callable[[], float] | None = None
        self.emit_event: EventSink | None = None

    @property
    def quality_level(self) -> str:
        return "full"

    def attach(self, media_clock: Callable[[], float], emit_event: EventSink) -> None:
        self.media_clock, self.emit_event = media_clock, emit_event

    # -- input side -------------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, media_time: float) -> None:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("renderer audio must be mono int16")
        current = self._segments[-1] if self._segments else None
        half_sample = 0.5 / self.sample_rate
        if current is None or current.flushed or abs(current.end - media_time) > half_sample:
            if current is not None:
                current.flushed = True
            current = _Segment(media_time, self.sample_rate, self.fps)
            self._segments.append(current)
        current.append(pcm)
        self._changed.set()

    def push_visemes(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        """Ignored here: a renderer that draws from the audio alone (MuseTalk) has no use for them; the
        warp renderer overrides this."""

    def flush(self) -> None:
        if self._segments:
            self._segments[-1].flushed = True
        self._changed.set()

    def clear(self) -> None:
        self._segments.clear()
        self._generation += 1
        self._changed.set()

    async def aclose(self) -> None:
        self._closed = True
        self._changed.set()

    # -- output side ------------------------------------------------------------------------------
    def _ready_jobs(self) -> list[FrameJob]:
        while self._segments:
            seg = self._segments[0]
            jobs: list[FrameJob] = []
            while len(jobs) < self.max_batch:
                t = seg.next_frame / self.fps
                if t >= seg.end or (not seg.flushed and t + self.lookahead_s > seg.end):
                    break
                jobs.append(self._job(seg, seg.next_frame))
                seg.next_frame += 1
            if jobs:
                return jobs
            if seg.flushed and seg.next_frame / self.fps >= seg.end:
                self._segments.pop(0)
                continue
            return []
        return []

    def _job(self, seg: _Segment, index: int) -> FrameJob:
        sr = self.sample_rate
        before = round(self.window_before_s * sr)
        after = round(self.lookahead_s * sr)
        centre = round((index / self.fps - seg.start) * sr)
        pcm = seg.pcm()
        lo, hi = centre - before, centre + after
        window = np.zeros(hi - lo, np.float32)
        src_lo, src_hi = max(lo, 0), min(hi, len(pcm))
        if src_hi > src_lo:
            window[src_lo - lo : src_hi - lo] = pcm[src_lo:src_hi].astype(np.float32) / 32768.0
        return FrameJob(index=index, template_index=self.template.loop_index(index), audio=window)

    async def frames(self) -> AsyncIterator[RenderedFrame]:
        while not self._closed:
            jobs = self._ready_jobs()
            if not jobs:
                self._changed.clear()
                await self._changed.wait()
                continue
            generation = self._generation
            images = await self.render_jobs(jobs)
            if generation != self._generation:
                continue  # cleared while rendering: these frames belong to speech nobody will hear
            for job, image in zip(jobs, images, strict=True):
                yield RenderedFrame(job.index, image)
                if generation != self._generation:
                    break

    async def render_jobs(self, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
        return await asyncio.to_thread(self.render_batch, jobs)

    def render_batch(self, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
        raise NotImplementedError
