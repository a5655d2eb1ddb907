"""One caller: a peer connection, its media clock and playout, its data channel, its speech."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_rtc import metrics
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.template import Template
from avatar_rtc.bounded_json import JsonInputError, parse_json
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
from avatar_rtc.rtc.encoders import Vp8Tuning, use_h264_encoder
from avatar_rtc.rtc.ice import host_candidates
from avatar_rtc.rtc.recorder import SessionRecorder
from avatar_rtc.rtc.tracks import AvatarAudioTrack, AvatarVideoTrack

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "events"
MAX_MESSAGE_BYTES = 64 * 1024


class SessionError(ValueError):
    """A request the session refuses; the message is safe to show the caller."""


class TextTooLongError(SessionError):
    pass


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
    speech_for_language: Callable[[str], tuple[TextToSpeech, SpeechRecognizer | None, str]] | None = None


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
        self.language = deps.settings.conversation.language
        self.template_id = template.id  # acquired (pinned) in the library by whoever made the session
        self._state_changed = asyncio.Event()  # set on every conversation state event
        self.renderer = self._open_renderer(template)
        # A template prepared before the renderer was enabled lacks its data: the call starts on the
        # engine's light renderer and the data is completed in the background (see _complete_template).
        self._incomplete_template: str | None = template.id if library.needs_extras(template) else None
        self._pump_task: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        talk = deps.settings.conversation
        self.conversation = Conversation(
            speaker=Speaker(
                deps.tts, self.playout, self.renderer, stall_timeout_s=talk.stage_timeout_s, session=self.id
            ),
            playout=self.playout,
            renderer=self.renderer,
            history=ConversationHistory(
                talk.system_prompt, talk.history_turns, talk.history_chars, language=self.language
            ),
            emit=self.send_event,
            llm=deps.llm,
            asr=deps.asr,
            vad=VoiceActivitySegmenter(talk.vad),
            echo_guard=EchoGuard(max_spread_db=talk.echo_max_spread_db),
            llm_unavailable=deps.llm_unavailable,
            asr_unavailable=deps.asr_unavailable,
            first_clause_chars=talk.first_clause_chars,
            barge_in_confirm_s=talk.barge_in_confirm_ms / 1000,
            speculative_asr_pause_s=talk.early_asr_pause_ms / 1000,
            stage_timeout_s=talk.stage_timeout_s,
            language=self.language,
            session=self.id,
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
        self.channel: RTCDataChannel | None = None
        self._bad_message_times: deque[float] = deque(maxlen=10)
        self.bad_messages_unanswered = 0
        self._ping_budget = PingBudget(deps.settings.limits.pings_per_second)
        self.pings_dropped = 0
        self._connected = asyncio.Event()
        self._on_closed = on_closed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing: asyncio.Future[None] | None = None
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

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
        self._pump_task = self._spawn(self._pump_frames(self.renderer))
        self._spawn(self._watch_connection())
        self.conversation.start()
        if self._incomplete_template is not None:
            self._spawn(self._complete_template(self._incomplete_template))
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

    def stats(self) -> dict[str, Any]:
        playout = self.playout.stats
        lateness = sorted(playout.video_send_lateness)

        def pct(q: float) -> float | None:
            return (
                round(lateness[min(len(lateness) - 1, int(q * len(lateness)))] * 1000, 2)
                if lateness
                else None
            )

        return {
            "session_id": self.id,
            "state": self.state,
            "media_time_s": round(self.clock.now(), 3),
            "frames_sent": playout.frames_sent,
            "frames_rendered": playout.frames_rendered,
            "frames_idle": playout.frames_idle,
            "frames_late": playout.frames_late,
            "frames_dropped": playout.frames_dropped,
            "audio_frames_sent": playout.audio_frames_sent,
            "send_lateness_ms_p50": pct(0.5),
            "send_lateness_ms_p99": pct(0.99),
            "output_size": list(self.video_source.output_size),
            "video_quality": self.video_source.quality_level,
            "video_encoder": self.video_encoder,
        }

    def send_event(self, event: dict[str, Any]) -> None:
        metrics.observe_event(event)
        if event.get("type") == "state":
            self._state_changed.set()
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps(event))

    # -- loops ----------------------------------------------------------------------------------
    def _open_renderer(self, template: Template) -> Renderer:
        renderer = self.deps.renderer.open(template)
        # A renderer that batches across sessions (MuseTalk) schedules by this call's media clock and
        # reports its quality level on the data channel.
        renderer.attach(self.clock.now, self.send_event)
        return renderer

    async def _pump_frames(self, renderer: Renderer) -> None:
        while True:
            try:
                async for frame in renderer.frames():
                    await self.playout.put_frame(frame.index, frame.image)
                return
            except Exception as error:
                # A renderer that fails mid-utterance costs that utterance its mouth movement, not the
                # call: speech goes on over repeated frames, and the next utterance renders afresh.
                log.exception("session %s: renderer failed", self.id)
                self.send_event({"type": "error", "message": f"rendering failed: {error}"})
                renderer.clear()

    async def select_template(self, template_id: object) -> float:
        """Switch this call to another avatar; returns how long the switch took (ms).

        The new template is pinned in the library (from RAM when warm, else loaded off the event
        loop) before anything changes, so a failed load leaves the call as it was. Speech in progress
        stops: it belongs to the old face.
        """
        if not isinstance(template_id, str) or not template_id:
            raise SessionError("select_template needs an 'id'")
        async with self._switch_lock:
            started = time.monotonic()
            if template_id == self.template_id:
                self.send_event(
                    {"type": "template", "id": template_id, "switch_ms": 0.0, "language": self.language}
                )
                return 0.0
            try:
                template = await self.library.acquire_async(template_id)
            except LookupError:
                raise SessionError(f"no template {template_id!r}") from None
            except Exception as error:  # corrupt cache, over the RAM budget, ...
                raise SessionError(f"template {template_id!r} cannot be used: {error}") from None
            try:
                # Loading the renderer's device data (MuseTalk latents) is blocking work: off the loop.
                await executors.run_media(self.deps.renderer.warm, template)
                info = self.library.info(template_id)
                language = info.language or self.deps.settings.conversation.language
                speech = None
                if language != self.language and self.deps.speech_for_language is not None:
                    speech = await executors.run_media(self.deps.speech_for_language, language)
                renderer = self._open_renderer(template)
            except Exception:
                self.library.release(template_id)
                raise
            self.conversation.interrupt()
            if speech is not None:
                self.conversation.set_speech_engines(*speech, language=language)
                self.language = language
                # The model is told the call's language, and judged by it before its replies are kept.
                self.conversation.history.language = language
            old_id = self.template_id
            self.template_id = template_id
            await self._install_renderer(renderer, template)
            self.library.release(old_id)
            if self.library.needs_extras(template):
                self._spawn(self._complete_template(template_id))
            switch_ms = round((time.monotonic() - started) * 1000, 1)
            self.send_event(
                {"type": "template", "id": template_id, "switch_ms": switch_ms, "language": self.language}
            )
            if info.welcome:
                self.conversation.say(info.welcome)
            return switch_ms

    async def _install_renderer(self, renderer: Renderer, template: Template) -> None:
        """Show ``template`` through ``renderer`` from the next frame on; the old renderer is closed."""
        old_renderer, old_pump = self.renderer, self._pump_task
        self.renderer = renderer
        self.conversation.set_renderer(renderer)
        # From the next video frame on, idle frames come from the new template.
        self.playout.set_template(template)
        self._pump_task = self._spawn(self._pump_frames(renderer))
        if old_pump is not None:
            old_pump.cancel()
        await old_renderer.aclose()

    async def _complete_template(self, template_id: str) -> None:
        """Have the library compute the renderer's data this template lacks (on its own thread, cached
        for every later call), reporting progress as ``template_data`` events; then move this call from
        the light renderer to the real one at the next moment the avatar is not speaking."""
        loop = asyncio.get_running_loop()
        engine = self.deps.renderer
        last_tenth = -1

        def report(done: int, total: int) -> None:  # on the loop
            nonlocal last_tenth
            tenth = 10 * done // max(total, 1)
            if tenth != last_tenth:  # a few events, not one per frame
                last_tenth = tenth
                self.send_event(
                    {
                        "type": "template_data",
                        "id": template_id,
                        "renderer": engine.name,
                        "state": "preparing",
                        "done": done,
                        "total": total,
                    }
                )

        def progress(done: int, total: int) -> None:  # on the library's extras thread
            loop.call_soon_threadsafe(report, done, total)

        log.info(
            "session %s: template %r lacks %s data; computing it in the background",
            self.id,
            template_id,
            engine.name,
        )
        try:
            template = await self.library.complete_extras_async(template_id, progress)
            # Switching mid-sentence would drop the sentence's frames: wait for the avatar to finish.
            while self.template_id == template_id and self.state == "speaking":
                self._state_changed.clear()
                await self._state_changed.wait()
            async with self._switch_lock:
                if self.template_id != template_id:
                    return  # the caller switched away meanwhile
                await executors.run_media(engine.warm, template)
                await self._install_renderer(self._open_renderer(template), template)
        except Exception as error:
            log.exception("session %s: completing template %r failed", self.id, template_id)
            self.send_event(
                {
                    "type": "template_data",
                    "id": template_id,
                    "renderer": engine.name,
                    "state": "failed",
                    "message": str(error),
                }
            )
            return
        self.send_event(
            {"type": "template_data", "id": template_id, "renderer": engine.name, "state": "ready"}
        )

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
    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_CHANNEL:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        channel.on("open", lambda: self._greet())
        if channel.readyState == "open":
            self._greet()

    def _greet(self) -> None:
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
        self.send_event(hello)
        self.send_event({"type": "state", "state": self.state})

    def _on_message(self, message: str | bytes) -> None:
        # Runs inside aiortc's receive loop: an exception escaping here would end the data channel
        # for good, so nothing a caller sends may raise out of it.
        try:
            self._handle_message(message)
        except SessionError as error:
            self._report_bad_message(str(error))
        except Exception:
            log.exception("session %s: a data-channel message failed", self.id)
            self._report_bad_message("the message could not be handled")

    def _handle_message(self, message: str | bytes) -> None:
        try:
            data = parse_json(message, max_bytes=MAX_MESSAGE_BYTES)
        except JsonInputError as error:
            raise SessionError(f"message refused: {error}") from None
        if not isinstance(data, dict):
            raise SessionError("message must be a JSON object")
        kind = data.get("type")
        if kind == "say":
            self.say(data.get("text"))
        elif kind == "chat":
            self.chat(data.get("text"))
        elif kind == "interrupt":
            self.interrupt()
        elif kind == "select_template":
            self._spawn(self._select_and_report(data.get("id")))
        elif kind == "ping":
            if self._ping_budget.take(time.monotonic()):
                sent_at = data.get("t")
                self.send_event({"type": "pong", "t": sent_at if isinstance(sent_at, int | float) else None})
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
        self.send_event({"type": "error", "message": message})

    async def _select_and_report(self, template_id: object) -> None:
        try:
            await self.select_template(template_id)
        except SessionError as error:
            self.send_event({"type": "error", "message": str(error)})

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._listen(track))

    async def _on_connection_state(self) -> None:
        if self.pc.connectionState == "connected":
            self._connected.set()
        if self.pc.connectionState in ("failed", "closed"):
            await self.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
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
