"""What encoding one call's outgoing video costs in CPU, by frame size and codec.

Usage: ``python scripts/bench_encode.py [--seconds 4] [--repeats 3] [--bitrates default,max]
[--json docs/figures/encode.json]``.

Every call encodes its own stream, so this cost is paid once per session. Each row encodes ``--seconds``
of 25 fps video exactly as a call does: the frame converted BGR→I420 with OpenCV as AvatarVideoTrack
does, stamped in the 90 kHz time base, then ``encode`` of the encoder aiortc's sender gets from
``aiortc.codecs.get_encoder`` for the negotiated codec (libvpx for VP8, libx264 for H.264), packetisation
included. The frames are the default avatar photo on the canvas (scaled to the short side, the rest
mirrored from it so the background has texture), with the head moving by a pixel or two, the mouth
opening and closing at syllable rate and camera noise, so the encoder never sees a still picture.
Frame synthesis is not timed. CPU is process time (every encoder thread counted); core_percent is
the share of one core a session needs at 25 fps. Each figure is the median of ``--repeats`` runs, each
with a fresh encoder (its first frame a keyframe, as at the start of a call or after a size change).

Bitrates: ``default`` is where aiortc's encoders start (VP8 500 kbps, H.264 1 Mbps); ``max`` is their
ceiling (1.5 and 3 Mbps), where a call on a good network ends up once the receiver's estimate rises.
"""

from __future__ import annotations

import argparse
import fractions
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiortc
import av
import cv2
import numpy as np
from aiortc.codecs import get_encoder, h264, vpx
from aiortc.codecs.base import Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from avatar_rtc.avatar import face
from avatar_rtc.avatar.photo import default_photo
from avatar_rtc.rtc.encoders import TunedVp8Encoder, Vp8Tuning, X264PresetEncoder, probe_nvenc
from avatar_rtc.rtc.resolution import interpolation
from avatar_rtc.testing.lipsync import mouth_box

FPS = 25
VIDEO_CLOCK_RATE = 90000
CANVASES = [(512, 512), (1280, 720), (720, 1280), (1920, 1080)]
# As aiortc offers them (RTCRtpSender.getCapabilities("video")); get_encoder goes by the MIME type.
CODECS = {
    "VP8": RTCRtpCodecParameters(mimeType="video/VP8", clockRate=VIDEO_CLOCK_RATE, payloadType=97),
    "H264": RTCRtpCodecParameters(
        mimeType="video/H264",
        clockRate=VIDEO_CLOCK_RATE,
        payloadType=99,
        parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1", "profile-level-id": "42e01f"},
    ),
}
MAX_BITRATE = {"VP8": vpx.MAX_BITRATE, "H264": h264.MAX_BITRATE}


