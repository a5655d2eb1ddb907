"""A living idle loop from one photo: a still would read as a frozen picture, so the loop adds a slow
breathing sway (a sub-pixel affine, periodic over the loop) and natural blinks (the upper lid skin is
warped down over the eye). Landmarks are detected once on the photo and carried through the same
per-frame affine.

Also the built-in default photo (scikit-image's public-domain astronaut, framed head and shoulders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.template import Template

DEFAULT_PHOTO_SOURCE = "skimage.data.astronaut (NASA, public domain)"
DEFAULT_PHOTO_SIZE = 512

# Breathing: vertical bob amplitude (px at 512 px output, scaled with image height), scale swing and a
# tiny roll, all periodic over the loop.
SWAY_BOB_PX_AT_512 = 1.4
SWAY_SCALE = 0.003
SWAY_ROLL_DEG = 0.15
# A blink's lid closure per frame at 25 fps (fast close, slower open: about 200 ms in all).
BLINK_PROFILE_25FPS = (0.45, 1.0, 0.8, 0.45, 0.15)
SECONDS_PER_BLINK = 4.0


def default_photo(size: int = DEFAULT_PHOTO_SIZE) -> np.ndarray:
    """scikit-image's public-domain astronaut portrait, cropped square on the face, BGR ``size``².

    The face takes a bit over 40% of the width with head and shoulders in frame and the face slightly
    above centre, which is how a video-call avatar is usually framed.
    """
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    landmarks = face.detect_landmarks(photo, "default photo")
    return crop_portrait(photo, landmarks, size)


def crop_matrix(box: tuple[float, float, float], size: int) -> np.ndarray:
    """(2, 3) affine mapping the square ``box`` (left, top, side) onto a ``size``² image."""
    left, top, side = box
    scale = size / side
    return np.array([[scale, 0.0, -left * scale], [0.0, scale, -top * scale]], dtype=np.float64)


def crop_portrait(
    image_bgr: np.ndarray, landmarks: np.ndarray, size: int, face_fraction: float = 0.42
) -> np.ndarray:
    """Square crop where the face (outline width) is ``face_fraction`` of the side, resized (Lanczos)."""
    # One resampling from source to output (handles crops past the border).
    return cv2.warpAffine(
        image_bgr,
        crop_matrix(face.portrait_box(landmarks, face_fraction), size),
        (size, size),
        flags=cv2.INTER_LANCZOS4,
        borderMode=cv2.BORDER_REPLICATE,
    )


@dataclass(frozen=True)
class _EyeRig:
    """Precomputed geometry to close one eye: the region around it and its lid lines per column."""

    x0: int
    y0: int
    grid_x: np.ndarray  # (h, w) float32 absolute pixel x of the region
    grid_y: np.ndarray
    brow: np.ndarray  # (w,) y above which nothing moves
    upper: np.ndarray  # (w,) upper lid margin y
    lower: np.ndarray  # (w,) lower lid margin y
    column_weight: np.ndarray  # (w,) 1 across the eye, 0 past the corners
    upper_indices: tuple[int, ...]
    lower_indices: tuple[int, ...]


def _eye_rig(
    landmarks: np.ndarray,
    upper_idx: tuple[int, ...],
    lower_idx: tuple[int, ...],
    brow_idx: tuple[int, ...],
    shape: tuple[int, int],
) -> _EyeRig:
    upper_pts = landmarks[list(upper_idx)].astype(np.float64)
    lower_pts = landmarks[list(lower_idx)].astype(np.float64)
    corner_a, corner_b = upper_pts[0], upper_pts[-1]
    eye_width = float(np.hypot(*(corner_b - corner_a)))
    opening = float(np.max(lower_pts[:, 1] - upper_pts[:, 1]))
    opening = max(opening, 0.08 * eye_width)
    x_lo = float(min(corner_a[0], corner_b[0]))
    x_hi = float(max(corner_a[0], corner_b[0]))
    margin_x = 0.35 * eye_width
    # The stretched lid skin ends well below the eyebrow, which must not move.
    lid_to_brow = float(upper_pts[:, 1].min() - landmarks[list(brow_idx), 1].max())
    brow_height = float(np.clip(0.7 * lid_to_brow, 0.8 * opening, 1.6 * opening))
    height, width = shape
    x0 = max(math.floor(x_lo - margin_x), 0)
    x1 = min(math.ceil(x_hi + margin_x) + 1, width)
    y0 = max(math.floor(float(upper_pts[:, 1].min()) - brow_height - 2), 0)
    y1 = min(math.ceil(float(lower_pts[:, 1].max()) + 0.6 * opening + 2) + 1, height)
    xs = np.arange(x0, x1, dtype=np.float64)

    def line(points: np.ndarray) -> np.ndarray:
        order = np.argsort(points[:, 0])
        return np.interp(xs, points[order, 0], points[order, 1])

    upper = line(upper_pts)
    lower = np.maximum(line(lower_pts), upper)
    # Smooth the polylines so the warp has no kinks at the landmark vertices.
    kernel = np.hanning(max(3, int(0.15 * eye_width) | 1))
    kernel /= kernel.sum()
    upper = np.convolve(np.pad(upper, len(kernel) // 2, mode="edge"), kernel, mode="valid")
    lower = np.maximum(np.convolve(np.pad(lower, len(kernel) // 2, mode="edge"), kernel, mode="valid"), upper)
    # Fade out past the corners so the lid stretch ends smoothly in the skin around the eye.
    centre = 0.5 * (x_lo + x_hi)
    half = 0.5 * (x_hi - x_lo)
    distance = np.clip((np.abs(xs - centre) - half) / margin_x, 0.0, 1.0)
    column_weight = 0.5 + 0.5 * np.cos(np.pi * distance)
    grid_y, grid_x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return _EyeRig(
        x0=x0,
        y0=y0,
        grid_x=grid_x,
        grid_y=grid_y,
        brow=(upper - brow_height).astype(np.float32),
        upper=upper.astype(np.float32),
        lower=lower.astype(np.float32),
        column_weight=column_weight.astype(np.float32),
        upper_indices=upper_idx,
        lower_indices=lower_idx,
    )


def _close_eye(image: np.ndarray, rig: _EyeRig, closure: float) -> None:
    """Warp the upper lid down by ``closure`` (0 open, 1 shut) in place.

    Per column the lid margin (lashes and a band of lid above them) slides down rigidly to its new
    place, the lid skin between it and the brow line stretches to follow, and the visible eye between
    the lids is squeezed under the margin. Sliding the margin rather than stretching it keeps the lash
    line thin, which is what makes a shut eye read as shut.
    """
    y = rig.grid_y
    brow, lower = rig.brow[None, :], rig.lower[None, :]
    # The landmark sits a little above where the lashes end.
    upper = rig.upper[None, :] + 0.2 * (lower - rig.upper[None, :])
    band = 0.3 * (upper - brow)
    weight = (closure * rig.column_weight)[None, :]
    # Shut means the margin reaches a little past the lower lid, so no white shows.
    shift = weight * (1.05 * (lower - upper) + 1.5)
    new_upper = upper + shift
    band_top = upper - band
    new_band_top = band_top + shift
    # The lid skin shown above the moving margin comes from the clean upper part of the lid: the fold
    # and lash shadow just above the margin are left out rather than stretched into streaks.
    skin_used = (band_top - brow) * (1.0 - 0.55 * weight)
    stretch = skin_used / np.maximum(new_band_top - brow, 1e-3)
    squeeze = (lower - upper) / np.maximum(lower - new_upper, 1e-3)
    source_y = np.where(
        y <= brow,
        y,
        np.where(
            y <= new_band_top,
            brow + (y - brow) * stretch,
            np.where(
                y <= new_upper,
                y - shift,
                np.where(y <= lower, upper + (y - new_upper) * squeeze, y),
            ),
        ),
    )
    # No blur on this map: it jumps where the shut lid meets the lower lid, and smoothing the jump
    # would sample the hidden eye into a light line under the lashes. The lid lines are smooth in x.
    displacement = (source_y - y).astype(np.float32)
    region = image[rig.y0 : rig.y0 + y.shape[0], rig.x0 : rig.x0 + y.shape[1]]
    warped = cv2.remap(
        image,
        rig.grid_x,
        rig.grid_y + displacement,
        interpolation=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REPLICATE,
    )
    # A shut lid sits in the eye socket's shadow; without it the stretched skin looks too bright.
    in_lid = np.clip((y - brow) / np.maximum(new_upper - brow, 1e-3), 0.0, 1.0)
    shade = 1.0 - 0.12 * weight * np.sin(np.pi * in_lid) ** 2
    region[:] = np.clip(warped.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)


def _close_eye_landmarks(landmarks: np.ndarray, rig: _EyeRig, closure: float) -> None:
    for up, low in zip(rig.upper_indices[1:-1], rig.lower_indices[1:-1], strict=True):
        landmarks[up, 1] += closure * (landmarks[low, 1] - landmarks[up, 1])


def blink_closures(frame_count: int, fps: int, seconds: float) -> np.ndarray:
    """Lid closure per frame: ``max(1, seconds / 4)`` blinks, spread out and away from the loop ends."""
    closures = np.zeros(frame_count, dtype=np.float32)
    # Resample the 25 fps profile to this fps.
    profile_t = np.arange(len(BLINK_PROFILE_25FPS)) / 25.0
    duration = profile_t[-1] + 1 / 25.0
    frame_t = np.arange(max(1, round(duration * fps))) / fps
    profile = np.interp(frame_t, profile_t, BLINK_PROFILE_25FPS, right=0.0)
    blinks = max(1, round(seconds / SECONDS_PER_BLINK))
    for k in range(blinks):
        # The loop plays forward then back, so keep blinks off its ends: a blink near an end would be
        # seen twice in quick succession.
        start = round(frame_count * (k + 0.35) / blinks)
        end = min(start + len(profile), frame_count - 2)
        closures[start:end] = np.maximum(closures[start:end], profile[: end - start])
    return closures


def sway_matrices(frame_count: int, image_size: tuple[int, int], anchor: tuple[float, float]) -> np.ndarray:
    """(N, 2, 3) affine per frame: bob, breathing scale and a tiny roll about ``anchor``.

    Cosines of whole cycles over the loop, so the first and last frames match and the motion is at
    rest at both ends, which keeps the forward-backward loop seamless.
    """
    _, height = image_size
    bob = SWAY_BOB_PX_AT_512 * height / 512.0
    phase = 2 * np.pi * np.arange(frame_count) / max(frame_count - 1, 1)
    matrices = np.zeros((frame_count, 2, 3), dtype=np.float64)
    for i, p in enumerate(phase):
        inhale = 0.5 - 0.5 * math.cos(p)
        scale = 1.0 + SWAY_SCALE * inhale
        dy = -bob * inhale
        roll = SWAY_ROLL_DEG * (0.5 - 0.5 * math.cos(2 * p))
        matrix = cv2.getRotationMatrix2D(anchor, roll, scale)
        matrix[1, 2] += dy
        matrices[i] = matrix
    return matrices


def prepare_photo(
    image_bgr: np.ndarray, template_id: str, fps: int = 25, seconds: float = 4.0, source: str = "photo"
) -> Template:
    """A living idle loop (breathing sway and blinks) from one BGR photo.

    Raises :class:`~avatar_rtc.avatar.face.FaceNotFoundError` if the photo has no face.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 BGR photo, got {image_bgr.shape} {image_bgr.dtype}")
    if fps <= 0 or seconds <= 0:
        raise ValueError("fps and seconds must be positive")
    photo = np.ascontiguousarray(image_bgr)
    height, width = photo.shape[:2]
    landmarks = face.detect_landmarks(photo, f"photo for template {template_id!r}")
    frame_count = max(2, round(fps * seconds))

    eyes = [
        _eye_rig(
            landmarks,
            face.LEFT_EYE_UPPER_CONTOUR,
            face.LEFT_EYE_LOWER_CONTOUR,
            face.LEFT_EYEBROW_LOWER,
            (height, width),
        ),
        _eye_rig(
            landmarks,
            face.RIGHT_EYE_UPPER_CONTOUR,
            face.RIGHT_EYE_LOWER_CONTOUR,
            face.RIGHT_EYEBROW_LOWER,
            (height, width),
        ),
    ]
    closures = blink_closures(frame_count, fps, seconds)
    # Breathing moves the head about a point below the chin (the chest), not the image centre.
    chin = landmarks[face.CHIN]
    anchor = (float(chin[0]), float(min(chin[1] + 0.5 * (chin[1] - landmarks[face.NOSE_TIP, 1]), height - 1)))
    matrices = sway_matrices(frame_count, (width, height), anchor)

    frames = np.empty((frame_count, height, width, 3), dtype=np.uint8)
    frame_landmarks = np.empty((frame_count, face.LANDMARK_COUNT, 2), dtype=np.float32)
    for i in range(frame_count):
        base = photo
        points = landmarks.astype(np.float64)
        if closures[i] > 0:
            base = photo.copy()
            for eye in eyes:
                _close_eye(base, eye, float(closures[i]))
                _close_eye_landmarks(points, eye, float(closures[i]))
        # Every frame goes through the same resampling so sharpness does not flicker between frames.
        frames[i] = cv2.warpAffine(
            base, matrices[i], (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
        )
        frame_landmarks[i] = points @ matrices[i][:, :2].T + matrices[i][:, 2]
    return Template(
        id=template_id,
        fps=fps,
        frames=frames,
        landmarks=frame_landmarks,
        source=source,
    )
