"""The aiohttp application: the call page, WebRTC signaling, and the small JSON API."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiortc import RTCSessionDescription
from aiortc import sdp as aiortc_sdp

from avatar_rtc import __version__
from avatar_rtc.config import SecuritySettings, Settings
from avatar_rtc.rtc.manager import SessionManager, TooManySessionsError
from avatar_rtc.rtc.recorder import recording_wanted
from avatar_rtc.rtc.session import Session, SessionError, TextTooLongError
from avatar_rtc.server import cluster, observability, security
from avatar_rtc.server.responses import ApiError, json_error, read_json_body
from avatar_rtc.server.services import Services
from avatar_rtc.server.templates_api import TemplatesApi, setup_templates_api

log = logging.getLogger(__name__)

# The default request body limit (security.max_body_bytes sets it).
MAX_BODY_BYTES = SecuritySettings().max_body_bytes
SERVICES = web.AppKey("services", Services)
# The header that carries a session's key (from the /offer answer) on /api/sessions/{id}/... routes.
SESSION_KEY_HEADER = "X-Session-Key"
# Forms a multipart upload adds around its file: boundaries, part headers, the short text fields.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


async def read_json_object(request: web.Request) -> dict[str, Any]:
    data = await read_json_body(request, request.app[SERVICES].settings.security.body_timeout_s)
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def _sessions(request: web.Request) -> SessionManager:
    return request.app[SERVICES].sessions


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(request.app[SERVICES].settings.static_dir / "index.html")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "sessions": len(_sessions(request).sessions),
            **cluster.cluster_health(request.app),
        }
    )


async def client_config(request: web.Request) -> web.Response:
    settings = request.app[SERVICES].settings
    policy = request.app[security.ACCESS_POLICY_KEY]
    servers = policy.ice_servers_for_client(s.model_dump(exclude_none=True) for s in settings.ice_servers)
    return web.json_response({"ice_servers": servers})


async def offer(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    sdp, kind = data.get("sdp"), data.get("type")
    if not isinstance(sdp, str) or not sdp.strip():
        return json_error(400, "field 'sdp' must be a non-empty string")
    if kind != "offer":
        return json_error(400, "field 'type' must be 'offer'")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as error:  # aiortc's parser raises anything from AssertionError to ValueError
        return json_error(400, f"malformed SDP offer: {error or type(error).__name__}")
    media = [m for m in parsed.media if m.kind in ("audio", "video")]
    if not media:
        return json_error(400, "malformed SDP offer: it offers no audio or video")
    # Refused before a peer connection is made for it: a burst of such offers must not occupy
    # session slots, even briefly.
    for m in media:
        if not (m.ice and m.ice.usernameFragment and m.ice.password):
            return json_error(400, f"malformed SDP offer: {m.kind} has no ICE credentials")
        if not (m.dtls and m.dtls.fingerprints):
            return json_error(400, f"malformed SDP offer: {m.kind} has no DTLS fingerprint")
    try:
        record = recording_wanted(request.app[SERVICES].settings.recording, data.get("record"))
        session, answer = await _sessions(request).create(
            RTCSessionDescription(sdp=sdp, type="offer"), record=record
        )
    except TooManySessionsError as error:
        return json_error(503, str(error))
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, AssertionError) as error:
        # Parsed but unusable: no fingerprint, no common codec, bad ICE credentials, ...
        return json_error(400, f"unusable SDP offer: {error or type(error).__name__}")
    request[cluster.OFFERED_SESSION_ID] = session.id
    return web.json_response(
        {"sdp": answer.sdp, "type": answer.type, "session_id": session.id, "session_key": session.key}
    )


def _session_or_404(request: web.Request) -> Session:
    """The session the route names, if the request carries its key. A wrong key answers exactly as
    an unknown id does, so ids cannot be confirmed by guessing."""
    presented = request.headers.get(SESSION_KEY_HEADER)
    if not presented:
        raise ApiError(
            401,
            f"this route needs the session's key in the {SESSION_KEY_HEADER} header (from the /offer answer)",
        )
    session = _sessions(request).get(request.match_info["session_id"])
    if session is None or not session.key_matches(presented):
        raise ApiError(404, "unknown session")
    return session


async def say(request: web.Request) -> web.Response:
    return await _turn_request(request, "say")


async def chat(request: web.Request) -> web.Response:
    return await _turn_request(request, "chat")


async def _turn_request(request: web.Request, kind: str) -> web.Response:
    session = _session_or_404(request)
    data = await read_json_object(request)
    try:
        turn = session.say(data.get("text")) if kind == "say" else session.chat(data.get("text"))
    except TextTooLongError as error:
        return json_error(413, str(error))
    except SessionError as error:
        return json_error(400, str(error))
    return web.json_response({"turn_id": turn.id}, status=202)


async def session_stats(request: web.Request) -> web.Response:
    return web.json_response(_session_or_404(request).stats())


async def interrupt(request: web.Request) -> web.Response:
    _session_or_404(request).interrupt()
    return web.json_response({"status": "interrupted"})


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as ``{"error": message}``, including aiohttp's own (413, 404, 405)."""
    try:
        return await handler(request)
    except ApiError as error:
        return json_error(error.status, error.message)
    except web.HTTPException as error:
        if error.status < 400 or error.content_type == "application/json":
            raise
        message = error.text if error.text and not error.text.startswith(f"{error.status}:") else error.reason
        return json_error(error.status, message or error.reason)


