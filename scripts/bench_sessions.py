"""N concurrent synthetic sessions through one MuseTalk batching worker: what a GPU holds.

Usage: ``python scripts/bench_sessions.py [--device auto|cpu|cuda] [--dtype auto|...] [--sessions 4,8,16,24]
[--seconds S] [--fps 25] [--budget-ms 200] [--max-batch 32] [--compile off|...] [--json FILE]``.

Builds the full-size v1.5 architecture with random weights (as ``bench_musetalk.py`` does) behind the
server's own :class:`~avatar_rtc.render.batching.BatchingWorker`. Each session submits one frame every
1/fps seconds of wall time, each due ``--budget-ms`` after it was submitted, as a live call's renderer
does; the worker batches frames across sessions by deadline. Per session count it prints the aggregate
and per-session frame rates, the p50/p99 time from submission to finished face, the share of frames past
their deadline, the mean batch size, and the peak device memory. Results go to ``--json`` as well (one
object per session count) for ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.render.batching import BatchingWorker  # noqa: E402
from avatar_rtc.render.musetalk.pipeline import COMPILE_MODES, MuseTalkPipeline  # noqa: E402
from scripts.bench_musetalk import build_pipeline, synthetic_jobs  # noqa: E402


async def run_sessions(
    pipeline: MuseTalkPipeline, sessions: int, seconds: float, fps: int, budget_s: float, max_batch: int
) -> dict[str, float]:
    worker = BatchingWorker(pipeline.render, max_batch=max_batch, max_wait_s=0.008, name="bench-worker")
    jobs = synthetic_jobs(pipeline, sessions)
    latencies: list[float] = []
    late = 0
    done = [0] * sessions
    if pipeline.models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipeline.models.device)
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + seconds

    async def one_frame(
        session: int, future: asyncio.Future[object], submitted: float, deadline: float
    ) -> None:
        nonlocal late
        await future
        finished = time.monotonic()
        latencies.append(finished - submitted)
        late += finished > deadline
        done[session] += 1

    async def session_loop(session: int) -> None:
        pending: list[asyncio.Task[None]] = []
        frame = 0
        # Sessions start spread over one frame period, as calls that began at different times.
        first = started + session / (sessions * fps)
        while (due := first + frame / fps) < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            submitted = time.monotonic()
            deadline = submitted + budget_s
            future = asyncio.wrap_future(worker.submit(jobs[session], deadline))
            pending.append(asyncio.create_task(one_frame(session, future, submitted, deadline)))
            frame += 1
        await asyncio.gather(*pending)

    try:
        await asyncio.gather(*(session_loop(s) for s in range(sessions)))
    finally:
        worker.close()
    elapsed = loop.time() - started
    ordered = sorted(latencies)
    batches = worker.batch_sizes
    memory = (
        torch.cuda.max_memory_allocated(pipeline.models.device) / 2**20
        if pipeline.models.device.type == "cuda"
        else float("nan")
    )
    return {
        "sessions": sessions,
        "aggregate_fps": sum(done) / elapsed,
        "per_session_fps": min(done) / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1e3 if ordered else float("nan"),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3 if ordered else float("nan"),
        "late_pct": 100.0 * late / max(1, len(latencies)),
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
        "peak_memory_mib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="off", choices=["off", *COMPILE_MODES])
    parser.add_argument("--sessions", default="4,8,16,24")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--budget-ms", type=float, default=200.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON object per session count")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = build_pipeline(args.device, args.dtype)
    if args.compile != "off":
        pipeline.compile(args.compile, args.max_batch)
    models = pipeline.models
    name = torch.cuda.get_device_name(models.device) if models.device.type == "cuda" else "cpu"
    print(
        f"device {models.device} [{name}] {models.dtype}, compile {args.compile}, torch {torch.__version__}"
    )
    pipeline.render(synthetic_jobs(pipeline, 1))  # warm-up: kernels, allocator
    print(
        f"{'sessions':>8} {'agg fps':>8} {'fps/sess':>8} {'p50 ms':>8} {'p99 ms':>8} {'late %':>7} "
        f"{'batch':>6} {'peak MiB':>9}"
    )
    for sessions in (int(n) for n in args.sessions.split(",")):
        result = asyncio.run(
            run_sessions(pipeline, sessions, args.seconds, args.fps, args.budget_ms / 1e3, args.max_batch)
        )
        result |= {"device": name, "dtype": str(models.dtype).removeprefix("torch."), "compile": args.compile}
        print(
            f"{sessions:>8} {result['aggregate_fps']:>8.1f} {result['per_session_fps']:>8.1f} "
            f"{result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} {result['late_pct']:>7.1f} "
            f"{result['mean_batch']:>6.1f} {result['peak_memory_mib']:>9.0f}",
            flush=True,
        )
        if args.json is not None:
            with args.json.open("a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
