"""The process's two named thread pools, so that model inference and media work do not queue behind
each other in the event loop's default executor.

- ``models``: inference of the shared speech and language engines (Whisper, llama.cpp, piper). Each
  engine runs one job at a time behind its :class:`~avatar_rtc.conversation.fair.FairLock`, which is
  taken on the event loop *before* a job is submitted, so these threads never sit waiting for a lock:
  a few threads (one per engine that may run at once) are enough.
- ``media``: renderer warm-ups (moving a template's data to the device), the template API's work
  (listing, thumbnails, preparing uploads, decoding audio), offline renders, the encoder probe and
  loading a template's language engines: work that must not wait behind a long answer's generation.

The event loop's default executor is left to aiortc and aiohttp, which use it implicitly (and to the
template library's ``acquire_async``, which lives in ``avatar/`` and uses asyncio.to_thread).

The pools are created on first use; :func:`configure` (called by ``wiring.build_services`` from the
settings, before anything is submitted) sets their sizes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Whisper, the LLM and piper may each be busy at the same time (three callers at different stages of
# their turns), plus one for an engine of a second language.
DEFAULT_MODEL_WORKERS = 4
DEFAULT_MEDIA_WORKERS = 4

_sizes = {"models": DEFAULT_MODEL_WORKERS, "media": DEFAULT_MEDIA_WORKERS}
_pools: dict[str, ThreadPoolExecutor] = {}
_guard = threading.Lock()


def configure(model_workers: int, media_workers: int) -> None:
    """Size the pools; pools already created keep their size (the first caller's choice stands)."""
    with _guard:
        _sizes["models"] = model_workers
        _sizes["media"] = media_workers


def _pool(name: str) -> ThreadPoolExecutor:
    with _guard:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(_sizes[name], thread_name_prefix=f"avatar-{name}")
        return pool


def models() -> ThreadPoolExecutor:
    """The pool for model inference (ASR, LLM, TTS)."""
    return _pool("models")


def media() -> ThreadPoolExecutor:
    """The pool for renderer warm-ups, template and engine loading."""
    return _pool("media")


async def run_media(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``function(*args, **kwargs)`` on the media pool, awaited from the event loop; like
    asyncio.to_thread it carries the caller's context variables (the session id in log lines)."""
    call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(media(), call)
