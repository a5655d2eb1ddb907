"""One node of a cluster: several avatar_rtc servers behind one front door (haproxy), sharing what
must be shared through Redis (docs/deploy.md, "A cluster").

- **Registry.** Every ``cluster.heartbeat_s`` the node writes ``<prefix>:node:<id>`` (address, agent,
  capacity, load, draining) with a TTL of ``cluster.node_ttl_s``: a node killed without a word leaves
  the registry by itself.
- **Capacity for the front door.** A tiny TCP server answers haproxy's ``agent-check`` with the share
  of free session slots (``ready 50%``; 1% when full), or ``drain`` while draining: haproxy then sends
  it nothing new, yet still routes the calls it holds (their ``/api/sessions/<node>.…`` routes).
- **Cluster-wide limits.** Offers per client address a minute and sessions in all, counted in Redis by
  one Lua script per offer (atomic across nodes, timed by Redis's own clock). Sessions are leases in a
  sorted set that the heartbeat renews; a dead node's leases run out after ``node_ttl_s``.
- **Template events.** An upload, change or delete is published; the other nodes drop their stale copy
  from RAM and warm the new one. Template files live in one shared directory.
- **Drain.** SIGTERM (when serving from the command line) or ``POST /api/nodes/<id>/drain``: no new
  offers, live calls go on (up to ``cluster.drain_timeout_s``), then the node exits.

Without Redis a node keeps every call it has and answers new offers 503 until Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from avatar_rtc import __version__
from avatar_rtc.config import Settings
from avatar_rtc.server.responses import json_error
from avatar_rtc.server.security import ACCESS_POLICY_KEY, OFFER_PATH

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from avatar_rtc.avatar.library import TemplateLibrary
    from avatar_rtc.rtc.manager import SessionManager

log = logging.getLogger(__name__)

# Every response of a cluster node names it: load tests and operators see who answered.
NODE_HEADER = "X-Avatar-Node"
# The offer handler leaves the new session's id here, so its cluster-wide slot follows the session.
OFFERED_SESSION_ID: web.RequestKey[str] = web.RequestKey("offered_session_id", str)
OFFER_WINDOW_S = 60
# A slot taken for an offer still being answered; held this long at most if its node dies meanwhile.
OFFER_RESERVATION_S = 20.0

# KEYS: offers of this address, leases of all sessions. ARGV: window s, offers per window (0: no
# limit), sessions in all (0: no limit), reservation member, reservation lease s.
# Refusals take nothing: a full cluster does not use up a caller's offers, as on a lone node.
_ADMIT_OFFER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window, per_window = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_sessions = tonumber(ARGV[3])
if max_sessions > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_sessions then return {'full', '0'} end
end
if per_window > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= per_window then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {'rate', tostring(tonumber(oldest[2]) + window - now)}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('EXPIRE', KEYS[1], window + 1)
end
if max_sessions > 0 then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4]) end
return {'ok', '0'}
"""

# KEYS: leases of all sessions. ARGV: lease s, then members to renew (or add), '--', members to remove.
_RENEW_LEASES = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local removing = false
for i = 2, #ARGV do
  if ARGV[i] == '--' then removing = true
  elseif removing then redis.call('ZREM', KEYS[1], ARGV[i])
  else redis.call('ZADD', KEYS[1], until_, ARGV[i]) end
end
return redis.call('ZCARD', KEYS[1])
"""


class ClusterUnavailableError(RuntimeError):
    """Redis cannot be reached: the node takes no new calls (its live ones go on)."""


@dataclass(frozen=True)
class Admission:
    """The answer to one offer: ``outcome`` is ok, rate (too many from the address) or full (the
    cluster is at cluster.max_sessions); ``member`` is the offer's reservation."""

    outcome: str
    member: str
    retry_after_s: float = 0.0


