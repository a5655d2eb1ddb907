"""Real mouths from the template itself: a bank of the template video's own mouth appearances.

A video of someone talking already shows their mouth open, closed, rounded and spread, with their own
teeth, tongue and lip texture. At preparation each template frame's mouth is measured from the face
landmarks tracked anyway (:func:`measure_mouths`: the inner-lip gap and the mouth width, in units of the
template's median mouth width, so head distance does not matter), and for each viseme the frame whose
mouth is nearest that viseme's shape (:func:`select_entries`) gives an *entry*: its lower-face mouth
region resampled into one canonical frame (the template's rest frame, by a similarity fitted to landmarks
that do not move with the mouth: eye corners and nose) and a feathered mask around its lips. A photo,
or a video whose mouth barely moves, gets an empty bank.

At run time :meth:`MouthBank.choose` maps the mouth the renderer is asked to draw (the same two measures, of
the pose applied to the current frame) to the nearest entries, with weights that fall smoothly to zero with
distance, so the real mouth fades in and out at the edge of the tolerance and adjacent entries cross-fade as
the pose glides between visemes instead of popping; :meth:`MouthBank.composite` warps the blend into the
current frame with its own landmark transform (``cv2.warpAffine`` on a small region), matches its colour to
the skin around it and blends it in through the mask. Where nothing is near, the drawn mouth stays.

The bank is a renderer extra (:class:`avatar_rtc.avatar.engine.TemplateEngine`): stored in the template
cache beside the frames, recomputed when missing or from another :data:`BANK_VERSION`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.visemes import Viseme

# Bump when what is stored changes meaning: cached banks of another version are computed again.
BANK_VERSION = 1
CROPS_KEY = "mouth_bank_crops"
MASKS_KEY = "mouth_bank_masks"
ENTRIES_KEY = "mouth_bank_entries"
META_KEY = "mouth_bank_meta"
KEYS = (CROPS_KEY, MASKS_KEY, ENTRIES_KEY, META_KEY)
DESCRIPTIONS = {
    CROPS_KEY: "mouth bank: the template's own mouth per entry, (K, H, W, 3) uint8 BGR in the canonical box",
    MASKS_KEY: "mouth bank: feathered mask around each entry's lips, (K, H, W) uint8",
    ENTRIES_KEY: "mouth bank: per entry viseme index, template frame, inner-lip gap and mouth width "
    "(template mouth widths), (K, 4) float32",
    META_KEY: "mouth bank: version, canonical box x0 y0, median mouth width (eye distances), calibration "
    "(gap, narrowing and widening scales), then the canonical anchor points x y, float64",
}

# Visemes the landmarks can tell apart by the lips' gap and width. Rest is the template's own mouth;
# f/v (lower lip under the teeth) and th (tongue tip) look like other shapes to the mesh, so they keep
# the drawn mouth, which shows the tuck and the tongue.
BANK_VISEMES = tuple(v for v in Viseme if v not in (Viseme.REST, Viseme.LABIODENTAL, Viseme.DENTAL))
VISEME_ORDER = tuple(Viseme)

# Points that move with the head but not with the mouth: eye corners, nasion, nose bottom and wings.
ANCHORS = (
    face.LEFT_EYE_OUTER_CORNER,
    face.LEFT_EYE_INNER_CORNER,
    face.RIGHT_EYE_INNER_CORNER,
    face.RIGHT_EYE_OUTER_CORNER,
    face.NASION,
    face.NOSE_BOTTOM,
    face.NOSE_LEFT_WING,
    face.NOSE_RIGHT_WING,
)
# Pairs of inner-lip points facing each other near the midline; their mean distance is the gap.
_GAP_UPPER = (82, face.UPPER_LIP_INNER_CENTRE, 312)
_GAP_LOWER = (87, face.LOWER_LIP_INNER_CENTRE, 317)
_META_HEAD = 7  # version, box x0 y0, median width, three calibration scales; the anchors follow
_LIP_POLYGON = (*face.LIP_OUTER_UPPER, *reversed(face.LIP_OUTER_LOWER[1:-1]))

# How near a mouth must be, in template mouth widths: the natural speech range is about 0.3 of the
# width in gap, and rounding narrows the mouth by about a quarter. A distance of 1 (scaled by these) is
# the edge of a match.
GAP_TOLERANCE = 0.05
WIDTH_TOLERANCE = 0.08
# At run time an entry within this (scaled) distance is shown fully; between it and 1 the drawn mouth
# fades in.
FULL_MATCH = 0.6
# Entries are cross-faded over this (scaled) distance: wider than the match itself, so that a pose
# moving from one entry to the next (usually one to two tolerances apart) always has both in its blend.
BLEND_RADIUS = 1.8
# How much a frame's mouth speed (tolerances per frame) counts against it when entries are chosen, in
# tolerances of distance: a held mouth a little further from the target beats one rushing past it.
STEADY_WEIGHT = 0.5
# The cross-fade's inverse-distance weight is 1 / (distance² + NEAR²): an entry much nearer than this
# to the pose dominates the blend (a half-and-half blend of two mouths shows a ghost of each), while a
# pose midway between entries still fades evenly (sharper fades jump when the pose itself jumps between
# two frames, as the coarticulated viseme track does at a short viseme's edges).
NEAR = 1.0
# A video whose inner-lip gap varies less than this (5th to 95th percentile, mouth widths) has no
# mouths worth banking: the drawn mouth does better than near-copies of the rest mouth.
MIN_GAP_VARIETY = 0.08
# The mask: the outer lip contour, grown by this much and feathered over this much (mouth widths).
MASK_GROW = 0.08
MASK_FEATHER = 0.10
# The part of the feather (mask values) where colours are compared.
RING = (0.1, 0.63)
# The canonical box reaches this far past the grown lips (mouth widths), so the feather fits in it.
BOX_MARGIN = 0.03


@dataclasses.dataclass(frozen=True)
class MouthMeasures:
    """Per template frame: the inner-lip gap and mouth width in eye distances (outer eye corners), and
    the template's median mouth width (eye distances) that makes them relative."""

    gap: np.ndarray
    width: np.ndarray
    median_width: float

    def relative(self) -> tuple[np.ndarray, np.ndarray]:
        """(gap, width) in template mouth widths (width 1 is the median mouth)."""
        return self.gap / self.median_width, self.width / self.median_width


