"""The one shape every error takes on the wire: ``{"error": message}`` with its status."""

from __future__ import annotations

from aiohttp import web


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
