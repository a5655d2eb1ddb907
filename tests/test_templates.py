"""Templates from video: preparation follows the face, the cache is atomic and checked, and the library's
RAM tier keeps to its budget without evicting what live calls show."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from avatar_rtc.avatar import face
from avatar_rtc.avatar.face import portrait_box
from avatar_rtc.avatar.library import (
    TemplateBudgetError,
    TemplateInUseError,
    TemplateLibrary,
)
from avatar_rtc.avatar.photo import default_photo
from avatar_rtc.avatar.prepare import PrepareSettings, prepare_video
from avatar_rtc.avatar.ram_tier import template_bytes
from avatar_rtc.avatar.store import TemplateCacheError, TemplateStore
from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.tracking import VideoTracker
from avatar_rtc.testing.talking import write_video

FPS = 25
VIDEO_SIZE = (640, 480)
COVERED_FRAMES = (30, 31, 32)
BACKGROUND = (90, 110, 120)


def face_motion(frame_count: int, fps: int = FPS, size: tuple[int, int] = VIDEO_SIZE) -> np.ndarray:
    """(N, 2, 3) affine per frame that places the 512 px default photo in the video: the face glides
    sideways and up/down and grows and shrinks by about 30% over the clip."""
    width, height = size
    seconds = frame_count / fps
    matrices = np.zeros((frame_count, 2, 3))
    for i in range(frame_count):
        phase = 2 * np.pi * (i / fps) / seconds
        scale = 0.7 + 0.1 * np.sin(phase)
        tx = (width - 512 * scale) / 2 + 40 * np.sin(phase)
        ty = (height - 512 * scale) / 2 + 20 * np.cos(phase)
        matrices[i] = [[scale, 0, tx], [0, scale, ty]]
    return matrices


def make_moving_face_video(
    path: Path, seconds: float = 3.0, covered: tuple[int, ...] = COVERED_FRAMES
) -> tuple[Path, np.ndarray]:
    """The default face moved and scaled over ``seconds``, with the face hidden behind a black box in
    the ``covered`` frames. Returns the file and the affine applied to the photo in each frame."""
    photo = default_photo()
    matrices = face_motion(round(seconds * FPS))
    frames = []
    for i, matrix in enumerate(matrices):
        image = cv2.warpAffine(photo, matrix, VIDEO_SIZE, flags=cv2.INTER_LINEAR, borderValue=BACKGROUND)
        if i in covered:
            corners = np.array([[40.0, 20.0, 1.0], [470.0, 480.0, 1.0]]) @ matrix.T
            cv2.rectangle(image, tuple(corners[0].astype(int)), tuple(corners[1].astype(int)), (0, 0, 0), -1)
        frames.append(image)
    return write_video(path, frames, crf=18), matrices


def noise_video(path: Path, seconds: float = 1.0, size: tuple[int, int] = (320, 240)) -> Path:
    rng = np.random.default_rng(3)
    count = round(seconds * FPS)
    frames = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]
    return write_video(path, frames, crf=18)


def synthetic_template(template_id: str, frames: int = 4, side: int = 64) -> Template:
    rng = np.random.default_rng(abs(hash(template_id)) % 2**32)
    return Template(
        id=template_id,
        fps=FPS,
        frames=rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8),
        landmarks=rng.random((frames, face.LANDMARK_COUNT, 2), dtype=np.float32) * side,
        source="test",
    )


@pytest.fixture(scope="module")
def moving_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    return make_moving_face_video(tmp_path_factory.mktemp("video") / "moving.mp4")


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, moving_video: tuple[Path, np.ndarray]
) -> tuple[TemplateLibrary, float]:
    library = TemplateLibrary(tmp_path_factory.mktemp("cache"), ram_budget_bytes=1 << 30)
    started = time.perf_counter()
    result = library.prepare(moving_video[0], "moving", info={"name": "Moving face", "welcome": "Hello!"})
    assert not result.cache_hit
    return library, time.perf_counter() - started


# -- preparation --------------------------------------------------------------------------------------------
def test_video_template_has_a_manifest_and_per_frame_data(prepared: tuple[TemplateLibrary, float]) -> None:
    library, _ = prepared
    manifest = json.loads((library.store.path("moving") / "manifest.json").read_text())
    assert manifest["format_version"] >= 2 and manifest["frame_count"] == 75 and manifest["fps"] == FPS
    assert len(manifest["source_sha256"]) == 64
    assert manifest["settings"]["max_long_side"] == 1280 and "renderer" not in manifest["settings"]
    assert manifest["info"] == {"name": "Moving face", "welcome": "Hello!", "language": None}
    for name in ("frames.jpgs", "landmarks.npy", "extra_crop_boxes.npy", "extra_lower_face_mask.npy"):
        entry = manifest["files"][name]
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0 and entry["description"]
    template = library.get("moving")
    # The source's own framing and size (640x480 is under the 1280 px bound): not a face crop.
    assert template.frames.shape == (75, VIDEO_SIZE[1], VIDEO_SIZE[0], 3)
    assert template.landmarks.shape == (75, face.LANDMARK_COUNT, 2)
    assert template.extras["crop_boxes"].shape == (75, 4)
    assert template.extras["lower_face_mask"].shape == (75, 256, 256)
    info = library.info("moving")
    assert (info.name, info.welcome, info.state) == ("Moving face", "Hello!", "warm")


def test_crop_boxes_follow_the_known_motion(
    prepared: tuple[TemplateLibrary, float], moving_video: tuple[Path, np.ndarray]
) -> None:
    template = prepared[0].get("moving")
    matrices = moving_video[1]
    left, top, side = portrait_box(face.detect_landmarks(default_photo()))
    photo_centre = np.array([left + side / 2, top + side / 2, 1.0])
    boxes = template.extras["crop_boxes"].astype(np.float64)
    centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
    sides = boxes[:, 2] - boxes[:, 0]
    expected_centres = np.einsum("nij,j->ni", matrices, photo_centre)
    expected_sides = side * matrices[:, 0, 0]
    centre_error = np.linalg.norm(centres - expected_centres, axis=1) / expected_sides
    side_error = np.abs(sides / expected_sides - 1)
    assert centre_error.max() < 0.03, f"crop centre off by up to {centre_error.max():.1%} of the side"
    assert side_error.max() < 0.03, f"crop size off by up to {side_error.max():.1%}"
    # The motion is real (the box moved and scaled), so following it is not trivially true.
    assert np.ptp(centres[:, 0]) > 60 and np.ptp(sides) / sides.mean() > 0.2


def test_frames_without_a_face_keep_their_place(prepared: tuple[TemplateLibrary, float]) -> None:
    template = prepared[0].get("moving")
    found = template.extras["face_found"]
    assert found[list(COVERED_FRAMES)].sum() == 0, "the covered frames should have no face"
    # The mesh runs on every other frame (landmark_stride 2): a frame it skipped next to a covered one
    # is not known to show the face; every other frame is.
    unknown = set(np.flatnonzero(found == 0))
    assert set(COVERED_FRAMES) <= unknown <= set(range(COVERED_FRAMES[0] - 1, COVERED_FRAMES[-1] + 2))
    # Interpolated landmarks glide in a line from the last face seen to the next one.
    nose = template.landmarks[:, face.NOSE_TIP]
    first, last = COVERED_FRAMES[0] - 1, COVERED_FRAMES[-1] + 1
    for i in COVERED_FRAMES:
        expected = nose[first] + (nose[last] - nose[first]) * (i - first) / (last - first)
        assert np.linalg.norm(nose[i] - expected) < 4.0
    # Each template frame is its own source frame: frame 31 is the black box, its neighbours are not.
    dark = (template.frames.mean(axis=(1, 2, 3)) < 60).nonzero()[0]
    assert set(dark) <= set(COVERED_FRAMES)


def test_face_box_frames_the_face_like_the_photo_path(prepared: tuple[TemplateLibrary, float]) -> None:
    template = prepared[0].get("moving")
    oval = template.landmarks[:, list(face.FACE_OVAL)]
    widths = oval[..., 0].max(axis=1) - oval[..., 0].min(axis=1)
    boxes = template.extras["crop_boxes"]
    assert np.all(np.abs(widths / (boxes[:, 2] - boxes[:, 0]) - 0.42) < 0.03)
    # The mask covers the face box, at the face's own resolution.
    mask = template.extras["lower_face_mask"][0]
    to_mask = 256 / float(boxes[0, 2] - boxes[0, 0])
    mouth = (template.landmarks[0, face.UPPER_LIP_INNER_CENTRE] - boxes[0, :2]) * to_mask
    eye = (template.landmarks[0, face.LEFT_EYE_UPPER_LID] - boxes[0, :2]) * to_mask
    assert mask[int(mouth[1]), int(mouth[0])] > 240, "the mouth is inside the lower-face mask"
    assert mask[int(eye[1]), int(eye[0])] == 0, "the eyes are outside it"
    assert 0 < mask.mean() < 60 and len(np.unique(mask)) > 50, "a feathered region, not a hard cut"


def test_second_prepare_is_a_cache_hit(
    prepared: tuple[TemplateLibrary, float], moving_video: tuple[Path, np.ndarray]
) -> None:
    library, first_seconds = prepared
    started = time.perf_counter()
    result = library.prepare(moving_video[0], "moving")
    assert result.cache_hit
    assert time.perf_counter() - started < first_seconds / 2
    assert library.info("moving").welcome == "Hello!", "a cache hit keeps the template's settings"


def test_photo_source_becomes_an_idle_loop(tmp_path: Path) -> None:
    photo = cv2.copyMakeBorder(default_photo(), 60, 60, 100, 100, cv2.BORDER_CONSTANT, value=BACKGROUND)
    path = tmp_path / "face.jpg"
    cv2.imwrite(str(path), photo)
    library = TemplateLibrary(tmp_path / "cache", ram_budget_bytes=1 << 30)
    result = library.prepare(path, "photo")
    template = library.get("photo")
    assert result.info.frame_count == template.frame_count == 100
    assert template.frames.shape[1:] == photo.shape, "the whole photo, not a face crop"
    box = template.extras["crop_boxes"][0]
    assert abs(box[0] - 100) < 25 and abs(box[1] - 60) < 25, "the crop box is where the portrait sits"
    assert template.extras["lower_face_mask"].shape == (100, 256, 256)


def test_streamed_smoothing_equals_smoothing_the_whole_clip() -> None:
    """The tracker finalises frames while tracking goes on; the result must be exactly what a centred
    (zero-lag) Gaussian over the whole clip, after interpolating the gaps, gives."""
    rng = np.random.default_rng(11)
    count = 60
    truth = np.cumsum(rng.normal(0, 2, (count, face.LANDMARK_COUNT, 2)), axis=0) + 300
    missing = {0, 1, 20, 21, 22, 23, 40, 59}
    settings = PrepareSettings()
    tracker = VideoTracker(settings)
    streamed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in range(count):
        tracker.add(None if i in missing else truth[i].astype(np.float32))
        for index, points, box in tracker.ready():
            streamed[index] = (points, box)
        assert all(index < i for index in streamed), "frames are finalised while tracking continues"
    tracker.end()
    for index, points, box in tracker.ready():
        streamed[index] = (points, box)
    assert sorted(streamed) == list(range(count))
    assert len([i for i in streamed if i < count - tracker.reach]) > 0

    found = np.array([i not in missing for i in range(count)])
    known = np.flatnonzero(found)
    filled = np.empty_like(truth)
    flat = truth.astype(np.float32).astype(np.float64).reshape(count, -1)
    for column in range(flat.shape[1]):
        filled.reshape(count, -1)[:, column] = np.interp(np.arange(count), known, flat[known, column])
    reference = gaussian_filter1d(filled, settings.landmark_smoothing_s * FPS, axis=0, mode="nearest")
    boxes = np.array([portrait_box(points) for points in reference])
    reference_boxes = gaussian_filter1d(boxes, settings.box_smoothing_s * FPS, axis=0, mode="nearest")
    for index in range(count):
        np.testing.assert_allclose(streamed[index][0], reference[index], atol=1e-6)
        np.testing.assert_allclose(streamed[index][1], reference_boxes[index], atol=1e-6)


def test_tracking_every_other_frame_matches_tracking_every_frame(
    prepared: tuple[TemplateLibrary, float], moving_video: tuple[Path, np.ndarray]
) -> None:
    """The default landmark_stride (2) interpolates the frames the mesh skips; against the mesh run on
    every frame, the lips and the face box land within a small fraction of the face."""
    strided = prepared[0].get("moving")
    every = prepare_video(moving_video[0], "every", PrepareSettings(landmark_stride=1))
    lips = [*face.LIP_OUTER_UPPER, *face.LIP_OUTER_LOWER]
    found = (strided.extras["face_found"] == 1) & (every.extras["face_found"] == 1)
    face_side = every.extras["crop_boxes"][:, 2] - every.extras["crop_boxes"][:, 0]
    error = np.linalg.norm(strided.landmarks[:, lips] - every.landmarks[:, lips], axis=2).max(axis=1)
    relative = error[found] / face_side[found]
    assert np.median(relative) < 0.005 and relative.max() < 0.015, f"lips off by up to {relative.max():.2%}"
    # The skipped frames are really interpolated, not copies of a tracked neighbour.
    nose = strided.landmarks[:, face.NOSE_TIP]
    assert np.all(np.linalg.norm(nose[1:-1:2] - nose[0:-2:2], axis=1)[found[1:-1:2]] > 0.1)


def test_too_few_faces_is_a_clear_error(tmp_path: Path) -> None:
    path, _ = make_moving_face_video(tmp_path / "hidden.mp4", seconds=1.0, covered=tuple(range(18)))
    library = TemplateLibrary(tmp_path / "cache", ram_budget_bytes=1 << 30)
    with pytest.raises(face.FaceNotFoundError, match=r"no face found in 18 of 25 frames"):
        library.prepare(path, "hidden")
    assert library.list() == []
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


# -- atomic cache, corruption ------------------------------------------------------------------------------
_KILL_SCRIPT = """
import sys, time
from avatar_rtc.avatar import store
from avatar_rtc.avatar.library import TemplateLibrary

