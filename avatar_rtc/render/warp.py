"""The default CPU renderer: opens the template's mouth by warping the lower face with the audio.

Per template frame a *rig* is precomputed from the landmarks: the lower-face crop, coordinates along
and across the mouth, and smooth weight maps saying how far each pixel follows the jaw, the upper
lip and the lip corners. Per video frame, openness and roundness from :func:`mouth_shape` scale those
maps into one backward map for ``cv2.remap`` over the crop only, and the gap that opens between the
lips is painted as a mouth interior. Everything outside the crop is the template frame, untouched.
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
from avatar_rtc.render.base import TierStats
from avatar_rtc.render.mouth_shape import mouth_shape
from avatar_rtc.render.stream import FrameJob, StreamingRenderer

# Geometry, in mouth widths (corner to corner) unless noted.
JAW_DROP = 0.36  # lower lip / chin travel at full openness
UPPER_LIP_RISE = 0.07  # upper lip travel at full openness
ROUND_CORNER_PULL = 0.16  # fraction of the half-width the corners move in at roundness +1
SPREAD_CORNER_PUSH = 0.10  # ... and out at roundness -1
ROUND_HEIGHT_GAIN = 0.25  # rounded: taller opening; spread: flatter
CHIN_FADE_START = 0.10  # below the jaw line, the jaw drop starts fading ...
CHIN_FADE_LENGTH = 0.60  # ... and is gone this much further down
# Mouth interior colours (BGR, 0-255): dark red-brown at the lips, near black deep inside.
INTERIOR_EDGE = np.array([34.0, 44.0, 96.0], dtype=np.float32)
INTERIOR_DEEP = np.array([12.0, 14.0, 30.0], dtype=np.float32)
TONGUE = np.array([60.0, 72.0, 150.0], dtype=np.float32)
TEETH = np.array([196.0, 204.0, 214.0], dtype=np.float32)

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
        }
    )
)
_RIG_REUSE_TOLERANCE_PX = 0.6


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
    jaw_near: np.ndarray  # weight of the opening profile (near the lips) in the jaw drop
    jaw_far: np.ndarray  # weight of the whole-jaw drop (chin), independent of the lip profile
    upper_lip: np.ndarray  # weight of the upper lip rise
    corner_pull: np.ndarray  # weight of the horizontal corner movement
    mouth_rows: tuple[int, int]  # crop rows the interior can reach at full opening
    mouth_cols: tuple[int, int]
    painted_teeth: float  # 1 for a closed mouth; 0 when the template already shows its teeth

    def shifted(self, dx: int, dy: int) -> MouthRig:
        return dataclasses.replace(self, x0=self.x0 + dx, y0=self.y0 + dy)


def build_rig(landmarks: np.ndarray, image_size: tuple[int, int]) -> MouthRig:
    """The rig for one template frame from its (478, 2) landmarks; ``image_size`` is (width, height)."""
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

    max_drop = JAW_DROP * (1 + ROUND_HEIGHT_GAIN) * mouth_width
    max_rise = UPPER_LIP_RISE * (1 + ROUND_HEIGHT_GAIN) * mouth_width
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
        jaw_near=f32(jaw_near),
        jaw_far=f32(jaw_far),
        upper_lip=f32(upper_lip),
        corner_pull=f32(corner_pull),
        mouth_rows=mouth_rows,
        mouth_cols=mouth_cols,
        painted_teeth=painted_teeth,
    )


def render_mouth(frame: np.ndarray, rig: MouthRig, openness: float, roundness: float) -> np.ndarray:
    """``frame`` (the rig's template frame) with the mouth opened; a new array, ``frame`` untouched."""
    output = frame.copy()
    if openness <= 1e-3:
        return output
    openness = min(float(openness), 1.0)
    roundness = float(np.clip(roundness, -1.0, 1.0))
    y0, x0 = rig.y0, rig.x0
    crop = frame[y0 : y0 + rig.height, x0 : x0 + rig.width]
    mouth_width = rig.mouth_width
    height_gain = 1.0 + ROUND_HEIGHT_GAIN * roundness
    jaw_drop = openness * JAW_DROP * mouth_width * height_gain
    lip_rise = openness * UPPER_LIP_RISE * mouth_width * height_gain
    corner_gain = roundness * (ROUND_CORNER_PULL if roundness > 0 else SPREAD_CORNER_PUSH)

    # Sampling further out along u than the output pixel pulls the corners in (rounded lips).
    u_shift = rig.u * (corner_gain * rig.corner_pull)
    u_source = rig.u + u_shift
    lens_t = 1.0 - np.square(u_source * (1.0 / rig.lens_half_width))
    np.maximum(lens_t, 0.0, out=lens_t)
    lens = lens_t * (1.5 - 0.5 * lens_t)  # 0 at the inner corners, 1 in the middle, lens-shaped
    lower_drop = jaw_drop * (rig.jaw_near * lens + rig.jaw_far)
    upper_rise = lip_rise * rig.upper_lip * lens
    is_lower = rig.is_lower
    # Signed travel along v (down positive): the lower face drops, the upper lip rises.
    travel = is_lower * (lower_drop + upper_rise) - upper_rise
    au, av = rig.axis_u, rig.axis_v
    map_x = rig.grid_x + u_shift * au[0] - travel * av[0]
    map_y = rig.grid_y + u_shift * au[1] - travel * av[1]
    warped = cv2.remap(crop, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # The tear: output pixels whose source lies across the line where the lips meet.
    r0, r1 = rig.mouth_rows
    c0, c1 = rig.mouth_cols
    window = np.s_[r0:r1, c0:c1]
    below = rig.below_line[window]
    lower_w = is_lower[window]
    drop_w, rise_w = lower_drop[window], upper_rise[window]
    across = lower_w * (drop_w - below) + (1.0 - lower_w) * (rise_w + below)
    feather = max(1.2, 0.02 * mouth_width)
    alpha = np.clip(across * (1.0 / feather), 0.0, 1.0)
    region = warped[window]
    if float(alpha.max()) > 0.0:
        region[:] = _paint_interior(
            region, alpha, below, drop_w, rise_w, lens[window], openness, mouth_width, rig.painted_teeth
        )
    output[y0 : y0 + rig.height, x0 : x0 + rig.width] = warped
    return output


def _paint_interior(
    region: np.ndarray,
    alpha: np.ndarray,
    below: np.ndarray,
    drop: np.ndarray,
    rise: np.ndarray,
    lens: np.ndarray,
    openness: float,
    mouth_width: float,
    teeth_amount: float,
) -> np.ndarray:
    """The mouth interior composited into ``region`` where ``alpha`` > 0."""
    gap = drop + rise
    safe_gap = np.maximum(gap, 1e-3)
    depth_from_top = below + rise  # px below the (moved) upper lip
    position = np.clip(depth_from_top / safe_gap, 0.0, 1.0)  # 0 at the upper lip, 1 at the lower
    # Darkest in the middle of the opening and towards its centre line; lighter near the lips.
    middle = 1.0 - np.abs(2.0 * position - 1.0)
    deep = np.clip(middle * np.sqrt(lens) * min(1.0, openness * 1.6), 0.0, 1.0)[..., None]
    colour = INTERIOR_EDGE + (INTERIOR_DEEP - INTERIOR_EDGE) * deep
    # Tongue: a dull red glow low in a wide-open mouth.
    tongue_strength = 0.55 * float(_smoothstep(np.array(openness / 0.6)))
    tongue = (_smoothstep((position - 0.6) / 0.3) * lens * tongue_strength)[..., None]
    colour = colour + (TONGUE - colour) * tongue
    # Upper teeth: a soft light band just under the upper lip when the mouth is well open.
    teeth_height = np.minimum(0.085 * mouth_width, 0.4 * gap)
    in_band = depth_from_top / np.maximum(teeth_height, 1e-3)
    band = _smoothstep(in_band / 0.35) * (1.0 - _smoothstep((in_band - 0.6) / 0.4))
    teeth_strength = 0.8 * teeth_amount * float(_smoothstep(np.array((openness - 0.3) / 0.4)))
    teeth = (band * np.sqrt(lens) * teeth_strength)[..., None]
    colour = colour + (TEETH * (0.75 + 0.25 * np.sqrt(lens))[..., None] - colour) * teeth
    a = alpha[..., None]
    blended = region.astype(np.float32) * (1.0 - a) + colour * a
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


class _TemplateRigs:
    """The rigs of one template, shared by every session rendering it."""

    # A rig is about 1.5 MB and takes about 2.5 ms to build. A photo template needs a handful; a video
    # template could need one per frame, so keep the most recently used ones and rebuild the rest.
    max_rigs = 64

    def __init__(self, template: Template) -> None:
        self.template = template
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
        rig = build_rig(self.template.landmarks[template_index], (width, height))
        self.unique.append((points, rig))
        return rig


class WarpRenderer(StreamingRenderer):
    """One session's warp renderer (see the module docstring)."""

    # A window centred on the frame time: the mouth shape then matches the sound heard with it.
    window_before_s = 0.04
    lookahead_s = 0.04

    def __init__(self, template: Template, rigs: _TemplateRigs) -> None:
        super().__init__(template)
        self._rigs = rigs

    def render_frame(self, template_index: int, openness: float, roundness: float) -> np.ndarray:
        return render_mouth(
            self.template.frames[template_index], self._rigs.rig(template_index), openness, roundness
        )

    def render_batch(self, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for job in jobs:
            openness, roundness = mouth_shape(job.audio, self.sample_rate)
            images.append(self.render_frame(job.template_index, openness, roundness))
        return images


class WarpEngine:
    """Process-wide part of the warp renderer: rigs cached per template, shared across sessions.

    It stores no extras and keeps nothing on a device; its rig cache follows the library's RAM tier
    (``evict``) and is bounded on its own too, least recently used first (rigs rebuild cheaply).
    """

    name = "warp"
    extras_keys: tuple[str, ...] = ()

    def __init__(self, max_templates: int = 32) -> None:
        self.max_templates = max_templates
        self._lock = threading.Lock()
        self._rigs: OrderedDict[str, _TemplateRigs] = OrderedDict()

    def rigs(self, template: Template) -> _TemplateRigs:
        with self._lock:
            entry = self._rigs.get(template.id)
            # A template re-prepared under the same id must not get the old rigs.
            if entry is None or (
                entry.template.landmarks is not template.landmarks
                and not np.array_equal(entry.template.landmarks, template.landmarks)
            ):
                entry = _TemplateRigs(template)
                self._rigs[template.id] = entry
            self._rigs.move_to_end(template.id)
            while len(self._rigs) > self.max_templates:
                self._rigs.popitem(last=False)  # sessions keep their own reference to their rigs
            return entry

    def template_extras(
        self, template: Template, progress: ExtrasProgress | None = None
    ) -> dict[str, np.ndarray]:
        return {}

    def has_extras(self, template: Template) -> bool:
        return True

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
