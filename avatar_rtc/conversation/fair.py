"""A lock for one shared engine (a TTS voice, a Whisper model, an LLM) that serves sessions in turn.

A plain lock (threading.Lock, asyncio.Lock) grants whoever asked first, so a session that queues many
requests (a long answer's sentences for TTS, speculative transcriptions) makes every other session wait
behind all of them. :class:`FairLock` keeps one queue per session and, each time the engine comes
free, serves the session that has waited longest since it was last served: round robin by session,
first come first served within one session.

Asynchronous waiters (``async with lock.hold(session)``) wait on the event loop, not in a thread, so a
waiting request occupies no executor thread, and a waiter that is cancelled before its turn simply
leaves the queue: the work it guarded never starts. Blocking waiters (``with
lock.hold_blocking(session)``) are for the synchronous start-up paths (warm-ups, benchmarks). Both
kinds share the one queue, and :meth:`release` may be called from any thread, so a worker thread can
hand the engine on as soon as its work is over.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

# The session key of work that belongs to no session (start-up warm-ups, scripts, tests).
NO_SESSION = ""


@dataclass(eq=False)
class _Waiter:
    session: str
    # Tells the waiter it holds the lock now; thread-safe. Returns False if nobody can be told (the
    # waiter's event loop is gone), and the lock then goes to the next waiter.
    wake: Callable[[], bool]
    granted: bool = field(default=False)


class FairLock:
    """Mutual exclusion with round-robin service between sessions (see the module's docstring)."""

    def __init__(self, name: str = "engine") -> None:
        self.name = name
        self._guard = threading.Lock()
        self._locked = False
        self._holder: str | None = None
        # Waiting sessions in service order: the first has waited longest since it was last served.
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    def locked(self) -> bool:
        return self._locked

    @property
    def holder(self) -> str | None:
        """The session whose work holds the lock, None when it is free."""
        return self._holder if self._locked else None

    def waiting(self) -> int:
        with self._guard:
            return sum(len(queue) for queue in self._waiting.values())

    # -- acquiring --------------------------------------------------------------------------------
    async def acquire(self, session: str = NO_SESSION) -> None:
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()

        def wake() -> bool:
            try:
                loop.call_soon_threadsafe(_resolve, granted)
            except RuntimeError:  # the loop is closed: this waiter will never run
                return False
            return True

        waiter = self._enqueue_or_take(session, wake)
        if waiter is None:
            return
        try:
            await granted
        except BaseException:
            with self._guard:
                handed_over = waiter.granted
                if not handed_over:
                    self._remove(waiter)
            if handed_over:
                # Granted in the same moment as the cancellation: pass the engine on, unused.
                self.release()
            raise

    def acquire_blocking(self, session: str = NO_SESSION) -> None:
        granted = threading.Event()

        def wake() -> bool:
            granted.set()
            return True

        if self._enqueue_or_take(session, wake) is not None:
            granted.wait()

    def release(self) -> None:
        """Hand the lock to the next session in turn, or free it; callable from any thread."""
        while True:
            with self._guard:
                if not self._locked:
                    raise RuntimeError(f"{self.name} lock released while not held")
                waiter = self._next_waiter()
                if waiter is None:
                    self._locked = False
                    self._holder = None
                    return
                waiter.granted = True
                self._holder = waiter.session
            if waiter.wake():
                return
            # Its event loop is gone: try the next one (the lock stays held meanwhile).

    @asynccontextmanager
    async def hold(self, session: str = NO_SESSION) -> AsyncIterator[None]:
        await self.acquire(session)
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def hold_blocking(self, session: str = NO_SESSION) -> Iterator[None]:
        self.acquire_blocking(session)
        try:
            yield
        finally:
            self.release()

    # -- the queue --------------------------------------------------------------------------------
    def _enqueue_or_take(self, session: str, wake: Callable[[], bool]) -> _Waiter | None:
        """None when the lock was free and is now the caller's; else the caller's place in the queue."""
        with self._guard:
            if not self._locked:
                self._locked = True
                self._holder = session
                return None
            waiter = _Waiter(session, wake)
            self._waiting.setdefault(session, deque()).append(waiter)
            return waiter

    def _next_waiter(self) -> _Waiter | None:
        if not self._waiting:
            return None
        # The session that just held the lock goes behind every other waiting session, even if it
        # queued its next request before they queued theirs.
        session = next((s for s in self._waiting if s != self._holder), None)
        if session is None:
            session = next(iter(self._waiting))
        queue = self._waiting[session]
        waiter = queue.popleft()
        if queue:
            self._waiting.move_to_end(session)  # its next request waits for one round of the others
        else:
            del self._waiting[session]
        return waiter

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.session)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        if not queue:
            del self._waiting[waiter.session]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def run_exclusive(
    lock: FairLock, session: str, executor: Executor, work: Callable[[threading.Event], T]
) -> T | None:
    """``work(cancelled)`` on ``executor`` while holding ``lock`` for ``session``; its result.

    The lock is taken on the event loop, so a request that is cancelled while it waits for its turn
    never starts (and occupies no thread meanwhile). Once started, cancelling the caller sets
    ``cancelled``, which ``work`` checks between steps (tokens, segments) to stop early; the lock is
    released by the worker thread when ``work`` returns, never while it still runs. Returns None
    when the work was cancelled before it started.
    """
    await lock.acquire(session)
    cancelled = threading.Event()
    context = contextvars.copy_context()

    def run() -> T | None:
        try:
            if cancelled.is_set():
                return None  # cancelled while waiting for a thread: skipped
            return context.run(work, cancelled)
        finally:
            lock.release()

    try:
        job = asyncio.get_running_loop().run_in_executor(executor, run)
    except BaseException:
        lock.release()
        raise
    # Nobody awaits a job whose caller was cancelled: read its outcome so that an error is not
    # reported as "never retrieved".
    job.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        # Shielded: cancelling the caller must not cancel a job still queued in the executor, or
        # its finally (the release) would never run.
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        cancelled.set()
        raise
