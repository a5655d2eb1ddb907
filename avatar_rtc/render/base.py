"""The renderer seam: what a session needs from any renderer, CPU warp or MuseTalk alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from avatar_rtc.avatar.template import Template


@dataclass(frozen=True)
class RenderedFrame:
    """A frame for media frame ``index`` (media time ``index / fps``), BGR uint8."""

    index: int
    image: np.ndarray


@runtime_checkable
class Renderer(Protocol):
    """One session's renderer: speech audio in, frames on the media timeline out.

    Audio arrives as mono int16 at ``sample_rate`` with the media time (seconds) of its first sample;
    consecutive chunks of one utterance are contiguous. A frame can be rendered once ``lookahead_s``
    of audio after its own time is known, or the utterance is flushed.
    """

    template: Template
    sample_rate: int
    lookahead_s: float

    def push_audio(self, pcm: np.ndarray, media_time: float) -> None: ...

    def flush(self) -> None:
        """The current utterance has no more audio: render its last frames without waiting."""

    def clear(self) -> None:
        """Barge-in: drop all pending audio and frames not yet yielded."""

    def frames(self) -> AsyncIterator[RenderedFrame]: ...

    async def aclose(self) -> None: ...


class RendererEngine(Protocol):
    """The process-wide part of a renderer (models, worker threads), shared by every session."""

    name: str

    def open(self, template: Template) -> Renderer:
        """A renderer for one session, bound to ``template``."""
