"""Time template preparation from video, and switching to a template cold (disk) and warm (RAM).

Usage: ``python scripts/bench_templates.py [--seconds 10] [--width 640 --height 480] [--runs 3]``.

Makes a clip of the default face moving and scaling (H.264, 25 fps), prepares it with the default
settings (the warp renderer adds no per-frame data), and prints the preparation time per second of
video. Switch times: "cold" reads the template from disk with the page cache dropped for its files
(so the disk is really read) and verifies every checksum; "warm" takes it from the RAM tier; both then
open a renderer on it and draw its first speaking frame, which is what a caller sees first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.library import TemplateLibrary, template_bytes
from avatar_rtc.avatar.prepare import default_photo
from avatar_rtc.render.warp import WarpEngine


def make_clip(path: Path, seconds: float, size: tuple[int, int], fps: int = 25) -> None:
    photo = default_photo()
    width, height = size
    count = round(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        base = 0.85 * min(width, height) / 512
        for i in range(count):
            phase = 2 * np.pi * i / count
            scale = base * (1 + 0.12 * np.sin(phase))
            tx = (width - 512 * scale) / 2 + 0.06 * width * np.sin(phase)
            ty = (height - 512 * scale) / 2 + 0.04 * height * np.cos(phase)
            matrix = np.array([[scale, 0, tx], [0, scale, ty]])
            image = cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR, borderValue=(90, 110, 120))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the cached pages of every file in ``directory`` (written back first)."""
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_frame_ms(engine: WarpEngine, library: TemplateLibrary, template_id: str) -> float:
    """Acquire, open a renderer and draw the first speaking frame: the switch as a caller sees it."""
    start = time.perf_counter()
    template = library.acquire(template_id)
    renderer = engine.open(template)
    renderer.render_frame(template.loop_index(0), 0.6, 0.0)
    elapsed = (time.perf_counter() - start) * 1e3
    library.release(template_id)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        clip = work_dir / "clip.mp4"
        make_clip(clip, args.seconds, (args.width, args.height))
        start = time.perf_counter()
        face.FaceLandmarker(static_image_mode=False).close()
        print(
            f"MediaPipe import and first graph (once per process): {(time.perf_counter() - start) * 1e3:.0f} ms"
        )

        times: list[float] = []
        stages: dict[str, float] = {}
        for run in range(args.runs):
            library = TemplateLibrary(work_dir / f"cache{run}", ram_budget_bytes=4 << 30)
            marks: dict[str, float] = {}

            def progress(stage: str, done: int, total: int | None, marks: dict[str, float] = marks) -> None:
                marks.setdefault(stage, time.perf_counter())

            start = time.perf_counter()
            result = library.prepare(clip, "bench", progress=progress)
            times.append(time.perf_counter() - start)
            # Tracking and cropping overlap (two threads), so they are timed together.
            stages = {
                "hash": marks["landmarks"] - marks["hash"],
                "decode+track+crop+masks": marks["write"] - marks["landmarks"],
                "write (fsync) + checks": start + times[-1] - marks["write"],
            }
        seconds = result.info.frame_count / result.info.fps
        best = min(times)
        print(
            f"prepare {seconds:.1f} s of {args.width}x{args.height} video ({result.info.frame_count} frames): "
            f"best {best:.2f} s, median {statistics.median(times):.2f} s over {args.runs} runs -> "
            f"{best / seconds * 1e3:.0f} ms per second of video, {seconds / best:.1f}x real time"
        )
        print("  last run by stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))

        cache = work_dir / f"cache{args.runs - 1}"
        engine = WarpEngine()
        cold_load, cold_first, warm_first = [], [], []
        size = 0
        for _ in range(args.runs):
            drop_page_cache(cache / "bench")
            library = TemplateLibrary(cache, ram_budget_bytes=4 << 30)
            start = time.perf_counter()
            template = library.acquire("bench")
            cold_load.append((time.perf_counter() - start) * 1e3)
            size = template_bytes(template)
            library.release("bench")
            drop_page_cache(cache / "bench")
            cold_library = TemplateLibrary(cache, ram_budget_bytes=4 << 30)
            cold_first.append(first_frame_ms(WarpEngine(), cold_library, "bench"))
            warm_first.append(first_frame_ms(engine, library, "bench"))
        print(
            f"switch cold (disk, page cache dropped, checksums verified, {size / 2**20:.0f} MiB): "
            f"load {statistics.median(cold_load):.0f} ms; to first speaking frame {statistics.median(cold_first):.0f} ms"
        )
        warm_get = []
        for _ in range(1000):
            start = time.perf_counter()
            library.get_warm("bench")
            warm_get.append((time.perf_counter() - start) * 1e6)
        print(
            f"switch warm (RAM): get_warm {statistics.median(warm_get):.1f} us; "
            f"to first speaking frame {statistics.median(warm_first):.1f} ms"
        )


if __name__ == "__main__":
    main()
