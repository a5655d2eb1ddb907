"""Mandarin offline: Chinese sentences and what a listener heard of them, the Whisper model each
language gets, traditional characters made simplified, and Mandarin speech through the real
multilingual Whisper base (assembled by scripts/pypi_models.py; those tests skip without it)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

from avatar_rtc.config import Settings
from avatar_rtc.conversation import asr as asr_module
from avatar_rtc.conversation.asr import (
    AsrUnavailableError,
    FasterWhisperASR,
    character_error_rate,
    create_speech_recognizer,
    find_whisper_model,
    to_simplified,
)
from avatar_rtc.conversation.fair import FairLock
from avatar_rtc.conversation.sentences import SentenceChunker, split_sentences
from avatar_rtc.media.playout import SpokenSentence, Utterance
from avatar_rtc.media.spoken_text import join_spoken, leading_share

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = REPO_ROOT / "models" / "faster-whisper-base"
needs_base = pytest.mark.skipif(
    not (BASE_MODEL / "model.bin").is_file(),
    reason=f"no multilingual Whisper base at {BASE_MODEL} (scripts/pypi_models.py whisper-base)",
)

# --- text ------------------------------------------------------------------------------------------


def test_a_chinese_first_clause_ends_at_the_full_width_comma_about_a_second_in() -> None:
    # 16 characters is about a second of English; in Chinese, where a character is a syllable, the
    # first comma after about five characters is. "你好，" is too short to be worth its own TTS call.
    chunker = SentenceChunker(first_clause_chars=16)
    assert chunker.push("你好，我是你的虚拟助手，很高兴见到你。今天天气") == [
        "你好，我是你的虚拟助手，",
        "很高兴见到你。",
    ]
    # Only the first chunk is cut early.
    assert chunker.push("很好，我们出去走走吧！") == ["今天天气很好，我们出去走走吧！"]
    assert chunker.flush() == []


def test_chinese_streams_one_character_at_a_time_into_the_same_sentences() -> None:
    text = "北京是中国的首都；上海是最大的城市。你去过吗？"
    chunker = SentenceChunker()
    out: list[str] = []
    for ch in text:
        out += chunker.push(ch)
    assert out + chunker.flush() == ["北京是中国的首都；", "上海是最大的城市。", "你去过吗？"]


def test_chinese_with_ascii_punctuation_and_numbers() -> None:
    # Small models write Chinese with ASCII marks and no space after them; "3.5" is still a number.
    assert split_sentences("你好!我是助手.今天3.5度,很好。") == ["你好!", "我是助手.", "今天3.5度,很好。"]
    assert split_sentences("我们用GPU. 然后呢?好的") == ["我们用GPU.", "然后呢?", "好的"]


def test_a_chinese_run_on_is_cut_by_speaking_time() -> None:
    # 40 characters of budget are about 13 Chinese characters: no TTS call waits for a minute of text.
    chunker = SentenceChunker(max_chars=40)
    out = chunker.push("这是一个很长的没有标点的句子我们一直说下去不停下来也不换气")
    assert out == ["这是一个很长的没有标点的句", "子我们一直说下去不停下来也"]
    assert chunker.flush() == ["不换气"]


def test_chinese_is_joined_without_spaces() -> None:
    assert join_spoken("你好。", "我是助手。") == "你好。我是助手。"
    assert join_spoken("Hello.", "我是助手。") == "Hello.我是助手。"
    assert join_spoken("Hello.", "How are you?") == "Hello. How are you?"
    assert join_spoken("", "你好") == "你好"


def test_what_was_heard_of_a_cut_chinese_sentence_is_counted_in_characters() -> None:
    u = Utterance("")
    u.sentences = [
        SpokenSentence("今天天气很好。", 48000, 96000, 48000),
        SpokenSentence("我们去公园散步吧。", 96000, 144000, 48000),
    ]
    u.played_until = 2.5  # half of the second sentence: four of its eight characters
    assert u.heard_text() == "今天天气很好。我们去公"
    u.played_until = 1.1  # not one character's share of the first
    assert u.heard_text() == ""
    u.played_until = 3.0
    assert u.heard_text() == "今天天气很好。我们去公园散步吧。"
    # English keeps counting words.
    assert leading_share("One two three four.", 0.5) == "One two"


# --- traditional to simplified, in the recogniser ----------------------------------------------------


class _ScriptedWhisper:
    """Stands in for faster-whisper's WhisperModel: answers every audio with the same segments."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.languages: list[str] = []

    def transcribe(self, audio: np.ndarray, language: str, **options: Any) -> tuple[Any, Any]:
        self.languages.append(language)
        self.options = options
        segments = (SimpleNamespace(text=text) for text in self.texts)
        return segments, SimpleNamespace(language=language)


