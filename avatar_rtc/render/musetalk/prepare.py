"""MuseTalk's per-template-frame data, from the template's MediaPipe landmarks.

- ``musetalk_bbox`` (N, 4) int32 x0, y0, x1, y1: upstream's face box. Its 68-point rule maps onto the
  face mesh as: x from the outline/brows/eyes/nose/lips extremes; nose point = 68-point 29, the lower
  nose bridge (mesh 5); bottom = the lowest of those points (the chin) + 10 px (v1.5's extra margin);
  top = nose_y - (bottom_before_margin - nose_y).
- ``musetalk_crop`` (N, 4) int32: the blend crop, a square centred on the box, half-side
  int(max(w, h) // 2 * 1.5), as upstream (unclipped; it can reach past the frame).
- ``musetalk_mask`` (N, 256, 256) uint8: the blend mask over the box. Upstream parses the face with
  BiSeNet; here the lower face is the polygon of the jaw outline below the nose, kept inside the box and
  below half the crop height, pulled in a little and Gaussian-feathered (kernel 0.1 x crop width).
- ``musetalk_latents`` (N, 8, 32, 32) float32: VAE latents of the masked and the reference face crop.
- ``musetalk_vae`` (16,) uint8: which VAE, in which dtype, made the latents (:func:`latents_key`); other
  weights or another dtype mean computing them again.

The engine computes them through its ``template_extras`` hook (at preparation, or in the background
for a template prepared before MuseTalk was enabled) and the template cache stores them: no process
computes them twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.template import Template

if TYPE_CHECKING:
    from avatar_rtc.render.musetalk.pipeline import MuseTalkPipeline

FACE_SIZE = 256
EXTRA_MARGIN_PX = 10  # v1.5: the box reaches this far below the chin
CROP_EXPAND = 1.5
NOSE_BRIDGE_LOWER = 5  # face mesh point for the 68-point landmark 29
KEYS = ("musetalk_bbox", "musetalk_crop", "musetalk_mask", "musetalk_latents", "musetalk_vae")
DESCRIPTIONS = {
    "musetalk_bbox": "MuseTalk face box per frame, (N, 4) int32 x0 y0 x1 y1",
    "musetalk_crop": "MuseTalk blend crop per frame, (N, 4) int32 x0 y0 x1 y1 (may reach past the frame)",
    "musetalk_mask": "MuseTalk feathered blend mask over the box, (N, 256, 256) uint8",
    "musetalk_latents": "VAE latents of the masked and the reference face crop, (N, 8, 32, 32) float32",
    "musetalk_vae": "which VAE weights and dtype made the latents (sha256 prefix)",
}
ENCODE_BATCH = 8

# The mesh points standing in for the 68-point set (outline, brows, eyes, nose, lips).
_BOX_POINTS = np.array(
    sorted(
        {
            *face.JAW_CONTOUR,
            *face.LEFT_EYEBROW_UPPER,
            *face.RIGHT_EYEBROW_UPPER,
            *face.LEFT_EYE_UPPER_CONTOUR,
            *face.LEFT_EYE_LOWER_CONTOUR,
            *face.RIGHT_EYE_UPPER_CONTOUR,
            *face.RIGHT_EYE_LOWER_CONTOUR,
            *face.LIP_OUTER_UPPER,
            *face.LIP_OUTER_LOWER,
            face.NOSE_TIP,
            face.NOSE_BOTTOM,
            face.NOSE_LEFT_WING,
            face.NOSE_RIGHT_WING,
            NOSE_BRIDGE_LOWER,
        }
    )
)


def face_box(landmarks: np.ndarray, frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Upstream's face box for one frame's (478, 2) landmarks, clipped to the frame (width, height)."""
    width, height = frame_size
    points = landmarks[_BOX_POINTS].astype(np.float64)
    nose_y = float(landmarks[NOSE_BRIDGE_LOWER, 1])
    chin_y = float(points[:, 1].max())
    x0, x1 = int(points[:, 0].min()), int(points[:, 0].max())
    y0 = int(nose_y - (chin_y - nose_y))
    y1 = int(chin_y) + EXTRA_MARGIN_PX
    box = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        raise ValueError(f"face box {box} is too small or outside the {width}x{height} frame")
    return box


