"""FairLock: round robin between sessions for one shared engine, and work that stops when abandoned."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from avatar_rtc.conversation.fair import FairLock, run_exclusive


async def _queue_up(lock: FairLock, requests: list[str], served: list[str]) -> list[asyncio.Task[None]]:
    """One task per request (a session key each), queued in list order behind the current holder."""

    async def use(session: str) -> None:
        async with lock.hold(session):
            served.append(session)
            await asyncio.sleep(0)

    tasks = []
    for session in requests:
        tasks.append(asyncio.create_task(use(session)))
        await asyncio.sleep(0)  # queued in this order
    return tasks


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)


async def test_sessions_are_served_in_turn_not_first_come() -> None:
    lock = FairLock()
    served: list[str] = []
    await lock.acquire("other")
    # A chatty session queues three requests before a second session queues its two.
    tasks = await _queue_up(lock, ["a", "a", "a", "b", "b"], served)
    assert lock.waiting() == 5
    lock.release()
    await asyncio.gather(*tasks)
    # A plain FIFO lock would serve a, a, a, b, b: b waits behind all of a's requests.
    assert served == ["a", "b", "a", "b", "a"]
    assert not lock.locked()


async def test_the_session_just_served_goes_behind_the_others() -> None:
    lock = FairLock()
    served: list[str] = []
    await lock.acquire("a")
    # a asks again before b asks at all; b still goes first, a has just had its turn.
    tasks = await _queue_up(lock, ["a", "b"], served)
    lock.release()
    await asyncio.gather(*tasks)
    assert served == ["b", "a"]


async def test_a_waiter_cancelled_before_its_turn_never_runs_and_blocks_nobody() -> None:
    lock = FairLock()
    served: list[str] = []
    await lock.acquire("x")
    cancelled, kept = await _queue_up(lock, ["a", "b"], served)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert lock.waiting() == 1
    lock.release()
    await kept
    assert served == ["b"]
    assert cancelled.cancelled()
    assert not lock.locked()


async def test_blocking_and_async_waiters_share_the_queue_and_release_works_from_threads() -> None:
    lock = FairLock()
    served: list[str] = []
    await lock.acquire("x")

    def blocking_user() -> None:
        with lock.hold_blocking("thread"):
            served.append("thread")

    thread = threading.Thread(target=blocking_user)
    thread.start()
    await _until(lambda: lock.waiting() == 1)
    tasks = await _queue_up(lock, ["a"], served)
    # Released from another thread, as an engine's worker does when its job is over.
    await asyncio.to_thread(lock.release)
    await asyncio.gather(*tasks)
    await asyncio.to_thread(thread.join)
    assert sorted(served) == ["a", "thread"]
    assert not lock.locked()


async def test_run_exclusive_skips_work_cancelled_while_waiting_and_stops_work_cancelled_mid_way() -> None:
    lock = FairLock()
    steps_after_cancel: list[int] = []
    started = threading.Event()

    def long_work(cancelled: threading.Event) -> str:
        started.set()
        for step in range(200):
            if cancelled.is_set():
                steps_after_cancel.append(step)
                return "stopped"
            time.sleep(0.005)
        return "finished"

    never_started = threading.Event()

    def waiting_work(cancelled: threading.Event) -> str:
        never_started.set()
        return "ran"

    with ThreadPoolExecutor(2) as pool:
        running = asyncio.create_task(run_exclusive(lock, "a", pool, long_work))
        await asyncio.to_thread(started.wait, 5)
        waiting = asyncio.create_task(run_exclusive(lock, "b", pool, waiting_work))
        await asyncio.sleep(0.02)
        waiting.cancel()
        running.cancel()
        for task in (waiting, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        # The lock comes free once the worker has noticed, not while it still runs.
        await _until(lambda: not lock.locked())
    assert not lock.locked()
    assert not never_started.is_set()
    assert len(steps_after_cancel) == 1 and steps_after_cancel[0] < 100