def _eye_distance(landmarks: np.ndarray) -> np.ndarray:
    lm = landmarks.astype(np.float64)
    delta = lm[..., face.RIGHT_EYE_OUTER_CORNER, :] - lm[..., face.LEFT_EYE_OUTER_CORNER, :]
    return np.maximum(np.hypot(delta[..., 0], delta[..., 1]), 1e-6)


def gap_and_width_px(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner-lip gap (across the mouth axis, mean of three pairs near the midline) and mouth width
    (corner to corner) in pixels, for (..., 478, 2) landmarks."""
    lm = landmarks.astype(np.float64)
    across = lm[..., face.MOUTH_RIGHT_CORNER, :] - lm[..., face.MOUTH_LEFT_CORNER, :]
    width = np.maximum(np.hypot(across[..., 0], across[..., 1]), 1e-6)
    down = np.stack([-across[..., 1], across[..., 0]], axis=-1) / width[..., None]
    opening = lm[..., list(_GAP_LOWER), :] - lm[..., list(_GAP_UPPER), :]
    gap = (opening * down[..., None, :]).sum(axis=-1).mean(axis=-1)
    return gap, width


def unit_px(landmarks: np.ndarray, median_width: float) -> float:
    """One template mouth width, in pixels, in a frame with (478, 2) ``landmarks``."""
    return float(_eye_distance(landmarks)) * median_width


def measure_mouths(landmarks: np.ndarray, candidates: np.ndarray | None = None) -> MouthMeasures:
    """:class:`MouthMeasures` of (N, 478, 2) landmarks; the median over ``candidates`` (a bool mask of
    frames whose face was tracked, not interpolated) when given."""
    gap, width = gap_and_width_px(landmarks)
    eye = _eye_distance(landmarks)
    gap, width = gap / eye, width / eye
    chosen = width if candidates is None or not candidates.any() else width[candidates]
    return MouthMeasures(gap=gap, width=width, median_width=float(np.median(chosen)))


def rest_frame(measures: MouthMeasures, candidates: np.ndarray) -> int:
    """The frame that shows the template's relaxed mouth: closest to the median width and the smallest
    gaps (its rig gives the targets each viseme is matched against, and its pixels are the canonical
    frame the entries are stored in)."""
    gap, width = measures.relative()
    low_gap = float(np.percentile(gap[candidates], 10))
    score = np.abs(width - 1.0) / WIDTH_TOLERANCE + np.abs(gap - low_gap) / GAP_TOLERANCE
    score = np.where(candidates, score, np.inf)
    return int(np.argmin(score))


def has_variety(measures: MouthMeasures, candidates: np.ndarray) -> bool:
    """Whether the mouth moves enough in the video to be worth banking (:data:`MIN_GAP_VARIETY`)."""
    gap, _ = measures.relative()
    chosen = gap[candidates]
    return chosen.size >= 2 and float(np.percentile(chosen, 95) - np.percentile(chosen, 5)) >= MIN_GAP_VARIETY


def match_distance(
    gap: np.ndarray | float, width: np.ndarray | float, target_gap: float, target_width: float
) -> np.ndarray:
    """Scaled distance of mouths from a target (1: the edge of a match)."""
    return np.hypot(
        (np.asarray(gap) - target_gap) / GAP_TOLERANCE, (np.asarray(width) - target_width) / WIDTH_TOLERANCE
    )


def mouth_speed(measures: MouthMeasures) -> np.ndarray:
    """Per frame, how fast its mouth is changing (scaled by the tolerances, per frame): the larger step to
    either neighbour. A mouth held for a moment is sharp and a full shape; one passing between two
    shapes is neither (motion blur, half of each)."""
    gap, width = measures.relative()
    step = np.hypot(np.diff(gap) / GAP_TOLERANCE, np.diff(width) / WIDTH_TOLERANCE)
    if step.size == 0:
        return np.zeros_like(gap)
    return np.maximum(np.concatenate([step[:1], step]), np.concatenate([step, step[-1:]]))


def select_entries(
    measures: MouthMeasures, candidates: np.ndarray, targets: Mapping[Viseme, tuple[float, float]]
) -> list[tuple[Viseme, int]]:
    """(viseme, template frame) for each viseme whose target (gap, width in mouth widths) some candidate
    frame matches within the tolerance: of those, the nearest, preferring mouths held still
    (:func:`mouth_speed`) to ones in passing. Each frame serves one viseme (the surest match first): two
    visemes with near targets get two different real mouths where the video has them, and the bank no
    copy of one (at run time entries are found by their mouth's shape, not their viseme)."""
    gap, width = measures.relative()
    speed = mouth_speed(measures)
    scores = {}
    for viseme, (target_gap, target_width) in targets.items():
        distance = match_distance(gap, width, target_gap, target_width)
        scores[viseme] = np.where(candidates & (distance <= 1.0), distance + STEADY_WEIGHT * speed, np.inf)
    chosen: list[tuple[Viseme, int]] = []
    taken = np.zeros(len(gap), bool)
    for viseme in sorted(scores, key=lambda v: float(scores[v].min())):
        score = np.where(taken, np.inf, scores[viseme])
        best = int(np.argmin(score))
        if np.isfinite(score[best]):
            chosen.append((viseme, best))
            taken[best] = True
    return sorted(chosen, key=lambda item: VISEME_ORDER.index(item[0]))


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that maps ``source`` points onto ``target``
    points best in least squares (both (M, 2))."""
    src, dst = source.astype(np.float64), target.astype(np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    norm = float((s * s).sum())
    if norm < 1e-9:
        return np.array([[1.0, 0.0, dst_mean[0] - src_mean[0]], [0.0, 1.0, dst_mean[1] - src_mean[1]]])
    a = float((s * d).sum()) / norm
    b = float((s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()) / norm
    rotation = np.array([[a, -b], [b, a]])
    shift = dst_mean - rotation @ src_mean
    return np.hstack([rotation, shift[:, None]])


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``outer`` after ``inner``."""
    full = np.vstack([inner, [0.0, 0.0, 1.0]])
    return outer @ full


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]


def _lip_mask(polygon: np.ndarray, size: tuple[int, int], grow: float, feather: float) -> np.ndarray:
    """uint8 mask of ``size`` (width, height): 255 inside ``polygon`` grown by ``grow`` px, fading to 0
    over ``feather`` px beyond."""
    width, height = size
    inside = np.zeros((height, width), np.uint8)
    cv2.fillPoly(inside, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    # Distance (px) from the lips for every pixel outside them.
    outside = cv2.distanceTransform((inside < 128).astype(np.uint8), cv2.DIST_L2, 5)
    t = np.clip((outside - grow) / max(feather, 1.0), 0.0, 1.0)
    alpha = 1.0 - t * t * (3.0 - 2.0 * t)
    return np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)


def empty_bank(box_height: int = 1, box_width: int = 1) -> dict[str, np.ndarray]:
    """The extras of a template with no bankable mouths (a photo, a video whose mouth hardly moves):
    stored all the same, so the bank is not computed again for every load."""
    return {
        CROPS_KEY: np.zeros((0, box_height, box_width, 3), np.uint8),
        MASKS_KEY: np.zeros((0, box_height, box_width), np.uint8),
        ENTRIES_KEY: np.zeros((0, 4), np.float32),
        META_KEY: np.array(
            [BANK_VERSION, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, *np.zeros(2 * len(ANCHORS))], np.float64
        ),
    }


def build_bank(
    template: Template,
    measures: MouthMeasures,
    reference: int,
    entries: list[tuple[Viseme, int]],
    calibration: Calibration,
) -> dict[str, np.ndarray]:
    """The bank's extras: each entry's mouth region resampled into the ``reference`` frame's
    coordinates (one shared box around the lips of every entry), with its feathered lip mask."""
    if not entries:
        return empty_bank()
    landmarks = template.landmarks.astype(np.float64)
    canonical_anchors = landmarks[reference][list(ANCHORS)]
    to_canonical = [similarity(landmarks[frame][list(ANCHORS)], canonical_anchors) for _, frame in entries]
    polygons = [
        _apply(matrix, landmarks[frame][list(_LIP_POLYGON)])
        for matrix, (_, frame) in zip(to_canonical, entries, strict=True)
    ]
    _, mouth_width = gap_and_width_px(landmarks[reference])
    mouth_width = float(mouth_width)
    reach = (MASK_GROW + MASK_FEATHER + BOX_MARGIN) * mouth_width
    every = np.vstack(polygons)
    x0, y0 = np.floor(every.min(axis=0) - reach)
    x1, y1 = np.ceil(every.max(axis=0) + reach)
    box_width, box_height = int(x1 - x0) + 1, int(y1 - y0) + 1
    into_box = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]])
    crops = np.empty((len(entries), box_height, box_width, 3), np.uint8)
    masks = np.empty((len(entries), box_height, box_width), np.uint8)
    rows = np.empty((len(entries), 4), np.float32)
    gap, width = measures.relative()
    for k, ((viseme, frame), matrix, polygon) in enumerate(zip(entries, to_canonical, polygons, strict=True)):
        # Cubic here: the run-time warp samples it a second time, bilinearly.
        crops[k] = cv2.warpAffine(
            template.frames[frame],
            _compose(into_box, matrix),
            (box_width, box_height),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REPLICATE,
        )
        masks[k] = _lip_mask(
            polygon - (x0, y0), (box_width, box_height), MASK_GROW * mouth_width, MASK_FEATHER * mouth_width
        )
        rows[k] = (VISEME_ORDER.index(viseme), frame, gap[frame], width[frame])
    meta = np.array(
        [
            BANK_VERSION,
            x0,
            y0,
            measures.median_width,
            calibration.gap_scale,
            calibration.narrow_scale,
            calibration.wide_scale,
            *canonical_anchors.reshape(-1),
        ],
        np.float64,
    )
    return {CROPS_KEY: crops, MASKS_KEY: masks, ENTRIES_KEY: rows, META_KEY: meta}


