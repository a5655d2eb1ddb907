"""The web side of the metrics and logs: ``GET /metrics`` on the app, and an access log without secrets.

What is measured, and the structured logs, are :mod:`avatar_rtc.metrics`, below every room that reports.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from avatar_rtc.metrics import METRICS, Metrics, SessionSource, TierSource

METRICS_KEY = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app.get(METRICS_KEY, METRICS)
    body = metrics.exposition()
    response = web.Response(body=body)
    # CONTENT_TYPE_LATEST carries a charset; aiohttp wants it in its own field.
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def setup_metrics(
    app: web.Application,
    sessions: SessionSource,
    metrics: Metrics = METRICS,
    session_ids: bool = False,
    renderer: TierSource | None = None,
) -> None:
    """Add ``GET /metrics`` to ``app`` and export the sessions ``sessions`` returns (and the renderer's
    template tier ``renderer`` reads) while it runs."""
    app[METRICS_KEY] = metrics
    metrics.sessions.session_ids = session_ids
    unwatchers = [metrics.watch_sessions(sessions)]
    if renderer is not None:
        unwatchers.append(metrics.watch_renderer(renderer))

    async def stop_watching(_: web.Application) -> None:
        for unwatch in unwatchers:
            unwatch()

    app.on_cleanup.append(stop_watching)
    app.router.add_get("/metrics", metrics_handler)


# -- access log ---------------------------------------------------------------------------------------
# Query parameters whose values never reach a log line: a token pasted into a kiosk URL, a signed
# URL's signature. Matched by name, case-insensitively.
_SECRET_PARAMETER = re.compile(
    r"(?i)([?&](?:[^=&#]*(?:token|key|secret|password|signature|credential|auth)[^=&#]*)=)[^&#\s]*"
)


def redact_url(url: str) -> str:
    """``url`` with the values of secret-looking query parameters replaced by ``REDACTED``."""
    return _SECRET_PARAMETER.sub(r"\1REDACTED", url)


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request, like aiohttp's default, without secrets: query values that look like
    tokens are redacted in the path and the Referer, and no request header is logged besides it
    and the User-Agent."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        referer = request.headers.get("Referer", "-")
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d "%s" "%s" %.1fms',
            request.remote or "-",
            request.method,
            redact_url(request.path_qs),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            redact_url(referer),
            request.headers.get("User-Agent", "-"),
            time * 1000,
        )


class ProbeQuietAccessLogger(RedactingAccessLogger):
    """The same, without the successful ``GET /healthz`` lines: a cluster's front door checks every
    node twice a second, which would be most of the log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path == "/healthz" and request.method == "GET" and response.status == 200:
            return
        super().log(request, response, time)
