"""The default CPU renderer: shapes the template's mouth by warping the lower face as it speaks.

Per template frame a *rig* is precomputed from the landmarks: the lower-face crop, coordinates along
and across the mouth, smooth weight maps saying how far each pixel follows the jaw, the upper lip and
the lip corners, and the natural range of the opening (:class:`MouthRange`). Per video frame a
:class:`~avatar_rtc.render.visemes.MouthPose` (from the visemes the TTS spoke at the frame's time, else
from the audio around it via :func:`mouth_shape`) scales those maps into one backward map for
``cv2.remap`` over the crop only; lips that part show a drawn interior (teeth, tongue, a shaded cavity),
lips that close (m, b, p) meet. Everything outside the crop is the template frame, untouched.

A video template that shows its presenter talking has real mouths to offer: its *mouth bank*
(:mod:`avatar_rtc.render.mouth_bank`, computed at preparation as this engine's template extras) holds
one per viseme shape, and where the pose asks for a mouth near one of them, the warp opens the jaw to
that mouth's gap and the real mouth is blended in over the lips instead of the drawn interior.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.engine import ExtrasProgress
from avatar_rtc.avatar.template import Template
from avatar_rtc.render import mouth_bank
from avatar_rtc.render.base import TierStats
from avatar_rtc.render.mouth_bank import KEYS as MOUTH_BANK_KEYS  # WarpEngine's setting is mouth_bank
from avatar_rtc.render.mouth_bank import MouthBank
from avatar_rtc.render.mouth_shape import mouth_shape
from avatar_rtc.render.stream import FrameJob, StreamingRenderer
from avatar_rtc.render.visemes import (
    PRESSED_LIPS,
    VISEME_POSES,
    MouthPose,
    TimedViseme,
    VisemeTrack,
)

# How far a mouth opens in speech, from measurements of real lips. Fromkin (1964, "Lip positions in
# American English vowels", Language and Speech 7) photographed the lips frontally during vowels: the
# midline opening of the most open vowels (/a/, /ae/) is about 1 cm against a mouth about 5 cm wide,
# and close vowels open a few millimetres. Lip-pellet studies of connected speech (Westbury & Hashi
# 1997, J. Phonetics 25) agree: lip separation for open vowels is around 10-15 mm. Adult faces are about
# 11-12 cm from nasion to chin (Farkas' anthropometric norms), so loud speech tops out near 0.3 of the
# mouth width or 0.13-0.14 of the nasion-chin height. Both are used, whichever is smaller: a smile widens
# the mouth by a fifth and more, the face height does not change.
DEFAULT_MAX_OPENING_MOUTH_WIDTHS = 0.30
DEFAULT_MAX_OPENING_FACE_HEIGHTS = 0.14


@dataclasses.dataclass(frozen=True)
class MouthRange:
    """The largest inner-lip opening (midline, upper to lower lip) the renderer draws, relative to the
    face: the smaller of ``mouth_widths`` of the mouth (corner to corner) and ``face_heights`` of the
    face (nasion to chin). Speech at any loudness stays within it."""

    mouth_widths: float = DEFAULT_MAX_OPENING_MOUTH_WIDTHS
    face_heights: float = DEFAULT_MAX_OPENING_FACE_HEIGHTS

    def max_gap_px(self, mouth_width: float, face_height: float) -> float:
        return min(self.mouth_widths * mouth_width, self.face_heights * face_height)


# Of an opening beyond the template's own, the lower lip (with the jaw) does most, the upper lip rises a
# little; closing (m, b, p on a template with parted lips) brings both lips about equally.
LOWER_LIP_SHARE_OPENING = 0.8
LOWER_LIP_SHARE_CLOSING = 0.55
# Geometry, in mouth widths (corner to corner) unless noted.
ROUND_CORNER_PULL = 0.4  # fraction of the half-width the corners move in at roundness +1
SPREAD_CORNER_PUSH = 0.10  # ... and out at roundness -1
CHIN_FADE_START = 0.10  # below the jaw line, the jaw drop starts fading ...
CHIN_FADE_LENGTH = 0.60  # ... and is gone this much further down
UPPER_TEETH_MAX = 0.13  # visible length of the upper incisors below the lip, at most
UPPER_TEETH_EXPOSURE = 0.06  # ... and at least, once the lips part (about 3 mm)
LOWER_TEETH_MAX = 0.09
TOOTH_WIDTH_UPPER = 0.095  # a central incisor is about a fifth of the visible dental arch
TOOTH_WIDTH_LOWER = 0.07
# Mouth interior colours (BGR, 0-255): dark red-brown near the lips, near black deep inside, a dull
# red tongue, off-white teeth.
INTERIOR_EDGE = np.array([30.0, 36.0, 88.0], dtype=np.float32)
INTERIOR_DEEP = np.array([14.0, 14.0, 30.0], dtype=np.float32)
TONGUE = np.array([78.0, 86.0, 168.0], dtype=np.float32)
TEETH = np.array([200.0, 210.0, 222.0], dtype=np.float32)

# Landmarks whose position defines a rig; a template frame whose points are all within this many
# pixels of an existing rig (after a whole-pixel shift) reuses that rig.
_RIG_POINTS = np.array(
    sorted(
        {
            *face.LIP_OUTER_UPPER,
            *face.LIP_OUTER_LOWER,
            *face.LIP_INNER_UPPER,
            *face.LIP_INNER_LOWER,
            *face.JAW_CONTOUR,
            face.NOSE_BOTTOM,
            face.NASION,
        }
    )
)
_RIG_REUSE_TOLERANCE_PX = 0.6
# A bank mouth blended in at least this strongly covers the opening: the drawn interior is not painted.
FULL_BANK_MOUTH = 0.95


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclasses.dataclass(frozen=True)
class MouthRig:
    """Everything per template frame that does not depend on the audio (float32 maps over the crop)."""

    x0: int
    y0: int
    width: int
    height: int
    axis_u: tuple[float, float]  # unit vector corner to corner (image xy)
    axis_v: tuple[float, float]  # unit vector down the face
    mouth_width: float
    lens_half_width: float  # half the distance between the inner lip corners
    grid_x: np.ndarray  # crop-local pixel coordinates
    grid_y: np.ndarray
    u: np.ndarray  # along the mouth, 0 between the inner corners
    below_line: np.ndarray  # signed distance below the line where the lips meet
    is_lower: np.ndarray  # 1 below that line, 0 above
    # The weights each frame's travel along v is made of, over the crop (see warp_maps): per px of the
    # lower lip's drop, the opening profile's share near the lips (0 above the line); per px of the
    # upper lip's rise, minus its weight above the line (0 below); per px of the chin's drop, the
    # whole-jaw weight below the line. And u times the corner pull: the horizontal corner movement
    # per unit of corner gain.
    lower_near: np.ndarray
    upper_signed: np.ndarray
    lower_far: np.ndarray
    u_corner: np.ndarray
    mouth_rows: tuple[int, int]  # crop rows the interior can reach at full opening
    mouth_cols: tuple[int, int]
    # Over that mouth window only (what the interior is painted from): the jaw drop's weight of the
    # opening profile and of the whole jaw, and the upper lip rise's weight, on both sides of the line.
    jaw_near: np.ndarray
    jaw_far: np.ndarray
    upper_lip: np.ndarray
    painted_teeth: float  # 1 for a closed mouth; 0 when the template already shows its teeth
    rest_gap: float  # the template's own inner-lip opening at the midline, px
    max_gap: float  # the largest inner-lip opening speech may show (MouthRange), px
    # The weight maps at the inner-lip centre points (jaw near, jaw far; upper lip): the lips there move
    # by the travel divided out by these, so the drawn opening is the one asked for.
    lower_lip_weights: tuple[float, float]
    upper_lip_weight: float
    corner_weight: float  # the corner pull at the outer lip corners: how far rounding moves them

    @property
    def mouth_window(self) -> tuple[slice, slice]:
        return np.s_[self.mouth_rows[0] : self.mouth_rows[1], self.mouth_cols[0] : self.mouth_cols[1]]

    def shifted(self, dx: int, dy: int) -> MouthRig:
        return dataclasses.replace(self, x0=self.x0 + dx, y0=self.y0 + dy)


def build_rig(
    landmarks: np.ndarray, image_size: tuple[int, int], mouth_range: MouthRange | None = None
) -> MouthRig:
    """The rig for one template frame from its (478, 2) landmarks; ``image_size`` is (width, height),
    ``mouth_range`` how far speech may open the mouth."""
    image_width, image_height = image_size
    lm = landmarks.astype(np.float64)
    left_corner, right_corner = lm[face.MOUTH_LEFT_CORNER], lm[face.MOUTH_RIGHT_CORNER]
    mouth_width = float(np.hypot(*(right_corner - left_corner)))
    if mouth_width < 4.0:
        raise ValueError(f"mouth too small to animate ({mouth_width:.1f} px wide)")
    axis_u = (right_corner - left_corner) / mouth_width
    axis_v = np.array([-axis_u[1], axis_u[0]])
    inner_left, inner_right = lm[face.MOUTH_INNER_LEFT_CORNER], lm[face.MOUTH_INNER_RIGHT_CORNER]
    origin = 0.5 * (inner_left + inner_right)

    def to_uv(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = points - origin
        return rel @ axis_u, rel @ axis_v

    lens_half_width = 0.5 * float((inner_right - inner_left) @ axis_u)
    lens_half_width = max(lens_half_width, 0.3 * mouth_width)
    mid_u, mid_v = to_uv(0.5 * (lm[list(face.LIP_INNER_UPPER)] + lm[list(face.LIP_INNER_LOWER)]))
    order = np.argsort(mid_u)
    mid_u, mid_v = mid_u[order], mid_v[order]
    jaw_u, jaw_v = to_uv(lm[list(face.JAW_CONTOUR)])
    # The jaw line as a function of u: the lowest contour point around each u (the contour is the
    # face outline, so below the mouth it is single-valued).
    jaw_order = np.argsort(jaw_u)
    jaw_u, jaw_v = jaw_u[jaw_order], jaw_v[jaw_order]
    _, nose_v = to_uv(lm[[face.NOSE_BOTTOM]])
    _, chin_v = to_uv(lm[[face.CHIN]])
    nose_v_at, chin_v_at = float(nose_v[0]), float(chin_v[0])
    line_v_centre = float(np.interp(0.0, mid_u, mid_v))
    # A template that already parts its lips keeps its own teeth at the edges of the opening (they
    # move with the lips); painting a second row under them would look wrong.
    lip_gap = float((lm[face.LOWER_LIP_INNER_CENTRE] - lm[face.UPPER_LIP_INNER_CENTRE]) @ axis_v)
    painted_teeth = float(np.clip(1.0 - (lip_gap / mouth_width - 0.02) / 0.05, 0.0, 1.0))
    rest_gap = max(lip_gap, 0.0)
    face_height = float(np.hypot(*(lm[face.CHIN] - lm[face.NASION])))
    max_gap = (mouth_range or MouthRange()).max_gap_px(mouth_width, face_height)

    # Crop: the region the weights can reach, as a rectangle in (u, v), then its bounding box.
    reach_u = 1.05 * mouth_width
    top_v = nose_v_at - 0.04 * mouth_width
    bottom_v = chin_v_at + (CHIN_FADE_START + CHIN_FADE_LENGTH + 0.06) * mouth_width
    corners = np.array([[su * reach_u, sv] for su in (-1.0, 1.0) for sv in (top_v, bottom_v)])
    corner_xy = origin + corners[:, :1] * axis_u + corners[:, 1:] * axis_v
    x0 = max(int(np.floor(corner_xy[:, 0].min())), 0)
    y0 = max(int(np.floor(corner_xy[:, 1].min())), 0)
    x1 = min(int(np.ceil(corner_xy[:, 0].max())) + 1, image_width)
    y1 = min(int(np.ceil(corner_xy[:, 1].max())) + 1, image_height)
    if x1 - x0 < 8 or y1 - y0 < 8:
        raise ValueError("mouth region lies outside the image")
    grid_y, grid_x = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float64)
    rel_x, rel_y = grid_x + x0 - origin[0], grid_y + y0 - origin[1]
    u = rel_x * axis_u[0] + rel_y * axis_u[1]
    v = rel_x * axis_v[0] + rel_y * axis_v[1]

    line_v = np.interp(u, mid_u, mid_v)  # flat past the corners
    below = v - line_v
    is_lower = (below > 0).astype(np.float64)
    abs_u = np.abs(u)

    # Jaw: near the lips the drop follows the lens-shaped opening profile (zero at the corners);
    # towards the chin it becomes one block that tapers off sideways. The blend runs over most of
    # the lip-to-chin distance so the skin below the corners stretches gently instead of folding.
    blend_length = max(0.75 * (chin_v_at - line_v_centre), 0.2 * mouth_width)
    to_chin = _smoothstep(below / blend_length)
    sideways = 1.0 - _smoothstep((abs_u - 0.5 * lens_half_width) / (1.5 * lens_half_width))
    jaw_line_v = np.interp(u, jaw_u, jaw_v)
    below_chin = 1.0 - _smoothstep(
        (v - jaw_line_v - CHIN_FADE_START * mouth_width) / (CHIN_FADE_LENGTH * mouth_width)
    )
    # Nothing at the crop border moves, so the composite has no seam even where the crop was clipped.
    border_px = 4.0
    height, width = grid_x.shape
    border = _smoothstep(
        np.minimum(np.minimum(grid_x, width - 1 - grid_x), np.minimum(grid_y, height - 1 - grid_y))
        / border_px
    )
    jaw_near = (1.0 - to_chin) * below_chin * border
    jaw_far = to_chin * sideways * below_chin * border

    # Upper lip: rises most at the line, fading out towards the nose.
    to_nose = np.clip(-below / np.maximum(line_v - nose_v_at, 1.0), 0.0, 1.0)
    upper_lip = (1.0 - _smoothstep(to_nose)) * border

    # Corners: horizontal pull around the mouth, fading above (before the nose) and below.
    along = 1.0 - _smoothstep((abs_u - lens_half_width) / (0.9 * lens_half_width))
    vertical_reach = np.where(below < 0, 0.35, 0.5) * mouth_width
    across = 1.0 - _smoothstep(np.abs(below) / vertical_reach)
    corner_pull = along * across * border

    max_opening = max(max_gap - rest_gap, 0.0)
    max_drop = LOWER_LIP_SHARE_OPENING * max_opening
    max_rise = (1.0 - LOWER_LIP_SHARE_OPENING) * max_opening
    pad = 3.0
    box_u = np.array([-1.0, 1.0, -1.0, 1.0]) * (lens_half_width * (1 + SPREAD_CORNER_PUSH) + pad)
    box_v = np.array([-1.0, -1.0, 1.0, 1.0])
    box_v = np.where(box_v < 0, float(mid_v.min()) - max_rise - pad, float(mid_v.max()) + max_drop + pad)
    box_xy = origin + box_u[:, None] * axis_u + box_v[:, None] * axis_v
    mouth_cols = (
        int(np.clip(np.floor(box_xy[:, 0].min()) - x0, 0, width)),
        int(np.clip(np.ceil(box_xy[:, 0].max()) - x0 + 1, 0, width)),
    )
    mouth_rows = (
        int(np.clip(np.floor(box_xy[:, 1].min()) - y0, 0, height)),
        int(np.clip(np.ceil(box_xy[:, 1].max()) - y0 + 1, 0, height)),
    )

    window = np.s_[mouth_rows[0] : mouth_rows[1], mouth_cols[0] : mouth_cols[1]]

    def crop_pixel(point: np.ndarray) -> tuple[int, int]:
        row = int(np.clip(round(point[1]) - y0, 0, height - 1))
        return row, int(np.clip(round(point[0]) - x0, 0, width - 1))

    lower_at = crop_pixel(lm[face.LOWER_LIP_INNER_CENTRE])
    upper_at = crop_pixel(lm[face.UPPER_LIP_INNER_CENTRE])
    corner_weight = 0.5 * float(corner_pull[crop_pixel(left_corner)] + corner_pull[crop_pixel(right_corner)])

    def f32(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)

    return MouthRig(
        x0=x0,
        y0=y0,
        width=width,
        height=height,
        axis_u=(float(axis_u[0]), float(axis_u[1])),
        axis_v=(float(axis_v[0]), float(axis_v[1])),
        mouth_width=mouth_width,
        lens_half_width=lens_half_width,
        grid_x=f32(grid_x),
        grid_y=f32(grid_y),
        u=f32(u),
        below_line=f32(below),
        is_lower=f32(is_lower),
        lower_near=f32(is_lower * jaw_near),
        upper_signed=f32((is_lower - 1.0) * upper_lip),
        lower_far=f32(is_lower * jaw_far),
        u_corner=f32(u * corner_pull),
        mouth_rows=mouth_rows,
        mouth_cols=mouth_cols,
        jaw_near=f32(jaw_near[window]),
        jaw_far=f32(jaw_far[window]),
        upper_lip=f32(upper_lip[window]),
        painted_teeth=painted_teeth,
        rest_gap=rest_gap,
        max_gap=max_gap,
        lower_lip_weights=(float(jaw_near[lower_at]), float(jaw_far[lower_at])),
        upper_lip_weight=float(upper_lip[upper_at]),
        corner_weight=corner_weight,
    )


def pose_from_audio(openness: float, roundness: float) -> MouthPose:
    """The pose for an audio-only estimate (:func:`mouth_shape`): silence is the template's own mouth,
    full openness the natural maximum, linearly between; rounded sounds open a little taller than
    spread ones."""
    if openness <= 1e-3:
        return MouthPose()
    openness = min(float(openness), 1.0)
    roundness = float(np.clip(roundness, -1.0, 1.0))
    opening = min(openness * (1.0 + 0.2 * roundness), 1.0)
    return MouthPose(opening=opening, jaw=0.6 - 0.25 * max(-roundness, 0.0), roundness=roundness, rest=1.0)


def lip_travel(rig: MouthRig, pose: MouthPose) -> tuple[float, float]:
    """(lower lip down, upper lip up) at the midline in px for ``pose``; negative values close the lips.

    The inner-lip gap the pose asks for: its ``opening`` share of the way from its base (the template's
    own gap for rest and vowels, closed lips for the consonants that shape them) to the natural maximum
    (``MouthRange``), never more than that maximum."""
    base = pose.rest * rig.rest_gap
    gap = base + pose.opening * max(rig.max_gap - base, 0.0)
    # Below zero the lips press together (m, b, p), by a little at most.
    gap = min(max(gap, PRESSED_LIPS * rig.max_gap), max(rig.max_gap, rig.rest_gap))
    change = gap - rig.rest_gap
    share = LOWER_LIP_SHARE_OPENING if change >= 0 else LOWER_LIP_SHARE_CLOSING
    lower = share * change
    return lower, change - lower


def warp_maps(
    rig: MouthRig, pose: MouthPose
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The backward map of the crop for ``pose`` (``cv2.remap``'s map_x, map_y, crop-local), and over
    the rig's mouth window (``rig.mouth_window``) the lower lip's drop, the upper lip's rise (px,
    negative when closing) and the lens profile of the opening (0 at the inner corners, 1 in the
    middle), which the interior is painted from."""
    lower, upper = lip_travel(rig, pose)
    roundness = min(max(pose.roundness, -1.0), 1.0)  # plain floats: this runs for every frame
    corner_gain = roundness * (ROUND_CORNER_PULL if roundness > 0 else SPREAD_CORNER_PUSH)
    # Sampling further out along u than the output pixel pulls the corners in (rounded lips).
    u_source = cv2.scaleAdd(rig.u_corner, corner_gain, rig.u)
    # The lens: 0 at the inner corners, 1 in the middle, lens-shaped; t (1 - (u / half width)^2, not
    # below 0) becomes t * (1.5 - 0.5 t).
    lens_t = cv2.multiply(u_source, u_source, scale=-1.0 / (rig.lens_half_width * rig.lens_half_width))
    lens_t += 1.0
    lens_t = cv2.max(lens_t, 0.0)  # vectorised; np.maximum is five times slower on float32 here
    lens = cv2.multiply(lens_t, lens_t, scale=-0.5)
    lens = cv2.scaleAdd(lens_t, 1.5, lens)
    # The chin follows the jaw: fully when the opening is a jaw drop (ah), less when the lips part over
    # nearly closed teeth (ee), a little when the lips close.
    chin_ratio = 0.35 + 0.65 * min(max(pose.jaw, 0.0), 1.0) if lower > 0 else 0.3
    near_weight, far_weight = rig.lower_lip_weights
    lower /= max(near_weight + far_weight * chin_ratio, 0.5)
    upper /= max(rig.upper_lip_weight, 0.5)
    chin = chin_ratio * lower
    # Signed travel along v (down positive): below the line the lower face drops by
    # lower * near * lens + chin * far; above it the upper lip rises by upper * lip * lens.
    travel = cv2.addWeighted(rig.lower_near, lower, rig.upper_signed, upper, 0.0)
    travel = cv2.multiply(travel, lens)
    travel = cv2.scaleAdd(rig.lower_far, chin, travel)
    au, av = rig.axis_u, rig.axis_v
    map_x = cv2.scaleAdd(travel, -av[0], cv2.scaleAdd(rig.u_corner, corner_gain * au[0], rig.grid_x))
    map_y = cv2.scaleAdd(travel, -av[1], cv2.scaleAdd(rig.u_corner, corner_gain * au[1], rig.grid_y))
    window = rig.mouth_window
    lens_w = lens[window]
    lower_drop = lower * (rig.jaw_near * lens_w) + chin * rig.jaw_far
    upper_rise = upper * rig.upper_lip * lens_w
    return map_x, map_y, lower_drop, upper_rise, lens_w


