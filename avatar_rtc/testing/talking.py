"""A talking-presenter video made on the spot, for the mouth bank's tests and gallery: the default face
with its lips closed, saying a row of visemes through the warp renderer (its drawn mouth), written as an
H.264 MP4 that preparation reads like any upload."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from avatar_rtc.avatar.photo import default_photo, prepare_photo
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.visemes import VISEME_POSES, TimedViseme, Viseme, VisemeTrack
from avatar_rtc.render.warp import WarpEngine

FPS = 25
# Each held long enough (6 frames) for its pose to be reached, then the next: open, closed, rounded and
# spread mouths, as in speech.
SAID = (
    Viseme.REST,
    Viseme.OPEN,
    Viseme.CLOSED,
    Viseme.ROUNDED,
    Viseme.MID,
    Viseme.SPREAD,
    Viseme.ROUNDED_OPEN,
    Viseme.TEETH,
    Viseme.OPEN,
    Viseme.POSTALVEOLAR,
    Viseme.CLOSED,
    Viseme.REST,
)
HOLD_S = 0.24


def closed_lips_face(seconds: float = 2.0) -> Template:
    """The default face with its lips closed (its own smile parts them), as a photo loop: a face whose
    relaxed mouth is closed, like most people's."""
    photo = prepare_photo(default_photo(), "talking-source", FPS, seconds=1.0)
    closed = WarpEngine(mouth_bank=False).open(photo).render_pose(0, VISEME_POSES[Viseme.CLOSED])
    return prepare_photo(closed, "closed-lips", FPS, seconds=seconds)


def talking_frames(
    face: Template, said: tuple[Viseme, ...] = SAID, hold_s: float = HOLD_S
) -> list[np.ndarray]:
    """``face`` saying ``said`` with the drawn mouth, one frame per 1/25 s."""
    renderer = WarpEngine(mouth_bank=False).open(face)
    track = VisemeTrack()
    track.push([TimedViseme(v, i * hold_s, (i + 1) * hold_s) for i, v in enumerate(said)], 0.0)
    count = round(len(said) * hold_s * FPS)
    frames = []
    for index in range(count):
        pose = track.pose_at(index / FPS)
        frames.append(renderer.render_pose(face.loop_index(index), pose or VISEME_POSES[Viseme.REST]))
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS, crf: int = 16) -> Path:
    """H.264 MP4 of BGR ``frames`` (crf 16: near-lossless, where the mouths are what is tested)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def talking_video(path: Path) -> Path:
    """The closed-lips default face saying :data:`SAID`, as an MP4 at ``path``."""
    return write_video(path, talking_frames(closed_lips_face()))
