"""A cluster on real parts: redis-server, haproxy as the front door, coturn, and two avatar_rtc nodes
as their own processes, all on 127.0.0.1 (scripts/cluster.py starts them, as scripts/cluster.sh
does). Calls spread over the nodes, session routes reach the node that holds the call, limits hold
across nodes, a template uploaded on one node is warm on the other, TURN credentials work with coturn,
and nodes fail, drain and lose Redis without dropping the calls they should keep.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from avatar_rtc.avatar.template import Template
from avatar_rtc.testing.receiver import CallReceiver
from scripts.cluster import LocalCluster, NodeSpec, free_port, wait_until_up

BINARIES = ("redis-server", "haproxy", "turnserver")
MISSING = [name for name in BINARIES if shutil.which(name) is None]
# The binaries come from Debian packages: scripts/setup.sh installs them with the test extras.
SKIP_REASON = (
    f"needs {', '.join(MISSING)}: Debian packages that scripts/setup.sh installs with the test extras "
    "(AVATAR_RTC_WITH_TESTS=1)"
)

NODE_SESSIONS = 3  # limits.max_sessions of each node
CLUSTER_SESSIONS = 4  # cluster.max_sessions: fewer than the nodes' slots together
OFFERS_PER_MINUTE = 30
HEARTBEAT_S = 0.5
NODE_TTL_S = 1.5
NODE_SETTINGS = {
    "AVATAR_RTC_LIMITS__MAX_SESSIONS": str(NODE_SESSIONS),
    "AVATAR_RTC_CLUSTER__MAX_SESSIONS": str(CLUSTER_SESSIONS),
    "AVATAR_RTC_SECURITY__OFFERS_PER_MINUTE": str(OFFERS_PER_MINUTE),
    "AVATAR_RTC_CLUSTER__HEARTBEAT_S": str(HEARTBEAT_S),
    "AVATAR_RTC_CLUSTER__NODE_TTL_S": str(NODE_TTL_S),
    "AVATAR_RTC_CLUSTER__DRAIN_TIMEOUT_S": "60",
    # An offer whose caller never connects (the forged TURN credential) frees its slot soon.
    "AVATAR_RTC_LIMITS__CONNECT_TIMEOUT_S": "3",
    "AVATAR_RTC_TTS__ENGINE": "espeak",
}


class Cluster(LocalCluster):
    def start_node_again(self, node: NodeSpec) -> None:
        self.start_node(node, NODE_SETTINGS)
        wait_until_up(f"{node.url}/healthz", 120, self.processes[node.node_id])

    def node(self, node_id: str) -> NodeSpec:
        return next(n for n in self.nodes if n.node_id == node_id)


@pytest.fixture(scope="module")
def binaries() -> None:
    """Skips before anything is prepared for a cluster that cannot start."""
    if MISSING:
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="module")
def cluster(
    binaries: None,
    tmp_path_factory: pytest.TempPathFactory,
    template_cache_dir: Path,
    default_template: Template,
) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("cluster")
    nodes = [NodeSpec(f"n{i}", "127.0.0.1", free_port(), free_port()) for i in (1, 2)]
    running = Cluster(
        run_dir=run_dir,
        front_port=free_port(),
        redis_port=free_port(),
        turn_port=free_port(),
        nodes=nodes,
        # The shared template directory, its default template already prepared.
        cache_dir=template_cache_dir,
    )
    try:
        running.start_redis()
        running.start_turn()
        for node in nodes:
            running.start_node(node, NODE_SETTINGS)
        running.wait_for_nodes(120)
        running.start_haproxy()
        wait_until_up(f"{running.front_url}/healthz", 10, running.processes["haproxy"])
        yield running
    finally:
        running.stop_all()


@pytest.fixture
async def http(cluster: Cluster) -> AsyncIterator[aiohttp.ClientSession]:
    """A client; every test starts with both nodes up, idle and seen up by the front door."""
    for node in cluster.nodes:
        if node.node_id not in cluster.processes:
            await asyncio.to_thread(cluster.start_node_again, node)
    async with aiohttp.ClientSession() as session:
        await wait_for(lambda: _all_up_and_idle(cluster, session), 20, "both nodes up and idle")
        yield session


async def _all_up_and_idle(cluster: Cluster, http: aiohttp.ClientSession) -> bool:
    if set(cluster.haproxy_status().values()) != {"UP"}:
        return False
    for node in cluster.nodes:
        async with http.get(f"{node.url}/healthz") as resp:
            health = await resp.json()
        if health["sessions"] or health["draining"] or not health["redis"]:
            return False
    async with http.get(f"{cluster.nodes[0].url}/api/cluster") as resp:
        state = await resp.json()
    return resp.status == 200 and state["sessions"] == 0 and len(state["nodes"]) == len(cluster.nodes)


async def wait_for(check: Any, timeout_s: float, what: str) -> float:
    """Seconds until ``check()`` (a coroutine function) is true; fails after ``timeout_s``."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except (aiohttp.ClientError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def open_call(http: aiohttp.ClientSession, url: str) -> CallReceiver:
    call = CallReceiver()
    try:
        await call.connect_http(url, http)
    except BaseException:
        await call.close()
        raise
    return call


