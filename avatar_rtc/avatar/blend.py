"""Fast compositing of a generated face crop into its template frame, for any renderer that makes one.

Upstream MuseTalk pastes through PIL with a full-crop mask every frame (and blurs the mask per frame in
its offline path): about 13 ms per 1080p frame on one core. Here everything that does not depend on the
generated face is done once per template frame (:func:`build_blend_plan`): the rectangle where the mask
is non-zero, the mask itself at that size, and the affine map from face pixels to that rectangle. Per
frame only that rectangle is touched: one ``cv2.warpAffine`` resamples the face straight into it, and
three saturating uint8 operations blend it (SIMD in OpenCV), after one copy of the frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class BlendPlan:
    """Per template frame: where the face goes and how much of it shows."""

    x0: int  # the rectangle of the frame the face changes, [x0, x1) x [y0, y1)
    y0: int
    x1: int
    y1: int
    alpha: np.ndarray  # (y1 - y0, x1 - x0, 3) uint8, 255 = generated face
    inverse_alpha: np.ndarray  # 255 - alpha, kept so the per-frame path does no arithmetic on it
    face_to_region: np.ndarray  # 2x3 float32: region pixel -> face pixel (cv2.WARP_INVERSE_MAP)
    face_size: tuple[int, int]  # (width, height) of the face image this plan expects

    @property
    def empty(self) -> bool:
        return self.x1 <= self.x0 or self.y1 <= self.y0


def build_blend_plan(
    frame_size: tuple[int, int],
    box: tuple[int, int, int, int],
    mask: np.ndarray,
    face_size: tuple[int, int] = (256, 256),
) -> BlendPlan:
    """The plan for pasting a ``face_size`` face over ``box`` (x0, y0, x1, y1, frame pixels) of a frame of
    ``frame_size`` (width, height), weighted by ``mask``: uint8 (or float in [0, 1]) covering the box at any
    resolution."""
    frame_width, frame_height = frame_size
    bx0, by0, bx1, by1 = (int(v) for v in box)
    box_width, box_height = bx1 - bx0, by1 - by0
    if box_width <= 0 or box_height <= 0:
        raise ValueError(f"empty face box {box}")
    if mask.dtype != np.uint8:
        mask = np.clip(np.asarray(mask, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    box_mask = cv2.resize(mask, (box_width, box_height), interpolation=cv2.INTER_LINEAR)
    # Only the part of the box inside the frame, and of that only where the mask is non-zero.
    cx0, cy0 = max(bx0, 0), max(by0, 0)
    cx1, cy1 = min(bx1, frame_width), min(by1, frame_height)
    clipped = box_mask[cy0 - by0 : cy1 - by0, cx0 - bx0 : cx1 - bx0] if cx1 > cx0 and cy1 > cy0 else None
    face_w, face_h = face_size
    if clipped is None or not clipped.any():
        empty = np.zeros((0, 0, 3), np.uint8)
        return BlendPlan(0, 0, 0, 0, empty, empty, np.zeros((2, 3), np.float32), face_size)
    rows = np.flatnonzero(clipped.any(axis=1))
    cols = np.flatnonzero(clipped.any(axis=0))
    x0, x1 = cx0 + int(cols[0]), cx0 + int(cols[-1]) + 1
    y0, y1 = cy0 + int(rows[0]), cy0 + int(rows[-1]) + 1
    alpha = np.ascontiguousarray(box_mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0])
    alpha3 = cv2.merge([alpha, alpha, alpha])
    # Pixel centres map as in cv2.resize(face, (box_width, box_height)), then shift to the region.
    sx, sy = face_w / box_width, face_h / box_height
    face_to_region = np.array(
        [[sx, 0.0, (x0 - bx0 + 0.5) * sx - 0.5], [0.0, sy, (y0 - by0 + 0.5) * sy - 0.5]], np.float32
    )
    return BlendPlan(x0, y0, x1, y1, alpha3, cv2.subtract(255, alpha3), face_to_region, face_size)


def composite(frame: np.ndarray, face: np.ndarray, plan: BlendPlan) -> np.ndarray:
    """A new frame: ``frame`` (H, W, 3 uint8) with ``face`` (uint8, same channel order) blended in."""
    output = frame.copy()
    if plan.empty:
        return output
    if (face.shape[1], face.shape[0]) != plan.face_size:
        raise ValueError(f"face is {face.shape[1]}x{face.shape[0]}, the plan expects {plan.face_size}")
    region = output[plan.y0 : plan.y1, plan.x0 : plan.x1]
    size = (plan.x1 - plan.x0, plan.y1 - plan.y0)
    warped = cv2.warpAffine(
        face,
        plan.face_to_region,
        size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    scale = 1.0 / 255.0
    cv2.add(
        cv2.multiply(warped, plan.alpha, scale=scale),
        cv2.multiply(region, plan.inverse_alpha, scale=scale),
        dst=region,
    )
    return output


class BlendPlans:
    """Plans for the frames of one template, built on first use and shared by every session."""

    def __init__(self, frame_size: tuple[int, int], build: Callable[[int], BlendPlan]) -> None:
        self.frame_size = frame_size
        self._build = build
        self._plans: dict[int, BlendPlan] = {}
        self._lock = threading.Lock()

    def __getitem__(self, template_index: int) -> BlendPlan:
        plan = self._plans.get(template_index)
        if plan is None:
            plan = self._build(template_index)
            with self._lock:
                plan = self._plans.setdefault(template_index, plan)
        return plan
