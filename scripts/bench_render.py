"""Time the warp renderer per frame at 512x512, and the one-off preparation of the default template.

Usage: ``python scripts/bench_render.py [--frames N] [--visemes] [--bank]``. Prints median and p95
milliseconds per frame over a mix of mouth shapes (as in speech), after a warm-up that builds the rigs.
``--bank`` also times a 512x512 talking-video template whose mouths come from its own mouth bank
(made on the spot: a few seconds of face tracking), against the same template with the bank off.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from avatar_rtc.avatar.photo import default_photo, prepare_photo
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.render.mouth_shape import mouth_shape
from avatar_rtc.render.warp import WarpEngine


def _bench_visemes(renderer: object, template: object, frames: int) -> None:
    """Frames posed from a viseme track (the TTS path): the pose lookup and blend, then the render."""
    from avatar_rtc.render.visemes import TimedViseme, Viseme

    cycle = list(Viseme)
    track = [TimedViseme(cycle[i % len(cycle)], 0.08 * i, 0.08 * (i + 1)) for i in range(frames)]
    renderer.push_visemes(track, 0.0)  # type: ignore[attr-defined]
    pose_times, cpu_times = [], []
    for i in range(frames):
        start = time.thread_time()
        pose = renderer._visemes.pose_at(i / 25)  # type: ignore[attr-defined]
        pose_times.append(time.thread_time() - start)
        start = time.thread_time()
        renderer.render_pose(template.loop_index(i), pose)  # type: ignore[attr-defined]
        cpu_times.append(time.thread_time() - start)
    print(
        f"viseme pose lookup: median {np.median(pose_times) * 1e3:.3f} ms; frames from visemes, thread CPU "
        f"time: median {np.median(cpu_times) * 1e3:.2f} ms, p95 {np.percentile(cpu_times, 95) * 1e3:.2f} ms"
    )


def _bench_bank(frames: int) -> None:
    """Frames of a talking-video template posed from visemes, with its mouth bank and without."""
    from pathlib import Path

    from avatar_rtc.avatar.library import TemplateLibrary
    from avatar_rtc.render.visemes import VISEME_POSES, Viseme
    from avatar_rtc.testing.talking import talking_video

    with tempfile.TemporaryDirectory() as folder:
        video = talking_video(Path(folder) / "talking.mp4")
        library = TemplateLibrary(Path(folder) / "cache", ram_budget_bytes=1 << 30, engine=WarpEngine())
        start = time.perf_counter()
        library.prepare(video, "talking")
        prepare_s = time.perf_counter() - start
        template = library.get("talking")
    start = time.perf_counter()
    WarpEngine().template_extras(template)
    bank_s = time.perf_counter() - start
    print(
        f"talking video ({template.frame_count} frames): prepared in {prepare_s * 1e3:.0f} ms, of which the "
        f"mouth bank {bank_s * 1e3:.0f} ms"
    )
    poses = [VISEME_POSES[v] for v in Viseme]
    for label, engine in (("with its mouth bank", WarpEngine()), ("bank off", WarpEngine(mouth_bank=False))):
        renderer = engine.open(template)
        for index in range(template.frame_count):
            renderer.render_pose(index, poses[index % len(poses)])
        renderer.mouth_bank_frames = 0
        cpu_times = []
        for i in range(frames):
            start = time.thread_time()
            renderer.render_pose(template.loop_index(i), poses[i % len(poses)])
            cpu_times.append(time.thread_time() - start)
        ms = np.array(cpu_times) * 1e3
        print(
            f"talking template 512x512 {label}, visemes in turn, thread CPU time: median {np.median(ms):.2f} "
            f"ms, p95 {np.percentile(ms, 95):.2f} ms ({renderer.mouth_bank_frames} of {frames} frames from "
            "the bank)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--visemes", action="store_true", help="also time frames posed from visemes")
    parser.add_argument("--bank", action="store_true", help="also time a talking template's mouth bank")
    args = parser.parse_args()

    start = time.perf_counter()
    photo = default_photo()
    photo_s = time.perf_counter() - start
    start = time.perf_counter()
    template = prepare_photo(photo, "default")
    prepare_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        TemplateStore(cache_dir).save(template)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        TemplateStore(cache_dir).load("default")
        load_s = time.perf_counter() - start
    print(f"default photo (import + landmarks + crop): {photo_s * 1e3:.0f} ms")
    print(f"prepare_photo ({template.frame_count} frames): {prepare_s * 1e3:.0f} ms")
    print(f"store save: {save_s * 1e3:.0f} ms, load (with checksums): {load_s * 1e3:.0f} ms")

    renderer = WarpEngine().open(template)
    rng = np.random.default_rng(0)
    shapes = [
        (float(o), float(r)) for o, r in zip(rng.uniform(0.05, 1.0, 64), rng.uniform(-1, 1, 64), strict=True)
    ]
    start = time.perf_counter()
    for index in range(template.frame_count):
        renderer.render_frame(index, 0.5, 0.0)
    warm_s = time.perf_counter() - start
    print(f"first pass over the loop (builds rigs): {warm_s * 1e3:.0f} ms")

    frame_times, cpu_times = [], []
    for i in range(args.frames):
        openness, roundness = shapes[i % len(shapes)]
        start, cpu_start = time.perf_counter(), time.thread_time()
        renderer.render_frame(template.loop_index(i), openness, roundness)
        frame_times.append(time.perf_counter() - start)
        cpu_times.append(time.thread_time() - cpu_start)
    ms, cpu_ms = np.array(frame_times) * 1e3, np.array(cpu_times) * 1e3
    print(f"warp render 512x512: median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms per frame")
    # CPU time of the rendering thread alone: what a frame costs when other processes share the cores.
    print(
        f"warp render 512x512, thread CPU time: median {np.median(cpu_ms):.2f} ms, p95 {np.percentile(cpu_ms, 95):.2f} ms"
    )
    if args.visemes:
        _bench_visemes(renderer, template, args.frames)
    if args.bank:
        _bench_bank(args.frames)

    audio = (0.1 * np.sin(2 * np.pi * 150 * np.arange(1280) / 16000)).astype(np.float32)
    start = time.perf_counter()
    for _ in range(2000):
        mouth_shape(audio)
    print(f"mouth_shape: {(time.perf_counter() - start) / 2000 * 1e3:.3f} ms per window")


if __name__ == "__main__":
    main()
