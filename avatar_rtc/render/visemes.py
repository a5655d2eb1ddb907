"""Visemes: the lip and jaw shapes of speech, from phonemes with their times, as poses for the face.

A :class:`MouthPose` says how far the lips part (a share of the face's natural speech range, see
``render.warp.MouthRange``), how much of that is the jaw (the gap between the teeth), how rounded or
spread the lips are, whether the lower lip tucks under the upper teeth, and whether the tongue tip
shows. Each viseme class has one target pose; the pose at a moment blends the visemes around it
(coarticulation), weighted by their time near that moment and by their *dominance*: a bilabial closure
must reach closed lips whatever surrounds it, while a /t/ barely constrains the lips at all (after
Cohen & Massaro's dominance model of coarticulation, 1993). The blend window is centred on the
moment, so the frame for media time t shows what is said at t, with no lag.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import threading
from collections.abc import Iterable, Sequence

import numpy as np


class Viseme(enum.StrEnum):
    REST = "rest"  # silence and pauses: lips together, relaxed
    CLOSED = "closed"  # m b p: lips pressed together
    LABIODENTAL = "f"  # f v: lower lip against the upper teeth
    DENTAL = "th"  # θ ð: tongue tip between the teeth
    ROUNDED = "oo"  # u ʊ w: small round opening, lips pushed forward
    ROUNDED_OPEN = "oh"  # o ɔ ɒ: rounder and more open
    SPREAD = "ee"  # i ɪ e j: lips spread, teeth close and showing
    MID = "eh"  # ɛ æ ə ɜ ʌ ɚ: neutral lips, half open
    OPEN = "ah"  # a ɑ ɐ: the widest jaw
    TEETH = "s"  # s z t d n l k g ŋ h ɹ: teeth almost together, lips slightly apart
    POSTALVEOLAR = "sh"  # ʃ ʒ tʃ dʒ: lips pushed forward and a little round, teeth close


@dataclasses.dataclass(frozen=True)
class MouthPose:
    """A lip and jaw configuration. The default is the template's own mouth (``rest`` = 1)."""

    opening: float = 0.0  # inner-lip gap as a share of the natural maximum, 0..1 (< 0: pressed)
    jaw: float = 0.5  # share of that gap that is open between the teeth (the rest shows teeth), 0..1
    roundness: float = 0.0  # +1 rounded and narrow, -1 spread and wide
    # Whether the opening starts from the template's own lip gap (1: rest and vowels, so a template that
    # smiles with parted lips keeps them parted and opens further) or from closed lips (0: consonants that
    # shape the lips themselves, so m, b, p close even a parted mouth).
    rest: float = 1.0
    lip_tuck: float = 0.0  # 1: the lower lip rests against the upper teeth (f, v)
    tongue_tip: float = 0.0  # 1: the tongue tip shows between the teeth (th)

    def as_array(self) -> np.ndarray:
        return np.array([self.opening, self.jaw, self.roundness, self.rest, self.lip_tuck, self.tongue_tip])

    def scaled(self, factor: float) -> MouthPose:
        """The pose with its opening scaled (louder or softer speech), the lip shape kept."""
        return dataclasses.replace(self, opening=float(np.clip(self.opening * factor, PRESSED_LIPS, 1.0)))


REST_POSE = MouthPose()
# m, b, p press the lips together a little (a negative opening): a blend with the sounds around a
# short closure still shuts the mouth.
PRESSED_LIPS = -0.08

# Target poses. Openings are shares of the natural range (render.warp.MouthRange): /a/ nearly all of it,
# mid vowels about half, close vowels and consonants with parted lips a sixth to a third.
VISEME_POSES: dict[Viseme, MouthPose] = {
    Viseme.REST: REST_POSE,
    Viseme.CLOSED: MouthPose(opening=PRESSED_LIPS, jaw=0.0, roundness=0.05, rest=0.0),
    Viseme.LABIODENTAL: MouthPose(opening=0.16, jaw=0.0, roundness=-0.3, rest=0.0, lip_tuck=1.0),
    Viseme.DENTAL: MouthPose(opening=0.24, jaw=0.35, roundness=-0.2, rest=0.0, tongue_tip=1.0),
    Viseme.ROUNDED: MouthPose(opening=0.26, jaw=0.55, roundness=1.0, rest=1.0),
    Viseme.ROUNDED_OPEN: MouthPose(opening=0.5, jaw=0.6, roundness=0.7, rest=1.0),
    Viseme.SPREAD: MouthPose(opening=0.3, jaw=0.15, roundness=-1.0, rest=1.0),
    Viseme.MID: MouthPose(opening=0.56, jaw=0.55, roundness=-0.2, rest=1.0),
    Viseme.OPEN: MouthPose(opening=0.9, jaw=0.55, roundness=0.0, rest=1.0),
    Viseme.TEETH: MouthPose(opening=0.16, jaw=0.1, roundness=-0.35, rest=0.0),
    Viseme.POSTALVEOLAR: MouthPose(opening=0.24, jaw=0.1, roundness=0.6, rest=0.0),
}
_POSE_ARRAYS = {viseme: pose.as_array() for viseme, pose in VISEME_POSES.items()}

