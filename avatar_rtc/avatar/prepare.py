"""Turn a source photo or video into a :class:`Template`.

Photo: a still photo would read as a frozen picture, so the loop adds a slow breathing sway (a sub-pixel
affine, periodic over the loop) and natural blinks (the upper lid skin is warped down over the eye).
Landmarks are detected once on the photo and carried through the same per-frame affine.

Video: frames are resampled to the template fps, the face mesh is tracked frame by frame (on a scaled-down
copy: the mesh itself runs on a 192 px face crop), frames where no face was found get landmarks
interpolated from their neighbours (indices never shift), and landmarks and face boxes are smoothed over
time with a centred Gaussian (zero lag: an offline clip can look ahead).

Both keep the source's own framing: the whole picture at its aspect ratio, scaled down only when its long
side exceeds ``max_long_side`` and given even dimensions (the video codecs want them). A call shows the
presenter as filmed; the face is only the renderers' working area inside the frame.

Both add per-frame extras: ``crop_boxes`` (the square face working area in the frame, smoothed so it
glides) and ``lower_face_mask`` (the feathered region a mouth renderer may repaint, over that square),
plus whatever the configured renderer engine computes in its ``template_extras(template)`` hook (stored
in the cache with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.engine import TemplateEngine
from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.video import (
    MediaLimits,
    SourceInfo,
    SourceTooLargeError,
    iter_video_frames,
    probe_source,
    read_photo,
)

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


def portrait_box(landmarks: np.ndarray, face_fraction: float = 0.42) -> tuple[float, float, float]:
    """(left, top, side) of the square where the face (outline width) is ``face_fraction`` of the side,
    with the face centre about 8% of the side above the square's centre."""
    oval = landmarks[list(face.FACE_OVAL)]
    face_width = float(oval[:, 0].max() - oval[:, 0].min())
    face_centre_x = float(oval[:, 0].mean())
    face_centre_y = 0.5 * float(oval[:, 1].min() + oval[:, 1].max())
    side = face_width / face_fraction
    return face_centre_x - side / 2, face_centre_y - side * 0.42, side


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
        crop_matrix(portrait_box(landmarks, face_fraction), size),
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


# -- sources: photo or video files ------------------------------------------------------------------------
ProgressCallback = Callable[[str, int, int | None], None]
"""Called as ``progress(stage, done, total)``; ``total`` is None while unknown. It may raise to cancel."""
FrameSink = Callable[[int, np.ndarray], None]
"""Called as ``sink(index, frame)`` with each template frame once it is final, in order."""


def _no_progress(stage: str, done: int, total: int | None) -> None:
    pass


