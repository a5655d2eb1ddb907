"""A receiving peer (aiortc) that records arrival times of audio and video, as a caller would see them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_rtc.rtc.ice import host_candidates

# Test and benchmark callers talk to 127.0.0.1 only (see the shared README on WebRTC tests).
LOOPBACK = ("127.0.0.1",)

FrameProbe = Callable[[np.ndarray], float]


@dataclass
class Received:
    audio_arrival: list[float] = field(default_factory=list)
    audio_pts: list[int] = field(default_factory=list)
    audio_pcm: list[np.ndarray] = field(default_factory=list)  # mono int16 per frame
    audio_rate: int = 48000
    video_arrival: list[float] = field(default_factory=list)
    video_pts: list[int] = field(default_factory=list)
    video_probe: list[float] = field(default_factory=list)
    video_size: tuple[int, int] | None = None
    snapshots: list[tuple[float, np.ndarray]] = field(default_factory=list)

    def audio(self) -> np.ndarray:
        return np.concatenate(self.audio_pcm) if self.audio_pcm else np.zeros(0, np.int16)


class CallReceiver:
    """Joins a call as the browser would (data channel ``events`` created before the offer) and
    records everything that arrives. ``probe`` maps each decoded BGR frame to one number."""

    def __init__(
        self,
        probe: FrameProbe | None = None,
        keep_snapshots: Callable[[float], bool] | None = None,
        mic: MediaStreamTrack | None = None,
        host_addresses: tuple[str, ...] = LOOPBACK,
        configuration: RTCConfiguration | None = None,
    ):
        self.host_addresses = host_addresses
        # No ICE servers unless a test brings its own (a TURN server on loopback, say).
        self.pc = RTCPeerConnection(configuration or RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("events")
        if mic is not None:
            self.pc.addTransceiver(mic, direction="sendrecv")
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.received = Received()
        self.events: list[dict[str, Any]] = []
        self.event_times: list[float] = []
        self.session_id: str | None = None
        # The /offer answer's proof of ownership, wanted by /api/sessions/{id}/... routes.
        self.session_key: str | None = None
        self._probe = probe
        self._keep_snapshot = keep_snapshots
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = asyncio.Event()
        self._event_arrived = asyncio.Event()
        self.channel.on("open", self._opened.set)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def _on_message(self, message: str | bytes) -> None:
        self.events.append(json.loads(message))
        self.event_times.append(time.monotonic())
        self._event_arrived.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        reader = self._read_audio if track.kind == "audio" else self._read_video
        self._tasks.append(asyncio.ensure_future(reader(track)))

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        rec = self.received
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
                rec.audio_rate = frame.sample_rate
                rec.audio_arrival.append(now)
                rec.audio_pts.append(int(frame.pts))
                rec.audio_pcm.append(samples.mean(axis=1).astype(np.int16))

    async def _read_video(self, track: MediaStreamTrack) -> None:
        rec = self.received
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                rec.video_arrival.append(now)
                rec.video_pts.append(int(frame.pts))
                rec.video_size = (frame.width, frame.height)
                if self._probe is not None or self._keep_snapshot is not None:
                    image = frame.to_ndarray(format="bgr24")
                    if self._probe is not None:
                        rec.video_probe.append(self._probe(image))
                    if self._keep_snapshot is not None and self._keep_snapshot(now):
                        rec.snapshots.append((now, image))

    async def make_offer(self) -> RTCSessionDescription:
        """This caller's offer, its ICE candidates gathered on ``host_addresses`` only."""
        with host_candidates(self.host_addresses):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription

    async def connect(self, answer_for: Callable[[RTCSessionDescription], Awaitable[dict[str, Any]]]) -> None:
        reply = await answer_for(await self.make_offer())
        self.session_id = reply.get("session_id")
        self.session_key = reply.get("session_key")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type=reply["type"]))
        await asyncio.wait_for(self._opened.wait(), 10)

    async def connect_http(self, base_url: str, http: aiohttp.ClientSession) -> None:
        async def post(offer: RTCSessionDescription) -> dict[str, Any]:
            async with http.post(f"{base_url}/offer", json={"sdp": offer.sdp, "type": offer.type}) as resp:
                resp.raise_for_status()
                return await resp.json()

        await self.connect(post)

    async def join(self, base_url: str) -> dict[str, Any]:
        """Connect to the server at ``base_url`` and return its ``hello`` event."""
        async with aiohttp.ClientSession() as http:
            await self.connect_http(base_url, http)
        return await self.wait_event(lambda e: e["type"] == "hello")

    @property
    def session_headers(self) -> dict[str, str]:
        """Headers for this call's /api/sessions/{id}/... routes."""
        return {"X-Session-Key": self.session_key or ""}

    def send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message))

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], wait_s: float = 10, after: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``after`` on (already received or arriving within ``wait_s``)
        that matches."""
        deadline = time.monotonic() + wait_s
        seen = after
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching event; got {self.events}")
            self._event_arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_arrived.wait(), remaining)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def is_final_answer(event: dict[str, Any]) -> bool:
    """The assistant's final transcript of a turn: what the caller heard of the answer."""
    return event["type"] == "transcript" and event["role"] == "assistant" and event["final"]