def crop_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    centre_x, centre_y = (x0 + x1) // 2, (y0 + y1) // 2
    half = int(max(x1 - x0, y1 - y0) // 2 * CROP_EXPAND)
    return centre_x - half, centre_y - half, centre_x + half, centre_y + half


def lower_face_mask(
    landmarks: np.ndarray, box: tuple[int, int, int, int], crop: tuple[int, int, int, int]
) -> np.ndarray:
    """The feathered blend mask over ``box``, resampled to (256, 256) uint8."""
    cx0, cy0, cx1, cy1 = crop
    crop_w, crop_h = cx1 - cx0, cy1 - cy0
    # Drawn in crop coordinates, so the blur sees the same surroundings upstream's does.
    outline = landmarks[list(face.JAW_CONTOUR)].astype(np.float64) - (cx0, cy0)
    mask = np.zeros((crop_h, crop_w), np.uint8)
    cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 255)
    # Below the nose only, and below half the crop (upstream's upper boundary ratio 0.5).
    cut = max(int(np.ceil(landmarks[face.NOSE_BOTTOM, 1] - cy0)), crop_h // 2)
    mask[:cut] = 0
    bx0, by0, bx1, by1 = box
    inside = np.zeros_like(mask)
    inside[max(by0 - cy0, 0) : by1 - cy0, max(bx0 - cx0, 0) : bx1 - cx0] = 1
    mask *= inside
    # Pull the edge in, so the feather fades out on skin rather than on the background behind the jaw.
    shrink = max(int(0.02 * crop_w), 1)
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * shrink + 1, 2 * shrink + 1)))
    kernel = int(0.1 * crop_w) // 2 * 2 + 1
    mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
    in_box = mask[by0 - cy0 : by1 - cy0, bx0 - cx0 : bx1 - cx0]
    return cv2.resize(in_box, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA)


def face_crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of a BGR frame as a (256, 256, 3) RGB face (Lanczos, as upstream)."""
    x0, y0, x1, y1 = box
    resized = cv2.resize(frame[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


def latents_key(vae_id: str, dtype: str) -> str:
    """What the latents depend on besides the frames: the VAE's weights and the dtype it ran in."""
    import hashlib

    return hashlib.sha256(f"{vae_id}/{dtype}".encode()).hexdigest()[:32]


def vae_id_array(key: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(key[:32].ljust(32, "0")), np.uint8).copy()


def geometry(template: Template) -> dict[str, np.ndarray]:
    """Box, crop and mask for every frame: everything but the latents (no models needed)."""
    size = template.size
    boxes = np.zeros((template.frame_count, 4), np.int32)
    crops = np.zeros((template.frame_count, 4), np.int32)
    masks = np.zeros((template.frame_count, FACE_SIZE, FACE_SIZE), np.uint8)
    for index in range(template.frame_count):
        landmarks = template.landmarks[index]
        # Every frame gets its own row, so a bad frame cannot shift later frames' latents (an upstream bug).
        box = face_box(landmarks, size)
        crop = crop_box(box)
        boxes[index], crops[index] = box, crop
        masks[index] = lower_face_mask(landmarks, box, crop)
    return {"musetalk_bbox": boxes, "musetalk_crop": crops, "musetalk_mask": masks}


def musetalk_template_data(
    template: Template,
    pipeline: MuseTalkPipeline,
    key: str,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """All of MuseTalk's per-frame data for ``template`` (see the module docstring), ready for extras;
    ``key`` is :func:`latents_key` of the pipeline's VAE and dtype. Blocking: seconds on a GPU."""
    data = geometry(template)
    n = template.frame_count
    latents = []
    for lo in range(0, n, ENCODE_BATCH):
        faces = np.stack(
            [
                face_crop(template.frames[i], tuple(data["musetalk_bbox"][i]))
                for i in range(lo, min(lo + ENCODE_BATCH, n))
            ]
        )
        latents.append(pipeline.encode_faces(faces, batch=ENCODE_BATCH))
        if progress is not None:
            progress(min(lo + ENCODE_BATCH, n), n)
    data["musetalk_latents"] = np.concatenate(latents)
    data["musetalk_vae"] = vae_id_array(key)
    return data


def has_current_data(template: Template, key: str) -> bool:
    """Whether ``template.extras`` already holds complete MuseTalk data made with the VAE and dtype
    ``key`` (:func:`latents_key`) names."""
    extras = template.extras
    if any(key not in extras for key in KEYS):
        return False
    n = template.frame_count
    return (
        extras["musetalk_latents"].shape[0] == n
        and extras["musetalk_bbox"].shape == (n, 4)
        and extras["musetalk_mask"].shape == (n, FACE_SIZE, FACE_SIZE)
        and np.array_equal(extras["musetalk_vae"], vae_id_array(key))
    )
