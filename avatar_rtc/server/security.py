"""Who may use the server and how much: optional admin and page tokens, the origins whose pages may
call it, and limits on offers per client address, concurrent sessions and request size per route.

Everything here runs before a handler, so a refused request costs a dictionary lookup and never
reaches SDP parsing or a peer connection. Refusals leave as ``{"error": message}`` with 401, 403,
413, 429 or 503, and carry CORS headers where the origin is allowed, so a page can show them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from avatar_rtc.config import SecuritySettings

# Requests under these paths need a token when one is set. The page, its static files and
# /healthz stay open: the page must load to ask for a token, and health probes carry none.
ACCESS_POLICY_KEY: web.AppKey[AccessPolicy] = web.AppKey("access_policy")
PROTECTED_PREFIXES: tuple[str, ...] = ("/offer", "/api/", "/metrics")
OFFER_PATH = "/offer"

# What a page token may do: start and run calls, and show the avatar picker. Everything else under
# the protected prefixes (changing templates, rendering files, /metrics) needs the admin token.
_CALL_ROUTES = re.compile(
    r"^(POST /offer|GET /api/config|GET /api/templates|GET /api/templates/[^/]+/thumbnail\.jpg"
    r"|(GET|POST) /api/sessions/.*)$"
)
# Routes that change what the server stores, make it work for minutes or stop it (a cluster node's
# drain): never from another site's page, whatever the CORS settings say.
_SAME_ORIGIN_ONLY = re.compile(
    r"^((POST|PATCH|DELETE) /api/templates(/.*)?|POST /api/render|POST /api/nodes/.*)$"
)

Scope = Literal["open", "call", "admin"]


def _is_local_host(hostname: str) -> bool:
    """An IP literal or localhost: a name no other site can point at this server by DNS rebinding."""
    hostname = hostname.strip("[]").lower()
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def _normalized_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


class AccessPolicy:
    """The decisions, kept apart from aiohttp so they can be tested and reused (the data channel
    may ask the same questions). ``session_count`` reports live (and reserved) sessions; ``clock``
    is for tests."""

    # Bounds the rate limiter's memory under a flood from many addresses: the oldest idle entry goes.
    MAX_TRACKED_ADDRESSES = 10_000
    WINDOW_S = 60.0

    def __init__(
        self,
        settings: SecuritySettings,
        *,
        max_sessions: int | None = None,
        session_count: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.max_sessions = max_sessions
        self._session_count = session_count
        self._clock = clock
        self._admin_token = settings.api_token.get_secret_value().encode() if settings.api_token else b""
        self._page_token = settings.page_token.get_secret_value().encode() if settings.page_token else b""
        self._offers: OrderedDict[str, deque[float]] = OrderedDict()
        self._public_origins = {_normalized_origin(o) for o in settings.public_origins}
        self._allowed_origins = {_normalized_origin(o) for o in settings.cors_allow_origins}
        # "METHOD /path" -> the largest body that route takes; every other route: max_body_bytes.
        self._body_limits = dict(body_limits or {})
        self.refused: dict[int, int] = {}  # HTTP status -> count, for logs and tests

    # -- tokens -----------------------------------------------------------------------------------
    @property
    def token_required(self) -> bool:
        return bool(self._admin_token)

    @staticmethod
    def scope(method: str, path: str) -> Scope:
        """What a request needs: nothing (the pages), a page or admin token (calls), the admin token."""
        if not any(path == p.rstrip("/") or path.startswith(p) for p in PROTECTED_PREFIXES):
            return "open"
        if method in (hdrs.METH_OPTIONS, hdrs.METH_HEAD):
            method = hdrs.METH_GET
        return "call" if _CALL_ROUTES.match(f"{method} {path}") else "admin"

    def token_refusal(self, method: str, path: str, presented: str | None) -> tuple[int, str] | None:
        """None if ``presented`` may make this request, else (status, message)."""
        scope = self.scope(method, path)
        if scope == "open" or not self._admin_token:
            return None
        given = (presented or "").encode()
        if given and hmac.compare_digest(given, self._admin_token):
            return None
        if given and self._page_token and hmac.compare_digest(given, self._page_token):
            if scope == "call":
                return None
            return 403, "this token may only start calls; this needs the admin token"
        return 401, "a valid API token is required (Authorization: Bearer <token>)"

    @staticmethod
    def presented_token(request: web.Request) -> str | None:
        # A header only: query strings end up in access logs, proxies' logs and browser history.
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None

    @staticmethod
    def is_protected(path: str) -> bool:
        return AccessPolicy.scope(hdrs.METH_GET, path) != "open"

    # -- origins ----------------------------------------------------------------------------------
    def same_origin(self, origin: str, request_host: str, request_scheme: str) -> bool:
        """Whether a page at ``origin`` is one of this server's own. The Host header alone proves
        nothing (a rebinding page sends its own name as Host and Origin), so it counts only when it
        is an IP address or localhost; named hosts must be listed in ``public_origins``."""
        origin = _normalized_origin(origin)
        if origin in self._public_origins:
            return True
        if origin != f"{request_scheme}://{request_host}".lower():
            return False
        return _is_local_host(urlsplit(origin).hostname or "")

    def origin_allowed(self, origin: str, request_host: str, request_scheme: str) -> bool:
        if self.same_origin(origin, request_host, request_scheme):
            return True
        return "*" in self._allowed_origins or _normalized_origin(origin) in self._allowed_origins

    @staticmethod
    def same_origin_only(method: str, path: str) -> bool:
        return bool(_SAME_ORIGIN_ONLY.match(f"{method} {path}"))

    # -- limits -----------------------------------------------------------------------------------
    def client_address(self, request: web.Request) -> str:
        if self.settings.trust_forwarded_for:
            forwarded = request.headers.get("X-Forwarded-For", "")
            first = forwarded.split(",")[0].strip()
            if first:
                return first
        return request.remote or "unknown"

    def take_offer(self, address: str) -> float | None:
        """Count an offer from ``address``; None if it is within the limit, else the seconds until
        the next one would be."""
        limit = self.settings.offers_per_minute
        if limit <= 0:
            return None
        now = self._clock()
        recent = self._offers.get(address)
        if recent is None:
            recent = deque()
            self._offers[address] = recent
            while len(self._offers) > self.MAX_TRACKED_ADDRESSES:
                self._offers.popitem(last=False)
        else:
            self._offers.move_to_end(address)
        while recent and recent[0] <= now - self.WINDOW_S:
            recent.popleft()
        if len(recent) >= limit:
            return max(0.0, recent[0] + self.WINDOW_S - now)
        recent.append(now)
        return None

    def sessions_full(self) -> bool:
        return self.max_sessions is not None and self._session_count() >= self.max_sessions

    def body_limit(self, method: str, path: str) -> int:
        return self._body_limits.get(f"{method} {path}", self.settings.max_body_bytes)

    # -- ICE ----------------------------------------------------------------------------------------
    def ice_servers_for_client(
        self, ice_servers: Iterable[dict[str, Any]], user: str = "avatar"
    ) -> list[dict[str, Any]]:
        """The ICE servers a page should use. With ``turn_secret`` set, every turn:/turns: server
        without its own credentials gets a time-limited pair in coturn's REST-API scheme:
        username ``<expiry>:<user>``, credential base64(HMAC-SHA1(secret, username))."""
        servers = [dict(s) for s in ice_servers]
        if self.settings.turn_secret is None:
            return servers
        username, credential = turn_rest_credentials(
            self.settings.turn_secret.get_secret_value(),
            user,
            self.settings.turn_credential_ttl_s,
            now=time.time(),
        )
        for server in servers:
            urls = server.get("urls", [])
            is_turn = any(str(u).startswith(("turn:", "turns:")) for u in urls)
            if is_turn and not server.get("username"):
                server["username"], server["credential"] = username, credential
        return servers

    def refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        self.refused[status] = self.refused.get(status, 0) + 1
        return web.json_response({"error": message}, status=status, headers=headers)


def turn_rest_credentials(secret: str, user: str, ttl_s: int, now: float) -> tuple[str, str]:
    username = f"{int(now) + ttl_s}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Session-Key"
CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE_S = "600"


def _cors_headers(origin: str) -> dict[str, str]:
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
        "Access-Control-Max-Age": CORS_MAX_AGE_S,
        "Vary": "Origin",
    }


def middlewares(policy: AccessPolicy) -> list[Middleware]:
    """CORS, then the token, then limits: a preflight needs no token, and every refusal below CORS
    still carries the headers that let an allowed page read it."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            # Not sent by a browser's cross-site request (they always send Origin on writes).
            return await handler(request)
        same_origin = policy.same_origin(origin, request.host, request.scheme)
        allowed = same_origin or policy.origin_allowed(origin, request.host, request.scheme)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            wanted = request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD].upper()
            if not allowed or (not same_origin and policy.same_origin_only(wanted, request.path)):
                return policy.refuse(403, f"origin {origin} is not allowed")
            return web.Response(status=204, headers=_cors_headers(origin))
        if not same_origin and policy.same_origin_only(request.method, request.path):
            return policy.refuse(403, f"origin {origin} may not change templates or render files")
        if not allowed:
            # A cross-site page must not open calls or spend the server's limits; reads of the open
            # pages (GET) are harmless and a browser would hide the answer anyway.
            if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD) or policy.is_protected(request.path):
                return policy.refuse(403, f"origin {origin} is not allowed")
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as error:
            error.headers.update(_cors_headers(origin))
            raise
        if not response.prepared:
            response.headers.update(_cors_headers(origin))
        return response

    @web.middleware
    async def token(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = policy.token_refusal(request.method, request.path, policy.presented_token(request))
        if refusal is not None:
            status, message = refusal
            headers = {hdrs.WWW_AUTHENTICATE: "Bearer"} if status == 401 else None
            return policy.refuse(status, message, headers)
        return await handler(request)

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = policy.body_limit(request.method, request.path)
        if request.content_length is not None and request.content_length > limit:
            return policy.refuse(413, f"request body is larger than {limit} bytes")
        if request.path == OFFER_PATH and request.method == hdrs.METH_POST:
            if policy.sessions_full():
                return policy.refuse(
                    503,
                    f"the server is at its limit of {policy.max_sessions} sessions",
                    {"Retry-After": "10"},
                )
            wait_s = policy.take_offer(policy.client_address(request))
            if wait_s is not None:
                return policy.refuse(
                    429,
                    f"too many calls from this address: at most {policy.settings.offers_per_minute} a minute",
                    {"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
        return await handler(request)

    return [cors, token, limits]