class TalkingCanvas:
    """Frames of a talking head on a ``width`` x ``height`` canvas."""

    def __init__(self, photo: np.ndarray, landmarks: np.ndarray, width: int, height: int) -> None:
        side = min(width, height)
        scale = side / photo.shape[0]
        self.person = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
        self.left, self.top = (width - side) // 2, (height - side) // 2
        right, bottom = width - side - self.left, height - side - self.top
        # The static background: the photo mirrored outwards, textured like a real room.
        self.background = cv2.copyMakeBorder(
            self.person, self.top, bottom, self.left, right, cv2.BORDER_REFLECT_101
        )
        x0, y0, x1, y1 = mouth_box(landmarks * scale, (side, side))
        self.mouth_centre = ((x0 + x1) / 2, y0 + (y1 - y0) * 0.35)
        self.mouth_width = (x1 - x0) * 0.4
        self.mouth_height = (y1 - y0) * 0.35
        rng = np.random.default_rng(7)
        self.noise = [rng.normal(0, 2.0, (height, width, 3)).astype(np.int16) for _ in range(4)]

    def frame(self, index: int) -> np.ndarray:
        t = index / FPS
        side = self.person.shape[0]
        # Head sway: a pixel or two and a fraction of a degree, as in an idle video loop.
        angle = 0.4 * math.sin(2 * math.pi * 0.17 * t)
        matrix = cv2.getRotationMatrix2D((side / 2, side * 0.6), angle, 1.0)
        matrix[0, 2] += 1.5 * math.sin(2 * math.pi * 0.3 * t)
        matrix[1, 2] += 1.0 * math.sin(2 * math.pi * 0.23 * t + 1.0)
        person = cv2.warpAffine(self.person, matrix, (side, side), borderMode=cv2.BORDER_REFLECT_101)
        # Mouth: opens and closes at about 3.5 syllables a second, some syllables wider than others.
        opening = max(0.0, math.sin(2 * math.pi * 3.5 * t)) * (0.6 + 0.4 * math.sin(2 * math.pi * 0.7 * t))
        if opening > 0.05:
            cx, cy = self.mouth_centre
            axes = (max(1, int(self.mouth_width)), max(1, int(self.mouth_height * opening)))
            cv2.ellipse(person, (int(cx), int(cy)), axes, 0, 0, 360, (35, 25, 60), -1, cv2.LINE_AA)
        image = self.background.copy()
        image[self.top : self.top + side, self.left : self.left + side] = person
        noisy = image.astype(np.int16) + self.noise[index % len(self.noise)]
        return np.clip(noisy, 0, 255).astype(np.uint8)


def encode_run(canvas: TalkingCanvas, codec: str, bitrate: int | None, frames: int) -> dict[str, float]:
    """One run: a fresh encoder, ``frames`` frames; CPU and wall time of conversion and encoding."""
    # "H264-veryfast": libx264 at that preset, as media.x264_preset sets it; "VP8-tuned": libvpx at the
    # project's default media.vp8_* settings; plain names: aiortc's own encoders.
    name, _, variant = codec.partition("-")
    encoder: Encoder
    if name == "VP8" and variant:
        encoder = TunedVp8Encoder(Vp8Tuning())
    elif variant:
        encoder = X264PresetEncoder(variant)  # type: ignore[arg-type]
    else:
        encoder = get_encoder(CODECS[name])
    if bitrate is not None:
        encoder.target_bitrate = bitrate  # type: ignore[attr-defined]  # what the sender sets from REMB
    time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
    convert_cpu = encode_cpu = wall = 0.0
    payload_bytes = 0
    for index in range(frames):
        image = canvas.frame(index)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        frame.pts = index * (VIDEO_CLOCK_RATE // FPS)
        frame.time_base = time_base
        cpu1 = time.process_time()
        payloads, _ = encoder.encode(frame, False)
        cpu2, wall2 = time.process_time(), time.perf_counter()
        convert_cpu += cpu1 - cpu0
        encode_cpu += cpu2 - cpu1
        wall += wall2 - wall0
        payload_bytes += sum(len(p) for p in payloads)
    return {
        "convert_ms": 1000 * convert_cpu / frames,
        "encode_ms": 1000 * encode_cpu / frames,
        "wall_ms": 1000 * wall / frames,
        "kbps": payload_bytes * 8 / (frames / FPS) / 1000,
    }


def resize_cost(canvas: TalkingCanvas, size: tuple[int, int], method: int, frames: int = 40) -> float:
    """CPU ms per frame of the track's downscale (a lower level, or max_output_long_side) by ``method``."""
    images = [canvas.frame(i) for i in range(4)]
    cpu0 = time.process_time()
    for index in range(frames):
        cv2.resize(images[index % 4], size, interpolation=method)
    return 1000 * (time.process_time() - cpu0) / frames


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "av": av.__version__,
        "ffmpeg": {name: ".".join(map(str, v)) for name, v in av.library_versions.items()},
        "opencv_threads": cv2.getNumThreads(),
    }


