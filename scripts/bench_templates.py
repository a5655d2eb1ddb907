"""Time template preparation from video, and switching to a template cold (disk) and warm (RAM).

Usage: ``python scripts/bench_templates.py [--seconds 10] [--width 640 --height 480] [--runs 3]``,
or ``python scripts/bench_templates.py --storage [--seconds 4]`` for the cache's cost per template second.

Makes a clip of the default face moving and scaling (H.264, 25 fps), prepares it with the default
settings (the warp renderer adds no per-frame data), and prints the preparation time per second of
video. Switch times: "cold" reads the template from disk with the page cache dropped for its files
(so the disk is really read) and verifies every checksum; "warm" takes it from the RAM tier; both then
open a renderer on it and draw its first speaking frame, which is what a caller sees first.

``--storage`` measures the cache format (frames as JPEG) without preparation: full-frame templates of
the default portrait at 512x512, 1280x720 and 1920x1080, each at JPEG quality 90 and 95, in two kinds of
picture: "plain" (the portrait filling the frame's height on a flat backdrop, drifting a little) and
"busy" (the same over a blurred copy of itself filling the frame, plus camera grain of sigma 2: harder
to compress). Per template second it reports RAM (decoded frames, what the RAM tier holds), disk, the
save time (parallel encode, write, fsync) and the load time (page cache dropped, checksum, parallel
decode), and the PSNR the JPEGs keep; then checks that a warm switch reads nothing from disk. Writes
``docs/figures/templates_storage.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from avatar_rtc.avatar import face
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.photo import default_photo
from avatar_rtc.avatar.ram_tier import template_bytes

# Format 2's raw writer and checked reader, for the reference rows.
from avatar_rtc.avatar.store import JPEG_QUALITY, TemplateStore, _read_verified_array, _write_array
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.warp import WarpEngine

STORAGE_CANVASES = ((512, 512), (1280, 720), (1920, 1080))
STORAGE_QUALITIES = (90, 95)
STORAGE_FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "templates_storage.json"


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


def storage_frames(
    photo: np.ndarray, landmarks: np.ndarray, size: tuple[int, int], count: int, busy: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(frames, landmarks) of a template: the portrait filling the canvas height, swaying a few pixels
    and breathing in scale over the clip, on a flat backdrop or (``busy``) a blurred copy of itself with
    grain."""
    width, height = size
    rng = np.random.default_rng(1)
    base = height / photo.shape[0]
    if busy:
        cover = max(width, height) / photo.shape[0]
        backdrop = cv2.GaussianBlur(
            cv2.resize(photo, None, fx=cover, fy=cover, interpolation=cv2.INTER_LINEAR), (0, 0), 6
        )
        y0, x0 = (backdrop.shape[0] - height) // 2, (backdrop.shape[1] - width) // 2
        backdrop = backdrop[y0 : y0 + height, x0 : x0 + width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    points = np.empty((count, *landmarks.shape), dtype=np.float32)
    for i in range(count):
        phase = 2 * np.pi * i / max(count, 1)
        scale = base * (1 + 0.02 * np.sin(phase))
        tx = (width - photo.shape[1] * scale) / 2 + 0.01 * width * np.sin(2 * phase)
        ty = (height - photo.shape[0] * scale) / 2 + 0.005 * height * np.cos(phase)
        matrix = np.array([[scale, 0, tx], [0, scale, ty]])
        if busy:
            frame = cv2.warpAffine(
                photo,
                matrix,
                size,
                dst=backdrop.copy(),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_TRANSPARENT,
            )
            grain = rng.normal(0, 2.0, frame.shape)
            frames[i] = np.clip(frame + grain, 0, 255).astype(np.uint8)
        else:
            frames[i] = cv2.warpAffine(
                photo, matrix, size, flags=cv2.INTER_LINEAR, borderValue=(90, 110, 120)
            )
        points[i] = landmarks * scale + np.array([tx, ty], dtype=np.float32)
    return frames, points


def timings(saves: list[Timer], loads: list[Timer], seconds: float) -> dict[str, float]:
    """Best of the runs, per template second, in milliseconds."""
    return {
        "save_ms_per_s": min(t.wall for t in saves) / seconds * 1e3,
        "load_ms_per_s": min(t.wall for t in loads) / seconds * 1e3,
        "save_cpu_ms_per_s": min(t.cpu for t in saves) / seconds * 1e3,
        "load_cpu_ms_per_s": min(t.cpu for t in loads) / seconds * 1e3,
    }


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def proc_read_chars() -> int:
    """Bytes this process has read through system calls so far (/proc/self/io ``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


class Timer:
    """Wall and CPU time (all threads of the process) of a block: on a machine shared with other work,
    the CPU time is the steadier figure, and wall ~ CPU / cores where the work runs in parallel."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def storage_row(
    work: Path, frames: np.ndarray, landmarks: np.ndarray, quality: int, fps: int, runs: int
) -> dict[str, Any]:
    seconds = len(frames) / fps
    template = Template(id="bench", fps=fps, frames=frames, landmarks=landmarks, source="bench")
    store = TemplateStore(work / f"q{quality}", jpeg_quality=quality)
    saves, loads = [], []
    loaded = template
    for _ in range(runs):
        with Timer() as timer:
            store.save(template)
        saves.append(timer)
        drop_page_cache(store.path("bench"))
        with Timer() as timer:
            loaded = store.load("bench")
        loads.append(timer)
    disk = sum(p.stat().st_size for p in store.path("bench").iterdir())
    frames_file = (store.path("bench") / "frames.jpgs").stat().st_size
    quality_db = [psnr_db(a, b) for a, b in zip(loaded.frames, frames, strict=True)]
    return {
        "quality": quality,
        "frames": len(frames),
        "raw_mb_per_s": frames.nbytes / seconds / 1e6,
        "ram_mb_per_s": template_bytes(loaded) / seconds / 1e6,
        "disk_mb_per_s": disk / seconds / 1e6,
        "jpeg_kb_per_frame": frames_file / len(frames) / 1e3,
        "raw_over_disk": frames.nbytes / frames_file,
        **timings(saves, loads, seconds),
        "psnr_db_mean": statistics.fmean(quality_db),
        "psnr_db_min": min(quality_db),
    }


