"""Photo preparation (landmarks, living idle loop) and the on-disk template store."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from avatar_rtc.avatar import face, store
from avatar_rtc.avatar.face import FaceNotFoundError, detect_landmarks
from avatar_rtc.avatar.photo import default_photo, prepare_photo
from avatar_rtc.avatar.store import TemplateCacheError, TemplateStore
from avatar_rtc.avatar.template import Template


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return default_photo()


@pytest.fixture(scope="module")
def photo_landmarks(photo: np.ndarray) -> np.ndarray:
    return detect_landmarks(photo)


@pytest.fixture(scope="module")
def template(photo: np.ndarray) -> Template:
    return prepare_photo(photo, "astronaut", fps=25, seconds=4.0)


def _small_template(template_id: str = "small", frames: int = 3) -> Template:
    rng = np.random.default_rng(7)
    # A real picture, not noise: the cache stores frames as JPEG, which is made for pictures.
    picture = cv2.resize(skimage.data.astronaut()[:, :, ::-1], (48, 32), interpolation=cv2.INTER_AREA)
    return Template(
        id=template_id,
        fps=25,
        frames=np.stack([np.roll(picture, i, axis=1) for i in range(frames)]),
        landmarks=rng.random((frames, face.LANDMARK_COUNT, 2), dtype=np.float32) * 32,
        source="test",
        extras={"rig": rng.random((frames, 5), dtype=np.float32)},
    )


# -- landmarks and the default photo -----------------------------------------------------------------
def test_default_photo_is_a_framed_portrait(photo: np.ndarray, photo_landmarks: np.ndarray) -> None:
    assert photo.shape == (512, 512, 3) and photo.dtype == np.uint8
    assert photo_landmarks.shape == (face.LANDMARK_COUNT, 2) and photo_landmarks.dtype == np.float32
    oval = photo_landmarks[list(face.FACE_OVAL)]
    face_width = oval[:, 0].max() - oval[:, 0].min()
    assert 0.36 * 512 < face_width < 0.5 * 512
    face_centre_y = 0.5 * (oval[:, 1].min() + oval[:, 1].max())
    assert 0.3 * 512 < face_centre_y < 0.5 * 512  # slightly above the middle


def test_mouth_and_eyes_are_where_a_face_has_them(photo_landmarks: np.ndarray) -> None:
    lm = photo_landmarks
    mouth = 0.5 * (lm[face.UPPER_LIP_INNER_CENTRE] + lm[face.LOWER_LIP_INNER_CENTRE])
    assert 0.42 * 512 < mouth[0] < 0.58 * 512
    assert 0.45 * 512 < mouth[1] < 0.65 * 512
    left, right = lm[face.MOUTH_LEFT_CORNER], lm[face.MOUTH_RIGHT_CORNER]
    assert left[0] < mouth[0] < right[0]
    assert 60 < right[0] - left[0] < 140  # mouth width in px at this framing
    for upper, lower in (
        (face.LEFT_EYE_UPPER_LID, face.LEFT_EYE_LOWER_LID),
        (face.RIGHT_EYE_UPPER_LID, face.RIGHT_EYE_LOWER_LID),
    ):
        assert lm[upper, 1] < lm[lower, 1] < lm[face.NOSE_TIP, 1] < mouth[1] < lm[face.CHIN, 1]
    assert lm[face.LEFT_EYE_OUTER_CORNER, 0] < lm[face.RIGHT_EYE_OUTER_CORNER, 0]


def test_no_face_raises_a_clear_error() -> None:
    blank = np.full((256, 256, 3), 128, np.uint8)
    with pytest.raises(FaceNotFoundError, match="no face"):
        detect_landmarks(blank)
    with pytest.raises(FaceNotFoundError):
        prepare_photo(blank, "blank")
    with face.FaceLandmarker() as landmarker:
        assert landmarker.detect(blank) is None


# -- the idle loop ---------------------------------------------------------------------------------------
def test_photo_template_shape(template: Template) -> None:
    assert template.frames.shape == (100, 512, 512, 3)
    assert template.landmarks.shape == (100, face.LANDMARK_COUNT, 2)
    assert template.fps == 25 and template.id == "astronaut"


def test_idle_loop_moves_a_little(template: Template) -> None:
    frames = template.frames.astype(np.int16)
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0.01).mean() > 0.8, "the idle loop should not be a frozen picture"
    nose = template.landmarks[:, face.NOSE_TIP]
    travel = nose.max(axis=0) - nose.min(axis=0)
    assert 0.5 < travel[1] < 4.0, f"breathing bob should be a pixel or two, got {travel}"
    assert travel[0] < 2.0


def test_idle_loop_is_seamless(template: Template) -> None:
    # Played forward then back: the ends must be at rest (no jump in motion at the turn) and the loop
    # should also close on itself.
    nose = template.landmarks[:, face.NOSE_TIP].astype(np.float64)
    steps = np.linalg.norm(np.diff(nose, axis=0), axis=1)
    assert steps[0] < 0.3 * steps.max() and steps[-1] < 0.3 * steps.max()
    assert np.linalg.norm(nose[-1] - nose[0]) <= steps.max()
    first, last = template.frames[0].astype(np.int16), template.frames[-1].astype(np.int16)
    typical_step = np.median(
        np.abs(np.diff(template.frames[40:60].astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    )
    assert np.abs(last - first).mean() <= typical_step


def test_idle_loop_blinks(template: Template) -> None:
    lm = template.landmarks[0]
    eye_points = lm[list(face.LEFT_EYE_UPPER_CONTOUR + face.RIGHT_EYE_UPPER_CONTOUR)]
    x0, y0 = np.floor(eye_points.min(axis=0)).astype(int) - 4
    x1, y1 = np.ceil(eye_points.max(axis=0)).astype(int) + 12
    eyes = template.frames[:, y0:y1, x0:x1].astype(np.float32).mean(axis=3)
    # Change in the eye region against the frame two before: a blink dwarfs the breathing sway.
    change = np.abs(eyes[2:] - eyes[:-2]).mean(axis=(1, 2))
    assert change.max() > 6 * np.median(change)
    blinking = np.flatnonzero(change > 0.5 * change.max())
    assert 1 <= len(blinking) <= 8, "a blink lasts a few frames"
    # The lids close: the upper lid landmarks come down to the lower lid.
    opening = (
        template.landmarks[:, face.LEFT_EYE_LOWER_LID, 1] - template.landmarks[:, face.LEFT_EYE_UPPER_LID, 1]
    )
    assert opening.min() < 0.2 * np.median(opening)
    shut = int(np.argmin(opening))
    assert 2 < shut < len(opening) - 3, "blinks stay off the ends of the forward-backward loop"


# -- the store -------------------------------------------------------------------------------------------
def test_store_round_trip(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    original = _small_template()
    assert not cache.exists("small")
    cache.save(original)
    assert cache.exists("small")
    loaded = cache.load("small")
    # Stored as JPEG: what comes back is each frame's JPEG round trip, bit for bit (the quality bound on
    # real pictures is in tests/test_template_store.py).
    for frame, source in zip(loaded.frames, original.frames, strict=True):
        encoded = cv2.imencode(".jpg", source, [cv2.IMWRITE_JPEG_QUALITY, store.JPEG_QUALITY])[1]
        np.testing.assert_array_equal(frame, cv2.imdecode(encoded, cv2.IMREAD_COLOR))
    assert np.array_equal(loaded.landmarks, original.landmarks)
    assert np.array_equal(loaded.extras["rig"], original.extras["rig"])
    assert (loaded.id, loaded.fps, loaded.source) == ("small", 25, "test")
    manifest = json.loads((tmp_path / "small" / "manifest.json").read_text())
    assert manifest["format_version"] == store.FORMAT_VERSION
    assert (manifest["frame_count"], manifest["width"], manifest["height"]) == (3, 48, 32)
    assert manifest["files"]["frames.jpgs"]["shape"] == [3, 32, 48, 3]
    assert len(manifest["files"]["landmarks.npy"]["sha256"]) == 64


def test_store_replaces_an_older_version(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    cache.save(_small_template(frames=3))
    cache.save(_small_template(frames=5))
    assert cache.load("small").frame_count == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


def test_store_detects_corruption(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    cache.save(_small_template())
    path = tmp_path / "small" / "landmarks.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TemplateCacheError, match="checksum"):
        cache.load("small")


def test_store_detects_missing_file_and_other_version(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    cache.save(_small_template())
    (tmp_path / "small" / "extra_rig.npy").unlink()
    with pytest.raises(TemplateCacheError, match="missing"):
        cache.load("small")
    cache.save(_small_template())
    manifest_path = tmp_path / "small" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = store.FORMAT_VERSION + 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TemplateCacheError, match="format version"):
        cache.load("small")
    with pytest.raises(TemplateCacheError, match="not in the cache"):
        cache.load("other")


def test_interrupted_save_leaves_no_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TemplateStore(tmp_path)
    cache.save(_small_template("kept", frames=3))
    real_write = store._write_array
    calls = 0

    def failing_write(path: Path, array: np.ndarray) -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk full")
        return real_write(path, array)

    monkeypatch.setattr(store, "_write_array", failing_write)
    with pytest.raises(OSError, match="disk full"):
        cache.save(_small_template("fresh"))
    calls = 0
    with pytest.raises(OSError, match="disk full"):
        cache.save(_small_template("kept", frames=5))
    assert not cache.exists("fresh")
    assert not (tmp_path / "fresh").exists()
    # The older version is still there, whole, and no half-written directory is left behind.
    assert cache.load("kept").frame_count == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.parametrize("bad_id", ["", "../etc", "a/b", ".hidden", "-dash", "x" * 65, "sp ace", "é"])
def test_bad_template_ids_are_refused(tmp_path: Path, bad_id: str) -> None:
    cache = TemplateStore(tmp_path)
    with pytest.raises(ValueError, match="invalid template id"):
        cache.exists(bad_id)
    with pytest.raises(ValueError, match="invalid template id"):
        cache.load(bad_id)
    with pytest.raises(ValueError, match="invalid template id"):
        cache.save(_small_template(bad_id))


def test_ensure_default_prepares_caches_and_rebuilds(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache_dir = tmp_path_factory.mktemp("cache")
    cache = TemplateStore(cache_dir)
    built = cache.ensure_default()
    assert built.id == "default" and built.frame_count == 100 and "astronaut" in built.source
    assert cache.exists("default")
    created = json.loads((cache_dir / "default" / "manifest.json").read_text())["created"]
    again = cache.ensure_default()
    assert again.frames.shape == built.frames.shape
    assert np.abs(again.frames.astype(int) - built.frames).mean() < 2, "the cached frames, as JPEG"
    assert json.loads((cache_dir / "default" / "manifest.json").read_text())["created"] == created
    (cache_dir / "default" / "frames.jpgs").write_bytes(b"truncated")
    rebuilt = cache.ensure_default()
    assert rebuilt.frame_count == 100
    assert cache.load("default").frame_count == 100