def drawn_inner_lip_gap(rig: MouthRig, pose: MouthPose, landmarks: np.ndarray) -> float:
    """Where the warp draws the inner lips at the midline for ``pose``: the distance in px between the
    output rows showing the template's upper and lower inner-lip centre points (``landmarks`` are the
    rig's frame's). Read off the backward map itself, so it measures what is drawn."""
    _, map_y, _, _, _ = warp_maps(rig, pose)
    upper = landmarks[face.UPPER_LIP_INNER_CENTRE].astype(np.float64)
    lower = landmarks[face.LOWER_LIP_INNER_CENTRE].astype(np.float64)
    column = round(0.5 * (upper[0] + lower[0])) - rig.x0
    source_y = map_y[:, column].astype(np.float64) + rig.y0
    rows = np.arange(rig.height, dtype=np.float64) + rig.y0
    on_lower_side = rig.is_lower[:, column] > 0
    upper_rows = rows[~on_lower_side & (source_y <= upper[1])]
    lower_rows = rows[on_lower_side & (source_y >= lower[1])]
    if upper_rows.size == 0 or lower_rows.size == 0:
        raise ValueError("the inner lips are outside the rig")

    # Sub-pixel: where the source coordinate crosses the landmark between two output rows.
    def crossing(row: float, target: float) -> float:
        index = int(row - rig.y0)
        a, b = source_y[index], source_y[min(index + 1, rig.height - 1)]
        return row + (target - a) / (b - a) if b != a else row

    top = crossing(float(upper_rows.max()), upper[1])
    bottom = crossing(float(lower_rows.min()) - 1.0, lower[1])
    return float(bottom - top)


