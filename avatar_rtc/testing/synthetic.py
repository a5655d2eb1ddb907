"""A synthetic sender whose picture follows its audio exactly, to calibrate the lip-offset measurement.

It shares no code with the server's playout: two plain aiortc tracks stamped from one start time;
video frame n shows a dark ellipse whose area is the audio RMS around media time n / fps.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from avatar_rtc.rtc.ice import host_candidates
from avatar_rtc.testing.receiver import LOOPBACK

RATE = 48000


def syllable_signal(seconds: float, seed: int = 7) -> np.ndarray:
    """A speech-like test signal: a 140 Hz harmonic buzz in irregular syllables and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    buzz = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    envelope = np.zeros_like(t)
    pos = 0.3
    while pos < seconds - 0.3:
        length = rng.uniform(0.12, 0.3)
        mask = (t >= pos) & (t < pos + length)
        envelope[mask] = np.sin(np.pi * (t[mask] - pos) / length) * rng.uniform(0.4, 1.0)
        pos += length + rng.uniform(0.05, 0.5)
    return (buzz * envelope / 3.0 * 20000).astype(np.int16)


class _Shared:
    def __init__(self, pcm: np.ndarray, fps: int, size: int, box: tuple[int, int, int, int]) -> None:
        self.pcm, self.fps, self.size, self.box = pcm, fps, size, box
        self.start: float | None = None

    async def wait(self, media_time: float) -> None:
        if self.start is None:
            self.start = time.monotonic()
        delay = self.start + media_time - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class _Audio(MediaStreamTrack):
    kind = "audio"

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared, self.sample = shared, 0

    async def recv(self) -> av.AudioFrame:
        await self.shared.wait(self.sample / RATE)
        idx = (self.sample + np.arange(960)) % len(self.shared.pcm)
        frame = av.AudioFrame.from_ndarray(self.shared.pcm[idx].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, self.sample, fractions.Fraction(1, RATE)
        self.sample += 960
        return frame


class _Video(MediaStreamTrack):
    kind = "video"

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared, self.index = shared, 0

    async def recv(self) -> av.VideoFrame:
        s = self.shared
        await s.wait(self.index / s.fps)
        centre = self.index * RATE // s.fps
        idx = (centre + np.arange(-RATE // s.fps, RATE // s.fps)) % len(s.pcm)
        rms = float(np.sqrt(np.mean(s.pcm[idx].astype(np.float64) ** 2))) / 8000.0
        image = np.full((s.size, s.size, 3), 170, np.uint8)
        x0, y0, x1, y1 = s.box
        radius_x, radius_y = (x1 - x0) / 2 * min(1.0, rms) ** 0.5, (y1 - y0) / 2 * min(1.0, rms) ** 0.5
        if radius_x >= 1 and radius_y >= 1:
            centre_xy = ((x0 + x1) // 2, (y0 + y1) // 2)
            cv2.ellipse(image, centre_xy, (int(radius_x), int(radius_y)), 0, 0, 360, (20, 20, 40), -1)
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        frame.pts, frame.time_base = self.index * (90000 // s.fps), fractions.Fraction(1, 90000)
        self.index += 1
        return frame


class SyntheticSender:
    def __init__(self, pcm: np.ndarray, box: tuple[int, int, int, int], fps: int = 25, size: int = 512):
        shared = _Shared(pcm, fps, size, box)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.audio, self.video = _Audio(shared), _Video(shared)

    async def answer(self, offer: RTCSessionDescription) -> dict[str, Any]:
        self.pc.addTrack(self.audio)
        self.pc.addTrack(self.video)
        await self.pc.setRemoteDescription(offer)
        with host_candidates(LOOPBACK):
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}

    async def close(self) -> None:
        await self.pc.close()


# Presenter pictures for benchmarks at a call resolution: name -> (width, height).
RESOLUTIONS = {"512": (512, 512), "720p": (720, 1280), "720p-landscape": (1280, 720), "1080p": (1080, 1920)}


def presenter_photo(size: tuple[int, int]) -> np.ndarray:
    """scikit-image's public-domain astronaut photo scaled to cover ``size`` (width, height) and cut
    around the face, head and shoulders framed like a presenter: a full-frame template source at a
    call resolution. Upscaled, so it holds less fine detail than a camera's picture (cheaper to encode)."""
    import skimage.data

    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    width, height = size
    # The face is about 100 px wide in the 512 px photo; make it about a third of the short side.
    scale = max(width / 512, height / 512, min(width, height) / 300)
    scaled = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    face_x, face_y = 215 * scale, 110 * scale  # the astronaut's face in the scaled photo
    x0 = int(np.clip(face_x - width / 2, 0, scaled.shape[1] - width))
    y0 = int(np.clip(face_y - 0.3 * height, 0, scaled.shape[0] - height))
    return np.ascontiguousarray(scaled[y0 : y0 + height, x0 : x0 + width])


def prepare_presenter_template(cache_dir: Path, resolution: str) -> str:
    """Prepare a :func:`presenter_photo` of ``resolution`` (a key of :data:`RESOLUTIONS`) as a template
    in ``cache_dir``, as ``avatar-rtc prepare`` would; returns its id."""
    from avatar_rtc.avatar.library import TemplateLibrary

    template_id = f"presenter_{resolution.replace('-', '_')}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    photo = cache_dir.parent / f"{template_id}.png"
    cv2.imwrite(str(photo), presenter_photo(RESOLUTIONS[resolution]))
    TemplateLibrary(cache_dir, ram_budget_bytes=1 << 31).prepare(photo, template_id)
    return template_id