def rows(
    args: argparse.Namespace, canvases: dict[tuple[int, int], TalkingCanvas]
) -> Iterator[dict[str, Any]]:
    frames = int(args.seconds * FPS)
    for codec in args.codecs.split(","):
        for bitrate_name in args.bitrates.split(","):
            bitrate = None if bitrate_name == "default" else MAX_BITRATE[codec.partition("-")[0]]
            for (width, height), canvas in canvases.items():
                runs = [encode_run(canvas, codec, bitrate, frames) for _ in range(args.repeats)]
                median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                per_frame = median["convert_ms"] + median["encode_ms"]
                yield {
                    "codec": codec,
                    "bitrate": bitrate_name,
                    "width": width,
                    "height": height,
                    "convert_ms": round(median["convert_ms"], 2),
                    "encode_ms": round(median["encode_ms"], 2),
                    "ms_per_frame": round(per_frame, 2),
                    "core_percent": round(per_frame * FPS / 10, 1),
                    "wall_ms": round(median["wall_ms"], 2),
                    "kbps": round(median["kbps"]),
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="video encoded per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--codecs",
        default="VP8,VP8-tuned,H264,H264-veryfast",
        help="H264-<preset>: libx264 at an x264 preset; VP8-tuned: the media.vp8_* defaults",
    )
    parser.add_argument("--bitrates", default="default,max")
    parser.add_argument("--json", type=Path, default=Path("docs/figures/encode.json"))
    args = parser.parse_args()

    photo = default_photo()
    landmarks = face.detect_landmarks(photo, "default photo")
    canvases = {size: TalkingCanvas(photo, landmarks, *size) for size in CANVASES}
    load_before = os.getloadavg()
    print(
        f"{'codec':13} {'bitrate':7} {'size':>9} {'convert':>8} {'encode':>8} {'ms/frame':>9} "
        f"{'core %':>7} {'wall ms':>8} {'kbps':>6}"
    )
    results: list[dict[str, Any]] = []
    for row in rows(args, canvases):
        results.append(row)
        size = f"{row['width']}x{row['height']}"
        print(
            f"{row['codec']:13} {row['bitrate']:7} {size:>9} {row['convert_ms']:8.2f} {row['encode_ms']:8.2f} "
            f"{row['ms_per_frame']:9.2f} {row['core_percent']:7.1f} {row['wall_ms']:8.2f} {row['kbps']:6d}"
        )
    load_after = os.getloadavg()

    downscale: dict[str, dict[str, Any]] = {}
    for source, target in [
        ((1920, 1080), (1440, 810)),
        ((1920, 1080), (1280, 720)),
        ((1280, 720), (960, 540)),
        ((720, 1280), (540, 960)),
        ((1920, 1080), (640, 360)),
    ]:
        name = f"{source[0]}x{source[1]}->{target[0]}x{target[1]}"
        downscale[name] = {
            method: round(resize_cost(canvases[source], target, flag), 2)
            for method, flag in (("area", cv2.INTER_AREA), ("linear", cv2.INTER_LINEAR))
        }
        chosen = "area" if interpolation(source, target) == cv2.INTER_AREA else "linear"
        downscale[name]["track_uses"] = chosen
    nvenc = probe_nvenc()
    print("\ndownscale (cv2.resize), CPU ms per frame:")
    for name, costs in downscale.items():
        print(
            f"  {name:22} area {costs['area']:6.2f}  linear {costs['linear']:6.2f}  (the track uses {costs['track_uses']})"
        )
    print(f"h264_nvenc: {'available' if nvenc.available else 'not available'} ({nvenc.reason})")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")

    report = {
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_after},
        "fps": FPS,
        "seconds_per_run": args.seconds,
        "repeats": args.repeats,
        "rows": results,
        "downscale_ms": downscale,
        "h264_nvenc": {"available": nvenc.available, "reason": nvenc.reason},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