def drawn_mouth_change(rig: MouthRig, pose: MouthPose) -> tuple[float, float, float]:
    """How the warp changes the template frame's mouth for ``pose``: the inner-lip gap's change (px),
    the mouth width's factor (corner to corner), and how far that departs from the frame's own mouth
    (0: not at all, 1: clearly). The mouth bank is matched on these."""
    lower, upper = lip_travel(rig, pose)
    roundness = min(max(pose.roundness, -1.0), 1.0)  # plain floats: this runs for every frame
    corner_gain = roundness * (ROUND_CORNER_PULL if roundness > 0 else SPREAD_CORNER_PUSH)
    # The corners sample from (1 + gain * weight) times further out (see warp_maps).
    width_factor = 1.0 / (1.0 + corner_gain * rig.corner_weight)
    change = min(max(abs(lower + upper) / (0.04 * rig.mouth_width), abs(roundness) / 0.25), 1.0)
    departure = change * change * (3.0 - 2.0 * change)
    return lower + upper, width_factor, departure


def opening_for_gap(rig: MouthRig, pose: MouthPose, gap_px: float) -> float:
    """The ``opening`` that makes :func:`lip_travel` draw an inner-lip gap of ``gap_px`` with ``pose``'s
    other settings (its inverse)."""
    base = pose.rest * rig.rest_gap
    span = rig.max_gap - base
    if span <= 1e-3:
        return pose.opening
    return float(np.clip((gap_px - base) / span, PRESSED_LIPS, 1.0))