def _fake_model_dir(root: Path, name: str, vocabulary_size: int) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "model.bin").write_bytes(b"")
    (directory / "config.json").write_text("{}")
    (directory / "vocabulary.txt").write_text("".join(f"t{i}\n" for i in range(vocabulary_size)))
    return directory


@pytest.fixture
def scripted_models(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str, str, int], Any]:
    """An empty process-wide model table for the test, restored afterwards."""
    table: dict[tuple[str, str, str, int], Any] = {}
    monkeypatch.setattr(asr_module, "_loaded_models", table)
    return table


async def test_traditional_characters_from_whisper_come_out_simplified(
    tmp_path: Path, scripted_models: dict[tuple[str, str, str, int], Any]
) -> None:
    model_dir = _fake_model_dir(tmp_path, "faster-whisper-base", 51865)
    whisper = _ScriptedWhisper([" 我們明天去北京。", " 這是我的朋友，歡迎光臨！"])
    scripted_models[(str(model_dir.resolve()), "cpu", "int8", 2)] = (whisper, FairLock())
    chinese = FasterWhisperASR(model_dir, language="zh")
    transcript = await chinese.transcribe(np.ones(16000, np.int16))
    # Simplified, and the segments joined without a space: Chinese has none between them.
    assert transcript.text == "我们明天去北京。这是我的朋友，欢迎光临！"
    assert transcript.language == "zh" and whisper.languages == ["zh"]
    # A decoding loop is cut off near what a second of speech can hold, not at Whisper's 448 tokens.
    assert whisper.options["max_new_tokens"] == 15 + 16
    # English output is left alone (the converter would not change it, and is not asked to).
    whisper.texts = [" Hello there.", " How are you?"]
    english = FasterWhisperASR(model_dir, language="en")
    assert (await english.transcribe(np.ones(16000, np.int16))).text == "Hello there. How are you?"


def test_to_simplified_changes_the_script_not_the_words() -> None:
    assert to_simplified("我們說話，這個軟件很好用。") == "我们说话，这个软件很好用。"
    # Character tables only (OpenCC t2s), not Taiwan-to-mainland vocabulary (tw2sp): Whisper wrote what
    # it heard, and 軟體 (ruǎntǐ) is another word than 软件 (ruǎnjiàn), not another spelling of it.
    assert to_simplified("軟體") == "软体"
    assert to_simplified("我们明天去北京。Hello 3.5") == "我们明天去北京。Hello 3.5"


# --- which model each language gets ------------------------------------------------------------------


class _CountingWhisperModel:
    """faster_whisper.WhisperModel's constructor, counted: a load is a load."""

    loads: ClassVar[list[str]] = []

    def __init__(self, source: str, **_: Any) -> None:
        type(self).loads.append(Path(source).name)


