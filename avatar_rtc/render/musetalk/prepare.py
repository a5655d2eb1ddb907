"""MuseTalk's per-template-frame data, from the template's MediaPipe landmarks.

- ``musetalk_bbox`` (N, 4) int32 x0, y0, x1, y1: upstream's face box. Its 68-point rule maps onto the
  face mesh as: x from the outline/brows/eyes/nose/lips extremes; nose point = 68-point 29, the lower
  nose bridge (mesh 5, checked: see :func:`nose_point_29`), moved down by ``bbox_shift`` px; bottom =
  the lowest of those points (the chin) + 10 px (v1.5's extra margin); top = nose_y - (chin_y - nose_y).
- ``musetalk_crop`` (N, 4) int32: the blend crop, a square centred on the box, half-side
  int(max(w, h) // 2 * 1.5), as upstream (unclipped; it can reach past the frame).
- ``musetalk_mask`` (N, 256, 256) uint8: the blend mask over the box, v1.5's "jaw" region from the
  landmarks (:func:`jaw_region_mask`). Upstream parses the face with BiSeNet and takes the skin grown
  by a cone-shaped kernel, its sides (beyond the central 31 % of the crop) eroded back, the nose left
  out, mouth and lips in; then only the part inside the box and below half the crop, feathered
  (kernel 0.1 x crop width). Here the skin is the face outline below the nose; the central band keeps
  room below the chin, to the box's bottom (the 10 px margin v1.5 added for it), where the generated
  jaw opens; the cheeks are pulled in so the feather ends on skin, not on what is behind the face.
- ``musetalk_latents`` (N, 8, 32, 32) float32: VAE latents of the masked and the reference face crop.
- ``musetalk_vae`` (16,) uint8: which VAE, in which dtype, with which face geometry (``bbox_shift``,
  :data:`GEOMETRY_VERSION`), made the latents (:func:`latents_key`); any change means computing them
  again.

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
NOSE_BRIDGE_LOWER = 5  # face mesh point for the 68-point landmark 29 (see nose_point_29)
# Mesh points at the two ends of the 68-point nose bridge: 27, the nasion (between the eyes), and 30,
# the nose tip. The 68-point convention spaces 27..30 evenly along the bridge, so 29 lies two thirds
# of the way down.
NASION, NOSE_TIP_POINT = 168, 1
# Bumped when the box or mask rule changes: cached latents made under an older rule are recomputed.
GEOMETRY_VERSION = 2
# v1.5's jaw mode, in fractions of the crop (its parsing runs at 512 x 512): the central band that
# keeps the grown skin (160 px), and how far the cheeks beside it are eroded (35 px ellipse, twice).
JAW_CENTRAL_BAND = 160 / 512
CHEEK_EROSION = 35 / 512
KEYS = ("musetalk_bbox", "musetalk_crop", "musetalk_mask", "musetalk_latents", "musetalk_vae")
DESCRIPTIONS = {
    "musetalk_bbox": "MuseTalk face box per frame, (N, 4) int32 x0 y0 x1 y1",
    "musetalk_crop": "MuseTalk blend crop per frame, (N, 4) int32 x0 y0 x1 y1 (may reach past the frame)",
    "musetalk_mask": "MuseTalk feathered blend mask over the box, (N, 256, 256) uint8",
    "musetalk_latents": "VAE latents of the masked and the reference face crop, (N, 8, 32, 32) float32",
    "musetalk_vae": "which VAE weights, dtype and face geometry made the latents (sha256 prefix)",
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


def nose_point_29(landmarks: np.ndarray) -> np.ndarray:
    """Where the 68-point convention puts landmark 29: two thirds of the way from the nasion to the
    nose tip. Mesh point 5 (:data:`NOSE_BRIDGE_LOWER`) stands in for it; on the default avatar they are
    0.2 % of the face's height apart (``scripts/musetalk_face_pictures.py`` draws both)."""
    return landmarks[NASION] + (landmarks[NOSE_TIP_POINT] - landmarks[NASION]) * (2 / 3)


def face_box(
    landmarks: np.ndarray, frame_size: tuple[int, int], bbox_shift: int = 0
) -> tuple[int, int, int, int]:
    """Upstream's face box for one frame's (478, 2) landmarks, clipped to the frame (width, height).
    ``bbox_shift`` moves the nose point down (up if negative) by that many pixels, as upstream's
    setting of that name does: the box's top moves twice as far, so more (or less) of the face above
    the mouth is generated."""
    width, height = frame_size
    points = landmarks[_BOX_POINTS].astype(np.float64)
    nose_y = float(landmarks[NOSE_BRIDGE_LOWER, 1]) + bbox_shift
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


