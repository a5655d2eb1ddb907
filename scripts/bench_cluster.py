"""What the front door costs and how fast a cluster routes around a dead node.

Starts a cluster on loopback (redis-server, haproxy, two nodes: scripts/cluster.py), then measures:

- **Added latency**: the median time of ``POST /offer`` (a session set up and answered) sent straight to
  a node and through haproxy, interleaved, ``--offers`` of each; the same for ``GET /healthz``, which
  is haproxy's own cost without the node's work.
- **Failover**: with a live call on each node, SIGKILL one; the time until a new call through the front
  door is answered and connected, until haproxy marks the node DOWN, and until its registry entry has
  expired in Redis.

    python scripts/bench_cluster.py [--offers 50] [--json docs/figures/cluster.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from scripts.cluster import LocalCluster, NodeSpec, free_port, wait_until_up  # noqa: E402

NODE_SETTINGS = {
    "AVATAR_RTC_LIMITS__MAX_SESSIONS": "64",
    # Offers that are never connected free their slot after a second.
    "AVATAR_RTC_LIMITS__CONNECT_TIMEOUT_S": "1",
    "AVATAR_RTC_SECURITY__OFFERS_PER_MINUTE": "0",
    "AVATAR_RTC_TTS__ENGINE": "espeak",
}


async def timed_ms(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> float:
    started = time.perf_counter()
    async with http.request(method, url, **kwargs) as resp:
        await resp.read()
        assert resp.status == 200, (url, resp.status)
    return (time.perf_counter() - started) * 1000


async def added_latency(cluster: LocalCluster, offers: int) -> dict[str, float]:
    caller = CallReceiver()
    await caller.make_offer()
    offer = {"sdp": caller.pc.localDescription.sdp, "type": "offer"}
    # The front door sends every other offer to each node, so the direct ones alternate as well: an
    # offer leaves a session behind for a second (never connected), and a node holding more of them
    # answers more slowly.
    times: dict[str, list[float]] = {
        "offer_direct": [],
        "offer_front": [],
        "health_direct": [],
        "health_front": [],
    }
    async with aiohttp.ClientSession() as http:
        for node in cluster.nodes:  # warm both paths (first sessions, connections)
            await timed_ms(http, "POST", f"{node.url}/offer", json=offer)
            await timed_ms(http, "POST", f"{cluster.front_url}/offer", json=offer)
        for n in range(offers):
            node = cluster.nodes[n % len(cluster.nodes)]
            times["offer_direct"].append(await timed_ms(http, "POST", f"{node.url}/offer", json=offer))
            times["offer_front"].append(
                await timed_ms(http, "POST", f"{cluster.front_url}/offer", json=offer)
            )
            times["health_direct"].append(await timed_ms(http, "GET", f"{node.url}/healthz"))
            times["health_front"].append(await timed_ms(http, "GET", f"{cluster.front_url}/healthz"))
    await caller.close()
    figures = {f"{name}_median_ms": round(statistics.median(values), 2) for name, values in times.items()}
    # Each offer through the front door against the direct one sent just before it: the machine's
    # load drifts less within a pair than over the run.
    paired = [f - d for f, d in zip(times["offer_front"], times["offer_direct"], strict=True)]
    figures["offer_added_paired_median_ms"] = round(statistics.median(paired), 2)
    return figures


async def failover(cluster: LocalCluster) -> dict[str, float]:
    async with aiohttp.ClientSession() as http:
        calls = []
        for _ in range(2):
            call = CallReceiver()
            await call.connect_http(cluster.front_url, http)
            calls.append(call)
        await asyncio.sleep(1.0)
        cluster.stop("n1", signal.SIGKILL)
        killed = time.monotonic()
        first_call = down = unregistered = None
        while None in (first_call, down, unregistered) and time.monotonic() - killed < 15:
            now = time.monotonic() - killed
            if first_call is None:
                call = CallReceiver()
                try:
                    await call.connect_http(cluster.front_url, http)
                    first_call = time.monotonic() - killed
                except Exception:
                    pass
                calls.append(call)
            if down is None and cluster.haproxy_status().get("n1", "").startswith("DOWN"):
                down = now
            if unregistered is None:
                async with http.get(f"{cluster.nodes[1].url}/api/cluster") as resp:
                    if [n["id"] for n in (await resp.json())["nodes"]] == ["n2"]:
                        unregistered = now
            await asyncio.sleep(0.02)
        await asyncio.gather(*(c.close() for c in calls), return_exceptions=True)
    return {
        "first_new_call_s": round(first_call or -1, 3),
        "haproxy_down_s": round(down or -1, 3),
        "registry_expired_s": round(unregistered or -1, 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as work:
        run_dir = Path(work)
        nodes = [NodeSpec(f"n{i}", "127.0.0.1", free_port(), free_port()) for i in (1, 2)]
        cluster = LocalCluster(run_dir, free_port(), free_port(), free_port(), nodes, run_dir / "cache")
        try:
            cluster.start_redis()
            cluster.start_node(nodes[0], NODE_SETTINGS)  # prepares the shared default template
            await asyncio.to_thread(wait_until_up, f"{nodes[0].url}/healthz", 300, cluster.processes["n1"])
            cluster.start_node(nodes[1], NODE_SETTINGS)
            await asyncio.to_thread(cluster.wait_for_nodes, 300)
            cluster.start_haproxy()
            await asyncio.to_thread(
                wait_until_up, f"{cluster.front_url}/healthz", 10, cluster.processes["haproxy"]
            )
            await asyncio.sleep(2.0)  # both nodes UP in haproxy (rise 2)
            figures = await added_latency(cluster, args.offers)
            figures |= await failover(cluster)
        finally:
            cluster.stop_all()
    figures["offers"] = args.offers
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--offers", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the figures here as well")
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    added_offer = figures["offer_front_median_ms"] - figures["offer_direct_median_ms"]
    added_health = figures["health_front_median_ms"] - figures["health_direct_median_ms"]
    print(
        f"POST /offer   median direct {figures['offer_direct_median_ms']:7.2f} ms   through haproxy "
        f"{figures['offer_front_median_ms']:7.2f} ms   added {added_offer:+.2f} ms  ({args.offers} each; "
        f"median of the paired differences {figures['offer_added_paired_median_ms']:+.2f} ms)"
    )
    print(
        f"GET /healthz  median direct {figures['health_direct_median_ms']:7.2f} ms   through haproxy "
        f"{figures['health_front_median_ms']:7.2f} ms   added {added_health:+.2f} ms"
    )
    print(
        f"SIGKILL of a node with a live call: new call connected after {figures['first_new_call_s']:.2f} s, "
        f"haproxy marks it DOWN after {figures['haproxy_down_s']:.2f} s, "
        f"its registry entry expired after {figures['registry_expired_s']:.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
