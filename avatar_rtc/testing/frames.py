"""Frames from a renderer for tests and benchmarks that drive one without a call."""

from __future__ import annotations

import asyncio

from avatar_rtc.render.base import RenderedFrame, Renderer


async def first_frames(renderer: Renderer, count: int, timeout_s: float = 20.0) -> list[RenderedFrame]:
    """The renderer's first ``count`` frames (a stalled renderer fails with TimeoutError); the renderer
    is closed afterwards."""
    frames: list[RenderedFrame] = []
    async with asyncio.timeout(timeout_s):
        async for frame in renderer.frames():
            frames.append(frame)
            if len(frames) == count:
                break
    await renderer.aclose()
    return frames