async def _close_sessions(app: web.Application) -> None:
    services = app[SERVICES]
    await services.sessions.close_all()
    services.sessions.deps.renderer.close()  # a renderer's worker threads (MuseTalk) stop with the server
    services.library.close()


# The pages' scripts are ES modules. A browser runs a module only if its Content-Type is a JavaScript
# one, and aiohttp guesses that from the host's mime.types (application/javascript here, possibly
# nothing elsewhere): name the current standard type instead. A page on another origin loads modules
# (js/avatar_call.js through embed.js, or an import of its own) in CORS mode, so the scripts say any
# origin may read them: they are the same public files every visitor gets, fetched without cookies.
STATIC_PREFIX = "/static/"
SCRIPT_CONTENT_TYPE = "text/javascript; charset=utf-8"


async def _static_script_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not (request.path.startswith(STATIC_PREFIX) and request.path.endswith(".js")):
        return
    if response.status in (200, 206):
        response.headers[hdrs.CONTENT_TYPE] = SCRIPT_CONTENT_TYPE
    # The CORS middleware has already answered an allowed origin by name; any other gets "*".
    response.headers.setdefault(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, "*")


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``web.run_app`` / ``web.AppRunner``: connections that send no request
    head in time are closed, and the access log never holds a token."""
    return {
        "keepalive_timeout": settings.security.header_timeout_s,
        # A cluster's front door checks every node's /healthz twice a second: not worth a log line each.
        "access_log_class": (
            observability.ProbeQuietAccessLogger
            if settings.cluster.enabled
            else observability.RedactingAccessLogger
        ),
    }


def create_app(services: Services) -> web.Application:
    settings = services.settings
    upload_bytes = int(settings.avatar.max_upload_mb * 1e6) + MULTIPART_OVERHEAD_BYTES
    render_bytes = int(settings.limits.max_render_audio_mb * 1e6) + MULTIPART_OVERHEAD_BYTES
    policy = security.AccessPolicy(
        settings.security,
        max_sessions=settings.limits.max_sessions,
        session_count=lambda: services.sessions.count,
        body_limits={"POST /api/templates": upload_bytes, "POST /api/render": render_bytes},
    )
    # Cluster mode (cluster.redis_url set): membership, cluster-wide limits, template events, drain.
    node = (
        cluster.ClusterNode(settings, services.sessions, services.library)
        if settings.cluster.enabled
        else None
    )
    app = web.Application(
        client_max_size=settings.security.max_body_bytes,
        middlewares=[
            *security.middlewares(policy),
            *(cluster.middlewares(node) if node is not None else []),
            json_errors,
        ],
    )
    if node is not None:
        cluster.setup_cluster(app, node)
    app[SERVICES] = services
    app[security.ACCESS_POLICY_KEY] = policy
    renderer = services.sessions.deps.renderer
    if settings.observability.metrics_enabled:
        observability.setup_metrics(
            app,
            lambda: list(services.sessions.sessions.values()),
            session_ids=settings.observability.session_metrics,
            renderer=lambda: (renderer.name, renderer.tier_stats()),
        )
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/config", client_config)
    app.router.add_post("/offer", offer)
    app.router.add_post("/api/sessions/{session_id}/say", say)
    app.router.add_post("/api/sessions/{session_id}/chat", chat)
    app.router.add_post("/api/sessions/{session_id}/interrupt", interrupt)
    app.router.add_get("/api/sessions/{session_id}/stats", session_stats)
    deps = services.sessions.deps
    setup_templates_api(
        app,
        TemplatesApi(
            library=services.library,
            tts=deps.tts,
            engine=deps.renderer,
            max_text_chars=settings.limits.max_text_chars,
            max_render_audio_s=settings.limits.max_render_audio_s,
            max_render_audio_bytes=int(settings.limits.max_render_audio_mb * 1e6),
            body_timeout_s=settings.security.body_timeout_s,
            on_change=node.publish_template_event if node is not None else None,
        ),
    )
    app.router.add_static(STATIC_PREFIX.rstrip("/"), services.settings.static_dir)
    app.on_response_prepare.append(_static_script_headers)
    app.on_shutdown.append(_close_sessions)
    return app