@dataclasses.dataclass(frozen=True)
class Calibration:
    """How the tracked mouths of this template relate to what the renderer draws.

    The face mesh does not follow lips exactly (on the warp renderer's own mouths it reports about 60% of a
    drawn opening or narrowing), and real speakers differ in how far they open and round. So the speaker's own
    range in the video stands for the natural range: the gap 95% of frames stay under is taken for the widest
    viseme (ah), and the narrowest and widest mouths (5th and 95th percentile) for the most rounded (oo) and
    spread (ee). Each scale maps a change the renderer draws (a gap change in mouth widths, a width factor) to
    the same change in tracked units."""

    gap_scale: float = 1.0
    narrow_scale: float = 1.0
    wide_scale: float = 1.0

    def target(
        self, current_gap: float, current_width: float, gap_change: float, width_factor: float
    ) -> tuple[float, float]:
        """The tracked (gap, width) of a frame whose tracked mouth is ``current_gap``, ``current_width``
        once the renderer changes its gap by ``gap_change`` and its width by ``width_factor``."""
        scale = self.narrow_scale if width_factor < 1.0 else self.wide_scale
        return current_gap + self.gap_scale * gap_change, current_width * (1.0 + (width_factor - 1.0) * scale)


# Calibration scales are kept within these: a video whose speaker barely rounds must not have its one
# slightly narrow mouth stand in for "oo".
_SCALE_RANGE = (0.35, 1.5)


