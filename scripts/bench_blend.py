"""Time compositing a generated 256x256 face into 720p and 1080p frames on one CPU thread.

Usage: ``python scripts/bench_blend.py [--frames N]``. Compares avatar_rtc.avatar.blend (plan per template
frame, region-only warp and uint8 blend) with a straightforward reimplementation of upstream MuseTalk's
blending: resize the face to the box, PIL-crop the blend square, paste the face, paste the square back
through its mask; "offline" also Gaussian-blurs the mask every frame as upstream's get_image does, "realtime"
uses a precomputed mask as its realtime script does. Each includes the copy of the template frame.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from avatar_rtc.avatar.blend import build_blend_plan, composite
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.musetalk.prepare import crop_box, geometry


def scene(height: int) -> tuple[np.ndarray, tuple[int, int, int, int], tuple[int, int, int, int], np.ndarray]:
    """A 16:9 frame with the default avatar filling its height: frame, face box, crop box, box mask."""
    with tempfile.TemporaryDirectory() as cache:
        template = TemplateStore(cache).ensure_default()
    width = height * 16 // 9
    photo = cv2.resize(template.frames[0], (height, height), interpolation=cv2.INTER_LINEAR)
    frame = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    frame[:, left : left + height] = photo
    landmarks = template.landmarks[:1] * (height / template.size[1]) + np.array([left, 0], np.float32)
    scaled = Template("bench", template.fps, frame[None], landmarks.astype(np.float32))
    data = geometry(scaled)
    box = tuple(int(v) for v in data["musetalk_bbox"][0])
    return frame, box, crop_box(box), data["musetalk_mask"][0]


def upstream_style(
    frame: np.ndarray,
    box: tuple[int, int, int, int],
    crop: tuple[int, int, int, int],
    mask: np.ndarray,
    blur: bool,
) -> Callable[[np.ndarray], np.ndarray]:
    x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = crop
    # The mask over the blend square, as upstream keeps it (hard-edged when it blurs per frame).
    crop_mask = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
    crop_mask[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = cv2.resize(mask, (x1 - x0, y1 - y0))
    if blur:
        crop_mask = (crop_mask > 127).astype(np.uint8) * 255
    kernel = int(0.1 * (cx1 - cx0) // 2 * 2) + 1

    def blend(face: np.ndarray) -> np.ndarray:
        original = frame.copy()
        resized = cv2.resize(face, (x1 - x0, y1 - y0))
        body = Image.fromarray(original[:, :, ::-1])
        face_large = body.crop(crop)
        face_large.paste(Image.fromarray(resized[:, :, ::-1]), (x0 - cx0, y0 - cy0))
        mask_array = cv2.GaussianBlur(crop_mask, (kernel, kernel), 0) if blur else crop_mask
        body.paste(face_large, crop[:2], Image.fromarray(mask_array))
        return np.asarray(body)[:, :, ::-1]

    return blend


def time_ms(function: Callable[[np.ndarray], np.ndarray], faces: list[np.ndarray], frames: int) -> float:
    for face in faces[:5]:
        function(face)
    start = time.perf_counter()
    for i in range(frames):
        function(faces[i % len(faces)])
    return (time.perf_counter() - start) / frames * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    faces = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(8)]
    print("one thread (cv2.setNumThreads(1)); ms per frame, mean over", args.frames, "frames")
    print(
        f"{'frame':>10} {'face box':>10} {'avatar_rtc':>11} {'upstream rt':>12} {'upstream':>9} {'speed-up':>9}"
    )
    for height in (720, 1080):
        frame, box, crop, mask = scene(height)
        started = time.perf_counter()
        plan = build_blend_plan((frame.shape[1], frame.shape[0]), box, mask)
        plan_ms = (time.perf_counter() - started) * 1e3
        fast = time_ms(lambda face, frame=frame, plan=plan: composite(frame, face, plan), faces, args.frames)
        realtime = time_ms(upstream_style(frame, box, crop, mask, blur=False), faces, args.frames)
        offline = time_ms(upstream_style(frame, box, crop, mask, blur=True), faces, args.frames)
        size = f"{frame.shape[1]}x{frame.shape[0]}"
        face_size = f"{box[2] - box[0]}x{box[3] - box[1]}"
        print(
            f"{size:>10} {face_size:>10} {fast:>11.3f} {realtime:>12.3f} {offline:>9.3f} "
            f"{offline / fast:>8.1f}x   (plan, once per template frame: {plan_ms:.2f} ms)"
        )


if __name__ == "__main__":
    main()