def raw_row(work: Path, frames: np.ndarray, fps: int, runs: int) -> dict[str, Any]:
    """The same frames stored raw, as cache format 2 stored them (``frames.npy``, checksummed): the
    reference the JPEG rows are weighed against."""
    seconds = len(frames) / fps
    work.mkdir(parents=True, exist_ok=True)
    path = work / "frames.npy"
    saves, loads = [], []
    meta: dict[str, Any] = {}
    for _ in range(runs):
        with Timer() as timer:
            meta = _write_array(path, frames)
        saves.append(timer)
        drop_page_cache(work)
        with Timer() as timer:
            _read_verified_array(path, meta, "raw")
        loads.append(timer)
    path.unlink()
    return {
        "quality": "raw",
        "frames": len(frames),
        "raw_mb_per_s": frames.nbytes / seconds / 1e6,
        "ram_mb_per_s": frames.nbytes / seconds / 1e6,
        "disk_mb_per_s": meta["bytes"] / seconds / 1e6,
        "jpeg_kb_per_frame": None,
        "raw_over_disk": 1.0,
        **timings(saves, loads, seconds),
        "psnr_db_mean": None,
        "psnr_db_min": None,
    }


def warm_switch_check(cache: Path) -> dict[str, Any]:
    """Switching to a template already in the RAM tier: how long, and whether it touches the disk."""
    library = TemplateLibrary(cache, ram_budget_bytes=8 << 30)
    loads = 0
    real_load = library.store.load

    def counting_load(template_id: str) -> Template:
        nonlocal loads
        loads += 1
        return real_load(template_id)

    library.store.load = counting_load  # type: ignore[method-assign]
    start = time.perf_counter()
    library.acquire("bench")
    cold_ms = (time.perf_counter() - start) * 1e3
    library.release("bench")
    loads_cold = loads
    baseline = proc_read_chars()
    baseline = proc_read_chars() - baseline  # what reading /proc/self/io itself costs
    before = proc_read_chars()
    times = []
    for _ in range(1000):
        start = time.perf_counter()
        library.get_warm("bench")
        library.acquire("bench")
        times.append((time.perf_counter() - start) * 1e6)
        library.release("bench")
    read = proc_read_chars() - before - baseline
    return {
        "template": f"1920x1080, quality {JPEG_QUALITY}",
        "cold_acquire_ms": cold_ms,
        "loads_cold": loads_cold,
        "warm_get_and_acquire_us_median": statistics.median(times),
        "loads_warm": loads - loads_cold,
        "bytes_read_warm": read,
    }


