"""Which avatar a call shows: the renderer open on its template and the pump that moves the renderer's
frames into the playout, a switch to another template mid-call, and the background completion of a
template that lacks the renderer's data."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.template import Template
from avatar_rtc.conversation.asr import SpeechRecognizer
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.conversation.turn import Conversation
from avatar_rtc.media import executors
from avatar_rtc.media.playout import Playout
from avatar_rtc.render.base import EventSink, Renderer, RendererEngine
from avatar_rtc.rtc.errors import SessionError

log = logging.getLogger(__name__)

# language -> (TTS, ASR or None, why there is no ASR): the speech engines for a language other than the
# server's, which a template may ask for.
SpeechForLanguage = Callable[[str], tuple[TextToSpeech, SpeechRecognizer | None, str]]


def open_renderer(
    engine: RendererEngine, template: Template, media_clock: Callable[[], float], emit: EventSink
) -> Renderer:
    renderer = engine.open(template)
    # A renderer that batches across sessions (MuseTalk) schedules by this call's media clock and
    # reports its quality level on the data channel.
    renderer.attach(media_clock, emit)
    return renderer


class TemplateSwitcher:
    """One call's template and the renderer showing it. The template (``template_id``) is acquired
    (pinned) in the library; whoever holds the switcher releases the last one when the call ends."""

    def __init__(
        self,
        *,
        session_id: str,
        template: Template,
        renderer: Renderer,
        language: str,
        engine: RendererEngine,
        library: TemplateLibrary,
        playout: Playout,
        conversation: Conversation,
        media_clock: Callable[[], float],
        emit: EventSink,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        state_changed: asyncio.Event,
        default_language: str,
        speech_for_language: SpeechForLanguage | None,
    ) -> None:
        self.template_id = template.id
        self.renderer = renderer
        self.language = language
        self._session_id = session_id
        self._engine = engine
        self._library = library
        self._playout = playout
        self._conversation = conversation
        self._media_clock = media_clock
        self._emit = emit
        # The tasks outlive a switch (the pump, a completion): the session owns them and ends them.
        self._spawn = spawn
        self._state_changed = state_changed  # set on every conversation state event
        self._default_language = default_language
        self._speech_for_language = speech_for_language
        # A template prepared before the renderer was enabled lacks its data: the call starts on the
        # engine's light renderer and the data is completed in the background (see _complete_template).
        self._incomplete_template: str | None = template.id if library.needs_extras(template) else None
        self._pump_task: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()

    def start_pump(self) -> None:
        """Start moving the renderer's frames into the playout (once the call is answered)."""
        self._pump_task = self._spawn(self._pump_frames(self.renderer))

    def complete_in_background(self) -> None:
        """Start completing the call's first template if it lacks the renderer's data."""
        if self._incomplete_template is not None:
            self._spawn(self._complete_template(self._incomplete_template))

    def _open_renderer(self, template: Template) -> Renderer:
        return open_renderer(self._engine, template, self._media_clock, self._emit)

    async def _pump_frames(self, renderer: Renderer) -> None:
        while True:
            try:
                async for frame in renderer.frames():
                    await self._playout.put_frame(frame.index, frame.image)
                return
            except Exception as error:
                # A renderer that fails mid-utterance costs that utterance its mouth movement, not the
                # call: speech goes on over repeated frames, and the next utterance renders afresh.
                log.exception("session %s: renderer failed", self._session_id)
                self._emit({"type": "error", "message": f"rendering failed: {error}"})
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
                self._emit(
                    {"type": "template", "id": template_id, "switch_ms": 0.0, "language": self.language}
                )
                return 0.0
            try:
                template = await self._library.acquire_async(template_id)
            except LookupError:
                raise SessionError(f"no template {template_id!r}") from None
            except Exception as error:  # corrupt cache, over the RAM budget, ...
                raise SessionError(f"template {template_id!r} cannot be used: {error}") from None
            try:
                # Loading the renderer's device data (MuseTalk latents) is blocking work: off the loop.
                await executors.run_media(self._engine.warm, template)
                info = self._library.info(template_id)
                language = info.language or self._default_language
                speech = None
                if language != self.language and self._speech_for_language is not None:
                    speech = await executors.run_media(self._speech_for_language, language)
                renderer = self._open_renderer(template)
            except Exception:
                self._library.release(template_id)
                raise
            self._conversation.interrupt()
            if speech is not None:
                self._conversation.set_speech_engines(*speech, language=language)
                self.language = language
                # The model is told the call's language, and judged by it before its replies are kept.
                self._conversation.history.language = language
            old_id = self.template_id
            self.template_id = template_id
            await self._install_renderer(renderer, template)
            self._library.release(old_id)
            if self._library.needs_extras(template):
                self._spawn(self._complete_template(template_id))
            switch_ms = round((time.monotonic() - started) * 1000, 1)
            self._emit(
                {"type": "template", "id": template_id, "switch_ms": switch_ms, "language": self.language}
            )
            if info.welcome:
                self._conversation.say(info.welcome)
            return switch_ms

    async def _install_renderer(self, renderer: Renderer, template: Template) -> None:
        """Show ``template`` through ``renderer`` from the next frame on; the old renderer is closed."""
        old_renderer, old_pump = self.renderer, self._pump_task
        self.renderer = renderer
        self._conversation.set_renderer(renderer)
        # From the next video frame on, idle frames come from the new template.
        self._playout.set_template(template)
        self._pump_task = self._spawn(self._pump_frames(renderer))
        if old_pump is not None:
            old_pump.cancel()
        await old_renderer.aclose()

    async def _complete_template(self, template_id: str) -> None:
        """Have the library compute the renderer's data this template lacks (on its own thread, cached
        for every later call), reporting progress as ``template_data`` events; then move this call from
        the light renderer to the real one at the next moment the avatar is not speaking."""
        loop = asyncio.get_running_loop()
        engine = self._engine
        last_tenth = -1

        def report(done: int, total: int) -> None:  # on the loop
            nonlocal last_tenth
            tenth = 10 * done // max(total, 1)
            if tenth != last_tenth:  # a few events, not one per frame
                last_tenth = tenth
                self._emit(
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
            self._session_id,
            template_id,
            engine.name,
        )
        try:
            template = await self._library.complete_extras_async(template_id, progress)
            # Switching mid-sentence would drop the sentence's frames: wait for the avatar to finish.
            while self.template_id == template_id and self._conversation.state == "speaking":
                self._state_changed.clear()
                await self._state_changed.wait()
            async with self._switch_lock:
                if self.template_id != template_id:
                    return  # the caller switched away meanwhile
                await executors.run_media(engine.warm, template)
                await self._install_renderer(self._open_renderer(template), template)
        except Exception as error:
            log.exception("session %s: completing template %r failed", self._session_id, template_id)
            self._emit(
                {
                    "type": "template_data",
                    "id": template_id,
                    "renderer": engine.name,
                    "state": "failed",
                    "message": str(error),
                }
            )
            return
        self._emit({"type": "template_data", "id": template_id, "renderer": engine.name, "state": "ready"})
