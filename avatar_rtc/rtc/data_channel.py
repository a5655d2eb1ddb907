"""The ``events`` data channel's protocol: the greeting, the caller's messages parsed, checked and
dispatched to the session, refused ones reported at a bounded rate, and pings answered within a budget."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiortc import RTCDataChannel

from avatar_rtc.bounded_json import JsonInputError, parse_json
from avatar_rtc.conversation.turn import Turn
from avatar_rtc.rtc.errors import SessionError

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "events"
MAX_MESSAGE_BYTES = 64 * 1024


class PingBudget:
    """A token bucket: ``rate`` pings a second answered on average, bursts up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = self.capacity
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class ChannelRequests(Protocol):
    """What the channel asks of its session (``Session`` answers all of it)."""

    @property
    def state(self) -> str: ...

    def hello(self) -> dict[str, Any]:
        """The greeting's ``hello`` event: what this call can do and how it looks now."""
        ...

    def say(self, text: object) -> Turn: ...

    def chat(self, text: object) -> Turn: ...

    def interrupt(self) -> None: ...

    async def select_template(self, template_id: object) -> float: ...


class EventsChannel:
    """One call's ``events`` channel. Until the caller has opened it, events sent are dropped."""

    def __init__(
        self,
        session_id: str,
        requests: ChannelRequests,
        emit: Callable[[dict[str, Any]], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        pings_per_second: float,
    ) -> None:
        self._session_id = session_id
        self._requests = requests
        # The channel's own events (greeting, pongs, errors) go out the way every session event does,
        # through ``emit``: the metrics count them and a state event wakes whoever waits on the state.
        self._emit = emit
        # Work a message starts can outlive the message (a template switch): the session owns the task.
        self._spawn = spawn
        self.channel: RTCDataChannel | None = None
        self._bad_message_times: deque[float] = deque(maxlen=10)
        self.bad_messages_unanswered = 0
        self._ping_budget = PingBudget(pings_per_second)
        self.pings_dropped = 0

    def on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_CHANNEL:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("open", lambda: self._greet())
        if channel.readyState == "open":
            self._greet()

    def send(self, event: dict[str, Any]) -> None:
        """Put ``event`` on the wire if the channel is open (``emit`` is the way in for everything else)."""
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(event))

    def _greet(self) -> None:
        self._emit(self._requests.hello())
        self._emit({"type": "state", "state": self._requests.state})

    def _on_message(self, message: str | bytes) -> None:
        # Runs inside aiortc's receive loop: an exception escaping here would end the data channel
        # for good, so nothing a caller sends may raise out of it.
        try:
            self._handle_message(message)
        except SessionError as error:
            self._report_bad_message(str(error))
        except Exception:
            log.exception("session %s: a data-channel message failed", self._session_id)
            self._report_bad_message("the message could not be handled")

    def _handle_message(self, message: str | bytes) -> None:
        try:
            data = parse_json(message, max_bytes=MAX_MESSAGE_BYTES)
        except JsonInputError as error:
            raise SessionError(f"message refused: {error}") from None
        if not isinstance(data, dict):
            raise SessionError("message must be a JSON object")
        kind = data.get("type")
        requests = self._requests
        if kind == "say":
            requests.say(data.get("text"))
        elif kind == "chat":
            requests.chat(data.get("text"))
        elif kind == "interrupt":
            requests.interrupt()
        elif kind == "select_template":
            self._spawn(self._select_and_report(data.get("id")))
        elif kind == "ping":
            if self._ping_budget.take(time.monotonic()):
                sent_at = data.get("t")
                self._emit({"type": "pong", "t": sent_at if isinstance(sent_at, int | float) else None})
            else:
                self.pings_dropped += 1
        else:
            raise SessionError(f"unknown message type {kind!r}")

    def _report_bad_message(self, message: str) -> None:
        # A client flooding the channel with garbage gets a few error events a second, not one per
        # message: answering each would cost this call (and every other) its frame pacing.
        now = time.monotonic()
        recent = self._bad_message_times
        if len(recent) == recent.maxlen and now - recent[0] < 1.0:
            self.bad_messages_unanswered += 1
            return
        recent.append(now)
        self._emit({"type": "error", "message": message})

    async def _select_and_report(self, template_id: object) -> None:
        try:
            await self._requests.select_template(template_id)
        except SessionError as error:
            self._emit({"type": "error", "message": str(error)})
