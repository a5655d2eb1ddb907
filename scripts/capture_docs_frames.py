#!/usr/bin/env python3
"""Join a call as a client, make the avatar speak, and save received frames (closed, half open, open)
as small PNGs under docs/. The frames are what a caller receives: decoded from the VP8 stream."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp
import cv2
import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.config import Settings  # noqa: E402
from avatar_rtc.server.app import create_app  # noqa: E402
from avatar_rtc.testing.lipsync import MouthDarkness, mouth_box  # noqa: E402
from avatar_rtc.testing.netns import reexec_in_loopback_namespace  # noqa: E402
from avatar_rtc.testing.receiver import CallReceiver  # noqa: E402
from avatar_rtc.wiring import build_services  # noqa: E402

TEXT = "Hello! I am the default avatar. Watch my lips move as I speak to you."


async def record(cache: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    services = build_services(Settings(ice_host_addresses=["127.0.0.1"], avatar={"cache_dir": cache}))
    template = services.library.ensure_default()
    box = mouth_box(template.landmarks[0], template.size)
    runner = web.AppRunner(create_app(services))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    receiver = CallReceiver(probe=MouthDarkness(box), keep_snapshots=lambda _: True)
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(url, http)
        await asyncio.sleep(1.0)
        receiver.send({"type": "say", "text": TEXT})
        await receiver.wait_event(lambda e: e["type"] == "metrics", wait_s=30)
    await receiver.close()
    await runner.cleanup()

    return np.asarray(receiver.received.video_probe), [image for _, image in receiver.received.snapshots]


def save(out_dir: Path, openness: np.ndarray, images: list[np.ndarray]) -> None:
    closed = int(np.argmin(openness[: len(openness) // 4]))
    order = np.argsort(openness)
    half = int(np.argmin(np.abs(openness - 0.5 * openness.max())))
    picks = {"closed": closed, "half": half, "open": int(order[-1])}
    out_dir.mkdir(exist_ok=True)
    for name, index in picks.items():
        small = cv2.resize(images[index], (256, 256), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out_dir / f"frame_{name}.png"), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        print(f"{name}: frame {index}, openness {openness[index]:.3f}")


if __name__ == "__main__":
    reexec_in_loopback_namespace()
    cache_dir = Path(tempfile.mkdtemp(prefix="docs_frames_"))
    try:
        save(ROOT / "docs", *asyncio.run(record(cache_dir)))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
