"""Who may use the server and how much: an optional API token, a CORS allow-list, and limits on
offers per client address, concurrent sessions and request size.

Everything here runs before a handler, so a refused request costs a dictionary lookup and never
reaches SDP parsing or a peer connection. Refusals leave as ``{"error": message}`` with 401, 403,
413, 429 or 503, and carry CORS headers where the origin is allowed, so a page can show them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from avatar_rtc.config import SecuritySettings

# Requests under these paths need the token when one is set. The page, its static files and
# /healthz stay open: the page must load to ask for a token, and health probes carry none.
ACCESS_POLICY_KEY: web.AppKey[AccessPolicy] = web.AppKey("access_policy")
PROTECTED_PREFIXES: tuple[str, ...] = ("/offer", "/api/", "/metrics")
OFFER_PATH = "/offer"


class AccessPolicy:
    """The decisions, kept apart from aiohttp so they can be tested and reused (the data channel
    may ask the same questions). ``session_count`` reports live sessions; ``clock`` is for tests."""

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
    ) -> None:
        self.settings = settings
        self.max_sessions = max_sessions
        self._session_count = session_count
        self._clock = clock
        token = settings.api_token.get_secret_value() if settings.api_token else ""
        self._token = token.encode()
        self._offers: OrderedDict[str, deque[float]] = OrderedDict()
        self._allowed_origins = {o.rstrip("/").lower() for o in settings.cors_allow_origins}
        self.refused: dict[int, int] = {}  # HTTP status -> count, for logs and tests

    # -- token ------------------------------------------------------------------------------------
    @property
    def token_required(self) -> bool:
        return bool(self._token)

    def token_ok(self, presented: str | None) -> bool:
        if not self._token:
            return True
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self._token)

    @staticmethod
    def presented_token(request: web.Request) -> str | None:
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return request.query.get("token")

    @staticmethod
    def is_protected(path: str) -> bool:
        return any(path == p.rstrip("/") or path.startswith(p) for p in PROTECTED_PREFIXES)

    # -- origins ----------------------------------------------------------------------------------
    def origin_allowed(self, origin: str, request_host: str, request_scheme: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin == f"{request_scheme}://{request_host}".lower():
            return True
        return "*" in self._allowed_origins or origin in self._allowed_origins

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

    def body_too_large(self, content_length: int | None) -> bool:
        return content_length is not None and content_length > self.settings.max_body_bytes

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


CORS_ALLOW_HEADERS = "Authorization, Content-Type"
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
            return await handler(request)
        allowed = policy.origin_allowed(origin, request.host, request.scheme)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            if not allowed:
                return policy.refuse(403, f"origin {origin} is not allowed")
            return web.Response(status=204, headers=_cors_headers(origin))
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
        if policy.is_protected(request.path) and not policy.token_ok(policy.presented_token(request)):
            return policy.refuse(401, "a valid API token is required", {hdrs.WWW_AUTHENTICATE: "Bearer"})
        return await handler(request)

    @web.middleware
    async def limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if policy.body_too_large(request.content_length):
            return policy.refuse(413, f"request body is larger than {policy.settings.max_body_bytes} bytes")
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