def storage_main(seconds: float, runs: int, note: str) -> None:
    fps = 25
    count = round(seconds * fps)
    photo = default_photo()
    landmarks = face.detect_landmarks(photo)
    load_avg = os.getloadavg()
    rows: list[dict[str, Any]] = []
    print(
        f"{count} frames ({seconds:g} s at {fps} fps) per template; best of {runs}; "
        f"{len(os.sched_getaffinity(0))} CPUs; load average at start {load_avg[0]:.2f}"
    )
    header = (
        f"{'canvas':>10} {'picture':>7} {'q':>3} | {'RAM MB/s':>8} {'raw MB/s':>8} {'disk MB/s':>9} "
        f"{'raw/jpeg':>8} {'kB/frame':>8} | {'save ms/s':>9} {'load ms/s':>9} | {'save CPU':>8} "
        f"{'load CPU':>8} | {'PSNR dB':>17}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as work:
        for size in STORAGE_CANVASES:
            for busy in (False, True):
                frames, points = storage_frames(photo, landmarks, size, count, busy)
                case = Path(work) / f"{size[0]}x{size[1]}-{busy}"
                # The raw reference once per canvas: its cost does not depend on the picture.
                cases: list[int | str] = [*(["raw"] if not busy else []), *STORAGE_QUALITIES]
                for quality in cases:
                    if quality == "raw":
                        row = raw_row(case / "raw", frames, fps, runs)
                    else:
                        row = storage_row(case, frames, points, int(quality), fps, runs)
                    row.update(width=size[0], height=size[1], picture="busy" if busy else "plain")
                    rows.append(row)
                    kb = "" if row["jpeg_kb_per_frame"] is None else f"{row['jpeg_kb_per_frame']:.1f}"
                    db = (
                        ""
                        if row["psnr_db_mean"] is None
                        else f"{row['psnr_db_mean']:.1f} (min {row['psnr_db_min']:.1f})"
                    )
                    picture = "" if quality == "raw" else row["picture"]
                    print(
                        f"{size[0]:>5}x{size[1]:<4} {picture:>7} {quality:>3} | "
                        f"{row['ram_mb_per_s']:>8.1f} {row['raw_mb_per_s']:>8.1f} {row['disk_mb_per_s']:>9.2f} "
                        f"{row['raw_over_disk']:>8.1f} {kb:>8} | "
                        f"{row['save_ms_per_s']:>9.0f} {row['load_ms_per_s']:>9.0f} | "
                        f"{row['save_cpu_ms_per_s']:>8.0f} {row['load_cpu_ms_per_s']:>8.0f} | {db:>17}"
                    )
                del frames
        warm = warm_switch_check(Path(work) / "1920x1080-False" / f"q{JPEG_QUALITY}")
    print(
        f"warm switch (1920x1080 in RAM): get_warm + acquire {warm['warm_get_and_acquire_us_median']:.1f} us "
        f"median; {warm['loads_warm']} loads from disk and {warm['bytes_read_warm']} bytes read in 1000 switches "
        f"(a cold acquire: {warm['cold_acquire_ms']:.0f} ms, {warm['loads_cold']} load)"
    )
    figure = {
        "what": "template cache cost per template second (25 fps), format 3: frames as JPEG",
        "script": "scripts/bench_templates.py --storage",
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 2) for x in load_avg],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "conditions": note,
        "columns": {
            "ram_mb_per_s": "decoded frames + landmarks in the RAM tier",
            "disk_mb_per_s": "every file of the cache directory",
            "save_ms_per_s": "wall: encode on every CPU, write, fsync",
            "load_ms_per_s": "wall, page cache dropped: read, sha256, decode on every CPU",
            "*_cpu_ms_per_s": "CPU time of all threads (steadier than wall on a shared machine)",
            "raw rows": "the same frames as cache format 2 stored them (frames.npy)",
        },
        "seconds_per_template": seconds,
        "runs": runs,
        "chosen_quality": JPEG_QUALITY,
        "rows": [{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()} for row in rows],
        "warm_switch": {k: round(v, 2) if isinstance(v, float) else v for k, v in warm.items()},
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    STORAGE_FIGURE.parent.mkdir(parents=True, exist_ok=True)
    STORAGE_FIGURE.write_text(json.dumps(figure, indent=2) + "\n")
    print(f"written to {STORAGE_FIGURE}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="clip length (default 10; 4 with --storage)"
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--runs", type=int, default=None, help="repeats (default 3; 2 with --storage)")
    parser.add_argument("--storage", action="store_true", help="measure the cache format only (see above)")
    parser.add_argument("--note", default="", help="with --storage: what else ran, kept in the figure")
    args = parser.parse_args()
    if args.storage:
        storage_main(args.seconds or 4.0, args.runs or 2, args.note)
        return
    args.seconds = args.seconds or 10.0
    args.runs = args.runs or 3

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
