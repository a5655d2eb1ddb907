"""How much of a spoken text a listener heard, in the units a listener hears: words in English, characters
in Chinese. Shared by the conversation (joining an answer's pieces) and the media timeline (the part of an
interrupted answer that was played), so it lives at the bottom."""

from __future__ import annotations

import re

# CJK ideographs (the unified block, extension A, compatibility ideographs): a syllable each.
IDEOGRAPHS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_IDEOGRAPH = re.compile(f"[{IDEOGRAPHS}]")
# What a listener hears as one unit: an English word (with its punctuation), or one Chinese character
# (with the punctuation after it).
_SPOKEN_UNIT = re.compile(f"[{IDEOGRAPHS}][^\\w\\s]*|[^\\s{IDEOGRAPHS}]+")
# Chinese writes no space after these, nor between characters.
_NO_SPACE_AFTER = re.compile(f"[{IDEOGRAPHS}\u3000-\u303f\uff00-\uffef…”’」』）》]")


def is_ideograph(ch: str) -> bool:
    return _IDEOGRAPH.match(ch) is not None


def join_spoken(left: str, right: str) -> str:
    """Two pieces of an answer as one text: a space between them, except where Chinese meets Chinese."""
    if not left or not right:
        return left or right
    if _NO_SPACE_AFTER.match(left[-1]) or is_ideograph(right[0]):
        return left + right
    return f"{left} {right}"


def leading_share(text: str, share: float) -> str:
    """The first ``share`` (0-1) of ``text``'s spoken units as written: whole words in English, whole
    characters in Chinese (which has no spaces to split on); "" until one whole unit fits."""
    units = list(_SPOKEN_UNIT.finditer(text))
    count = int(len(units) * max(0.0, min(share, 1.0)))
    return text[: units[count - 1].end()] if count else ""
