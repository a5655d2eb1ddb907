"""Spoken test clips made on the spot with espeak-ng (Debian package), at 48 kHz as a microphone sends."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np

from avatar_rtc.conversation.audio import resample_pcm


def spoken_clip(
    text: str, voice: str = "en-us", rate: int = 48000, words_per_minute: int = 160
) -> np.ndarray:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    wav_bytes = subprocess.run(
        [binary, "-v", voice, "-s", str(words_per_minute), "--stdout", "--", text],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(wav_bytes)) as wav:
        source_rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    return resample_pcm(pcm, source_rate, rate)