# How strongly a viseme holds its pose against its neighbours (see the module docstring).
DOMINANCE: dict[Viseme, float] = {
    Viseme.REST: 0.6,
    Viseme.CLOSED: 10.0,
    Viseme.LABIODENTAL: 6.0,
    Viseme.DENTAL: 3.0,
    Viseme.ROUNDED: 2.5,
    Viseme.ROUNDED_OPEN: 1.5,
    Viseme.SPREAD: 1.2,
    Viseme.MID: 1.0,
    Viseme.OPEN: 1.2,
    Viseme.TEETH: 0.5,
    Viseme.POSTALVEOLAR: 2.5,
}

_PHONEME_VISEMES: dict[str, Viseme] = {}
for _symbols, _viseme in (
    ("mbpɱ", Viseme.CLOSED),
    ("fv", Viseme.LABIODENTAL),
    ("θð", Viseme.DENTAL),
    ("uʊwʉɯʍ", Viseme.ROUNDED),
    ("oɔɒøœɵ", Viseme.ROUNDED_OPEN),
    ("iɪeejyʏɨ", Viseme.SPREAD),
    ("ɛæəɜʌɚɝɘɤ", Viseme.MID),
    ("aɑɐɶ", Viseme.OPEN),
    ("sztdnlkgŋhɹrɾɡxɣʔçʝɲɫʁχ", Viseme.TEETH),
    ("ʃʒɕʑʂʐ", Viseme.POSTALVEOLAR),
):
    for _symbol in _symbols:
        _PHONEME_VISEMES[_symbol] = _viseme

# Symbols that are not sounds of their own: stress marks belong to the phoneme after them, length
# and other marks to the one before.
_BELONGS_TO_NEXT = frozenset("ˈˌ")
_BELONGS_TO_PREVIOUS = frozenset("ːˑ̩̯̃͡")


def viseme_of_phoneme(phoneme: str) -> Viseme | None:
    """The viseme of one phoneme symbol; REST for pauses and word gaps; None for a mark that only
    modifies a neighbour (stress, length)."""
    if not phoneme:
        return Viseme.REST
    first = phoneme[0]
    if first in _BELONGS_TO_NEXT or first in _BELONGS_TO_PREVIOUS:
        return None
    return _PHONEME_VISEMES.get(first, Viseme.REST)


@dataclasses.dataclass(frozen=True)
class TimedViseme:
    """A viseme held from ``start_s`` to ``end_s`` (seconds, relative to what it is pushed with)."""

    viseme: Viseme
    start_s: float
    end_s: float


# A stop's lips close before its burst; a TTS times the stop by the burst and puts the silent closure
# in the sound before it. Its closed lips start this much earlier (taken from the viseme before, at
# most half of it).
STOP_CLOSURE_LEAD_S = 0.03
_STOPS_WITH_CLOSED_LIPS = frozenset("pb")