@pytest.fixture
def fake_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scripted_models: dict[tuple[str, str, str, int], Any]
) -> dict[str, Path]:
    """A models directory with an English-only tiny.en (standing in for the packaged one) and a
    multilingual base, loaded by a counting stand-in for WhisperModel."""
    import faster_whisper

    tiny = _fake_model_dir(tmp_path / "package", "tiny.en", 51864)
    base = _fake_model_dir(tmp_path / "models", "faster-whisper-base", 51865)
    monkeypatch.setattr(asr_module, "packaged_whisper_model", lambda: tiny)
    monkeypatch.setattr(faster_whisper, "WhisperModel", _CountingWhisperModel)
    monkeypatch.setattr(_CountingWhisperModel, "loads", [])
    return {"tiny.en": tiny, "base": base, "models_dir": tmp_path / "models"}


def test_mandarin_gets_the_multilingual_model_and_english_the_english_default(
    fake_models: dict[str, Path],
) -> None:
    models_dir = fake_models["models_dir"]
    assert find_whisper_model(models_dir, language="zh") == fake_models["base"]
    # English stays on tiny.en with base beside it: as accurate here, and 2-3x cheaper (see
    # scripts/bench_voice.py --asr and the README).
    assert find_whisper_model(models_dir, language="en") == fake_models["tiny.en"]
    chinese = create_speech_recognizer(models_dir=models_dir, language="zh")
    assert Path(chinese.model_source) == fake_models["base"].resolve() and chinese.language == "zh"
    # An English-only model is never used for Chinese, even when it is the only one there.
    english_only = _fake_model_dir(models_dir.parent / "english-only", "faster-whisper-base.en", 51864)
    assert find_whisper_model(english_only.parent, language="zh") is None
    assert find_whisper_model(english_only.parent, language="en") == fake_models["tiny.en"]
    with pytest.raises(AsrUnavailableError, match="multilingual"):
        create_speech_recognizer(models_dir=english_only.parent, language="zh")


def test_switching_languages_loads_each_model_once_per_process(fake_models: dict[str, Path]) -> None:
    from avatar_rtc.wiring import SpeechEnginesByLanguage, build_asr

    settings = Settings(
        asr={"models_dir": fake_models["models_dir"]},
        tts={"engine": "espeak", "models_dir": fake_models["models_dir"]},
    )
    english, reason = build_asr(settings)
    assert english is not None, reason
    engines = SpeechEnginesByLanguage(settings, (object(), english, ""))  # type: ignore[arg-type]
    calls = [engines(language) for language in ("zh", "en", "zh", "en", "zh")]
    chinese = calls[0][1]
    assert chinese is not None and chinese.language == "zh"
    assert all(call[1] is chinese for call in calls[::2]) and all(call[1] is english for call in calls[1::2])
    # One load per model file, whichever sessions switch back and forth.
    loads = _CountingWhisperModel.loads
    assert sorted(loads) == ["faster-whisper-base", "tiny.en"], loads
    # A second recogniser on a loaded model (another language, a configured copy) shares its weights.
    # (The same threads too: CTranslate2 fixes them when it loads a model.)
    threads = settings.asr.cpu_threads
    assert FasterWhisperASR(fake_models["base"], language="en", cpu_threads=threads)._model is chinese._model
    assert len(loads) == 2


# --- Mandarin speech through the real model ----------------------------------------------------------

# Everyday sentences that Whisper base reads back from espeak-ng's Mandarin voice at its default rate
# (175 words a minute), chosen because base gets them right at 170-185 too, not only at one rate. It
# writes the first in traditional characters (我們): the comparison needs the conversion.
MANDARIN = ["我们想去北京。", "我想喝一杯咖啡。", "我们一起去吃饭吧。", "我想去北京。", "我想喝一个咖啡。"]
ESPEAK_RATE = 175
# Over all 33 characters, three may be wrong: Mandarin has many homophones (one syllable, several
# characters) and espeak-ng's tones are crude, so an int8 decode on another CPU may settle one or two
# differently. A misheard phrase costs more than that (at 165 words a minute base writes 我们想去北京
# as 我們想準備見, four characters, and 我想去北京 as 我想去那邊, two): that fails.
MAX_CHARACTER_ERROR_RATE = 0.1


