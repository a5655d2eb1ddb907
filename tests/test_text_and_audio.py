"""Sentence chunking (English and Chinese) and PCM resampling with av."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_rtc.conversation.audio import resample_pcm
from avatar_rtc.conversation.phonemes import SpeechChunk, TimedPhoneme
from avatar_rtc.conversation.sentences import RunOnChunk, SentenceChunker, split_sentences
from avatar_rtc.conversation.speaker import without_trailing_pause


def test_english_sentences_split_on_punctuation_but_not_abbreviations_or_numbers() -> None:
    text = "Hello there! Dr. Smith paid 3.5 dollars, e.g. a lot. Really? Yes."
    assert split_sentences(text) == [
        "Hello there!",
        "Dr. Smith paid 3.5 dollars, e.g. a lot.",
        "Really?",
        "Yes.",
    ]


def test_chinese_sentences() -> None:
    assert split_sentences("你好！今天天气很好。我们去公园吧？") == [
        "你好！",
        "今天天气很好。",
        "我们去公园吧？",
    ]


def test_streaming_chunker_emits_a_sentence_as_soon_as_it_is_complete() -> None:
    chunker = SentenceChunker()
    assert chunker.push("The sky is") == []
    assert chunker.push(" blue. It") == ["The sky is blue."]
    assert chunker.push(" costs 3.") == []  # could be 3.5: wait for more
    assert chunker.push("5 euros") == []
    assert chunker.flush() == ["It costs 3.5 euros"]


def test_run_on_text_is_cut_at_a_comma() -> None:
    chunker = SentenceChunker(max_chars=40)
    out = chunker.push("one two three four five, six seven eight nine ten eleven twelve")
    assert out == ["one two three four five,"]


@pytest.mark.parametrize(("src", "dst"), [(22050, 48000), (22050, 16000), (48000, 16000), (16000, 16000)])
def test_resample_keeps_length_and_pitch(src: int, dst: int) -> None:
    t = np.arange(int(src * 0.5)) / src
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    out = resample_pcm(tone, src, dst)
    assert len(out) == round(len(tone) * dst / src)
    spectrum = np.abs(np.fft.rfft(out[dst // 10 : dst // 10 + dst // 4].astype(np.float64)))
    peak_hz = np.argmax(spectrum) * dst / (dst // 4)
    assert abs(peak_hz - 440) < 8


def test_first_clause_is_cut_early_only_once() -> None:
    chunker = SentenceChunker(first_clause_chars=20)
    out = chunker.push("Well, the sky on a clear summer day, as you know, is blue. Later, it")
    assert out == ["Well, the sky on a clear summer day,", "as you know, is blue."]
    assert chunker.push(" turns orange, then red, then dark. ") == [
        "Later, it turns orange, then red, then dark."
    ]


def test_the_first_chunk_ends_after_its_words_when_no_comma_comes() -> None:
    chunker = SentenceChunker(first_clause_chars=16, first_chunk_words=5)
    said: list[str] = []
    for token in "The sky is usually blue on a clear day. It is lovely, really.".split(" "):
        said += chunker.push(token + " ")
    said += chunker.flush()
    # Only the first chunk is cut by its words; it is one the speaker runs on from without a pause.
    assert said == ["The sky is usually blue", "on a clear day.", "It is lovely, really."]
    assert [isinstance(chunk, RunOnChunk) for chunk in said] == [True, False, False]
    # A short first sentence ends at its full stop as before.
    chunker = SentenceChunker(first_clause_chars=16, first_chunk_words=5)
    assert chunker.push("Paris. It is in France. ") == ["Paris.", "It is in France."]


def test_a_chunk_that_runs_on_loses_the_pause_the_tts_ends_it_with() -> None:
    rate = 22050
    sound = (np.sin(np.arange(rate // 2) * 0.2) * 8000).astype(np.int16)
    pause = np.zeros(rate // 4, np.int16)
    phonemes = (
        TimedPhoneme("b", 0.0, 0.3),
        TimedPhoneme("u", 0.3, 0.5),
        TimedPhoneme(".", 0.5, 0.75),
    )
    cut = without_trailing_pause(SpeechChunk(np.concatenate([sound, pause]), phonemes), rate)
    assert len(cut.pcm) == pytest.approx(len(sound) + 0.03 * rate, abs=rate // 100)
    assert cut.phonemes is not None and cut.phonemes[-1].end_s <= len(cut.pcm) / rate
    quiet = SpeechChunk(np.zeros(rate // 2, np.int16))
    assert without_trailing_pause(quiet, rate) is quiet  # nothing said: nothing to cut to
