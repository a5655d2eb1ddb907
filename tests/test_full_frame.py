"""Full-frame avatars: a portrait or landscape source keeps its shape and its framing from preparation to
the file the renderer writes, and the renderer changes only the mouth region of each frame."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from avatar_rtc.avatar import face
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.photo import default_photo
from avatar_rtc.avatar.prepare import PrepareSettings, output_size
from avatar_rtc.avatar.template import Template
from avatar_rtc.conversation.offline import AudioClipSpeech, render_to_file
from avatar_rtc.render.warp import WarpEngine
from avatar_rtc.testing.synthetic import RATE, syllable_signal
from avatar_rtc.testing.talking import write_video

FPS = 25
BACKGROUND = (40, 90, 60)


def presenter_video(path: Path, size: tuple[int, int], seconds: float = 1.2) -> Path:
    """The default face as a presenter on a ``size`` canvas (head in the upper part, room below for the
    shoulders), swaying a little, as H.264."""
    width, height = size
    photo = default_photo()
    scale = 0.8 * min(width, height) / 512
    frames = []
    for i in range(round(seconds * FPS)):
        dx = 6 * np.sin(2 * np.pi * i / FPS)
        matrix = np.array(
            [[scale, 0, (width - 512 * scale) / 2 + dx], [0, scale, 0.12 * height]], dtype=np.float64
        )
        frames.append(cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR, borderValue=BACKGROUND))
    return write_video(path, frames, FPS)


def mouth_region(template: Template, margin: float = 0.25) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around every frame's lower face (nose to chin, cheek to cheek), with a margin:
    the most a mouth renderer may change."""
    points = template.landmarks[:, [*face.JAW_CONTOUR, face.NOSE_BOTTOM]]
    x0, y0 = points[..., 0].min(), points[..., 1].min()
    x1, y1 = points[..., 0].max(), points[..., 1].max()
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    return int(x0 - pad_x), int(y0 - pad_y), int(x1 + pad_x) + 1, int(y1 + pad_y) + 1


def block_means(image: np.ndarray, block: int = 16) -> np.ndarray:
    height, width = (image.shape[0] // block) * block, (image.shape[1] // block) * block
    tiles = image[:height, :width].reshape(height // block, block, width // block, block)
    return tiles.mean(axis=(1, 3))


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module", params=[(288, 512), (512, 288)], ids=["portrait", "landscape"])
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Template:
    size: tuple[int, int] = request.param
    directory = tmp_path_factory.mktemp("full-frame")
    video = presenter_video(directory / "presenter.mp4", size)
    library = TemplateLibrary(directory / "cache", ram_budget_bytes=1 << 30)
    library.prepare(video, "presenter")
    return library.get("presenter")


def test_the_template_keeps_the_source_shape_and_framing(prepared: Template) -> None:
    height, width = prepared.frames.shape[1:3]
    assert (width, height) in {(288, 512), (512, 288)}
    # The whole picture is there, background included, not a crop around the face.
    corners = prepared.frames[0][[4, 4, -5, -5], [4, -5, 4, -5]].astype(float)
    assert np.abs(corners - BACKGROUND).max() < 16, "the source's corners (background) are kept"
    boxes = prepared.extras["crop_boxes"]
    side = boxes[:, 2] - boxes[:, 0]
    assert np.all(side < 0.9 * max(width, height)), "the face box is a part of the frame"


def test_rendered_file_keeps_the_shape_and_changes_only_the_mouth(prepared: Template, tmp_path: Path) -> None:
    speech = AudioClipSpeech(syllable_signal(2.0), RATE)
    output = tmp_path / "speech.mp4"
    asyncio.run(render_to_file(output, prepared, WarpEngine(), speech, "(audio)"))
    frames = decoded_frames(output)
    assert frames and frames[0].shape == prepared.frames.shape[1:], "the file has the template's shape"
    x0, y0, x1, y1 = mouth_region(prepared)
    outside = np.ones(frames[0].shape[:2], dtype=bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    assert outside.mean() > 0.5, "the mouth region is a small part of the frame"
    mouth_change = []
    for index, frame in enumerate(frames):
        reference = prepared.idle_frame(index).astype(np.int16)
        difference = np.abs(frame.astype(np.int16) - reference).mean(axis=2)
        # H.264 at the writer's quality and a colour conversion there and back: a few levels on average,
        # and no 16 px block (a macroblock) changed visibly; a frame moved by one pixel fails both.
        assert difference[outside].mean() < 4.0, f"frame {index}: pixels outside the mouth changed"
        blocks = block_means(np.where(outside, difference, 0.0))
        assert blocks.max() < 12, f"frame {index}: a block outside the mouth changed by {blocks.max():.1f}"
        mouth_change.append(float(difference[~outside].mean()))
    # The lips part by a natural amount (issue 16), a small part of this lower-face box: its mean change
    # rises well above the codec's noise, not to several times it.
    assert max(mouth_change) > np.median(mouth_change[:3] or [1.0]) + 2.5, "the mouth moved"


def test_sources_past_the_bound_are_scaled_down_with_even_sides() -> None:
    assert output_size((720, 1280), 1280) == (720, 1280)
    assert output_size((1080, 1920), 1280) == (720, 1280)
    assert output_size((1920, 1080), 1280) == (1280, 720)
    assert output_size((1001, 1999), 1280) == (640, 1280)
    assert output_size((333, 501), 1280) == (332, 500), "odd sides are made even, never scaled up"
    assert PrepareSettings().max_long_side == 1280


def test_a_photo_template_is_the_whole_photo(tmp_path: Path) -> None:
    photo = cv2.copyMakeBorder(default_photo(), 300, 80, 40, 40, cv2.BORDER_CONSTANT, value=BACKGROUND)
    path = tmp_path / "portrait.png"
    cv2.imwrite(str(path), photo)
    library = TemplateLibrary(tmp_path / "cache", ram_budget_bytes=1 << 30)
    library.prepare(path, "photo")
    template = library.get("photo")
    assert template.frames.shape[1:] == photo.shape == (892, 592, 3)
    # Still a living loop of the whole photo: the background stays, the face is where it was.
    assert np.abs(template.frames[0][:200].astype(float) - BACKGROUND).mean() < 4
    box = template.extras["crop_boxes"][0]
    assert abs(box[0] - 40) < 25 and abs(box[1] - 300) < 25
    # The picker's thumbnail shows the face, not the middle of the portrait.
    thumbnail = cv2.imdecode(np.frombuffer(library.thumbnail("photo"), np.uint8), cv2.IMREAD_COLOR)
    size = thumbnail.shape[1::-1]
    x0, y0, side = int(box[0]), int(box[1]), int(box[2] - box[0])
    face_square = cv2.resize(template.frames[0][y0 : y0 + side, x0 : x0 + side], size)
    centre = cv2.resize(template.frames[0][150:742], size)
    assert (
        np.abs(thumbnail.astype(float) - face_square).mean()
        < 0.5 * np.abs(thumbnail.astype(float) - centre).mean()
    )