def calibrate(
    measures: MouthMeasures,
    candidates: np.ndarray,
    reference: int,
    widest_gap_change: float,
    narrowest_factor: float,
    widest_factor: float,
) -> Calibration:
    """The :class:`Calibration` of a template from its measures, given what the renderer draws for the
    widest viseme (gap change, mouth widths) and the most rounded and spread ones (width factors) on
    the ``reference`` frame."""
    gap, width = measures.relative()
    chosen_gap, chosen_width = gap[candidates], width[candidates] / width[reference]

    def scale(observed: float, drawn: float) -> float:
        return float(np.clip(observed / drawn, *_SCALE_RANGE)) if drawn > 1e-6 else 1.0

    return Calibration(
        gap_scale=scale(float(np.percentile(chosen_gap, 95)) - float(gap[reference]), widest_gap_change),
        narrow_scale=scale(1.0 - float(np.percentile(chosen_width, 5)), 1.0 - narrowest_factor),
        wide_scale=scale(float(np.percentile(chosen_width, 95)) - 1.0, widest_factor - 1.0),
    )


def is_current(extras: Mapping[str, np.ndarray]) -> bool:
    """Whether ``extras`` hold a complete bank of this :data:`BANK_VERSION` (cheap)."""
    if any(key not in extras for key in KEYS):
        return False
    meta, crops = extras[META_KEY], extras[CROPS_KEY]
    count = crops.shape[0] if crops.ndim == 4 else -1
    return (
        meta.ndim == 1
        and meta.shape[0] == _META_HEAD + 2 * len(ANCHORS)
        and int(meta[0]) == BANK_VERSION
        and extras[MASKS_KEY].shape == crops.shape[:3]
        and extras[ENTRIES_KEY].shape == (count, 4)
    )