def redis_client(url: str, timeout_s: float | None) -> Redis:
    """A client that fails fast: ``timeout_s`` per connect and per reply (None: replies may take as long
    as they take, for a subscription), and one immediate second try, which is what a pooled connection
    that a restarted Redis closed needs (a Redis that is down refuses it at once as well)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s or 1.0,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
    )


class ClusterNode:
    """This process's membership in the cluster. ``exit_when_drained`` is called once a drain is done
    (the command line raises SIGINT: aiohttp's own graceful shutdown)."""

    def __init__(self, settings: Settings, sessions: SessionManager, library: TemplateLibrary) -> None:
        cluster = settings.cluster
        assert cluster.redis_url is not None and cluster.node_id is not None
        self.settings = settings
        self.config = cluster
        self.node_id = cluster.node_id
        self.address = cluster.advertise or f"{settings.host}:{settings.port}"
        self.sessions = sessions
        self.library = library
        self.draining = False
        self.drained = asyncio.Event()
        self.redis_reachable = False
        self.exit_when_drained: Callable[[], None] | None = None
        self.handle_sigterm = False
        self.agent_port: int | None = None
        prefix = cluster.key_prefix
        self.node_key = f"{prefix}:node:{self.node_id}"
        self.sessions_key = f"{prefix}:sessions"
        self.templates_channel = f"{prefix}:templates"
        self._offers_prefix = f"{prefix}:offers:"
        self._nodes_pattern = f"{prefix}:node:*"
        redis_url = cluster.redis_url.get_secret_value()
        self._redis = redis_client(redis_url, cluster.redis_timeout_s)
        self._subscriber = redis_client(redis_url, None)
        self._admit = self._redis.register_script(_ADMIT_OFFER)
        self._renew = self._redis.register_script(_RENEW_LEASES)
        # Session ids this node holds leases for: the heartbeat renews the live ones, removes the rest.
        self._leased: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._agent: asyncio.Server | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self.started_at = time.time()

    # -- what the node reports -----------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.settings.limits.max_sessions

    def agent_status(self) -> str:
        """haproxy's agent-check answer: the share of free slots as the server's weight, or ``drain``
        while draining (nothing new; the calls it holds still reach it). A full node keeps the least
        weight rather than drain: when every node is full the pages and the template API must still
        load, and an offer that reaches it gets the node's own 503 (haproxy tries another node)."""
        if self.draining:
            return "drain\n"
        free = self.capacity - self.sessions.count
        return f"ready {max(1, round(100 * free / self.capacity))}%\n"

    def registry_entry(self) -> dict[str, str]:
        return {
            "id": self.node_id,
            "address": self.address,
            "agent": f"{self.config.agent_host}:{self.agent_port}" if self.agent_port else "",
            "capacity": str(self.capacity),
            "load": str(self.sessions.count),
            "draining": "1" if self.draining else "0",
            "version": __version__,
            "started": f"{self.started_at:.3f}",
            "heartbeat": f"{time.time():.3f}",
        }

    # -- lifetime --------------------------------------------------------------------------------------------
    async def start(self, _: web.Application | None = None) -> None:
        if self.config.agent_port:
            self._agent = await asyncio.start_server(
                self._answer_agent, self.config.agent_host, self.config.agent_port
            )
            self.agent_port = self._agent.sockets[0].getsockname()[1]
        await self._heartbeat_once()  # a node without Redis still starts: it refuses offers until then
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="cluster-heartbeat"),
            asyncio.create_task(self._template_events_loop(), name="cluster-template-events"),
        ]
        if self.handle_sigterm:
            # Replaces aiohttp's own SIGTERM handler (installed before the app starts): a rolling
            # upgrade's SIGTERM lets live calls finish first. SIGINT still stops the node at once.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.begin_drain, "SIGTERM")
        log.info("cluster node %s at %s (agent port %s)", self.node_id, self.address, self.agent_port)

    async def stop(self, _: web.Application | None = None) -> None:
        if self._agent is not None:
            self._agent.close()
        for task in (*self._tasks, self._drain_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Leave at once rather than after the TTL: the front door and the limits see it now.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.config.redis_timeout_s * 2):
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(self.node_key)
                if self._leased:
                    pipe.zrem(self.sessions_key, *self._leased)
                await pipe.execute()
        for client in (self._redis, self._subscriber):
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _answer_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(self.agent_status().encode())
            await writer.drain()
        writer.close()

    # -- registry and leases ---------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        try:
            async with asyncio.timeout(self.config.redis_timeout_s * 3):
                await self._publish_state()
        except Exception as error:  # Redis down, slow or restarting: calls go on, offers are refused
            if self.redis_reachable:
                log.warning("cluster: Redis unreachable (%s); refusing new calls until it is back", error)
            self.redis_reachable = False
            return
        if not self.redis_reachable:
            log.info("cluster: node %s registered with Redis", self.node_id)
        self.redis_reachable = True

    async def _publish_state(self) -> None:
        live = set(self.sessions.sessions)
        gone = self._leased - live
        ttl_ms = int(self.config.node_ttl_s * 1000)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.node_key, mapping=self.registry_entry())
        pipe.pexpire(self.node_key, ttl_ms)
        await pipe.execute()
        if live or gone:
            await self._renew(
                keys=[self.sessions_key], args=[self.config.node_ttl_s, *sorted(live), "--", *sorted(gone)]
            )
        self._leased = (self._leased - gone) | live

    async def nodes(self) -> list[dict[str, str]]:
        """The registry: every node whose heartbeat has not expired."""
        keys = [key async for key in self._redis.scan_iter(match=self._nodes_pattern, count=100)]
        entries = []
        for key in sorted(keys):
            entry = await self._redis.hgetall(key)
            if entry:
                entries.append(entry)
        return entries

    # -- offers ---------------------------------------------------------------------------------------------
    async def admit_offer(self, client_address: str) -> Admission:
        """Count an offer against the cluster-wide limits; raises :class:`ClusterUnavailableError`."""
        member = f"{self.node_id}|offer|{uuid.uuid4().hex}"
        try:
            async with asyncio.timeout(self.config.redis_timeout_s * 2):
                outcome, retry_after = await self._admit(
                    keys=[self._offers_prefix + client_address, self.sessions_key],
                    args=[
                        OFFER_WINDOW_S,
                        self.settings.security.offers_per_minute,
                        self.config.max_sessions,
                        member,
                        OFFER_RESERVATION_S,
                    ],
                )
        except Exception as error:
            self.redis_reachable = False
            raise ClusterUnavailableError(str(error) or type(error).__name__) from error
        return Admission(outcome, member, float(retry_after))

    async def settle_offer(self, admission: Admission, session_id: str | None) -> None:
        """The offer's reservation becomes its session's lease, or is given back."""
        if not self.config.max_sessions:
            return
        if session_id is not None:
            self._leased.add(session_id)
        with contextlib.suppress(Exception):  # the heartbeat puts it right once Redis answers again
            async with asyncio.timeout(self.config.redis_timeout_s * 2):
                added = [session_id] if session_id is not None else []
                await self._renew(
                    keys=[self.sessions_key], args=[self.config.node_ttl_s, *added, "--", admission.member]
                )

    async def cluster_sessions(self) -> int:
        """Sessions (and reservations) with a live lease, across the cluster."""
        t_s, t_us = await self._redis.time()
        now = t_s + t_us / 1e6
        return int(await self._redis.zcount(self.sessions_key, now, "+inf"))

    # -- templates ------------------------------------------------------------------------------------------
    async def publish_template_event(self, event: str, template_id: str) -> None:
        """Tell the other nodes that a template was prepared (``ready``), changed or deleted. A lost
        event costs them a stale RAM copy, never a request: this one's answer does not wait on it."""
        message = json.dumps({"node": self.node_id, "event": event, "template": template_id})
        try:
            async with asyncio.timeout(self.config.redis_timeout_s * 2):
                await self._redis.publish(self.templates_channel, message)
        except Exception as error:
            log.warning("cluster: template %r %s not announced: %s", template_id, event, error)

    async def _template_events_loop(self) -> None:
        missed_events = False
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.templates_channel)
                if missed_events:
                    # Pub/sub keeps nothing for a subscriber that was away (and a publisher finds no
                    # Redis to tell while it is down): what changed meanwhile is read from the
                    # shared directory instead.
                    await self.reload_templates_in_ram()
                    missed_events = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        await self.apply_template_event(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("cluster: template events unavailable (%s); retrying", error)
                missed_events = True
                await asyncio.sleep(self.config.heartbeat_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def apply_template_event(self, data: str) -> None:
        from avatar_rtc.avatar.library import TemplateBudgetError, TemplateInUseError
        from avatar_rtc.avatar.store import TemplateCacheError, validate_template_id

        try:
            event = json.loads(data)
            template_id = validate_template_id(str(event["template"]))
            kind = str(event["event"])
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: ignoring a malformed template event %r", data[:200])
            return
        if event.get("node") == self.node_id:
            return
        library = self.library

        def apply() -> None:
            was_warm = template_id in library.in_ram()
            # The copy in RAM is of the files as they were: drop it (a live call keeps its own pin).
            with contextlib.suppress(TemplateInUseError):
                library.unload(template_id)
            if kind == "ready" or (kind == "updated" and was_warm):
                library.warm(template_id)

        try:
            await asyncio.to_thread(apply)
            log.info("cluster: template %r %s on node %s", template_id, kind, event.get("node"))
        except (TemplateBudgetError, TemplateCacheError, LookupError, OSError) as error:
            log.warning("cluster: template %r %s: not warmed here: %s", template_id, kind, error)

    async def reload_templates_in_ram(self) -> None:
        """Drop every template copy in RAM that no call is using and read it again from the shared
        directory, where it still exists: after template events may have been missed, a copy in RAM
        may be of files since changed or deleted on another node."""
        from avatar_rtc.avatar.library import TemplateBudgetError, TemplateInUseError
        from avatar_rtc.avatar.store import TemplateCacheError

        library = self.library

        def reload() -> tuple[int, int]:
            dropped = reloaded = 0
            for template_id in library.in_ram():
                try:
                    library.unload(template_id)
                except TemplateInUseError:
                    continue  # a live call keeps the copy it started with until it switches
                dropped += 1
                if library.store.exists(template_id):
                    with contextlib.suppress(TemplateBudgetError, TemplateCacheError, LookupError, OSError):
                        library.warm(template_id)
                        reloaded += 1
            return dropped, reloaded

        dropped, reloaded = await asyncio.to_thread(reload)
        log.info(
            "cluster: template events may have been missed; %d copies in RAM dropped, %d read again",
            dropped,
            reloaded,
        )

    # -- drain ---------------------------------------------------------------------------------------------
    def begin_drain(self, why: str = "admin") -> None:
        """No new calls from now on; once the live ones have ended (or the drain timeout), exit."""
        if self.draining:
            return
        self.draining = True
        log.info(
            "cluster: node %s draining (%s): %d live calls, up to %.0f s",
            self.node_id,
            why,
            self.sessions.count,
            self.config.drain_timeout_s,
        )
        self._drain_task = asyncio.create_task(self._drain(), name="cluster-drain")

    async def _drain(self) -> None:
        await self._heartbeat_once()  # the registry says so now, not at the next beat
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout_s
        # Polled: the session manager announces no closes (and it belongs to the room below).
        while self.sessions.count and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        if self.sessions.count:
            log.warning("cluster: drain timeout with %d calls still live", self.sessions.count)
        log.info("cluster: node %s drained", self.node_id)
        self.drained.set()
        if self.exit_when_drained is not None:
            self.exit_when_drained()


CLUSTER_NODE = web.AppKey("cluster_node", ClusterNode)


def _node(request: web.Request) -> ClusterNode:
    return request.app[CLUSTER_NODE]


def middlewares(node: ClusterNode) -> list[Middleware]:
    """Offers pass the cluster-wide limits (after the node's own, in security's middlewares)."""

    @web.middleware
    async def cluster_offers(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != hdrs.METH_POST or request.path != OFFER_PATH:
            return await handler(request)
        if node.draining:
            return json_error(503, f"node {node.node_id} is draining: it takes no new calls")
        policy = request.app[ACCESS_POLICY_KEY]
        try:
            admission = await node.admit_offer(policy.client_address(request))
        except ClusterUnavailableError as error:
            log.warning("cluster: offer refused, Redis unreachable: %s", error)
            return policy.refuse(
                503,
                "the cluster registry (Redis) cannot be reached: no new calls until it is back",
                {"Retry-After": "5"},
            )
        if admission.outcome == "rate":
            limit = policy.settings.offers_per_minute
            return policy.refuse(
                429,
                f"too many calls from this address: at most {limit} a minute across the cluster",
                {"Retry-After": str(max(1, int(admission.retry_after_s + 0.999)))},
            )
        if admission.outcome == "full":
            return policy.refuse(
                503,
                f"the cluster is at its limit of {node.config.max_sessions} sessions",
                {"Retry-After": "10"},
            )
        session_id: str | None = None
        try:
            response = await handler(request)
            if response.status == 200:
                session_id = request.get(OFFERED_SESSION_ID)
            return response
        finally:
            await asyncio.shield(node.settle_offer(admission, session_id))

    return [cluster_offers]


async def _name_the_node(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[NODE_HEADER] = _node(request).node_id


async def cluster_state(request: web.Request) -> web.Response:
    """``GET /api/cluster`` (admin): this node, the registry and the cluster-wide session count."""
    node = _node(request)
    try:
        async with asyncio.timeout(node.config.redis_timeout_s * 4):
            nodes, total = await node.nodes(), await node.cluster_sessions()
    except Exception as error:
        return json_error(503, f"the cluster registry (Redis) cannot be reached: {error}")
    return web.json_response(
        {"node": node.node_id, "draining": node.draining, "nodes": nodes, "sessions": total}
    )


async def drain(request: web.Request) -> web.Response:
    """``POST /api/nodes/{node_id}/drain`` (admin): the front door routes it to that node."""
    node = _node(request)
    if request.match_info["node_id"] != node.node_id:
        return json_error(404, f"this is node {node.node_id}, not {request.match_info['node_id']}")
    node.begin_drain("admin request")
    return web.json_response({"node": node.node_id, "draining": True, "sessions": node.sessions.count})


def setup_cluster(app: web.Application, node: ClusterNode) -> None:
    app[CLUSTER_NODE] = node
    app.on_startup.append(node.start)
    app.on_cleanup.append(node.stop)
    app.on_response_prepare.append(_name_the_node)
    app.router.add_get("/api/cluster", cluster_state)
    app.router.add_post("/api/nodes/{node_id}/drain", drain)


def cluster_health(app: web.Application) -> dict[str, Any]:
    """What /healthz adds on a cluster node (haproxy's health check: 200 while draining too, so the
    calls a draining node holds keep reaching it)."""
    node = app.get(CLUSTER_NODE)
    if node is None:
        return {}
    return {"node": node.node_id, "draining": node.draining, "redis": node.redis_reachable}