def jaw_region_mask(
    landmarks: np.ndarray, box: tuple[int, int, int, int], crop: tuple[int, int, int, int]
) -> np.ndarray:
    """v1.5's "jaw" blend region for one frame (see the module docstring), over ``box``, resampled to
    (256, 256) uint8."""
    cx0, cy0, cx1, cy1 = crop
    crop_w, crop_h = cx1 - cx0, cy1 - cy0
    bx0, by0, bx1, by1 = (v - o for v, o in zip(box, (cx0, cy0, cx0, cy0), strict=True))
    # Drawn in crop coordinates, so the blur sees the same surroundings upstream's does.
    outline = landmarks[list(face.JAW_CONTOUR)].astype(np.float64) - (cx0, cy0)
    skin = np.zeros((crop_h, crop_w), np.uint8)
    cv2.fillPoly(skin, [np.round(outline).astype(np.int32)], 255)
    # Room for the opening jaw: the skin grown straight down as far as the box reaches (its bottom is
    # the chin plus v1.5's extra margin, which exists for this), kept only in the central band.
    chin_y = int(np.ceil(outline[:, 1].max()))
    room = max(by1 - chin_y, 0)
    if room:
        down = np.ones((room + 1, 1), np.uint8)
        # Anchored at its last row: each pixel takes the skin from up to ``room`` rows above it.
        grown = cv2.dilate(skin, down, anchor=(0, room))
    else:
        grown = skin
    centre_x = float(landmarks[face.CHIN, 0] - cx0)
    half_band = JAW_CENTRAL_BAND * crop_w / 2
    band = np.zeros_like(skin)
    band[:, max(int(centre_x - half_band), 0) : max(int(np.ceil(centre_x + half_band)), 0)] = 1
    # Beside the band the cheeks are pulled in, so the feather fades out on skin rather than on the
    # background behind the jaw line.
    width = max(int(CHEEK_EROSION * crop_w), 1) | 1
    cheeks = cv2.erode(skin, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, 3)), iterations=2)
    mask = np.where(band == 1, grown, cheeks)
    # Below the nose only, and below half the crop (upstream's upper boundary ratio 0.5).
    cut = max(int(np.ceil(landmarks[face.NOSE_BOTTOM, 1] - cy0)), crop_h // 2)
    mask[:cut] = 0
    inside = np.zeros_like(mask)
    inside[max(by0, 0) : by1, max(bx0, 0) : bx1] = 1
    mask *= inside
    kernel = int(0.1 * crop_w) // 2 * 2 + 1
    mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
    return cv2.resize(mask[by0:by1, bx0:bx1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_AREA)


def face_crop(frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The box of a BGR frame as a (256, 256, 3) RGB face (Lanczos, as upstream)."""
    x0, y0, x1, y1 = box
    resized = cv2.resize(frame[y0:y1, x0:x1], (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


def latents_key(vae_id: str, dtype: str, bbox_shift: int = 0) -> str:
    """What the data depends on besides the frames: the VAE's weights, the dtype it ran in, and the face
    geometry (the box rule's ``bbox_shift`` and :data:`GEOMETRY_VERSION`)."""
    import hashlib

    return hashlib.sha256(f"{vae_id}/{dtype}/{bbox_shift}/{GEOMETRY_VERSION}".encode()).hexdigest()[:32]


def vae_id_array(key: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(key[:32].ljust(32, "0")), np.uint8).copy()


def geometry(template: Template, bbox_shift: int = 0) -> dict[str, np.ndarray]:
    """Box, crop and mask for every frame: everything but the latents (no models needed)."""
    size = template.size
    boxes = np.zeros((template.frame_count, 4), np.int32)
    crops = np.zeros((template.frame_count, 4), np.int32)
    masks = np.zeros((template.frame_count, FACE_SIZE, FACE_SIZE), np.uint8)
    for index in range(template.frame_count):
        landmarks = template.landmarks[index]
        # Every frame gets its own row, so a bad frame cannot shift later frames' latents (an upstream bug).
        box = face_box(landmarks, size, bbox_shift)
        crop = crop_box(box)
        boxes[index], crops[index] = box, crop
        masks[index] = jaw_region_mask(landmarks, box, crop)
    return {"musetalk_bbox": boxes, "musetalk_crop": crops, "musetalk_mask": masks}


def musetalk_template_data(
    template: Template,
    pipeline: MuseTalkPipeline,
    key: str,
    progress: Callable[[int, int], None] | None = None,
    bbox_shift: int = 0,
) -> dict[str, np.ndarray]:
    """All of MuseTalk's per-frame data for ``template`` (see the module docstring), ready for extras;
    ``key`` is :func:`latents_key` of the pipeline's VAE and dtype and of ``bbox_shift``. Blocking:
    seconds on a GPU."""
    data = geometry(template, bbox_shift)
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
