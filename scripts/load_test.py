"""How many simultaneous calls this machine holds at full frame rate.

Starts the server as its own process (or uses --url), then opens calls one at a time; every call
keeps its avatar talking (a `say` every few seconds). A step holds for --step-s and is healthy when
every call's video left on time: late-frame rate (repeated + dropped frames over frames sent)
at most --max-late and p99 send lateness at most --max-p99-ms, both from the server's own stats.
The largest healthy count is then held for --minutes and reported.

    python scripts/load_test.py --minutes 2            # ramp, then hold the capacity for 2 min
    python scripts/load_test.py --calls 4 --minutes 2  # no ramp: hold 4 calls

The callers run in this process on the same machine, so they take CPU from the server (decoding
video, as a browser would): the count is a lower bound for a server with its callers elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from avatar_rtc.testing.synthetic import RESOLUTIONS, prepare_presenter_template  # noqa: E402

SENTENCES = (
    "Thanks for calling, let me check that for you.",
    "The weather today looks bright, with a light breeze in the afternoon.",
    "Your order left the warehouse this morning and should arrive tomorrow.",
)


@dataclass
class CallStats:
    session_id: str
    frames_sent: int
    frames_late: int
    frames_dropped: int
    p99_ms: float | None


@dataclass
class StepResult:
    calls: int
    seconds: float
    frames_sent: int
    late_rate: float
    worst_p99_ms: float
    server_cpu_percent: float | None
    server_rss_mb: float | None

    def line(self) -> str:
        cpu = f"{self.server_cpu_percent:.0f}%" if self.server_cpu_percent is not None else "-"
        rss = f"{self.server_rss_mb:.0f} MB" if self.server_rss_mb is not None else "-"
        return (
            f"{self.calls:3d} calls  {self.seconds:6.0f} s  frames {self.frames_sent:7d}  "
            f"late {self.late_rate * 100:6.2f}%  worst p99 lateness {self.worst_p99_ms:6.1f} ms  "
            f"server CPU {cpu}  RSS {rss}"
        )


@contextlib.asynccontextmanager
async def local_server(
    port: int, token: str | None, template: tuple[Path, str] | None = None
) -> AsyncIterator[tuple[str, psutil.Process]]:
    """A server on ``port``; ``template``: (cache directory, id) of the template calls get."""
    env = {
        **os.environ,
        "AVATAR_RTC_ICE_HOST_ADDRESSES": '["127.0.0.1"]',
        "AVATAR_RTC_ASR__ENGINE": "none",
        "AVATAR_RTC_LLM__ENGINE": "none",
        "AVATAR_RTC_LIMITS__MAX_SESSIONS": "64",
        "AVATAR_RTC_SECURITY__OFFERS_PER_MINUTE": "0",
    }
    if token:
        env["AVATAR_RTC_SECURITY__API_TOKEN"] = token
    if template is not None:
        env["AVATAR_RTC_AVATAR__CACHE_DIR"] = str(template[0])
        env["AVATAR_RTC_AVATAR__DEFAULT_TEMPLATE"] = template[1]
    cmd = [sys.executable, "-m", "avatar_rtc.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = await asyncio.to_thread(
        subprocess.Popen,
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                if process.poll() is not None:
                    raise RuntimeError("server exited during start")
                await asyncio.sleep(0.2)
        yield url, psutil.Process(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


class LoadRun:
    def __init__(self, url: str, http: aiohttp.ClientSession, say_every_s: float) -> None:
        self.url = url
        self.http = http
        self.say_every_s = say_every_s
        self.calls: list[CallReceiver] = []
        self._talkers: list[asyncio.Task[None]] = []

    async def add_call(self) -> None:
        receiver = CallReceiver()
        await receiver.connect_http(self.url, self.http)
        self.calls.append(receiver)
        self._talkers.append(asyncio.ensure_future(self._talk(receiver, len(self.calls))))

    async def _talk(self, receiver: CallReceiver, n: int) -> None:
        await asyncio.sleep(0.3 * n % self.say_every_s)  # spread the calls' sentences out
        while True:
            with contextlib.suppress(Exception):
                receiver.send({"type": "say", "text": SENTENCES[n % len(SENTENCES)]})
            await asyncio.sleep(self.say_every_s)

    async def stats(self) -> list[CallStats]:
        out = []
        for receiver in self.calls:
            async with self.http.get(
                f"{self.url}/api/sessions/{receiver.session_id}/stats", headers=receiver.session_headers
            ) as resp:
                data = await resp.json()
            out.append(
                CallStats(
                    receiver.session_id or "",
                    data["frames_sent"],
                    data["frames_late"],
                    data["frames_dropped"],
                    data["send_lateness_ms_p99"],
                )
            )
        return out

    async def close(self) -> None:
        for task in self._talkers:
            task.cancel()
        await asyncio.gather(*self._talkers, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.calls), return_exceptions=True)


async def measure(run: LoadRun, seconds: float, server: psutil.Process | None) -> StepResult:
    """Frames sent and late across all calls during the next ``seconds``."""
    before = {s.session_id: s for s in await run.stats()}
    if server is not None:
        server.cpu_percent()
    await asyncio.sleep(seconds)
    after = await run.stats()
    sent = late = 0
    worst_p99 = 0.0
    for s in after:
        b = before.get(s.session_id)
        sent += s.frames_sent - (b.frames_sent if b else 0)
        late += (s.frames_late + s.frames_dropped) - ((b.frames_late + b.frames_dropped) if b else 0)
        worst_p99 = max(worst_p99, s.p99_ms or 0.0)
    cpu = server.cpu_percent() if server is not None else None
    rss = server.memory_info().rss / 1e6 if server is not None else None
    return StepResult(len(run.calls), seconds, sent, late / max(1, sent), worst_p99, cpu, rss)


def healthy(step: StepResult, max_late: float, max_p99_ms: float) -> bool:
    return step.late_rate <= max_late and step.worst_p99_ms <= max_p99_ms


async def ramp_and_hold(args: argparse.Namespace, url: str, server: psutil.Process | None) -> StepResult:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        run = LoadRun(url, http, args.say_every_s)
        try:
            capacity = args.calls
            if capacity is None:
                capacity = 0
                while len(run.calls) < args.max_calls:
                    await run.add_call()
                    await asyncio.sleep(2.0)  # past connection set-up
                    step = await measure(run, args.step_s, server)
                    print("ramp ", step.line(), flush=True)
                    if not healthy(step, args.max_late, args.max_p99_ms):
                        break
                    capacity = len(run.calls)
                # Hold the largest healthy count: drop the call that tipped it over.
                while len(run.calls) > max(1, capacity):
                    await run.calls.pop().close()
                    run._talkers.pop().cancel()
            else:
                for _ in range(capacity):
                    await run.add_call()
                await asyncio.sleep(2.0)
            # The measurement window restarts here: the p99 is recomputed from a fresh window.
            total = args.minutes * 60
            report = min(args.report_s, total)
            results = []
            elapsed = 0.0
            while elapsed < total:
                step = await measure(run, min(report, total - elapsed), server)
                elapsed += step.seconds
                results.append(step)
                print("hold ", step.line(), flush=True)
            sent = sum(r.frames_sent for r in results)
            late = sum(r.late_rate * r.frames_sent for r in results)
            summary = StepResult(
                len(run.calls),
                elapsed,
                sent,
                late / max(1, sent),
                max(r.worst_p99_ms for r in results),
                results[-1].server_cpu_percent,
                results[-1].server_rss_mb,
            )
            print("TOTAL", summary.line(), flush=True)
            return summary
        finally:
            await run.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server (default: start one on a free port)")
    p.add_argument("--token", help="API token, when the server wants one")
    p.add_argument("--calls", type=int, help="hold this many calls instead of ramping")
    p.add_argument("--max-calls", type=int, default=32)
    p.add_argument("--minutes", type=float, default=2.0, help="how long to hold the capacity")
    p.add_argument("--step-s", type=float, default=15.0, help="measurement per ramp step")
    p.add_argument("--report-s", type=float, default=30.0, help="report interval while holding")
    p.add_argument("--say-every-s", type=float, default=6.0)
    p.add_argument("--max-late", type=float, default=0.01, help="healthy: late-frame rate at most this")
    p.add_argument("--max-p99-ms", type=float, default=20.0, help="healthy: p99 send lateness at most this")
    p.add_argument(
        "--resolution",
        choices=["default", *RESOLUTIONS],
        default="default",
        help="the calls' template: the built-in 512 px one, or a full-frame presenter of this size",
    )
    return p


async def main_async(args: argparse.Namespace) -> int:
    if args.url:
        await ramp_and_hold(args, args.url.rstrip("/"), None)
        return 0
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    template: tuple[Path, str] | None = None
    with tempfile.TemporaryDirectory(prefix="load_test_") as work:
        if args.resolution != "default":
            cache = Path(work) / "cache"
            template = (cache, await asyncio.to_thread(prepare_presenter_template, cache, args.resolution))
            print(f"template {template[1]} ({'x'.join(map(str, RESOLUTIONS[args.resolution]))})", flush=True)
        async with local_server(port, args.token, template) as (url, server):
            await ramp_and_hold(args, url, server)
    return 0


def main() -> int:
    return asyncio.run(main_async(parser().parse_args()))


if __name__ == "__main__":
    sys.exit(main())