def render_mouth(
    frame: np.ndarray, rig: MouthRig, pose: MouthPose, paint_interior: bool = True
) -> np.ndarray:
    """``frame`` (the rig's template frame) with its mouth in ``pose``; a new array, ``frame`` untouched.
    ``paint_interior`` False leaves the opening unpainted, for a caller that covers it with a real mouth."""
    output = frame.copy()
    lower, upper = lip_travel(rig, pose)
    if abs(lower) + abs(upper) < 0.05 and abs(pose.roundness) < 1e-3:
        return output
    y0, x0 = rig.y0, rig.x0
    crop = frame[y0 : y0 + rig.height, x0 : x0 + rig.width]
    map_x, map_y, lower_drop, upper_rise, lens = warp_maps(rig, pose)
    # remap turns float maps into fixed point (1/32 px) block by block as it goes; converting them
    # first gives the same picture in about 60% of the time (0.36 against 0.64 ms for this crop).
    fixed_xy, fixed_fraction = cv2.convertMaps(map_x, map_y, cv2.CV_16SC2)
    warped = cv2.remap(
        crop, fixed_xy, fixed_fraction, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )

    if lower + upper > 0.0 and paint_interior:
        # The tear: output pixels whose source lies across the line where the lips meet.
        window = rig.mouth_window
        below = rig.below_line[window]
        lower_w = rig.is_lower[window]
        drop_w, rise_w = lower_drop, upper_rise
        across = lower_w * (drop_w - below) + (1.0 - lower_w) * (rise_w + below)
        feather = max(1.0, 0.015 * rig.mouth_width)
        alpha = np.clip(across * (1.0 / feather), 0.0, 1.0)
        region = warped[window]
        if float(alpha.max()) > 0.0:
            region[:] = _paint_interior(region, alpha, below, drop_w, rise_w, lens, rig.u[window], pose, rig)
    output[y0 : y0 + rig.height, x0 : x0 + rig.width] = warped
    return output


