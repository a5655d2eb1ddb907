"""Turn a source photo or video into a :class:`Template`: the entry point of preparation.

Photo: animated into a living idle loop by :mod:`avatar_rtc.avatar.photo` (breathing sway, blinks).

Video: frames are resampled to the template fps and decoded in a thread ahead of the tracker; the face
mesh is tracked frame by frame (on a scaled-down copy: the mesh itself runs on a 192 px face crop) and
:mod:`avatar_rtc.avatar.tracking` interpolates the frames without a face and smooths landmarks and
face boxes over time.

Both keep the source's own framing: the whole picture at its aspect ratio, scaled down only when its long
side exceeds ``max_long_side`` and given even dimensions (the video codecs want them). A call shows the
presenter as filmed; the face is only the renderers' working area inside the frame.

Both add per-frame extras: ``crop_boxes`` (the square face working area in the frame, smoothed so it
glides) and ``lower_face_mask`` (the feathered region a mouth renderer may repaint, over that square),
plus whatever the configured renderer engine computes in its ``template_extras(template)`` hook (stored
in the cache with them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.engine import TemplateEngine
from avatar_rtc.avatar.photo import DEFAULT_PHOTO_SOURCE, default_photo, prepare_photo
from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.tracking import VideoTracker
from avatar_rtc.avatar.video import (
    MediaLimits,
    SourceInfo,
    SourceTooLargeError,
    decoded_ahead,
    iter_video_frames,
    probe_source,
    read_photo,
)

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
    tracker = VideoTracker(settings)

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
        decoded = decoded_ahead(iter_video_frames(path, fps, settings.limits), scaled)
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
    left, top, side = face.portrait_box(
        template.landmarks[count // 2].astype(np.float64), settings.face_fraction
    )
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
