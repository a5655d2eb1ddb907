"""TTS back-ends: piper (the shipped voice) and the espeak-ng fallback, and how settings pick one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avatar_rtc.config import Settings
from avatar_rtc.conversation.tts import EspeakTTS, PiperTTS, TextToSpeech, espeak_voice
from avatar_rtc.wiring import build_tts


async def _speech(tts: TextToSpeech, text: str) -> np.ndarray:
    return np.concatenate([chunk async for chunk in tts.synthesize(text)])


async def test_piper_speaks_a_sentence(piper_tts: TextToSpeech) -> None:
    pcm = await _speech(piper_tts, "Good morning, how are you?")
    seconds = len(pcm) / piper_tts.sample_rate
    assert 1.0 < seconds < 4.0
    assert np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 500


async def test_espeak_fallback_speaks() -> None:
    tts = EspeakTTS("en-us")
    pcm = await _speech(tts, "Hello world.")
    assert tts.sample_rate == 22050
    assert len(pcm) > 0.5 * tts.sample_rate
    assert np.abs(pcm).max() > 3000


def test_settings_pick_the_engine(tmp_path: Path) -> None:
    assert isinstance(build_tts(Settings()), PiperTTS)
    assert isinstance(build_tts(Settings(tts={"engine": "espeak"})), EspeakTTS)
    # A configured voice that is not there falls back to espeak-ng rather than failing the server.
    missing = Settings(tts={"engine": "piper", "piper_voice": tmp_path / "nope.onnx"})
    assert isinstance(build_tts(missing), EspeakTTS)


def test_language_picks_the_voice(tmp_path: Path) -> None:
    from avatar_rtc.conversation.tts import find_piper_voice

    (tmp_path / "piper").mkdir()
    for name in ("en_GB-alan-low.onnx", "zh_CN-huayan-medium.onnx"):
        (tmp_path / "piper" / name).write_bytes(b"")
    assert find_piper_voice(tmp_path, "zh") == tmp_path / "piper" / "zh_CN-huayan-medium.onnx"
    assert find_piper_voice(tmp_path / "elsewhere", "zh") is None
    assert find_piper_voice(tmp_path, "en").name == "en_US-joe-medium.onnx"  # the packaged voice first
    # No Mandarin piper voice: Mandarin through espeak-ng's Mandarin voice rather than English.
    tts = build_tts(Settings(conversation={"language": "zh"}, tts={"models_dir": tmp_path / "elsewhere"}))
    assert isinstance(tts, EspeakTTS) and tts._voice == espeak_voice("zh")
    assert espeak_voice("zh") in ("cmn-latn-pinyin", "cmn")


def test_espeak_mandarin_reads_characters_as_mandarin_not_english() -> None:
    # Debian's espeak-ng turns characters into tone-numbered pinyin; its plain "cmn" voice then reads
    # those Latin letters as English ("(en)nI55Tr'i:55": "ni three"). The chosen voice must not.
    import subprocess

    command = ["espeak-ng", "-q", "-x", "-v", espeak_voice("zh"), "你好"]
    phonemes = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "(en)" not in phonemes, phonemes


async def test_mandarin_fallback_voice_speaks() -> None:
    pcm = await _speech(EspeakTTS(espeak_voice("zh")), "你好，今天天气很好。")
    assert len(pcm) > 22050 * 0.8


def test_mandarin_without_a_multilingual_whisper_disables_voice_input_with_a_reason(tmp_path: Path) -> None:
    from avatar_rtc.wiring import build_asr

    asr, reason = build_asr(Settings(conversation={"language": "zh"}, asr={"models_dir": tmp_path}))
    assert asr is None
    assert "multilingual" in reason and "download_models.py" in reason