@pytest.fixture(scope="module")
def mandarin_whisper() -> FasterWhisperASR:
    if not (BASE_MODEL / "model.bin").is_file():
        pytest.skip(f"no multilingual Whisper base at {BASE_MODEL} (scripts/pypi_models.py whisper-base)")
    return create_speech_recognizer(models_dir=BASE_MODEL.parent, language="zh")


@needs_base
async def test_mandarin_speech_is_transcribed_in_simplified_characters(
    mandarin_whisper: FasterWhisperASR,
) -> None:
    import shutil

    from avatar_rtc.conversation.tts import espeak_voice
    from avatar_rtc.conversation.vad import UtteranceEnded, VoiceActivitySegmenter
    from avatar_rtc.testing.speech import spoken_clip

    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    assert Path(mandarin_whisper.model_source) == BASE_MODEL.resolve()
    voice = espeak_voice("zh")
    errors = characters = 0
    for sentence in MANDARIN:
        # Through the VAD first (at its own 16 kHz), as a caller's utterance would be cut.
        clip = spoken_clip(sentence, voice, rate=16000, words_per_minute=ESPEAK_RATE)
        pcm = np.concatenate([np.zeros(8000, np.int16), clip, np.zeros(16000, np.int16)])
        vad = VoiceActivitySegmenter()
        utterances = [e for e in vad.push(pcm) + vad.flush() if isinstance(e, UtteranceEnded)]
        assert len(utterances) == 1, f"{sentence}: {len(utterances)} utterances"
        transcript = await mandarin_whisper.transcribe(utterances[0].pcm)
        rate = character_error_rate(sentence, transcript.text)
        length = len(sentence) - 1  # the full stop is not compared
        errors += round(rate * length)
        characters += length
        print(f"{sentence} -> {transcript.text} (CER {rate:.2f}, {transcript.processing_s:.2f} s)")
        assert transcript.language == "zh"
        assert to_simplified(transcript.text) == transcript.text, f"traditional characters: {transcript.text}"
    assert errors / characters <= MAX_CHARACTER_ERROR_RATE, f"{errors} of {characters} characters wrong"


# --- a Mandarin call -------------------------------------------------------------------------------

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")


async def test_a_mandarin_chat_is_answered_and_every_event_says_zh(server, template_library) -> None:
    """A template in Mandarin; a typed Chinese question gets an answer with Chinese characters. The
    answer's quality is the LLM's: this checks the path (language on the events, Chinese text through
    the sentence cutter, TTS and the heard-text bookkeeping), not that a small model knows Chinese."""
    import aiohttp

    from avatar_rtc.avatar.prepare import default_photo, prepare_photo
    from avatar_rtc.testing.receiver import CallReceiver

    if not template_library.store.exists("mandarin"):
        template = prepare_photo(default_photo(), "mandarin", seconds=1.0)
        template.extras.clear()
        template_library.store.save(template)
    template_library.update_info("mandarin", name="Mandarin", language="zh")
    receiver = CallReceiver()
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    hello = await receiver.wait_event(lambda e: e["type"] == "hello")
    assert hello["language"] == "en"
    receiver.send({"type": "select_template", "id": "mandarin"})
    switched = await receiver.wait_event(lambda e: e["type"] == "template", wait_s=15)
    assert switched["language"] == "zh"
    seen = len(receiver.events)
    receiver.send({"type": "chat", "text": "北京是哪个国家的首都？"})
    answer = await receiver.wait_event(
        lambda e: e["type"] == "transcript" and e["role"] == "assistant" and e["final"], wait_s=90, after=seen
    )
    await receiver.close()
    transcripts = [e for e in receiver.events[seen:] if e["type"] == "transcript"]
    print(f"answer: {answer['text']!r}")
    assert transcripts[0] == {
        "type": "transcript",
        "role": "user",
        "text": "北京是哪个国家的首都？",
        "final": True,
        "language": "zh",
    }
    assert all(e["language"] == "zh" for e in transcripts)
    assert _CJK.search(answer["text"]), answer