def _soft_inside(distance_inside: np.ndarray, edge_px: float = 0.8) -> np.ndarray:
    """1 well inside a band (``distance_inside`` > 0 px from its edge), 0 outside, a soft edge between."""
    return _smoothstep(distance_inside * (1.0 / (2.0 * edge_px)) + 0.5)


def _tooth_gaps(u: np.ndarray, tooth_width: float) -> tuple[np.ndarray, np.ndarray]:
    """(shade, edge) across a row of teeth: a faint dark line between neighbours (the midline falls
    between the central incisors), and each tooth's biting edge a little shorter near its sides."""
    phase = u * (1.0 / tooth_width)
    from_gap = np.abs(phase - np.round(phase))  # 0 at a gap, 0.5 mid-tooth
    shade = 1.0 - 0.15 * np.clip(1.0 - from_gap * (tooth_width / 0.9), 0.0, 1.0)
    edge = 0.86 + 0.14 * np.sqrt(2.0 * from_gap)
    return shade, edge


def _paint_interior(
    region: np.ndarray,
    alpha: np.ndarray,
    below: np.ndarray,
    drop: np.ndarray,
    rise: np.ndarray,
    lens: np.ndarray,
    u: np.ndarray,
    pose: MouthPose,
    rig: MouthRig,
) -> np.ndarray:
    """The mouth interior composited into ``region`` where ``alpha`` > 0: upper and lower teeth (unless
    the template shows its own, which then move with the lips), the dark cavity between them, darker
    inside and towards the corners, and the tongue low in it (or its tip between the teeth for th)."""
    mouth_width = rig.mouth_width
    gap = np.maximum(drop + rise, 1e-3)  # the opening's height in this column
    from_top = np.clip(below + rise, 0.0, None)  # px below the moved upper lip
    from_bottom = np.clip(gap - from_top, 0.0, None)  # px above the moved lower lip
    jaw = float(np.clip(pose.jaw, 0.0, 1.0))
    tuck = float(np.clip(pose.lip_tuck, 0.0, 1.0))
    root_lens = np.sqrt(lens)

    # Teeth: the part of the opening the jaw leaves closed shows teeth, mostly the upper ones; with the
    # lower lip tucked under them (f, v) the upper teeth fill it.
    # A template that shows its own teeth keeps them (the upper row moves with the upper lip, the lower
    # row with the lower lip): then none are drawn, and the opening between them is the dark cavity.
    # The upper incisors show a few millimetres below the lip as soon as the lips part.
    upper_share = (0.6 + 0.4 * tuck) * rig.painted_teeth
    teeth_height = (1.0 - jaw) * gap
    exposure = np.minimum(UPPER_TEETH_EXPOSURE * mouth_width * rig.painted_teeth, teeth_height)
    upper_height = np.minimum(np.maximum(teeth_height * upper_share, exposure), UPPER_TEETH_MAX * mouth_width)
    upper_height = upper_height + (tuck * rig.painted_teeth) * (gap - upper_height)
    lower_height = np.minimum(
        teeth_height - np.minimum(upper_height, teeth_height), LOWER_TEETH_MAX * mouth_width
    )
    # Teeth recede along the dental arch: none in the dark corners of the mouth.
    teeth_presence = rig.painted_teeth * _smoothstep((lens - 0.08) * (1.0 / 0.35))
    upper_height *= teeth_presence
    lower_height *= teeth_presence
    cavity = np.maximum(gap - upper_height - lower_height, 0.0)
    into_cavity = np.minimum(from_top - upper_height, from_bottom - lower_height)

    # Cavity: dark red-brown at its edges, near black in the middle and towards the corners.
    middle = _smoothstep(into_cavity / (0.5 * cavity + 1e-3))
    depth = np.minimum(cavity * (1.0 / (0.1 * mouth_width)), 1.0)  # a slit is shallow, lit from the lips
    deep = (0.3 + 0.7 * middle * depth) * (0.55 + 0.45 * root_lens)
    # Colours are built channel first, (3, rows, cols): numpy then runs its loops along the rows, not
    # over three channels at a time (four times faster on this window).
    colour = _channels(INTERIOR_EDGE) + _channels(INTERIOR_DEEP - INTERIOR_EDGE) * deep
    # Tongue: its back shows low in a mouth open more than a little, lit at the front, in shadow behind.
    open_enough = float(
        _smoothstep(np.array((float(cavity.max()) - 0.04 * mouth_width) / (0.08 * mouth_width)))
    )
    if open_enough > 0.0:
        tongue_top = 0.42 * cavity * root_lens
        on_tongue = (
            _soft_inside(tongue_top - (from_bottom - lower_height), 1.2) * root_lens * (0.8 * open_enough)
        )
        tongue_colour = _channels(TONGUE) * (0.55 + 0.35 * lens)
        colour = colour + (tongue_colour - colour) * on_tongue
    if pose.tongue_tip > 0.0:
        tip = float(np.clip(pose.tongue_tip, 0.0, 1.0)) * _smoothstep((lens - 0.35) * (1.0 / 0.3))
        colour = colour + (_channels(TONGUE * 1.1) - colour) * tip

    if float(upper_height.max()) > 0.3 or float(lower_height.max()) > 0.3:
        # Upper teeth: shaded towards the corners, in the lip's shadow at the top, slightly translucent
        # at the biting edge, with faint lines between them.
        gaps, edge = _tooth_gaps(u, TOOTH_WIDTH_UPPER * mouth_width)
        # Where the lower lip is tucked under the teeth (f, v) they rest on it: no rounded edges.
        upper_edge = upper_height * (edge + tuck * (1.0 - edge))
        in_upper = _soft_inside(upper_edge - from_top) * (upper_height > 0.3)
        upper_shade = (0.74 + 0.26 * root_lens) * gaps
        upper_shade *= 0.84 + 0.16 * _smoothstep(from_top / (0.3 * upper_height + 0.6))
        upper_shade *= 0.92 + 0.08 * _smoothstep((upper_edge - from_top) / 1.5)
        colour = colour + (_channels(TEETH) * upper_shade - colour) * in_upper
        # Lower teeth: smaller and more in shadow, under the upper ones.
        gaps, edge = _tooth_gaps(u, TOOTH_WIDTH_LOWER * mouth_width)
        in_lower = _soft_inside(lower_height * edge - from_bottom) * (lower_height > 0.3)
        lower_shade = (0.6 + 0.3 * root_lens) * gaps
        lower_shade *= 0.85 + 0.15 * _smoothstep(from_bottom / (0.4 * lower_height + 0.6))
        colour = colour + (_channels(TEETH) * lower_shade - colour) * in_lower

    blended = region.transpose(2, 0, 1).astype(np.float32) * (1.0 - alpha) + colour * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _channels(colour: np.ndarray) -> np.ndarray:
    """A BGR colour shaped to broadcast over a channel-first (3, rows, cols) image."""
    return colour.reshape(3, 1, 1)


