"""One caller: a peer connection, its media clock and playout, its speech. The jobs beside the peer
connection's are composed here: the ``events`` channel protocol (``data_channel``), the template and renderer
the call shows (``template_switch``) and what it reports (``stats``)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_rtc import metrics
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.conversation.asr import SpeechRecognizer
from avatar_rtc.conversation.echo import EchoGuard
from avatar_rtc.conversation.llm import ConversationHistory, LanguageModel
from avatar_rtc.conversation.speaker import Speaker
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.conversation.turn import Conversation, ConversationError, Turn
from avatar_rtc.conversation.vad import MicResampler, VoiceActivitySegmenter
from avatar_rtc.media import executors
from avatar_rtc.media.clock import MediaClock, RemoteTimeline
from avatar_rtc.media.playout import Playout
from avatar_rtc.render.base import Renderer, RendererEngine
from avatar_rtc.rtc.data_channel import EVENTS_CHANNEL, MAX_MESSAGE_BYTES, EventsChannel, PingBudget
from avatar_rtc.rtc.encoders import Vp8Tuning, use_h264_encoder
from avatar_rtc.rtc.errors import SessionError, TextTooLongError
from avatar_rtc.rtc.ice import host_candidates
from avatar_rtc.rtc.recorder import SessionRecorder
from avatar_rtc.rtc.stats import session_stats
from avatar_rtc.rtc.template_switch import SpeechForLanguage, TemplateSwitcher, open_renderer
from avatar_rtc.rtc.tracks import AvatarAudioTrack, AvatarVideoTrack

# What callers have always imported from here, wherever it is defined now.
__all__ = [
    "EVENTS_CHANNEL",
    "MAX_MESSAGE_BYTES",
    "PingBudget",
    "Session",
    "SessionDeps",
    "SessionError",
    "TextTooLongError",
    "rtc_configuration",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionDeps:
    """What every session shares: settings and the process-wide engines. An engine that could not be
    loaded is None, with the reason the caller is told."""

    settings: Settings
    tts: TextToSpeech
    renderer: RendererEngine
    asr: SpeechRecognizer | None = None
    llm: LanguageModel | None = None
    asr_unavailable: str = ""
    llm_unavailable: str = ""
    # Speech engines for a language other than the server's (a template may ask for one):
    # language -> (TTS, ASR or None, why there is no ASR). Built on first use, shared.
    speech_for_language: SpeechForLanguage | None = None


def rtc_configuration(settings: Settings) -> RTCConfiguration:
    # A TURN server listed without credentials is one whose credentials are minted per page from a shared
    # secret (security.turn_secret): it is for the callers; the server's own connections skip it.
    servers = [
        RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
        for s in settings.ice_servers
        if s.username or not any(url.startswith(("turn:", "turns:")) for url in s.urls)
    ]
    # An explicit (possibly empty) list: with None aiortc would fall back to a public STUN server.
    return RTCConfiguration(iceServers=servers)


class Session:
    def __init__(
        self,
        deps: SessionDeps,
        template: Template,
        library: TemplateLibrary,
        on_closed: Callable[[Session], None],
        record: bool = False,
    ) -> None:
        cluster = deps.settings.cluster
        # In a cluster the id starts with the node's name: the front door routes every
        # /api/sessions/<id>/... request to the node that holds the call by that prefix alone.
        node_prefix = f"{cluster.node_id}." if cluster.enabled else ""
        self.id = node_prefix + secrets.token_urlsafe(9)
        # The caller's proof of ownership: only the /offer answer carries it, and every HTTP route
        # scoped to this session wants it back (the id alone is visible in logs and events).
        self.key = secrets.token_urlsafe(24)
        # Why the server closed the call on its own (connect_timeout, media_timeout), if it did.
        self.reaped_reason: str | None = None
        self.deps = deps
        media = deps.settings.media
        self.clock = MediaClock()
        self.playout = Playout(
            self.clock.now,
            template,
            fps=media.fps,
            sample_rate=media.audio_sample_rate,
            lead_s=media.speech_lead_ms / 1000,
            max_ahead_s=media.max_ahead_s,
        )
        self.library = library
        language = deps.settings.conversation.language
        self._state_changed = asyncio.Event()  # set on every conversation state event
        self._tasks: set[asyncio.Task[Any]] = set()
        self.events_channel = EventsChannel(
            self.id,
            requests=self,
            emit=self.send_event,
            spawn=self._spawn,
            pings_per_second=deps.settings.limits.pings_per_second,
        )
        renderer = open_renderer(deps.renderer, template, self.clock.now, self.send_event)
        talk = deps.settings.conversation
        self.conversation = Conversation(
            speaker=Speaker(
                deps.tts, self.playout, renderer, stall_timeout_s=talk.stage_timeout_s, session=self.id
            ),
            playout=self.playout,
            renderer=renderer,
            history=ConversationHistory(
                talk.system_prompt, talk.history_turns, talk.history_chars, language=language
            ),
            emit=self.send_event,
            llm=deps.llm,
            asr=deps.asr,
            vad=VoiceActivitySegmenter(talk.vad),
            echo_guard=EchoGuard(min_correlation=talk.echo_min_correlation),
            llm_unavailable=deps.llm_unavailable,
            asr_unavailable=deps.asr_unavailable,
            first_clause_chars=talk.first_clause_chars,
            first_chunk_words=talk.first_chunk_words,
            barge_in_confirm_s=talk.barge_in_confirm_ms / 1000,
            speculative_asr_pause_s=talk.early_asr_pause_ms / 1000,
            stage_timeout_s=talk.stage_timeout_s,
            language=language,
            session=self.id,
        )
        # The template is acquired (pinned) in the library by whoever made the session.
        self.template_switcher = TemplateSwitcher(
            session_id=self.id,
            template=template,
            renderer=renderer,
            language=language,
            engine=deps.renderer,
            library=library,
            playout=self.playout,
            conversation=self.conversation,
            media_clock=self.clock.now,
            emit=self.send_event,
            spawn=self._spawn,
            state_changed=self._state_changed,
            default_language=talk.language,
            speech_for_language=deps.speech_for_language,
        )
        self.audio_track: MediaStreamTrack = AvatarAudioTrack(self.clock, self.playout, media.audio_frame_ms)
        # The track itself, for its output size and level; video_track may be a recorder's tap on it.
        self.video_source = AvatarVideoTrack(
            self.clock,
            self.playout,
            max_long_side=media.max_output_long_side,
            adaptive=media.adaptive_resolution,
            emit_event=self.send_event,
        )
        self.video_track: MediaStreamTrack = self.video_source
        # What encodes the video: libvpx for VP8; for H.264 known once accept() has picked it.
        self.video_encoder = "libvpx" if media.video_codec == "VP8" else "libx264"
        self.recorder: SessionRecorder | None = None
        if record:
            # What the caller saw and heard: the recorder taps the very frames the tracks send.
            self.recorder = SessionRecorder.for_session(
                self.id, deps.settings.recording, media.fps, media.audio_sample_rate
            )
            self.audio_track = self.recorder.tap(self.audio_track)
            self.video_track = self.recorder.tap(self.video_track)
        self.pc = RTCPeerConnection(rtc_configuration(deps.settings))
        self._connected = asyncio.Event()
        self._on_closed = on_closed
        self._closing: asyncio.Future[None] | None = None
        self.pc.on("datachannel", self.events_channel.on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    # -- what the parts hold ----------------------------------------------------------------------
    @property
    def template_id(self) -> str:
        return self.template_switcher.template_id

    @property
    def renderer(self) -> Renderer:
        return self.template_switcher.renderer

    @property
    def language(self) -> str:
        return self.template_switcher.language

    @property
    def bad_messages_unanswered(self) -> int:
        return self.events_channel.bad_messages_unanswered

    @property
    def pings_dropped(self) -> int:
        return self.events_channel.pings_dropped

    # -- signaling ------------------------------------------------------------------------------
    async def accept(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        media = self.deps.settings.media
        # Before the first frame, when the sender asks for its encoder. The first H.264 call probes
        # NVENC (CUDA start-up): off the event loop.
        chosen = await executors.run_media(
            use_h264_encoder,
            media.hardware_encoder if media.video_codec == "H264" else "off",
            x264_preset=media.x264_preset,
            vp8=Vp8Tuning(media.vp8_cpu_used, media.vp8_noise_sensitivity),
        )
        if media.video_codec == "H264":
            self.video_encoder = chosen
        self.pc.addTrack(self.audio_track)
        video_sender = self.pc.addTrack(self.video_track)
        # Codec preferences only take effect when set before the remote offer is applied.
        wanted = media.video_codec.lower()
        codecs = [
            c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == f"video/{wanted}"
        ]
        for transceiver in self.pc.getTransceivers():
            if transceiver.sender is video_sender and codecs:
                transceiver.setCodecPreferences(codecs)
        await self.pc.setRemoteDescription(offer)
        with host_candidates(self.deps.settings.ice_host_addresses):
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        self.template_switcher.start_pump()
        self._spawn(self._watch_connection())
        self.conversation.start()
        self.template_switcher.complete_in_background()
        return self.pc.localDescription

    def key_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.key.encode())

    # -- reaping ----------------------------------------------------------------------------------
    async def _watch_connection(self) -> None:
        """Close the call if it never connects, or once nothing has arrived from the caller for
        ``media_timeout_s``: a slot held by a peer that is not there is a slot a caller cannot have."""
        limits = self.deps.settings.limits
        try:
            await asyncio.wait_for(self._connected.wait(), limits.connect_timeout_s)
        except TimeoutError:
            self._reap("connect_timeout", f"not connected within {limits.connect_timeout_s:g} s")
            return
        last_count, last_change = -1, time.monotonic()
        interval = min(2.0, limits.media_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            count = await self._packets_received()
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= limits.media_timeout_s:
                self._reap("media_timeout", f"nothing received for {limits.media_timeout_s:g} s")
                return

    async def _packets_received(self) -> int:
        """Packets of any kind (DTLS, RTP, RTCP, data channel) received on this call's transports."""
        report = await self.pc.getStats()
        return sum(stat.packetsReceived for stat in report.values() if stat.type == "transport")

    def _reap(self, reason: str, why: str) -> None:
        log.info("session %s: closing, %s", self.id, why)
        self.reaped_reason = reason
        metrics.session_reaped(reason)
        # Not awaited here: closing cancels this session's tasks, the caller among them.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    # -- requests -------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.conversation.state

    def _checked_text(self, text: object) -> str:
        if not isinstance(text, str) or not text.strip():
            raise SessionError("text must be a non-empty string")
        limit = self.deps.settings.limits.max_text_chars
        if len(text) > limit:
            raise TextTooLongError(f"text is longer than {limit} characters")
        return text.strip()

    def say(self, text: object) -> Turn:
        """Speak ``text`` exactly as given."""
        try:
            return self.conversation.say(self._checked_text(text))
        except ConversationError as error:
            raise SessionError(str(error)) from None

    def chat(self, text: object) -> Turn:
        """Answer ``text`` with the language model, as if the caller had said it."""
        try:
            return self.conversation.chat(self._checked_text(text))
        except ConversationError as error:
            raise SessionError(str(error)) from None

    def interrupt(self) -> None:
        """Stop speaking now: cancel the turn, drop queued text, audio and frames."""
        self.conversation.interrupt()

    async def select_template(self, template_id: object) -> float:
        """Switch this call to another avatar; returns how long the switch took (ms)."""
        return await self.template_switcher.select_template(template_id)

    def stats(self) -> dict[str, Any]:
        return session_stats(
            session_id=self.id,
            state=self.state,
            media_time_s=self.clock.now(),
            playout=self.playout.stats,
            video_source=self.video_source,
            video_encoder=self.video_encoder,
        )

    def send_event(self, event: dict[str, Any]) -> None:
        metrics.observe_event(event)
        if event.get("type") == "state":
            self._state_changed.set()
        self.events_channel.send(event)

    def hello(self) -> dict[str, Any]:
        """The ``hello`` event the events channel greets the caller with."""
        deps = self.deps
        hello: dict[str, Any] = {
            "type": "hello",
            "session_id": self.id,
            "asr": deps.asr is not None,
            "llm": deps.llm is not None,
            "language": self.language,
        }
        if deps.asr is None:
            hello["asr_unavailable"] = deps.asr_unavailable
        if deps.llm is None:
            hello["llm_unavailable"] = deps.llm_unavailable
        hello["renderer"] = deps.renderer.name
        hello["quality"] = self.renderer.quality_level
        # The video's own level (its size under CPU pressure), apart from the renderer's.
        hello["video_quality"] = self.video_source.quality_level
        hello["output_size"] = list(self.video_source.output_size)
        return hello

    # -- loops ----------------------------------------------------------------------------------
    async def _listen(self, track: MediaStreamTrack) -> None:
        """The caller's microphone, resampled to 16 kHz, into VAD (and from there ASR and barge-in)."""
        resampler = MicResampler()
        # Times from the caller's own timestamps, not from when this loop got round to each frame.
        timeline = RemoteTimeline()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                at = timeline.wall_time(frame.time, time.monotonic()) + frame.samples / frame.sample_rate
                self.conversation.hear(resampler.push(frame), at)

    # -- callbacks ------------------------------------------------------------------------------
    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._listen(track))

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task failed", self.id, exc_info=task.exception())

    async def close(self) -> None:
        # Every caller waits for the one close: shutdown must not return while a recording is still
        # being finished.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await self.conversation.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.renderer.aclose()
        self.library.release(self.template_id)
        await self.pc.close()
        if self.recorder is not None:
            await self.recorder.aclose()
        self._on_closed(self)
