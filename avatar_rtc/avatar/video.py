"""Source media for templates: probe a file, check it against the limits, decode its frames with av.

A source is either a photo (one still image: JPEG, PNG, WebP, ...) or a short video. Limits are checked
from the container's metadata before anything is decoded, and again while decoding, because a stream's
declared duration can be missing or wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import av
import cv2
import numpy as np

# Demuxers that hold single still images: such a source is prepared as a photo.
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif")


_NO_TIMESTAMPS = (
    "the video's frames carry no timestamps (a raw stream?): put it in a container such as MP4 "
    "(ffmpeg -r <its frame rate> -i clip.h264 -c copy clip.mp4)"
)


class SourceMediaError(ValueError):
    """The source cannot be used: not a video or photo, or past a limit. The message says which."""


class NotMediaError(SourceMediaError):
    pass


class SourceTooLargeError(SourceMediaError):
    """Past a size limit (bytes, duration or resolution)."""


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 100 * 1024 * 1024
    max_seconds: float = 30.0
    # Width times height; 3840x2160 covers a 4K clip in either orientation.
    max_pixels: int = 3840 * 2160


@dataclass(frozen=True)
class SourceInfo:
    path: Path
    is_photo: bool
    width: int
    height: int
    duration_s: float | None  # None for photos, or when the container does not say
    average_fps: float | None
    size_bytes: int

    def frame_estimate(self, fps: int) -> int | None:
        """How many template frames a video gives at ``fps`` (1 for a photo), if the duration is known."""
        if self.is_photo:
            return 1
        if self.duration_s is None:
            return None
        return max(1, math.ceil(self.duration_s * fps - 1e-6))


def probe_source(path: str | os.PathLike[str], limits: MediaLimits) -> SourceInfo:
    """What ``path`` holds, checked against ``limits``; raises :class:`SourceMediaError` if unusable."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise NotMediaError("the file is empty")
    if size > limits.max_bytes:
        raise SourceTooLargeError(
            f"the file is {size / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.1f} MB"
        )
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise NotMediaError(f"not a video or photo that can be decoded ({exc})") from exc
    with container:
        if not container.streams.video:
            raise NotMediaError("the file has no video stream: upload a video or a photo of a face")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise NotMediaError("the video stream has no picture size: not a video that can be decoded")
        if width * height > limits.max_pixels:
            raise SourceTooLargeError(
                f"the picture is {width}x{height}; the limit is {limits.max_pixels / 1e6:.1f} megapixels"
            )
        is_photo = container.format.name.split(",")[0] in _IMAGE_FORMATS and (stream.frames or 1) <= 1
        duration: float | None = None
        if not is_photo:
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            if duration is not None and duration > limits.max_seconds:
                raise SourceTooLargeError(
                    f"the video is {duration:.1f} s long; the limit is {limits.max_seconds:g} s"
                )
            if duration is None:
                # No length in the header (a raw stream, a recording still being written): the
                # frames must carry their own times, or neither the limit nor the speed can be known.
                first = next(container.decode(stream), None)
                if first is None:
                    raise NotMediaError("the video holds no picture")
                if first.pts is None:
                    raise SourceMediaError(_NO_TIMESTAMPS)
        rate = stream.average_rate
        return SourceInfo(
            path=path,
            is_photo=is_photo,
            width=width,
            height=height,
            duration_s=duration,
            average_fps=float(rate) if rate else None,
            size_bytes=size,
        )


def read_photo(path: str | os.PathLike[str]) -> np.ndarray:
    """The first picture in ``path`` as (H, W, 3) uint8 BGR."""
    try:
        with av.open(str(path), mode="r") as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="bgr24")
    except (av.FFmpegError, ValueError) as exc:
        raise NotMediaError(f"the photo cannot be decoded ({exc})") from exc
    raise NotMediaError("the photo holds no picture")


def _to_bgr(frame: av.VideoFrame) -> np.ndarray:
    # OpenCV's I420 conversion is SIMD and about twice as fast as swscale's for the common H.264 case.
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2BGR_I420)
    return frame.to_ndarray(format="bgr24")


def iter_video_frames(
    path: str | os.PathLike[str], fps: int, limits: MediaLimits
) -> Iterator[tuple[int, np.ndarray]]:
    """Frames resampled to ``fps``: (template frame index, BGR image) for each index in order.

    Template frame k shows the source frame on screen at time k / fps (the latest one that started by
    then), so a 30 or 60 fps source plays at the right speed, and frames a 60 fps source has in
    between are not even converted. Indices are consecutive from 0: a frame is never skipped.
    """
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, ValueError) as exc:
        raise NotMediaError(f"not a video that can be decoded ({exc})") from exc
    with container:
        stream = container.streams.video[0]
        # Frame-level threads decode ahead while the caller runs face detection on the last frame.
        stream.thread_type = "AUTO"
        time_base = float(stream.time_base) if stream.time_base is not None else None
        next_index = 0
        start: float | None = None
        # The latest decoded frame not yet past its time, with its time in the clip.
        held: tuple[av.VideoFrame, float] | None = None
        try:
            for frame in container.decode(stream):
                if frame.pts is None or time_base is None:
                    # Counting frames at a guessed rate would play the clip at the wrong speed and let
                    # a long one past the duration limit.
                    raise SourceMediaError(_NO_TIMESTAMPS)
                t = frame.pts * time_base
                if start is None:
                    start = t
                t -= start
                if t > limits.max_seconds:
                    raise SourceTooLargeError(
                        f"the video is longer than the limit of {limits.max_seconds:g} s"
                    )
                # Every index whose time comes before this frame shows the one held.
                while held is not None and next_index / fps < t - 1e-6:
                    yield next_index, _to_bgr(held[0])
                    next_index += 1
                held = (frame, t)
            # The last frame lasts one source frame period (or one template frame if that is unknown).
            if held is not None:
                period = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / fps
                end = held[1] + period
                image = _to_bgr(held[0])
                while next_index == 0 or next_index / fps < end - 1e-6:
                    yield next_index, image
                    next_index += 1
        except av.FFmpegError as exc:
            raise NotMediaError(f"the video cannot be decoded past frame {next_index} ({exc})") from exc


def decoded_ahead(
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