class _TemplateRigs:
    """The rigs of one template, shared by every session rendering it."""

    # A rig is about 1.5 MB and takes about 2.5 ms to build. A photo template needs a handful; a video
    # template could need one per frame, so keep the most recently used ones and rebuild the rest.
    max_rigs = 64

    def __init__(
        self, template: Template, mouth_range: MouthRange | None = None, use_bank: bool = True
    ) -> None:
        self.template = template
        self.mouth_range = mouth_range or MouthRange()
        # The template's real mouths, if it has any (None: the drawn mouth everywhere).
        self.bank = MouthBank.from_template(template) if use_bank else None
        self.lock = threading.Lock()
        self.by_frame: OrderedDict[int, MouthRig] = OrderedDict()
        self.unique: deque[tuple[np.ndarray, MouthRig]] = deque(maxlen=self.max_rigs)

    def rig(self, template_index: int) -> MouthRig:
        with self.lock:
            rig = self.by_frame.get(template_index)
            if rig is None:
                rig = self._find_or_build(template_index)
                self.by_frame[template_index] = rig
                if len(self.by_frame) > self.max_rigs:
                    self.by_frame.popitem(last=False)
            else:
                self.by_frame.move_to_end(template_index)
        return rig

    def _find_or_build(self, template_index: int) -> MouthRig:
        points = self.template.landmarks[template_index][_RIG_POINTS].astype(np.float64)
        width, height = self.template.size
        # Idle loops made from a photo move the face by sub-pixel amounts: a rig that is the same up to
        # a whole-pixel shift is as good as a new one, and saves the memory of one per frame.
        for reference, base in self.unique:
            delta = points - reference
            shift = np.round(delta.mean(axis=0))
            if np.abs(delta - shift).max() > _RIG_REUSE_TOLERANCE_PX:
                continue
            dx, dy = int(shift[0]), int(shift[1])
            if 0 <= base.x0 + dx and base.x0 + dx + base.width <= width:
                if 0 <= base.y0 + dy and base.y0 + dy + base.height <= height:
                    return base.shifted(dx, dy)
        rig = build_rig(self.template.landmarks[template_index], (width, height), self.mouth_range)
        self.unique.append((points, rig))
        return rig