@dataclass(frozen=True)
class PrepareSettings:
    """How sources become templates. Everything but ``limits`` changes the result, so it is recorded in
    the manifest and a cached template prepared with other settings is prepared again."""

    fps: int = 25
    # Frames keep the source's framing; a source larger than this (long side, px) is scaled down.
    max_long_side: int = 1280
    face_fraction: float = 0.42
    mask_size: int = 256
    # Standard deviations (seconds) of the centred Gaussians that smooth the tracked landmarks (light:
    # jitter only, lip motion stays) and the crop boxes (strong: the framing should glide, not shake).
    landmark_smoothing_s: float = 0.03
    box_smoothing_s: float = 0.12
    # A video with a face in fewer of its frames than this is refused rather than interpolated.
    min_face_fraction: float = 0.5
    # Frames are scaled down to this long side for face tracking: the mesh runs on a 192 px face crop,
    # so a larger picture only costs time (the resize and MediaPipe's own copies of it).
    detect_max_side: int = 640
    # The mesh runs on every n-th frame (and always on the last); frames between get landmarks
    # interpolated from their tracked neighbours. The mesh is the largest cost of preparation (about
    # 7 ms of CPU a frame here), and at 2 the interpolation is finer than the landmark smoothing
    # (sigma 0.75 frames at 25 fps), so the result barely changes.
    landmark_stride: int = 2
    photo_seconds: float = 4.0
    limits: MediaLimits = field(default_factory=MediaLimits)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the prepared template, as JSON-ready values."""
        values = dataclasses.asdict(self)
        values.pop("limits")
        return values


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_size(source_size: tuple[int, int], max_long_side: int) -> tuple[int, int]:
    """(width, height) of template frames for a source of ``source_size``: its own aspect ratio, scaled
    down (never up) to ``max_long_side``, each side even (4:2:0 video needs it; an odd side of a source
    that needs no scaling loses its last pixel row or column rather than being resampled)."""
    width, height = source_size
    if width <= 0 or height <= 0:
        raise ValueError(f"empty picture {width}x{height}")
    scale = max_long_side / max(width, height)
    if scale >= 1.0:
        return max(2, width - width % 2), max(2, height - height % 2)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _fit_into(image: np.ndarray, size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
    """``image`` at ``size`` (from :func:`output_size`): cropped by the odd pixel, or scaled down."""
    height, width = image.shape[:2]
    if width - size[0] in (0, 1) and height - size[1] in (0, 1):
        fitted = image[: size[1], : size[0]]
        if dst is None:
            return np.ascontiguousarray(fitted)
        dst[...] = fitted
        return dst
    return cv2.resize(image, size, dst=dst, interpolation=cv2.INTER_AREA)


def fit_frame(image_bgr: np.ndarray, max_long_side: int) -> np.ndarray:
    """``image_bgr`` at :func:`output_size`."""
    height, width = image_bgr.shape[:2]
    return _fit_into(image_bgr, output_size((width, height), max_long_side))


def face_box_masks(landmarks: np.ndarray, crop_boxes: np.ndarray, mask_size: int) -> np.ndarray:
    """(N, mask_size, mask_size) uint8 feathered lower-face masks, each over its frame's square face box
    (x0, y0, x1, y1 frame pixels): the face's own resolution, whatever the frame's size."""
    masks = np.empty((len(landmarks), mask_size, mask_size), dtype=np.uint8)
    for i, (points, box) in enumerate(zip(landmarks, crop_boxes, strict=True)):
        side = float(box[2] - box[0])
        in_box = (points.astype(np.float64) - box[:2]) * (mask_size / side)
        masks[i] = face.lower_face_mask(in_box, (mask_size, mask_size), mask_size)
    return masks


def _detect_scaled(landmarker: face.FaceLandmarker, image: np.ndarray, max_side: int) -> np.ndarray | None:
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return landmarker.detect(image)
    small = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    points = landmarker.detect(small)
    if points is None:
        return None
    return points * np.array([width / small.shape[1], height / small.shape[0]], dtype=np.float32)


def _renderer_extras(
    engine: TemplateEngine, template: Template, progress: ProgressCallback
) -> dict[str, np.ndarray]:
    extras = engine.template_extras(template, lambda done, total: progress("renderer", done, total))
    return {str(name): np.asarray(value) for name, value in dict(extras).items()}


def gaussian_weights(sigma_frames: float) -> np.ndarray:
    """Normalised centred Gaussian taps, radius 4 sigma (as scipy's ``gaussian_filter1d``)."""
    if sigma_frames <= 0:
        return np.ones(1)
    radius = int(4.0 * sigma_frames + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_frames) ** 2)
    return taps / taps.sum()


