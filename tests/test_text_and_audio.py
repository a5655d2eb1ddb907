"""Sentence chunking (English and Chinese) and PCM resampling with av."""

from __future__ import annotations

import numpy as np
import pytest

from avatar_rtc.conversation.audio import resample_pcm
from avatar_rtc.conversation.sentences import SentenceChunker, split_sentences


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
