"""Cut streaming text into sentences, so speech starts as soon as the first one is complete."""

from __future__ import annotations

import re

from avatar_rtc.media.spoken_text import is_ideograph

# Abbreviations whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e no fig approx dept est inc ltd co".split()
)
# Full-width punctuation ends a sentence on its own; ASCII punctuation needs a space, the end, or a
# Chinese character after it (small models often write "你好!我是..." with ASCII marks).
_CJK_END = "。！？；…"
_ASCII_END = ".!?;"
_CLAUSE_END = ",，、:：—"
_CLOSERS = "\"')]}”’」』）》"
# Where a length stands in for speaking time (the first clause, a run-on's cut) an ideograph counts as
# this many characters: Mandarin is spoken at about 4-5 characters a second, English at about 14
# letters and spaces, so 16 characters are about a second of either.
_IDEOGRAPH_WEIGHT = 3


class RunOnChunk(str):
    """A chunk cut between words (``first_chunk_words``), not at punctuation: its speech runs on into
    the next chunk without a pause."""

    __slots__ = ()


class SentenceChunker:
    """Feed text as it streams in; get complete sentences back. English and Chinese punctuation; in the
    lengths a Chinese character counts as three, so a Chinese first clause is about as long to say as
    an English one."""

    def __init__(self, max_chars: int = 300, first_clause_chars: int = 0, first_chunk_words: int = 0) -> None:
        """``first_clause_chars`` > 0 lets the first chunk end at a comma once it is that long, so the
        first words can be spoken before a long first sentence is complete; ``first_chunk_words`` > 0
        ends it after that many words even without a comma (text written with spaces between words)."""
        self._buffer = ""
        self._max_chars = max_chars
        self._first_clause_chars = first_clause_chars
        self._first_chunk_words = first_chunk_words
        self._emitted = False

    def push(self, text: str) -> list[str]:
        self._buffer += text
        sentences: list[str] = []
        while True:
            cut, between_words = self._find_cut(self._buffer), False
            if cut is None:
                cut = self._first_words_cut(self._buffer)
                between_words = cut is not None
            if cut is None:
                break
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if sentence:
                sentences.append(RunOnChunk(sentence) if between_words else sentence)
                self._emitted = True
        return sentences

    def flush(self) -> list[str]:
        """End of the stream: whatever is left is the last sentence."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    def _find_cut(self, text: str) -> int | None:
        clause_from = self._first_clause_chars if self._first_clause_chars and not self._emitted else None
        spoken = 0  # spoken length of text[:i]
        limit = None  # where a run-on gets too long to wait for its end
        for i, ch in enumerate(text):
            if clause_from is not None and spoken >= clause_from and ch in _CLAUSE_END and i + 1 < len(text):
                if ch in "，、：" or text[i + 1].isspace() or is_ideograph(text[i + 1]):
                    return i + 1
            if ch in _CJK_END:
                return self._after_closers(text, i + 1)
            if ch in _ASCII_END:
                end = self._after_closers(text, i + 1)
                if end >= len(text):
                    return None  # wait: the next chunk may continue a number or an abbreviation
                if is_ideograph(text[end]):
                    return end  # "你好!我是": Chinese with ASCII punctuation
                if not text[end].isspace():
                    continue  # "3.5", "e.g.x", "U.S.A"
                if ch == "." and self._is_abbreviation(text[:i]):
                    continue
                return end
            if ch == "\n" and text[:i].strip():
                return i + 1
            spoken += _IDEOGRAPH_WEIGHT if is_ideograph(ch) else 1
            if limit is None and spoken > self._max_chars:
                limit = i
        if limit is not None:
            # A run-on without punctuation: cut at the last comma or space so TTS is not starved.
            for sep in "，,、 ":
                pos = text.rfind(sep, 0, limit)
                if pos > 0:
                    return pos + 1
            return limit
        return None

    def _first_words_cut(self, text: str) -> int | None:
        """After the first chunk's ``first_chunk_words`` words, if no punctuation has ended it yet."""
        if self._emitted or not self._first_chunk_words:
            return None
        words = list(re.finditer(r"\S+(?=\s)", text))
        if len(words) < self._first_chunk_words:
            return None
        return words[self._first_chunk_words - 1].end()

    @staticmethod
    def _after_closers(text: str, i: int) -> int:
        while i < len(text) and text[i] in _CLOSERS:
            i += 1
        return i

    @staticmethod
    def _is_abbreviation(head: str) -> bool:
        word = re.split(r"\s", head)[-1].lower().rstrip(".")
        return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha() and word not in "ia")


def split_sentences(text: str) -> list[str]:
    chunker = SentenceChunker()
    return chunker.push(text) + chunker.flush()