class _VideoTracker:
    """Per-frame landmarks as they are tracked, and which frames can already be finalised.

    A frame's smoothed crop box needs the landmarks of the frames within both smoothing radii after it,
    and a frame with no face needs the next frame that has one. Frames are finalised (handed to the crop
    worker) as soon as that much is known, so cropping runs alongside tracking instead of after it, and
    each result equals smoothing the whole clip at once (same taps, same edge rule).
    """

    def __init__(self, settings: PrepareSettings) -> None:
        self.settings = settings
        self.landmark_taps = gaussian_weights(settings.landmark_smoothing_s * settings.fps)
        self.box_taps = gaussian_weights(settings.box_smoothing_s * settings.fps)
        self.reach = len(self.landmark_taps) // 2 + len(self.box_taps) // 2
        self.raw: list[np.ndarray | None] = []
        self.skipped: set[int] = set()  # frames the mesh did not run on (see landmark_stride)
        self.filled: list[np.ndarray] = []  # raw landmarks with gaps interpolated, float64
        # Smoothed landmarks and the unsmoothed box they give, by frame, while later boxes still need them.
        self.smoothed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.finalised = 0
        self.ended = False

    def add(self, points: np.ndarray | None, tracked: bool = True) -> None:
        """The next frame's landmarks: None where no face was found, or where the mesh did not run on
        it (``tracked=False``); both are interpolated from the frames around them."""
        if not tracked:
            self.skipped.add(len(self.raw))
        self.raw.append(points)
        if points is None:
            return
        points = points.astype(np.float64)
        # Fill the gap since the last frame with a face, linearly (held before the first face).
        last = self.filled[-1] if self.filled else points
        gap = len(self.raw) - 1 - len(self.filled)
        for k in range(1, gap + 1):
            weight = k / (gap + 1) if len(self.filled) else 1.0
            self.filled.append(last * (1.0 - weight) + points * weight)
        self.filled.append(points)

    def face_found(self) -> np.ndarray:
        """Per frame: the mesh found the face there; a skipped frame counts as found when the tracked
        frames on both sides of it found it."""
        found = np.array([points is not None for points in self.raw], dtype=bool)
        for index in sorted(self.skipped):
            after = next((i for i in range(index + 1, len(self.raw)) if i not in self.skipped), None)
            found[index] = index > 0 and bool(found[index - 1]) and after is not None and bool(found[after])
        return found

    def end(self) -> None:
        """No more frames: trailing frames without a face hold the last landmarks found."""
        self.ended = True
        if self.filled:
            while len(self.filled) < len(self.raw):
                self.filled.append(self.filled[-1])

    def _smoothed(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self.smoothed.get(index)
        if cached is None:
            last = len(self.raw) - 1
            radius = len(self.landmark_taps) // 2
            points = np.zeros_like(self.filled[0])
            for k, tap in enumerate(self.landmark_taps):
                points += tap * self.filled[min(max(index + k - radius, 0), last)]
            cached = (points, np.array(portrait_box(points, self.settings.face_fraction)))
            self.smoothed[index] = cached
        return cached

    def _box(self, index: int) -> np.ndarray:
        last = len(self.raw) - 1
        radius = len(self.box_taps) // 2
        box = np.zeros(3)
        for k, tap in enumerate(self.box_taps):
            box += tap * self._smoothed(min(max(index + k - radius, 0), last))[1]
        return box

    def ready(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(index, smoothed source landmarks, smoothed box (left, top, side)) of each newly final frame."""
        limit = len(self.raw) if self.ended else len(self.filled) - self.reach
        out = []
        while self.finalised < limit:
            index = self.finalised
            out.append((index, self._smoothed(index)[0], self._box(index)))
            self.finalised += 1
        # Landmark sets no later box will read again.
        for stale in [i for i in self.smoothed if i < self.finalised - self.reach]:
            del self.smoothed[stale]
        return out


def prepare_video(
    path: str | os.PathLike[str],
    template_id: str,
    settings: PrepareSettings = PrepareSettings(),
    progress: ProgressCallback = _no_progress,
    engine: TemplateEngine | None = None,
    info: SourceInfo | None = None,
    source_name: str | None = None,
    frame_sink: FrameSink | None = None,
) -> Template:
    """A template from a video of one face looking at the camera (see the module docstring).
    ``source_name`` is the file name recorded in the template (default: ``path``'s); ``frame_sink``
    gets each template frame as soon as it is final (e.g. to encode it for the cache meanwhile).

    Each frame is decoded once, in a thread that also scales it to the template size (straight into the
    template's array) and makes the small copy the face mesh reads; this thread tracks the face and
    smooths the landmarks as soon as enough later frames are known. Raises
    :class:`~avatar_rtc.avatar.face.FaceNotFoundError` if too few frames show a face, and
    :class:`~avatar_rtc.avatar.video.SourceMediaError` for files past the limits or not decodable.
    """
    info = info or probe_source(path, settings.limits)
    fps = settings.fps
    width, height = output_size((info.width, info.height), settings.max_long_side)
    detect_scale = min(1.0, settings.detect_max_side / max(width, height))
    detect_size = (max(2, round(width * detect_scale)), max(2, round(height * detect_scale)))
    to_frame = np.array([width / detect_size[0], height / detect_size[1]], dtype=np.float32)
    estimate = info.frame_estimate(fps)
    # The longest clip the limits let through. The frames array is sized from the header's length (and
    # grown if that was short): at 1080p a limit-sized array would reserve more than the machine has.
    capacity = math.ceil((settings.limits.max_seconds + 1) * fps) + 1
    frames = np.empty((min(capacity, (estimate or 10 * fps) + fps), height, width, 3), dtype=np.uint8)
    landmarks = np.empty((capacity, face.LANDMARK_COUNT, 2), dtype=np.float32)
    boxes = np.empty((capacity, 3), dtype=np.float64)
    tracker = _VideoTracker(settings)

    def scaled(index: int, image: np.ndarray) -> np.ndarray:
        # Runs in the decoding thread: the frame goes into the template once; only the small copy moves on.
        nonlocal frames
        if index >= capacity:
            raise SourceTooLargeError(
                f"the video is longer than the limit of {settings.limits.max_seconds:g} s"
            )
        if index >= len(frames):
            grown = np.empty((min(capacity, 2 * len(frames)), height, width, 3), dtype=np.uint8)
            grown[:index] = frames[:index]
            frames = grown
        target = _fit_into(image, (width, height), dst=frames[index])
        if detect_size == (width, height):
            return target
        return cv2.resize(target, detect_size, interpolation=cv2.INTER_AREA)

    def finalise() -> None:
        for index, points, box in tracker.ready():
            landmarks[index] = points
            boxes[index] = box

    with face.FaceLandmarker(static_image_mode=False) as landmarker:
        decoded = _decoded_ahead(iter_video_frames(path, fps, settings.limits), scaled)
        held: tuple[int, np.ndarray] | None = None  # the newest frame, tracked only if it is the last
        for index, small in decoded:
            if frame_sink is not None:
                frame_sink(index, frames[index])
            if held is not None:
                tracker.add(None, tracked=False)
                held = None
            if index % settings.landmark_stride == 0:
                points = landmarker.detect(small)
                tracker.add(None if points is None else points * to_frame)
            else:
                held = (index, small)
            progress("landmarks", index + 1, max(estimate or 0, index + 1))
            finalise()
        if held is not None:
            points = landmarker.detect(held[1])
            tracker.add(None if points is None else points * to_frame)
    count = len(tracker.raw)
    found = tracker.face_found()
    if count == 0:
        raise face.FaceNotFoundError("the video has no frames")
    if found.sum() < max(1, settings.min_face_fraction * count):
        raise face.FaceNotFoundError(
            f"no face found in {count - int(found.sum())} of {count} frames; use a video where one face "
            f"is clearly visible, looking at the camera, in at least {settings.min_face_fraction:.0%} "
            "of the frames"
        )
    tracker.end()
    finalise()
    frames, landmarks, boxes = frames[:count], landmarks[:count], boxes[:count]
    crop_boxes = np.column_stack(
        [boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 2]]
    ).astype(np.float32)
    progress("masks", 0, count)
    masks = face_box_masks(landmarks, crop_boxes, settings.mask_size)
    progress("masks", count, count)
    template = Template(
        id=template_id,
        fps=fps,
        frames=frames,
        landmarks=landmarks,
        source=f"video {source_name or Path(path).name}",
        extras={"crop_boxes": crop_boxes, "face_found": found.astype(np.uint8), "lower_face_mask": masks},
    )
    return _with_renderer_extras(template, engine, progress)


def _decoded_ahead(
    frames: Iterator[tuple[int, np.ndarray]],
    transform: Callable[[int, np.ndarray], np.ndarray],
    depth: int = 8,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, transform(index, image))`` for ``frames``, decoded and transformed in a thread up to
    ``depth`` frames ahead of the consumer."""
    queue: Queue[tuple[int, np.ndarray] | BaseException | None] = Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for index, image in frames:
                if stop.is_set():
                    return
                queue.put((index, transform(index, image)))
            queue.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put(exc)

    thread = threading.Thread(target=produce, name="template-decode", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue so it sees the stop flag and closes the file.
        while thread.is_alive():
            with contextlib.suppress(Empty):
                queue.get(timeout=0.05)
        thread.join()


def _with_renderer_extras(
    template: Template, engine: TemplateEngine | None, progress: ProgressCallback
) -> Template:
    if engine is None or not engine.extras_keys:
        return template
    progress("renderer", 0, template.frame_count)
    extras = {**template.extras, **_renderer_extras(engine, template, progress)}
    progress("renderer", template.frame_count, template.frame_count)
    return dataclasses.replace(template, extras=extras)


def prepare_photo_template(
    image_bgr: np.ndarray,
    template_id: str,
    settings: PrepareSettings = PrepareSettings(),
    progress: ProgressCallback = _no_progress,
    engine: TemplateEngine | None = None,
    source: str = "photo",
) -> Template:
    """A living idle loop from a photo of any framing: the whole photo (scaled down past
    ``max_long_side``), animated by :func:`prepare_photo`, with the same extras as a video template."""
    progress("landmarks", 0, 1)
    photo = fit_frame(image_bgr, settings.max_long_side)
    progress("landmarks", 1, 1)
    progress("animate", 0, 1)
    template = prepare_photo(photo, template_id, settings.fps, settings.photo_seconds, source=source)
    progress("animate", 1, 1)
    count = template.frame_count
    progress("masks", 0, count)
    # The sway moves the face by a pixel or two: one working box, from the loop's middle, serves every frame.
    left, top, side = portrait_box(template.landmarks[count // 2].astype(np.float64), settings.face_fraction)
    crop_boxes = np.tile(np.array([left, top, left + side, top + side], np.float32), (count, 1))
    template = dataclasses.replace(
        template,
        extras={
            "crop_boxes": crop_boxes,
            "face_found": np.ones(count, np.uint8),
            "lower_face_mask": face_box_masks(template.landmarks, crop_boxes, settings.mask_size),
        },
    )
    progress("masks", count, count)
    return _with_renderer_extras(template, engine, progress)


def prepare_source(
    path: str | os.PathLike[str],
    template_id: str,
    settings: PrepareSettings = PrepareSettings(),
    progress: ProgressCallback = _no_progress,
    engine: TemplateEngine | None = None,
    source_name: str | None = None,
    frame_sink: FrameSink | None = None,
) -> Template:
    """A template from a photo or video file, whichever ``path`` holds. ``source_name`` is the file
    name the template records (an upload's own name, not the server's work file); ``frame_sink`` sees
    a video's frames as they are made (see :func:`prepare_video`)."""
    info = probe_source(path, settings.limits)
    name = source_name or Path(path).name
    if info.is_photo:
        return prepare_photo_template(
            read_photo(path), template_id, settings, progress, engine, f"photo {name}"
        )
    return prepare_video(
        path, template_id, settings, progress, engine, info, source_name=name, frame_sink=frame_sink
    )


def prepare_default(
    template_id: str = "default",
    settings: PrepareSettings = PrepareSettings(),
    engine: TemplateEngine | None = None,
) -> Template:
    """The built-in avatar from the public-domain astronaut photo, framed head and shoulders
    (:func:`default_photo`)."""
    return prepare_photo_template(
        default_photo(), template_id, settings, engine=engine, source=DEFAULT_PHOTO_SOURCE
    )


def check_face_visible(
    path: str | os.PathLike[str], settings: PrepareSettings = PrepareSettings(), samples: int = 6
) -> SourceInfo:
    """Probe a source and look for a face in a few frames spread over it, so an upload that can never
    become a template is refused before preparation starts.

    Raises :class:`~avatar_rtc.avatar.face.FaceNotFoundError` or
    :class:`~avatar_rtc.avatar.video.SourceMediaError`.
    """
    info = probe_source(path, settings.limits)
    if info.is_photo:
        face.detect_landmarks(read_photo(path), "photo")
        return info
    count = info.frame_estimate(settings.fps) or samples
    wanted = {round(k * (count - 1) / max(samples - 1, 1)) for k in range(samples)}
    with face.FaceLandmarker(static_image_mode=True) as landmarker:
        for index, image in iter_video_frames(path, settings.fps, settings.limits):
            if index in wanted and _detect_scaled(landmarker, image, settings.detect_max_side) is not None:
                return info
            if index >= max(wanted):
                break
    raise face.FaceNotFoundError(
        f"no face found in {len(wanted)} frames sampled across the video; use a video where one face is "
        "clearly visible, looking at the camera"
    )