@dataclasses.dataclass(frozen=True)
class BankChoice:
    """What :meth:`MouthBank.choose` picked: entries with weights summing to 1, the share of the bank's
    mouth against the drawn one (``alpha``), and the blended entries' gap (template mouth widths) for
    the renderer to open the jaw to."""

    entries: tuple[int, ...]
    weights: tuple[float, ...]
    alpha: float
    gap: float


@dataclasses.dataclass(frozen=True)
class BankFrame:
    """What the bank needs of one template frame (computed on its first use, then cached): its tracked
    mouth (template mouth widths), one template mouth width in its pixels, the affine that puts the
    canonical box in it, the region of the frame that covers (x0, y0, x1, y1) with that affine made local
    to it, and per entry the colour shift (BGR) that matches the entry's skin to this frame's around the
    lips."""

    gap: float
    width: float
    unit_px: float
    placement: np.ndarray
    region: tuple[int, int, int, int]
    local: np.ndarray
    colour_shifts: np.ndarray


# At most this many entries are blended into one frame (the nearest): more cost time and add nothing
# a viewer sees, their weights being small.
MAX_BLEND = 3


class MouthBank:
    """A template's bank, ready for rendering (see the module docstring). Thread-safe: render threads
    of every session showing the template share it."""

    def __init__(self, extras: Mapping[str, np.ndarray]) -> None:
        meta = extras[META_KEY]
        self.crops = np.ascontiguousarray(extras[CROPS_KEY])
        self.masks = np.ascontiguousarray(extras[MASKS_KEY])
        rows = extras[ENTRIES_KEY].astype(np.float64)
        self.visemes = tuple(VISEME_ORDER[int(i)] for i in rows[:, 0])
        self.frames = rows[:, 1].astype(int)
        self.gaps, self.widths = rows[:, 2], rows[:, 3]
        self.box_origin = (float(meta[1]), float(meta[2]))
        self.median_width = float(meta[3])
        self.calibration = Calibration(float(meta[4]), float(meta[5]), float(meta[6]))
        self.anchors = meta[_META_HEAD:].reshape(len(ANCHORS), 2)
        # Masks as blend weights.
        self._alphas = [np.ascontiguousarray(mask, np.float32) * (1.0 / 255.0) for mask in self.masks]
        # The feather ring around each entry's lips, where its skin meets the frame's, and the entry's
        # mean colour there: colours are matched on it.
        self._rings = [cv2.inRange(mask, int(RING[0] * 255), int(RING[1] * 255)) for mask in self.masks]
        self._ring_colours = np.array(
            [cv2.mean(crop, mask=ring)[:3] for crop, ring in zip(self.crops, self._rings, strict=True)],
            np.float32,
        )
        # Per template frame; written by render threads, each value computed whole before it is stored.
        self._frames: dict[int, BankFrame] = {}

    @classmethod
    def from_template(cls, template: Template) -> MouthBank | None:
        """The template's bank, or None if it has none (not computed, or empty)."""
        if not is_current(template.extras) or template.extras[CROPS_KEY].shape[0] == 0:
            return None
        return cls(template.extras)

    def __len__(self) -> int:
        return len(self.frames)

    def entry_for(self, viseme: Viseme) -> int | None:
        return self.visemes.index(viseme) if viseme in self.visemes else None

    def frame(self, template_index: int, image: np.ndarray, landmarks: np.ndarray) -> BankFrame:
        """The :class:`BankFrame` of template frame ``template_index`` (``image`` and ``landmarks`` are
        its own). The first call for a frame costs about a millisecond, later ones nothing."""
        found = self._frames.get(template_index)
        if found is None:
            found = self._measure_frame(image, landmarks)
            self._frames[template_index] = found
        return found

    def _measure_frame(self, image: np.ndarray, landmarks: np.ndarray) -> BankFrame:
        gap_px, width_px = gap_and_width_px(landmarks)
        unit = unit_px(landmarks, self.median_width)
        placement = self.placement(landmarks)
        box_height, box_width = self.masks.shape[1:]
        corners = _apply(
            placement, np.array([[0, 0], [box_width, 0], [0, box_height], [box_width, box_height]])
        )
        height, width = image.shape[:2]
        x0, y0 = (int(v) for v in np.maximum(np.floor(corners.min(axis=0)), 0))
        x1 = max(min(int(np.ceil(corners[:, 0].max())) + 1, width), x0)
        y1 = max(min(int(np.ceil(corners[:, 1].max())) + 1, height), y0)
        local = placement.copy()
        local[:, 2] -= (x0, y0)
        # The frame's skin around the lips, seen from the canonical box: each entry's colour shift is
        # the difference of the two on the entry's ring (the skin the warp moves keeps its colour).
        canonical = cv2.warpAffine(
            image,
            placement,
            (box_width, box_height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        around = np.array([cv2.mean(canonical, mask=ring)[:3] for ring in self._rings], np.float32)
        return BankFrame(
            gap=float(gap_px) / unit,
            width=float(width_px) / unit,
            unit_px=unit,
            placement=placement,
            region=(x0, y0, x1, y1),
            local=local,
            colour_shifts=around - self._ring_colours,
        )

    def target(self, frame: BankFrame, gap_change_px: float, width_factor: float) -> tuple[float, float]:
        """The tracked (gap, width) in template mouth widths that ``frame``'s mouth would show once the
        renderer opens it by ``gap_change_px`` and scales its width by ``width_factor``: what
        :meth:`choose` matches."""
        return self.calibration.target(frame.gap, frame.width, gap_change_px / frame.unit_px, width_factor)

    def gap_change_px(self, frame: BankFrame, gap: float) -> float:
        """How far the renderer must open ``frame``'s mouth (px, negative to close it) for it to show
        the tracked ``gap`` (template mouth widths): :meth:`target` reversed."""
        return (gap - frame.gap) / self.calibration.gap_scale * frame.unit_px

    def choose(self, gap: float, width: float) -> BankChoice | None:
        """The entries for a mouth of ``gap`` and ``width`` (template mouth widths), or None when none is
        within the tolerance. The nearest entries within :data:`BLEND_RADIUS` take part (at most
        :data:`MAX_BLEND`), their weights falling smoothly to 0 there: a pose moving between entries
        cross-fades them, and the bank fades against the drawn mouth instead of switching."""
        distance = match_distance(self.gaps, self.widths, gap, width)
        if float(distance.min()) >= 1.0:
            return None
        # Inverse distance: an entry the pose is at shows on its own (a blend of two mouths is a ghost
        # of both); times a window that reaches 0 at the radius, so none enters or leaves with a jump.
        raw = np.clip(1.0 - distance / BLEND_RADIUS, 0.0, None) ** 2 / (distance**2 + NEAR**2)
        near = np.argsort(-raw)[:MAX_BLEND]
        near = near[raw[near] > 1e-6]
        weights = raw[near] / raw[near].sum()
        t = float(np.clip((1.0 - float(distance[near[0]])) / (1.0 - FULL_MATCH), 0.0, 1.0))
        alpha = t * t * (3.0 - 2.0 * t)
        return BankChoice(
            entries=tuple(int(i) for i in near),
            weights=tuple(float(w) for w in weights),
            alpha=alpha,
            gap=float(self.gaps[near] @ weights),
        )

    def placement(self, landmarks: np.ndarray) -> np.ndarray:
        """The 2x3 affine from the canonical box into a frame with ``landmarks``."""
        to_frame = similarity(self.anchors, landmarks[list(ANCHORS)])
        x0, y0 = self.box_origin
        return _compose(to_frame, np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]]))

    def composite(self, image: np.ndarray, frame: BankFrame, choice: BankChoice) -> None:
        """Blend the chosen entries into ``image`` (in place; ``frame`` is its template frame), warped by
        the frame's own landmark transform, colour-matched to the skin around the lips. OpenCV on the
        mouth's region only: about half a millisecond at 512 px."""
        first = choice.entries[0]
        crop = self.crops[first]
        alpha = self._alphas[first] * (choice.weights[0] * choice.alpha)
        if len(choice.entries) > 1:
            # Cross-fade in the canonical box, then one warp: uint8 sums round to the nearest level.
            done = choice.weights[0]
            for index, weight in zip(choice.entries[1:], choice.weights[1:], strict=True):
                crop = cv2.addWeighted(
                    crop, done / (done + weight), self.crops[index], weight / (done + weight), 0
                )
                done += weight
                alpha = cv2.scaleAdd(self._alphas[index], weight * choice.alpha, alpha)
        x0, y0, x1, y1 = frame.region
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        size = (x1 - x0, y1 - y0)
        # One resampling from the canonical box straight into the region of the frame. Outside the box
        # the mask is 0, so the border needs no replicating (a constant border is three times faster).
        warped = cv2.warpAffine(
            crop, frame.local, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
        )
        weight = cv2.warpAffine(alpha, frame.local, size, flags=cv2.INTER_LINEAR, borderValue=0.0)
        region = image[y0:y1, x0:x1]
        # In float32, where OpenCV's per-pixel blend is fastest here (a third of its uint8 time). The bank
        # frames may be lit a little differently: their colour is shifted to the skin around the lips.
        ours = warped.astype(np.float32)
        ours += np.asarray(choice.weights, np.float32) @ frame.colour_shifts[list(choice.entries)]
        blended = cv2.blendLinear(ours, region.astype(np.float32), weight, 1.0 - weight)
        # Rounded and saturated to uint8 (nothing is below 0 once clipped there).
        region[:] = cv2.convertScaleAbs(np.maximum(blended, 0.0, out=blended))
