"""The renderer seam: what a session needs from any renderer, CPU warp or MuseTalk alike."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from avatar_rtc.avatar.engine import TemplateEngine
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.visemes import TimedViseme

# Where a renderer sends events for its session's caller (the session's data channel).
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RenderedFrame:
    """A frame for media frame ``index`` (media time ``index / fps``), BGR uint8."""

    index: int
    image: np.ndarray


@dataclass(frozen=True)
class TierStats:
    """An engine's per-template tier (device memory), as /metrics exports it."""

    bytes: int = 0  # held now (on CPU devices: the tensors' size)
    budget_bytes: int = 0  # 0: the engine keeps nothing per template on a device
    templates: int = 0
    pinned: int = 0  # templates in use by a session, never evicted
    loads: int = 0  # templates brought into the tier
    hits: int = 0  # opens and warms that found the template there
    evictions: int = 0
    extras_computed: int = 0  # templates whose per-frame data this process had to compute


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

    @property
    def quality_level(self) -> str:
        """Its current level (``render.batching.QUALITY_LEVELS``, or ``preparing``); ``full`` for a
        renderer that never degrades."""
        ...

    def attach(self, media_clock: Callable[[], float], emit_event: EventSink) -> None:
        """Bind it to its session: the session's media clock (now, in media seconds; a renderer that
        batches across sessions schedules frames by it) and where its events for the caller go."""

    def push_audio(self, pcm: np.ndarray, media_time: float) -> None: ...

    def push_visemes(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        """What is said in the audio pushed at ``media_time``, as visemes timed from that moment (from
        the TTS's phonemes). A renderer that shapes the lips from them uses them where they cover a
        frame's time and the audio elsewhere; one that works from the audio alone ignores them. Pushed
        right after the audio they describe."""

    def flush(self) -> None:
        """The current utterance has no more audio: render its last frames without waiting."""

    def clear(self) -> None:
        """Barge-in: drop all pending audio and frames not yet yielded."""

    def frames(self) -> AsyncIterator[RenderedFrame]: ...

    async def aclose(self) -> None: ...


class RendererEngine(TemplateEngine, Protocol):
    """The process-wide part of a renderer (models, worker threads, its template tier), shared by every
    session. Besides the template tier (:class:`TemplateEngine`):"""

    def open(self, template: Template) -> Renderer:
        """A renderer for one session, bound to ``template``. Runs on the event loop, so it must be
        cheap: call :meth:`warm` off the loop first. A template without this engine's extras gets a
        light stand-in renderer until they are computed."""

    def tier_stats(self) -> TierStats: ...

    def close(self) -> None:
        """Stop the engine's threads (server shutdown)."""
