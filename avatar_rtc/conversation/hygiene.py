"""What of an answer goes back into the conversation history.

A small model that slips into another language or starts looping does it again on the next turn if its
slip is in the prompt: the history is the strongest instruction it has. So a reply that drifts or
repeats itself is kept only up to its last clean sentence, and dropped when not even its first sentence
is clean. The caller still heard (and saw in the transcript) the whole reply; only the model's memory
of it is trimmed.

Language: a sentence has drifted when more than :data:`MAX_FOREIGN_LETTER_SHARE` of its letters belong
to scripts the conversation's language is not written in. The script of a letter is the first word of
its Unicode name (LATIN, CJK, CYRILLIC, HIRAGANA, ...). Counting letters, not words, is deliberate: a
drifted sentence is almost wholly in the other script (a share near 1), while an English answer that
quotes a word or a name in another script stays far below a third (``The Chinese for hello is 你好.``
is 2 letters of 22). It needs no model and no word lists, and it fits the drift that matters here (a
Qwen model carrying on in Chinese); it cannot tell English from French (both Latin), which is left alone.

Repetition: a sentence that mostly says again what earlier ones said (at least
:data:`MAX_REPEATED_TRIGRAM_SHARE` of its three-word runs already used, or the same words when it is
shorter than three) ends the clean part, and a sentence that loops inside itself (any three-word run
three times) is not clean. A share, not any shared run: natural replies reuse short phrases ("If the
wound is bleeding, ... If the wound is deep, ...") without repeating themselves.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter

from avatar_rtc.conversation.sentences import split_sentences
from avatar_rtc.media.spoken_text import join_spoken

# Scripts each conversation language is written in. Latin letters inside Chinese, Japanese or Korean
# sentences (names, brands, units) are normal, so those languages accept them too; a sentence there has
# drifted when it has no native letter at all (see _drifted).
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    "en": frozenset({"LATIN"}),
    "de": frozenset({"LATIN"}),
    "es": frozenset({"LATIN"}),
    "fr": frozenset({"LATIN"}),
    "it": frozenset({"LATIN"}),
    "nl": frozenset({"LATIN"}),
    "pt": frozenset({"LATIN"}),
    "zh": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    "ru": frozenset({"CYRILLIC"}),
    "uk": frozenset({"CYRILLIC"}),
    "el": frozenset({"GREEK"}),
}
MAX_FOREIGN_LETTER_SHARE = 0.3
# A sentence this short (in letters) is too short to judge by script shares alone ("OK.").
_MIN_LETTERS_TO_JUDGE = 2
# In a language not written in Latin letters: a sentence of this many Latin letters and no native one.
_MIN_LATIN_LETTERS_AS_SENTENCE = 8
MAX_REPEATED_TRIGRAM_SHARE = 0.6
_LOOP_COUNT = 3

_WORD = re.compile(r"\w+")


def _script(letter: str) -> str:
    return unicodedata.name(letter, "UNKNOWN").split(" ", 1)[0]


def _drifted(sentence: str, language: str) -> bool:
    expected = LANGUAGE_SCRIPTS.get(language.split("-")[0].lower())
    if expected is None:
        return False  # a language we have no script for: never judged
    scripts = Counter(_script(c) for c in sentence if c.isalpha())
    letters = sum(scripts.values())
    if letters < _MIN_LETTERS_TO_JUDGE:
        return False
    if "LATIN" not in expected:
        # Latin words are welcome inside a Chinese sentence (names, units); a sentence with no native
        # letter and a couple of Latin words is an English sentence instead of a Chinese one.
        native = sum(scripts[s] for s in expected)
        if native == 0 and scripts["LATIN"] >= _MIN_LATIN_LETTERS_AS_SENTENCE:
            return True
        expected = expected | {"LATIN"}
    foreign = letters - sum(scripts[s] for s in expected)
    return foreign / letters > MAX_FOREIGN_LETTER_SHARE


def _tokens(sentence: str) -> list[str]:
    """Words, lower-cased; each CJK character counts as a word (those scripts put no spaces)."""
    tokens: list[str] = []
    for word in _WORD.findall(sentence.lower()):
        if any(_script(c) in ("CJK", "HIRAGANA", "KATAKANA") for c in word):
            tokens.extend(word)
        else:
            tokens.append(word)
    return tokens


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _loops(tokens: list[str]) -> bool:
    counts = Counter(_ngrams(tokens, 3))
    return bool(counts) and max(counts.values()) >= _LOOP_COUNT


def _repeats(
    tokens: list[str], seen_sentences: set[tuple[str, ...]], seen_trigrams: set[tuple[str, ...]]
) -> bool:
    trigrams = _ngrams(tokens, 3)
    if not trigrams:
        return bool(tokens) and tuple(tokens) in seen_sentences
    used = sum(1 for trigram in trigrams if trigram in seen_trigrams)
    return used / len(trigrams) >= MAX_REPEATED_TRIGRAM_SHARE


def reply_for_history(text: str, language: str | None) -> str:
    """``text`` unchanged when it is clean; else its clean leading sentences ("" when there are none).

    ``language`` None (not known) checks repetition only.
    """
    sentences = split_sentences(text)
    kept: list[str] = []
    seen_sentences: set[tuple[str, ...]] = set()
    seen_trigrams: set[tuple[str, ...]] = set()
    for sentence in sentences:
        tokens = _tokens(sentence)
        if (
            (language is not None and _drifted(sentence, language))
            or _loops(tokens)
            or _repeats(tokens, seen_sentences, seen_trigrams)
        ):
            break
        kept.append(sentence)
        seen_sentences.add(tuple(tokens))
        seen_trigrams.update(_ngrams(tokens, 3))
    if len(kept) == len(sentences):
        return text.strip()
    return functools.reduce(join_spoken, kept, "")