def bank_choice(
    bank: MouthBank, rig: MouthRig, pose: MouthPose, frame: mouth_bank.BankFrame
) -> mouth_bank.BankChoice | None:
    """The bank's mouths for ``pose`` in the template frame of ``rig`` and ``frame``, or None for the drawn
    mouth: none near enough, the pose is the template's own mouth (which then stays exactly as it
    is), or it tucks the lip or shows the tongue (which the bank cannot tell from other shapes)."""
    gap_change, width_factor, departure = drawn_mouth_change(rig, pose)
    drawn_only = min(max(pose.lip_tuck, pose.tongue_tip, 0.0), 1.0)
    if departure <= 1e-3 or drawn_only >= 1.0:
        return None
    choice = bank.choose(*bank.target(frame, gap_change, width_factor))
    if choice is None:
        return None
    alpha = choice.alpha * departure * (1.0 - drawn_only)
    return dataclasses.replace(choice, alpha=alpha) if alpha > 1e-3 else None


def build_mouth_bank(template: Template, mouth_range: MouthRange | None = None) -> dict[str, np.ndarray]:
    """The template's mouth bank (:mod:`avatar_rtc.render.mouth_bank`) as extras: each bankable
    viseme's target is what this renderer would draw for it on the template's rest frame, and the
    frame that shows the nearest mouth becomes its entry."""
    found = template.extras.get("face_found")
    candidates = np.ones(template.frame_count, bool) if found is None else np.asarray(found).astype(bool)
    if found is not None and not candidates.any():
        candidates[:] = True
    measures = mouth_bank.measure_mouths(template.landmarks, candidates)
    if not mouth_bank.has_variety(measures, candidates):
        return mouth_bank.empty_bank()
    reference = mouth_bank.rest_frame(measures, candidates)
    landmarks = template.landmarks[reference]
    try:
        rig = build_rig(landmarks, template.size, mouth_range)
    except ValueError:  # no usable mouth on the rest frame: nothing to match against
        return mouth_bank.empty_bank()
    unit = mouth_bank.unit_px(landmarks, measures.median_width)
    changes = {v: drawn_mouth_change(rig, VISEME_POSES[v])[:2] for v in mouth_bank.BANK_VISEMES}
    calibration = mouth_bank.calibrate(
        measures,
        candidates,
        reference,
        widest_gap_change=max(gap for gap, _ in changes.values()) / unit,
        narrowest_factor=min(factor for _, factor in changes.values()),
        widest_factor=max(factor for _, factor in changes.values()),
    )
    gaps, widths = measures.relative()
    targets = {
        viseme: calibration.target(float(gaps[reference]), float(widths[reference]), gap / unit, factor)
        for viseme, (gap, factor) in changes.items()
    }
    entries = mouth_bank.select_entries(measures, candidates, targets)
    return mouth_bank.build_bank(template, measures, reference, entries, calibration)