real_write = store._write_array

def slow_write(path, array):
    result = real_write(path, array)
    print("WROTE", path.name, flush=True)
    time.sleep(30)  # killed here, with the template half written
    return result

store._write_array = slow_write
TemplateLibrary(sys.argv[1], ram_budget_bytes=1 << 30).prepare(sys.argv[2], "killed")
"""


def test_killed_preparation_leaves_nothing_that_claims_ready(
    tmp_path: Path, moving_video: tuple[Path, np.ndarray]
) -> None:
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(cache), str(moving_video[0])],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("WROTE"), f"preparation should reach the write stage, got {line!r}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    leftovers = [p.name for p in cache.iterdir()]
    assert leftovers and all(name.startswith(".") for name in leftovers), leftovers
    store = TemplateStore(cache)
    assert not store.exists("killed") and store.template_ids() == []
    library = TemplateLibrary(cache, ram_budget_bytes=1 << 30)  # a new process start cleans up
    assert library.list() == [] and [p.name for p in cache.iterdir()] == []
    result = library.prepare(moving_video[0], "killed")
    assert not result.cache_hit and result.info.state == "warm"
    assert store.load("killed").frame_count == 75


def _copy_prepared(library: TemplateLibrary, destination: Path) -> TemplateLibrary:
    shutil.copytree(library.store.path("moving"), destination / "moving")
    return TemplateLibrary(destination, ram_budget_bytes=1 << 30)


def test_truncated_cache_file_is_detected_and_rebuilt(
    tmp_path: Path, prepared: tuple[TemplateLibrary, float], moving_video: tuple[Path, np.ndarray]
) -> None:
    library = _copy_prepared(prepared[0], tmp_path)
    frames = tmp_path / "moving" / "frames.jpgs"
    with frames.open("r+b") as f:
        f.truncate(frames.stat().st_size // 2)
    info = library.info("moving")
    assert info.state == "corrupt" and "truncated" in (info.error or "")
    with pytest.raises(TemplateCacheError, match="checksum"):
        library.get("moving")
    result = library.prepare(moving_video[0], "moving")
    assert not result.cache_hit, "a corrupt cache is prepared again, never used"
    assert library.info("moving").state == "warm" and library.get("moving").frame_count == 75


def test_edited_cache_file_is_detected(tmp_path: Path, prepared: tuple[TemplateLibrary, float]) -> None:
    library = _copy_prepared(prepared[0], tmp_path)
    path = tmp_path / "moving" / "extra_crop_boxes.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(TemplateCacheError, match="checksum"):
        library.get("moving")
    assert library.info("moving").state == "corrupt"


def test_outdated_cache_is_reported(tmp_path: Path, prepared: tuple[TemplateLibrary, float]) -> None:
    library = _copy_prepared(prepared[0], tmp_path)
    manifest_path = tmp_path / "moving" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    info = library.info("moving")
    assert info.state == "outdated" and "prepare it again" in (info.error or "")
    with pytest.raises(TemplateCacheError, match="format version"):
        library.get("moving")


# -- the RAM tier -------------------------------------------------------------------------------------------
class RecordingEngine:
    name = "recording"
    extras_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.warmed: list[str] = []
        self.evicted: list[str] = []

    def warm(self, template: Template) -> None:
        self.warmed.append(template.id)

    def evict(self, template_id: str) -> None:
        self.evicted.append(template_id)

    def template_extras(self, template: Template, progress: object = None) -> dict[str, np.ndarray]:
        return {}

    def has_extras(self, template: Template) -> bool:
        return True


def test_lru_keeps_to_its_budget_and_never_evicts_pinned(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    for name in "abcde":
        store.save(synthetic_template(name))
    one = template_bytes(store.load("a"))
    engine = RecordingEngine()
    library = TemplateLibrary(store, ram_budget_bytes=int(2.5 * one), engine=engine)
    shown = library.acquire("a")  # a live call shows it
    library.get("b")
    library.get("c")  # over budget: b (least recently used, unpinned) goes, a stays
    assert library.in_ram() == ["a", "c"] and engine.evicted == ["b"]
    assert library.get_warm("a") is shown and library.get_warm("b") is None
    assert library.info("a").state == "in_use" and library.info("c").state == "warm"
    library.acquire("c")
    with pytest.raises(TemplateBudgetError, match="budget"):
        library.warm("d")  # a and c are pinned; d does not fit next to them
    assert library.in_ram() == ["a", "c"]
    assert library.get("d").id == "d", "a plain get still works, without being kept"
    assert library.in_ram() == ["a", "c"]
    with pytest.raises(TemplateInUseError):
        library.delete("a")
    library.release("c")
    library.warm("d")
    assert engine.warmed == ["d"] and library.in_ram() == ["a", "d"]
    library.release("a")
    library.delete("a")
    assert library.in_ram() == ["d"] and not store.exists("a")
    with pytest.raises(ValueError, match="not acquired"):
        library.release("a")


def test_budget_holds_under_concurrent_use(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path)
    names = [f"t{i}" for i in range(6)]
    for name in names:
        store.save(synthetic_template(name))
    one = template_bytes(store.load(names[0]))
    library = TemplateLibrary(store, ram_budget_bytes=int(3.5 * one))
    stop = threading.Event()
    errors: list[BaseException] = []
    peak = 0

    def caller(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                name = rng.choice(names)
                try:
                    template = library.acquire(name)
                except TemplateBudgetError:
                    continue
                # While pinned, the template stays in RAM whatever the other threads do.
                assert library.get_warm(name) is template
                time.sleep(rng.random() * 0.002)
                assert library.get_warm(name) is template
                library.release(name)
                library.get(rng.choice(names))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        peak = max(peak, library.ram_bytes)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert 0 < peak <= library.ram_budget
