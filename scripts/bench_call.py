#!/usr/bin/env python3
"""Benchmark live calls: 1, 2 and 4 simultaneous callers against a server in its own process, at each
template resolution asked for (--resolutions 512 720p 1080p: a full-frame presenter template of that
size, prepared from a public-domain photo before the server starts).

Prints, per run: received frames/s, inter-frame gap p50/p99 at the peer, late/repeated/dropped frames
and send-time error (server side), lip offset at the peer (corrected by a calibration sender),
`say` to first speech audio at the peer, and the server's CPU and resident memory.

Run as root it re-executes itself in a loopback-only network namespace; either way every peer
connection uses 127.0.0.1 only and no STUN server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.testing.lipsync import MouthDarkness, lip_offset, mouth_box  # noqa: E402
from avatar_rtc.testing.netns import reexec_in_loopback_namespace  # noqa: E402
from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from avatar_rtc.testing.synthetic import (  # noqa: E402
    RESOLUTIONS,
    SyntheticSender,
    prepare_presenter_template,
    syllable_signal,
)

SENTENCES = [
    "Hello! Nice to meet you today.",
    "The weather is lovely, so let us go for a walk in the park.",
    "Could you tell me more about your plans for the weekend?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def first_speech_delay(receiver: CallReceiver, sent_at: float, threshold: float = 500.0) -> float | None:
    rec = receiver.received
    for arrival, pcm in zip(rec.audio_arrival, rec.audio_pcm, strict=True):
        if arrival >= sent_at and np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > threshold:
            return arrival - sent_at
    return None


async def calibrate(box: tuple[int, int, int, int]) -> float:
    sender = SyntheticSender(syllable_signal(6.0), box)
    receiver = CallReceiver(probe=MouthDarkness(box))
    await receiver.connect(sender.answer)
    await asyncio.sleep(6.5)
    bias = lip_offset(receiver.received).offset_s
    await receiver.close()
    await sender.close()
    return bias


async def run_calls(
    url: str,
    pid: int,
    n: int,
    box: tuple[int, int, int, int],
    bias: float,
    seconds: float,
    size: tuple[int, int],
) -> dict[str, float]:
    receivers = [CallReceiver(probe=MouthDarkness(box, frame_size=size)) for _ in range(n)]
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(r.connect_http(url, http) for r in receivers))
        await asyncio.sleep(1.0)
        cpu0, wall0 = proc_cpu_seconds(pid), time.monotonic()
        delays: list[float] = []
        sends: list[tuple[CallReceiver, float]] = []
        end = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < end - 4.5:
            for r in receivers:
                r.send({"type": "say", "text": SENTENCES[turn % len(SENTENCES)]})
                sends.append((r, time.monotonic()))
            turn += 1
            await asyncio.sleep(4.5)
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        cpu = (proc_cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
        rss = proc_rss_mb(pid)
        stats = []
        for r in receivers:
            async with http.get(
                f"{url}/api/sessions/{r.session_id}/stats", headers=r.session_headers
            ) as resp:
                stats.append(await resp.json())
    for r, sent_at in sends:
        d = first_speech_delay(r, sent_at)
        if d is not None:
            delays.append(d)
    server_side = [
        e["request_to_first_audio_ms"]
        for r in receivers
        for e in r.events
        if e["type"] == "metrics" and e.get("request_to_first_audio_ms") is not None
    ]
    for r in receivers:
        await r.close()

    gaps = np.concatenate([np.diff(r.received.video_arrival) for r in receivers]) * 1000
    fps = [
        (len(r.received.video_arrival) - 1) / (r.received.video_arrival[-1] - r.received.video_arrival[0])
        for r in receivers
    ]
    offsets = [(lip_offset(r.received).offset_s - bias) * 1000 for r in receivers]
    sent = sum(s["frames_sent"] for s in stats)
    late = sum(s["frames_late"] for s in stats)
    dropped = sum(s["frames_dropped"] for s in stats)
    lateness_p99 = max(s["send_lateness_ms_p99"] or 0 for s in stats)
    sizes = sorted({"x".join(map(str, s.get("output_size") or size)) for s in stats})
    row = {
        "calls": n,
        "fps": round(statistics.median(fps), 2),
        "gap_p50_ms": round(float(np.percentile(gaps, 50)), 1),
        "gap_p99_ms": round(float(np.percentile(gaps, 99)), 1),
        "late_percent": round(late / sent * 100, 2),
        "dropped": dropped,
        "send_lateness_p99_ms": round(lateness_p99, 1),
        "lip_offset_ms": round(statistics.median(offsets), 1),
        "say_to_audio_ms": round(statistics.median(delays) * 1000) if delays else None,
        "cpu_percent_per_call": round(cpu * 100 / n, 1),
        "rss_mb": round(rss),
        "output_sizes_at_end": sizes,
    }
    print(
        f"{n:>5} | {statistics.median(fps):6.2f} | {np.percentile(gaps, 50):5.1f} / {np.percentile(gaps, 99):5.1f} "
        f"| {late / sent * 100:5.2f} % / {dropped:3d} | {lateness_p99:6.1f} "
        f"| {statistics.median(offsets):+6.1f} ({min(offsets):+.0f}..{max(offsets):+.0f}) "
        f"| {statistics.median(delays) * 1000 if delays else float('nan'):4.0f} ({statistics.median(server_side):3.0f}) "
        f"| {cpu * 100 / n:5.1f} % | {rss:6.0f} | {' '.join(sizes)}",
        flush=True,
    )
    return row


def save_figures(
    path: Path, resolution: str, template_id: str, bias: float, rows: list[dict[str, Any]], seconds: float
) -> None:
    """Add this resolution's rows to the figures file (other resolutions' rows are kept)."""
    figures: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    figures.setdefault("runs", {})[resolution] = {
        "template": template_id,
        "seconds_per_run": seconds,
        "receiver_bias_ms": round(bias * 1000, 1),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "rows": rows,
    }
    figures["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")


async def wait_healthy(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("server did not start")


def start_server(cache: Path, template_id: str = "default") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(
        os.environ,
        AVATAR_RTC_ICE_HOST_ADDRESSES='["127.0.0.1"]',
        AVATAR_RTC_AVATAR__CACHE_DIR=str(cache),
        AVATAR_RTC_AVATAR__DEFAULT_TEMPLATE=template_id,
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "avatar_rtc.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, f"http://127.0.0.1:{port}"


async def main(
    args: argparse.Namespace, server: subprocess.Popen[bytes], url: str, cache: Path, template_id: str
) -> None:
    try:
        await wait_healthy(url)
        from avatar_rtc.avatar.store import TemplateStore

        template = TemplateStore(cache).load(template_id)
        box = mouth_box(template.landmarks[0], template.size)
        bias = await calibrate(box)
        width, height = template.size
        print(
            f"template {template_id} {width}x{height}; server pid {server.pid}; receiver bias "
            f"{bias * 1000:+.1f} ms (calibration sender); {args.seconds:.0f} s per run"
        )
        print(
            "calls |    fps | gap p50/p99 ms | late % / dropped | send err p99 ms | lip offset ms | say->audio ms (server) | CPU/call | RSS MB | sent size"
        )
        base_rss = proc_rss_mb(server.pid)
        print(
            f"    0 |        |                |                  |                 |               |               |          | {base_rss:6.0f}"
        )
        rows = []
        for n in args.calls:
            rows.append(await run_calls(url, server.pid, n, box, bias, args.seconds, template.size))
            await asyncio.sleep(1.0)
        if args.json is not None:
            save_figures(args.json, f"{width}x{height}", template_id, bias, rows, args.seconds)
    finally:
        server.terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument(
        "--json", type=Path, default=None, help="add the figures to this file (e.g. docs/figures/calls.json)"
    )
    parser.add_argument(
        "--resolutions",
        nargs="+",
        choices=["default", *RESOLUTIONS],
        default=["default"],
        help="templates to call: the built-in 512 px one, or a presenter at a call resolution",
    )
    parsed = parser.parse_args()
    reexec_in_loopback_namespace()
    for resolution in parsed.resolutions:
        work = Path(tempfile.mkdtemp(prefix="bench_call_"))
        cache_dir = work / "cache"
        chosen = "default" if resolution == "default" else prepare_presenter_template(cache_dir, resolution)
        process, base_url = start_server(cache_dir, chosen)
        try:
            asyncio.run(main(parsed, process, base_url, cache_dir, chosen))
        finally:
            process.terminate()
            process.wait(10)
            shutil.rmtree(work, ignore_errors=True)
