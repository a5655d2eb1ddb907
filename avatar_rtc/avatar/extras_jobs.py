"""Renderer extras computed in the background: one job per template however many sessions wait for it,
on one thread of its own, so a long VAE encode takes no thread from the default executor (codecs, ASR,
TTS use it)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable

from avatar_rtc.avatar.engine import ExtrasProgress
from avatar_rtc.avatar.template import Template

log = logging.getLogger(__name__)

ExtrasWork = Callable[[str, ExtrasProgress], Template]
"""``work(template_id, progress)``: computes a template's extras, calling ``progress(done, total)``."""


class ExtrasJobs:
    """Jobs by template id on one background thread, each shared by every caller waiting for it."""

    def __init__(self, work: ExtrasWork) -> None:
        self._work = work
        # Reentrant: a job that is already done when its callback is added runs the callback at once,
        # in the thread that holds the lock.
        self._lock = threading.RLock()
        # Jobs running or queued: id -> (the job, its progress listeners).
        self._jobs: dict[str, tuple[concurrent.futures.Future[Template], list[ExtrasProgress]]] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, template_id: str, progress: ExtrasProgress | None = None) -> Template:
        """The job's result for ``template_id``, starting the job unless one runs already.
        ``progress(done, total)`` is called from the jobs' thread."""
        with self._lock:
            entry = self._jobs.get(template_id)
            if entry is None:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=1, thread_name_prefix="template-extras"
                    )
                listeners: list[ExtrasProgress] = []
                job = self._executor.submit(
                    self._work, template_id, lambda done, total: self._progress(listeners, done, total)
                )
                entry = self._jobs[template_id] = (job, listeners)
                job.add_done_callback(lambda _: self._finished(template_id))
            if progress is not None:
                entry[1].append(progress)
        # Shielded: a session that stops waiting (closed, switched away) must not cancel the others' job.
        return await asyncio.shield(asyncio.wrap_future(entry[0]))

    def _progress(self, listeners: list[ExtrasProgress], done: int, total: int) -> None:
        with self._lock:
            current = list(listeners)
        for listener in current:
            try:
                listener(done, total)
            except Exception:
                log.exception("a renderer-data progress listener failed")

    def _finished(self, template_id: str) -> None:
        with self._lock:
            self._jobs.pop(template_id, None)

    def close(self) -> None:
        """Stop the thread (after any job it is running); queued jobs are cancelled."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
