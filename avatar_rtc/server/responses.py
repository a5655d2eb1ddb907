"""The one shape every error takes on the wire, ``{"error": message}`` with its status, and the one
way request bodies are read: within a time limit, parsed with bounds."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import BodyPartReader, web

from avatar_rtc.bounded_json import JsonInputError, parse_json


class ApiError(Exception):
    """A request refused; ``status`` and ``message`` are what the client gets (the app's error
    middleware turns it into a JSON error response wherever it is raised)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_json_body(request: web.Request, timeout_s: float) -> Any:
    """The request's JSON body; the whole body must arrive within ``timeout_s`` and stay within the
    app's ``client_max_size``. Raises :class:`ApiError` (400, 408, 413, 415)."""
    if request.content_type != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.read()
    except TimeoutError:
        raise ApiError(408, "the request body did not arrive in time") from None
    except web.HTTPRequestEntityTooLarge as error:
        raise ApiError(413, f"request body is larger than {error.max_size} bytes") from None
    try:
        return parse_json(body)
    except JsonInputError as error:
        raise ApiError(400, f"body refused: {error}") from None


async def read_part_chunk(part: BodyPartReader, size: int, timeout_s: float) -> bytes:
    """The next chunk of a multipart part; a client that sends nothing for ``timeout_s`` loses the
    request (408) instead of holding the connection and the work file open."""
    try:
        async with asyncio.timeout(timeout_s):
            return await part.read_chunk(size)
    except TimeoutError:
        raise ApiError(408, "the upload stalled: nothing arrived in time") from None