async def offer_status(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict[str, Any]]:
    """POST /offer with a real offer from a throw-away peer; (status, body)."""
    call = CallReceiver()
    try:
        await call.make_offer()
        offer = {"sdp": call.pc.localDescription.sdp, "type": "offer"}
        async with http.post(f"{url}/offer", json=offer, headers=headers) as resp:
            return resp.status, await resp.json()
    finally:
        await call.close()


def node_of(call: CallReceiver) -> str:
    assert call.session_id is not None
    return call.session_id.split(".", 1)[0]


async def frames_keep_coming(call: CallReceiver, seconds: float = 1.0) -> bool:
    before = len(call.received.video_arrival)
    await asyncio.sleep(seconds)
    return len(call.received.video_arrival) > before + 5


async def close_all(calls: list[CallReceiver]) -> None:
    await asyncio.gather(*(call.close() for call in calls), return_exceptions=True)


async def test_calls_spread_over_nodes_and_session_routes_reach_their_node(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    front = cluster.front_url
    calls = [await open_call(http, front) for _ in range(2)]
    try:
        assert {node_of(call) for call in calls} == {"n1", "n2"}
        for call in calls:
            route = f"{front}/api/sessions/{call.session_id}"
            async with http.post(f"{route}/say", json={"text": "Hello."}, headers=call.session_headers) as r:
                assert r.status == 202, await r.text()
                assert r.headers["X-Avatar-Node"] == node_of(call)
            async with http.get(f"{route}/stats", headers=call.session_headers) as r:
                assert r.status == 200 and (await r.json())["session_id"] == call.session_id
            async with http.post(f"{route}/interrupt", headers=call.session_headers) as r:
                assert r.status == 200
        # A call's routes on a node that is not in the cluster (any more): no node has it.
        async with http.get(
            f"{front}/api/sessions/n9.AAAAAAAAAAAA/stats", headers=calls[0].session_headers
        ) as r:
            assert r.status == 404
        async with http.post(f"{front}/api/nodes/n9/drain") as r:
            assert r.status == 404 and "not n9" in (await r.json())["error"]
        # The pages and the template API answer from any node.
        async with http.get(f"{front}/api/templates") as r:
            assert r.status == 200 and (await r.json())["default"] == "default"
        async with http.get(f"{front}/static/embed.js") as r:
            assert r.status == 200
    finally:
        await close_all(calls)
    # haproxy's health checks, twice a second per node, stay out of the access log.
    log = (cluster.run_dir / "n1.log").read_text()
    assert '"POST /offer' in log and '"GET /healthz' not in log


async def test_limits_hold_across_nodes(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    # Offers per client address a minute: counted whichever node gets them (here alternately, from
    # an address of their own as the front door would forward it). Malformed offers count as well.
    caller = {"X-Forwarded-For": "198.51.100.7"}
    for n in range(OFFERS_PER_MINUTE):
        node = cluster.nodes[n % 2]
        async with http.post(f"{node.url}/offer", json={"type": "offer"}, headers=caller) as r:
            assert r.status == 400, await r.text()
    async with http.post(f"{cluster.nodes[0].url}/offer", json={"type": "offer"}, headers=caller) as r:
        assert r.status == 429 and "across the cluster" in (await r.json())["error"]
        assert int(r.headers["Retry-After"]) >= 1

    # Sessions in all: four across the two nodes, though the nodes have six slots together.
    calls = [await open_call(http, cluster.front_url) for _ in range(CLUSTER_SESSIONS)]
    try:
        counts = {n.node_id: sum(node_of(c) == n.node_id for c in calls) for n in cluster.nodes}
        with_room = next(node for node in cluster.nodes if counts[node.node_id] < NODE_SESSIONS)
        status, body = await offer_status(http, with_room.url)
        assert status == 503 and f"cluster is at its limit of {CLUSTER_SESSIONS}" in body["error"]
        status, body = await offer_status(http, cluster.front_url)
        assert status == 503 and "limit" in body["error"]
    finally:
        await close_all(calls)
    # Closed calls give their slots back to the whole cluster.
    await wait_for(lambda: _cluster_sessions_are(http, cluster, 0), 5, "the leases given back")
    call = await open_call(http, cluster.front_url)
    await call.close()


async def _cluster_sessions_are(http: aiohttp.ClientSession, cluster: Cluster, count: int) -> bool:
    async with http.get(f"{cluster.front_url}/api/cluster") as r:
        return (await r.json())["sessions"] == count


async def _upload_video_template(
    http: aiohttp.ClientSession, node: NodeSpec, template_id: str, tmp_path: Path
) -> None:
    """Prepare a short talking-face video as ``template_id`` on ``node``, through its upload API."""
    from test_templates import make_moving_face_video

    video = make_moving_face_video(tmp_path / "face.mp4", seconds=1.0)[0].read_bytes()
    form = aiohttp.FormData()
    form.add_field("id", template_id)
    form.add_field("file", io.BytesIO(video), filename="face.mp4", content_type="video/mp4")
    async with http.post(f"{node.url}/api/templates", data=form) as r:
        last = json.loads((await r.text()).splitlines()[-1])
    assert last["state"] == "ready", last


async def test_a_template_uploaded_on_one_node_is_warm_on_the_other(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n1, n2 = cluster.nodes
    await _upload_video_template(http, n1, "clustered", tmp_path)

    async def state_on(node: NodeSpec) -> str | None:
        async with http.get(f"{node.url}/api/templates") as r:
            listing = (await r.json())["templates"]
        return next((t["state"] for t in listing if t["id"] == "clustered"), None)

    # n2 heard of it and holds it in RAM, ready for a switch without a disk read.
    await wait_for(lambda: _equals(state_on(n2), "warm"), 10, "the template warm on n2")
    call = await open_call(http, n2.url)
    try:
        call.send({"type": "select_template", "id": "clustered"})
        switched = await call.wait_event(lambda e: e.get("type") == "template", 10)
        assert switched["id"] == "clustered"
    finally:
        await call.close()
    await wait_for(lambda: _equals(state_on(n2), "warm"), 10, "the call on n2 gone")
    async with http.delete(f"{n1.url}/api/templates/clustered") as r:
        assert r.status == 200
    await wait_for(lambda: _equals(state_on(n2), None), 5, "the template gone on n2")


async def test_a_template_deleted_while_redis_was_down_is_not_served_from_ram_after(
    cluster: Cluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The delete's event is lost (no Redis to publish it on): once its subscription is back, n2
    reads what is in RAM again from the shared directory instead of serving a copy of deleted files."""
    n1, n2 = cluster.nodes
    await _upload_video_template(http, n1, "offline-edit", tmp_path)

    async def warm_on_n2() -> bool:
        async with http.get(f"{n2.url}/api/templates") as r:
            listing = (await r.json())["templates"]
        return any(t["id"] == "offline-edit" and t["state"] == "warm" for t in listing)

    await wait_for(warm_on_n2, 10, "the template warm on n2")
    cluster.stop("redis", signal.SIGKILL)
    try:
        async with http.delete(f"{n1.url}/api/templates/offline-edit") as r:
            assert r.status == 200
    finally:
        cluster.start_redis()
    await wait_for(lambda: _all_up_and_idle(cluster, http), 10, "the nodes registered again")
    # The subscription comes back within a heartbeat or two of the registry.
    await asyncio.sleep(3 * HEARTBEAT_S)
    call = await open_call(http, n2.url)
    try:
        call.send({"type": "select_template", "id": "offline-edit"})
        answer = await call.wait_event(lambda e: e.get("type") in ("template", "error"), 10)
    finally:
        await call.close()
    assert answer["type"] == "error" and "offline-edit" in answer["message"], answer


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_pages_get_turn_credentials_that_coturn_accepts(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{cluster.front_url}/api/config") as r:
        (turn,) = (await r.json())["ice_servers"]
    expiry, user = turn["username"].split(":")
    assert user == "avatar" and int(expiry) > time.time()
    # A caller that may only use the relay: every packet of the call goes through coturn.
    relay_only = RTCConfiguration(
        iceServers=[RTCIceServer(turn["urls"], turn["username"], turn["credential"])],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    call = CallReceiver(configuration=relay_only)
    try:
        await call.connect_http(cluster.front_url, http)
        offered = call.pc.localDescription.sdp
        assert "typ relay" in offered and "typ host" not in offered
        await call.wait_event(lambda e: e.get("type") == "hello", 10)
        assert await frames_keep_coming(call)
    finally:
        await call.close()
    # A credential not minted from coturn's secret gets no relay (coturn answers 401), so no call.
    forged = RTCConfiguration(
        iceServers=[RTCIceServer(turn["urls"], turn["username"], "Zm9yZ2VkIGNyZWRlbnRpYWw=")],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY,
    )
    caller = CallReceiver(configuration=forged)
    try:
        await caller.make_offer()
        assert "typ relay" not in caller.pc.localDescription.sdp
    finally:
        await caller.close()


async def test_without_redis_new_calls_get_503_and_live_calls_go_on(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    calls = [await open_call(http, cluster.front_url) for _ in range(2)]
    try:
        cluster.stop("redis", signal.SIGKILL)
        status, body = await offer_status(http, cluster.front_url)
        assert status == 503 and "Redis" in body["error"], body
        for call in calls:
            route = f"{cluster.front_url}/api/sessions/{call.session_id}/say"
            async with http.post(route, json={"text": "Still here."}, headers=call.session_headers) as r:
                assert r.status == 202
            assert await frames_keep_coming(call)
        for node in cluster.nodes:
            async with http.get(f"{node.url}/healthz") as r:
                assert (await r.json())["redis"] is False
    finally:
        if "redis" not in cluster.processes:
            cluster.start_redis()
        await close_all(calls)
    # Redis back (empty: the heartbeats fill it in again): new calls are taken again.
    await wait_for(lambda: _all_up_and_idle(cluster, http), 10, "the nodes registered again")
    call = await open_call(http, cluster.front_url)
    await call.close()


async def test_drain_lets_live_calls_finish_and_takes_no_new_ones(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    draining, other = cluster.node("n1"), cluster.node("n2")
    calls = [await open_call(http, draining.url), await open_call(http, other.url)]
    by_node = {node_of(call): call for call in calls}
    live = by_node["n1"]
    cluster.send_signal("n1", signal.SIGTERM)  # as systemd or Kubernetes stop it
    await wait_for(lambda: _is_draining(http, draining), 5, "n1 draining")
    await wait_for(
        lambda: _async(cluster.haproxy_status()["n1"].startswith("DRAIN")), 3, "haproxy sees the drain"
    )
    status, body = await offer_status(http, draining.url)
    assert status == 503 and "draining" in body["error"]
    await by_node["n2"].close()
    await wait_for(lambda: _cluster_sessions_are(http, cluster, 1), 5, "n2's call gone")
    new = [await open_call(http, cluster.front_url) for _ in range(2)]
    try:
        assert [node_of(call) for call in new] == ["n2", "n2"]
        # The call on the draining node goes on, and its routes still reach it through the front door.
        route = f"{cluster.front_url}/api/sessions/{live.session_id}/say"
        async with http.post(route, json={"text": "Almost done."}, headers=live.session_headers) as r:
            assert r.status == 202
        assert await frames_keep_coming(live)
        assert cluster.processes["n1"].poll() is None
        await live.close()
        # Its last call over, the node leaves: the registry at once, the process with exit status 0.
        exit_code = await asyncio.to_thread(cluster.processes["n1"].wait, 15)
        assert exit_code == 0
        cluster.processes.pop("n1")
        async with http.get(f"{other.url}/api/cluster") as r:
            assert [n["id"] for n in (await r.json())["nodes"]] == ["n2"]
    finally:
        await close_all([*new, *calls])


async def _is_draining(http: aiohttp.ClientSession, node: NodeSpec) -> bool:
    async with http.get(f"{node.url}/healthz") as r:
        return bool((await r.json())["draining"])


async def _async(value: bool) -> bool:
    return value


async def test_a_killed_node_is_routed_around_within_two_seconds(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    calls = [await open_call(http, node.url) for node in cluster.nodes]
    survivor = calls[1]
    try:
        cluster.stop("n1", signal.SIGKILL)
        killed_at = time.monotonic()
        # New calls succeed at once. Of two in a row the front door sends one to the dead node before
        # its checks notice: that offer's connection is refused and it goes to the other node.
        new = [await open_call(http, cluster.front_url) for _ in range(2)]
        first_call_s = time.monotonic() - killed_at
        await close_all(new)
        assert [node_of(call) for call in new] == ["n2", "n2"] and first_call_s < 2.0
        down_s = await wait_for(
            lambda: _async(cluster.haproxy_status()["n1"].startswith("DOWN")), 2.0, "haproxy marks n1 down"
        )
        gone_s = await wait_for(
            lambda: _registry_is(http, cluster, ["n2"]), NODE_TTL_S + 1.5, "n1's registry entry expired"
        )
        print(f"kill: two new calls {first_call_s:.2f} s, down {down_s:.2f} s, unregistered {gone_s:.2f} s")
        assert await frames_keep_coming(survivor)
        route = f"{cluster.front_url}/api/sessions/{survivor.session_id}/stats"
        async with http.get(route, headers=survivor.session_headers) as r:
            assert r.status == 200
    finally:
        await close_all(calls)


async def _registry_is(http: aiohttp.ClientSession, cluster: Cluster, ids: list[str]) -> bool:
    async with http.get(f"{cluster.front_url}/api/cluster") as r:
        return [n["id"] for n in (await r.json())["nodes"]] == ids


# -- without the binaries -------------------------------------------------------------------------------


def test_the_agent_reports_free_capacity_and_drain() -> None:
    from avatar_rtc.config import Settings
    from avatar_rtc.server.cluster import ClusterNode

    class Sessions:
        count = 0
        sessions: dict[str, object] = {}  # noqa: RUF012

    settings = Settings(
        limits={"max_sessions": 4}, cluster={"redis_url": "redis://127.0.0.1:1/0", "node_id": "n7"}
    )
    node = ClusterNode(settings, Sessions(), library=None)  # type: ignore[arg-type]
    assert node.agent_status() == "ready 100%\n"
    Sessions.count = 3
    assert node.agent_status() == "ready 25%\n"
    Sessions.count = 4  # full: the least weight (pages still load), not drain
    assert node.agent_status() == "ready 1%\n"
    Sessions.count = 1
    node.draining = True
    assert node.agent_status() == "drain\n"


def test_session_ids_name_their_node_only_in_a_cluster() -> None:
    from avatar_rtc.config import Settings
    from avatar_rtc.rtc.session import rtc_configuration

    with pytest.raises(ValueError, match="node_id is required"):
        Settings(cluster={"redis_url": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ValueError):
        Settings(cluster={"redis_url": "redis://127.0.0.1:6379/0", "node_id": "n1.bad"})
    assert not Settings().cluster.enabled
    # TURN servers whose credentials are minted for pages are not the server's own.
    settings = Settings(
        ice_servers=[{"urls": ["turn:127.0.0.1:3478"]}, {"urls": ["stun:127.0.0.1:3478"]}],
    )
    assert [s.urls for s in rtc_configuration(settings).iceServers or []] == [["stun:127.0.0.1:3478"]]


def test_the_front_door_routes_each_node_s_sessions_to_it() -> None:
    from scripts.cluster import haproxy_config

    config = haproxy_config(
        [NodeSpec("n1", "10.0.0.11", 8080, 9100), NodeSpec("n2", "10.0.0.12", 8080, 9100)], "0.0.0.0", 80
    )
    lines = [line.strip() for line in config.splitlines()]
    assert "use-server n2 if { path_beg /api/sessions/n2. } || { path_beg /api/nodes/n2/ }" in lines
    assert "server n1 10.0.0.11:8080 agent-port 9100" in lines
    assert "agent-check" in config and "http-request set-header X-Forwarded-For %[src]" in config


async def test_without_the_front_door_nodes_and_their_calls_go_on(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    call = await open_call(http, cluster.front_url)
    node = cluster.node(node_of(call))
    try:
        cluster.stop("haproxy", signal.SIGKILL)
        # Media never went through haproxy; the node itself answers as before.
        assert await frames_keep_coming(call)
        route = f"{node.url}/api/sessions/{call.session_id}/say"
        async with http.post(route, json={"text": "Hello again."}, headers=call.session_headers) as r:
            assert r.status == 202
        other = await open_call(http, node.url)
        await other.close()
    finally:
        await call.close()
        if "haproxy" not in cluster.processes:
            cluster.start_haproxy()
