"""JSON from strangers, parsed with bounds on size and nesting.

Python's json module recurses once per nesting level: ten thousand ``[`` raise RecursionError from
deep inside the parser, which escapes ``except ValueError`` and, on a data channel, kills aiortc's
receive loop. Every place that parses what a client sent (HTTP bodies, data-channel messages) goes
through :func:`parse_json`, which refuses such input with :class:`JsonInputError` before parsing.
"""

from __future__ import annotations

import json
import re
from typing import Any

# No message or request body of this API nests deeper than three levels; 32 leaves room for clients
# that wrap their payloads without letting anyone near the interpreter's recursion limit.
MAX_JSON_DEPTH = 32

# A JSON string literal (with escapes): brackets inside strings do not nest anything.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class JsonInputError(ValueError):
    """The input is not JSON this server accepts; the message is safe to show the client."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (which need not be valid JSON)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(
    data: str | bytes | bytearray, *, max_bytes: int | None = None, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """``data`` parsed, or :class:`JsonInputError` if it is too large, too deep or not JSON."""
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonInputError(f"JSON larger than {max_bytes} bytes")
    if isinstance(data, bytes | bytearray):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonInputError("JSON is not UTF-8 text") from None
    # Fewer openers than the bound cannot nest past it: most messages skip the scan (C-speed counts).
    if data.count("[") + data.count("{") > max_depth and json_depth(data) > max_depth:
        raise JsonInputError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise JsonInputError("not valid JSON") from None