class WarpRenderer(StreamingRenderer):
    """One session's warp renderer (see the module docstring)."""

    # A window centred on the frame time: the mouth shape then matches the sound heard with it.
    window_before_s = 0.04
    lookahead_s = 0.04
    # With visemes, the share of a vowel's opening that follows the loudness (the rest is the vowel's).
    loudness_share = 0.6

    def __init__(self, template: Template, rigs: _TemplateRigs) -> None:
        super().__init__(template)
        self._rigs = rigs
        self._visemes = VisemeTrack()
        # Frames that showed a real mouth from the template's bank (a statistic; tests read it too).
        self.mouth_bank_frames = 0

    @property
    def mouth_bank(self) -> MouthBank | None:
        """The template's bank of real mouths this renderer uses (None: it draws every mouth)."""
        return self._rigs.bank

    def push_visemes(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        self._visemes.push(visemes, media_time)

    def clear(self) -> None:
        super().clear()
        self._visemes.clear()

    def frame_pose(self, job: FrameJob) -> MouthPose:
        """The mouth for the frame: the visemes said at its media time where the TTS gave them,
        else an estimate from the audio around it."""
        openness, roundness = mouth_shape(job.audio, self.sample_rate)
        pose = self._visemes.pose_at(job.index / self.fps)
        if pose is None:
            return pose_from_audio(openness, roundness)
        # The vowel sets the lip shape and how high the jaw goes relative to other vowels; how loud it
        # is sets how far it goes (stressed, louder syllables open wider). Consonants that shape the lips
        # themselves (rest = 0) ignore the loudness.
        vowel = float(np.clip(pose.rest, 0.0, 1.0))
        loudness_share = self.loudness_share * vowel
        opening = (1.0 - loudness_share) * pose.opening + loudness_share * openness
        return dataclasses.replace(pose, opening=opening)

    def render_pose(self, template_index: int, pose: MouthPose) -> np.ndarray:
        """The template frame with its mouth in ``pose``: a real mouth from the template's bank where
        one is near the pose, the drawn one elsewhere (and blended between the two at the edge)."""
        frame = self.template.frames[template_index]
        rig = self._rigs.rig(template_index)
        bank = self._rigs.bank
        if bank is None:
            return render_mouth(frame, rig, pose)
        bank_frame = bank.frame(template_index, frame, self.template.landmarks[template_index])
        choice = bank_choice(bank, rig, pose, bank_frame)
        if choice is None:
            return render_mouth(frame, rig, pose)
        # The jaw opens to the real mouth's gap, so the chin the warp moves and the lips blended in over
        # it agree; the drawn interior is needed only where the real mouth does not cover it (under a
        # real mouth at 95% and more, the unpainted opening shows through by a twentieth at most, and
        # painting it would cost as much as the real mouth does).
        target = opening_for_gap(rig, pose, rig.rest_gap + bank.gap_change_px(bank_frame, choice.gap))
        pose = dataclasses.replace(pose, opening=pose.opening + choice.alpha * (target - pose.opening))
        image = render_mouth(frame, rig, pose, paint_interior=choice.alpha < FULL_BANK_MOUTH)
        bank.composite(image, bank_frame, choice)
        self.mouth_bank_frames += 1
        return image

    def render_frame(self, template_index: int, openness: float, roundness: float) -> np.ndarray:
        """The frame for an audio-only estimate (:func:`mouth_shape`'s openness and roundness)."""
        return self.render_pose(template_index, pose_from_audio(openness, roundness))

    def render_batch(self, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
        return [self.render_pose(job.template_index, self.frame_pose(job)) for job in jobs]


class WarpEngine:
    """Process-wide part of the warp renderer: rigs cached per template, shared across sessions.

    It stores no extras and keeps nothing on a device; its rig cache follows the library's RAM tier
    (``evict``) and is bounded on its own too, least recently used first (rigs rebuild cheaply).
    """

    name = "warp"

    def __init__(
        self, max_templates: int = 32, mouth_range: MouthRange | None = None, mouth_bank: bool = True
    ) -> None:
        self.max_templates = max_templates
        self.mouth_range = mouth_range or MouthRange()
        # The bank of the template's own mouths: its extras (computed at preparation, cached with the
        # template) and its use. Off, every mouth is drawn and templates need no extras from this engine.
        self.use_mouth_bank = mouth_bank
        self.extras_keys: tuple[str, ...] = MOUTH_BANK_KEYS if mouth_bank else ()
        self._lock = threading.Lock()
        self._rigs: OrderedDict[str, _TemplateRigs] = OrderedDict()

    def rigs(self, template: Template) -> _TemplateRigs:
        with self._lock:
            entry = self._rigs.get(template.id)
            # A template re-prepared under the same id must not get the old rigs, and one whose bank was
            # completed since (a new copy with more extras) must get its bank.
            if (
                entry is None
                or (
                    entry.template.landmarks is not template.landmarks
                    and not np.array_equal(entry.template.landmarks, template.landmarks)
                )
                or entry.template.extras.get(mouth_bank.CROPS_KEY)
                is not template.extras.get(mouth_bank.CROPS_KEY)
            ):
                entry = _TemplateRigs(template, self.mouth_range, self.use_mouth_bank)
                self._rigs[template.id] = entry
            self._rigs.move_to_end(template.id)
            while len(self._rigs) > self.max_templates:
                self._rigs.popitem(last=False)  # sessions keep their own reference to their rigs
            return entry

    def template_extras(
        self, template: Template, progress: ExtrasProgress | None = None
    ) -> dict[str, np.ndarray]:
        """The template's mouth bank (empty for a photo or a mouth that hardly moves); nothing when the
        bank is off. Landmarks and a few frames only: well under a second for a 30 s video."""
        if not self.use_mouth_bank:
            return {}
        if progress is not None:
            progress(0, template.frame_count)
        extras = build_mouth_bank(template, self.mouth_range)
        if progress is not None:
            progress(template.frame_count, template.frame_count)
        return extras

    def has_extras(self, template: Template) -> bool:
        return not self.use_mouth_bank or mouth_bank.is_current(template.extras)

    def warm(self, template: Template) -> None:
        self.rigs(template)

    def evict(self, template_id: str) -> None:
        with self._lock:
            self._rigs.pop(template_id, None)

    def tier_stats(self) -> TierStats:
        with self._lock:
            return TierStats(templates=len(self._rigs))

    def close(self) -> None:
        pass

    def open(self, template: Template) -> WarpRenderer:
        return WarpRenderer(template, self.rigs(template))