def visemes_from_phonemes(phonemes: Iterable[tuple[str, float, float]]) -> list[TimedViseme]:
    """Timed visemes from (phoneme, start_s, end_s) in order: marks merge into their phoneme, and
    neighbours with the same viseme join. A word gap (" ") is no pause: it holds the onset of the next
    word (or the closure of its first stop), so it merges into the phoneme after it."""
    pending_start: float | None = None  # start of stress marks and word gaps waiting for their phoneme
    out: list[TimedViseme] = []
    for phoneme, start, end in phonemes:
        first = phoneme[:1]
        if first in _BELONGS_TO_NEXT or first == " ":
            pending_start = start if pending_start is None else pending_start
            continue
        if first in _BELONGS_TO_PREVIOUS:
            if out:
                out[-1] = TimedViseme(out[-1].viseme, out[-1].start_s, end)
            continue
        viseme = viseme_of_phoneme(phoneme) or Viseme.REST
        if pending_start is not None:
            start, pending_start = pending_start, None
        if first in _STOPS_WITH_CLOSED_LIPS and out and out[-1].viseme != viseme:
            previous = out[-1]
            lead = min(STOP_CLOSURE_LEAD_S, 0.5 * (previous.end_s - previous.start_s))
            out[-1] = TimedViseme(previous.viseme, previous.start_s, start - lead)
            start -= lead
        if out and out[-1].viseme == viseme:
            out[-1] = TimedViseme(viseme, out[-1].start_s, end)
        else:
            out.append(TimedViseme(viseme, start, end))
    if pending_start is not None and out:
        out[-1] = TimedViseme(out[-1].viseme, out[-1].start_s, max(out[-1].end_s, pending_start))
    return out


# Coarticulation window: half-width of the raised-cosine weighting around the frame's time. About one
# short syllable: a viseme of 80 ms or more reaches its own pose in its middle.
BLEND_HALF_WIDTH_S = 0.06
_KERNEL_SAMPLES = 13


def _kernel() -> tuple[np.ndarray, np.ndarray]:
    offsets = np.linspace(-1.0, 1.0, _KERNEL_SAMPLES)
    weights = 0.5 + 0.5 * np.cos(np.pi * offsets)
    return offsets * BLEND_HALF_WIDTH_S, weights / weights.sum()


_KERNEL_OFFSETS, _KERNEL_WEIGHTS = _kernel()


class VisemeTrack:
    """Timed visemes on the media timeline, as pushed with the speech; the pose at any moment.

    Written on the event loop, read by render threads: every change replaces the tuples whole, so a
    reader always sees one consistent version without holding the lock while it computes.
    """

    # Visemes ending this long before the latest push are dropped.
    keep_s = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: tuple[float, ...] = ()
        self._items: tuple[TimedViseme, ...] = ()

    def push(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        """Add ``visemes`` (times relative to ``media_time``); they replace what overlaps them."""
        if not visemes:
            return
        placed = [TimedViseme(v.viseme, media_time + v.start_s, media_time + v.end_s) for v in visemes]
        lo, hi = placed[0].start_s, placed[-1].end_s
        with self._lock:
            kept = [v for v in self._items if v.end_s <= lo or v.start_s >= hi]
            kept = [v for v in kept if v.end_s >= lo - self.keep_s]
            items = tuple(sorted([*kept, *placed], key=lambda v: v.start_s))
            self._items, self._starts = items, tuple(v.start_s for v in items)

    def clear(self) -> None:
        with self._lock:
            self._items, self._starts = (), ()

    def covers(self, media_time: float) -> bool:
        return self._at(media_time, self._items, self._starts) is not None

    @staticmethod
    def _at(t: float, items: tuple[TimedViseme, ...], starts: tuple[float, ...]) -> TimedViseme | None:
        index = bisect.bisect_right(starts, t) - 1
        if index >= 0 and t < items[index].end_s:
            return items[index]
        return None

    def viseme_at(self, media_time: float) -> Viseme | None:
        found = self._at(media_time, self._items, self._starts)
        return found.viseme if found is not None else None

    def pose_at(self, media_time: float) -> MouthPose | None:
        """The blended pose at ``media_time``, or None when no viseme covers it (the caller then
        estimates the mouth from the audio)."""
        items, starts = self._items, self._starts
        if self._at(media_time, items, starts) is None:
            return None
        totals = np.zeros(6)
        weight_sum = 0.0
        for offset, kernel_weight in zip(_KERNEL_OFFSETS, _KERNEL_WEIGHTS, strict=True):
            found = self._at(media_time + float(offset), items, starts)
            viseme = found.viseme if found is not None else Viseme.REST
            weight = float(kernel_weight) * DOMINANCE[viseme]
            totals += weight * _POSE_ARRAYS[viseme]
            weight_sum += weight
        opening, jaw, roundness, rest, lip_tuck, tongue_tip = (float(x) for x in totals / weight_sum)
        return MouthPose(opening, jaw, roundness, rest, lip_tuck, tongue_tip)
