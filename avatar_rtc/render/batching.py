"""One worker per device that batches frames from every session into one forward, by deadline.

Sessions :meth:`~BatchingWorker.submit` items with the wall-clock time (``time.monotonic``) by which
their result is needed and get a :class:`concurrent.futures.Future`. The worker thread takes the most
urgent items, up to ``max_batch``, waiting for more only while waiting cannot make the earliest one late:
until ``max_wait_s`` after the oldest arrived, or the earliest deadline minus the expected forward time
for the larger batch, whichever comes first. Each result goes back to its own future only, so sessions
never see each other's frames.

:class:`QualityPolicy` watches the deadlines the worker meets and steps through :data:`QUALITY_LEVELS`,
in that order, when it falls behind, and back one level at a time once it has kept up for a while.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
Result = TypeVar("Result")

# Degradation order. Each level keeps the measures of the ones before it.
#   full:         normal batching wait, every frame generated.
#   short_wait:   the worker waits a quarter as long to fill a batch (latency before throughput).
#   half_rate:    sessions generate every second frame and repeat it (half the GPU work per session).
#   cpu_fallback: new sessions get the light CPU renderer; running ones stay at half rate.
QUALITY_LEVELS = ("full", "short_wait", "half_rate", "cpu_fallback")
SHORT_WAIT_FACTOR = 0.25


@dataclass
class QualityPolicy:
    """Level from met and missed deadlines, with hysteresis.

    One level down (worse) when ``degrade_misses`` of the last ``window`` batches missed a deadline and the
    current level has held for ``min_dwell_s``; one level up when no batch has missed for ``recover_after_s``
    and the last ``window`` batches all finished with at least ``recover_slack_s`` to spare.
    """

    window: int = 8
    degrade_misses: int = 3
    min_dwell_s: float = 1.0
    recover_after_s: float = 5.0
    recover_slack_s: float = 0.01
    clock: Callable[[], float] = time.monotonic
    level_index: int = 0
    _recent: list[float] = field(default_factory=list)
    _changed_at: float = field(default=float("-inf"))
    _last_miss: float = field(default=float("-inf"))
    _listeners: list[Callable[[str], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def level(self) -> str:
        return QUALITY_LEVELS[self.level_index]

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(level)`` is called (on the worker thread) after every change."""
        self._listeners.append(listener)

    def observe(self, slack_s: float) -> None:
        """One batch finished ``slack_s`` before its earliest deadline (negative: that late)."""
        now = self.clock()
        with self._lock:
            self._recent.append(slack_s)
            del self._recent[: -self.window]
            if slack_s < 0:
                self._last_miss = now
            changed = False
            misses = sum(1 for s in self._recent if s < 0)
            settled = now - self._changed_at >= self.min_dwell_s
            if misses >= self.degrade_misses and settled and self.level_index < len(QUALITY_LEVELS) - 1:
                self.level_index += 1
                changed = True
            elif (
                self.level_index > 0
                and now - self._last_miss >= self.recover_after_s
                and now - self._changed_at >= self.recover_after_s
                and len(self._recent) >= self.window
                and min(self._recent) >= self.recover_slack_s
            ):
                self.level_index -= 1
                changed = True
            if changed:
                self._changed_at = now
                self._recent.clear()
            level = self.level
        if changed:
            for listener in list(self._listeners):
                listener(level)


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    deadline: float
    submitted: float
    future: Future[Out]


class BatchingWorker(Generic[In, Out]):
    """Runs ``forward`` (a list of items -> a list of results, same order) on batches of submitted items,
    in one thread."""

    def __init__(
        self,
        forward: Callable[[Sequence[In]], Sequence[Out]],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.008,
        policy: QualityPolicy | None = None,
        name: str = "batching-worker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.policy = policy or QualityPolicy(clock=clock)
        self.clock = clock
        self._pending: list[_Pending[In, Out]] = []
        self._calls: list[tuple[Callable[[], object], Future[object]]] = []
        self._cond = threading.Condition()
        self._closed = False
        # Seconds per forward by batch size (exponential average), for deciding how long waiting is safe.
        self._forward_s: dict[int, float] = {}
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- sessions' side ------------------------------------------------------------------------------
    def submit(self, item: In, deadline: float) -> Future[Out]:
        future: Future[Out] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batching worker is closed")
            self._pending.append(_Pending(item, deadline, self.clock(), future))
            self._cond.notify()
        return future

    def run_on_worker(self, function: Callable[[], Result]) -> Future[Result]:
        """Run ``function`` on the worker thread before the next batch: for work tied to the thread that
        runs the forwards (compiled CUDA graphs are recorded per thread)."""
        future: Future[Result] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batching worker is closed")
            self._calls.append((function, future))  # type: ignore[arg-type]
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            calls, self._calls = self._calls, []
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the batching worker is closed"))

    @property
    def wait_s(self) -> float:
        """How long the worker may hold the oldest item to fill a batch, at the current quality level."""
        return self.max_wait_s * (SHORT_WAIT_FACTOR if self.policy.level_index >= 1 else 1.0)

    def expected_forward_s(self, batch: int) -> float:
        """The forward time for ``batch`` items: measured, or scaled from the nearest measured size."""
        if batch in self._forward_s:
            return self._forward_s[batch]
        if not self._forward_s:
            return 0.0
        nearest = min(self._forward_s, key=lambda size: abs(size - batch))
        return self._forward_s[nearest] * max(batch / nearest, 1.0)

    # -- the worker thread ----------------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending[In, Out]] | None:
        with self._cond:
            while True:
                if self._calls and not self._closed:
                    return []  # the caller runs the calls first
                self._pending = [p for p in self._pending if not p.future.cancelled()]
                if self._closed and not self._pending:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                if self._closed or len(self._pending) >= self.max_batch:
                    break
                now = self.clock()
                earliest = min(p.deadline for p in self._pending)
                oldest = min(p.submitted for p in self._pending)
                grown = min(len(self._pending) + 1, self.max_batch)
                wait_until = min(oldest + self.wait_s, earliest - self.expected_forward_s(grown))
                if wait_until <= now:
                    break
                self._cond.wait(wait_until - now)
            self._pending.sort(key=lambda p: p.deadline)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        # A future cancelled since (its session cleared) is dropped rather than rendered.
        return [p for p in batch if p.future.set_running_or_notify_cancel()]

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for function, future in calls:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function())
            except BaseException as error:  # the caller waits on the future, so it hears of any failure
                future.set_exception(error)

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run_calls()
            if not batch:
                continue
            start = self.clock()
            try:
                results = list(self.forward([p.item for p in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"forward returned {len(results)} results for {len(batch)} items")
            except BaseException as error:  # every waiting session must hear about it, whatever it is
                for pending in batch:
                    pending.future.set_exception(error)
                continue
            finished = self.clock()
            elapsed = finished - start
            previous = self._forward_s.get(len(batch))
            self._forward_s[len(batch)] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
            for pending, result in zip(batch, results, strict=True):
                pending.future.set_result(result)
            self.policy.observe(min(p.deadline for p in batch) - finished)
