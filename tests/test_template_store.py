"""The template cache, format 3: frames as JPEGs at their own size, checked before they are decoded, and
format-2 caches (raw frames) converted in place without ever losing the old one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data

from avatar_rtc.avatar import face, store
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.store import OutdatedTemplateError, TemplateCacheError, TemplateStore
from avatar_rtc.avatar.template import Template

# What comes back is the JPEG round trip of each frame, bit for bit (libjpeg is deterministic), and that
# round trip at quality 95 keeps at least this PSNR on these frames: a sharp photo at 3/4 of its native
# scale measures 39.4-40.5 dB (the default portrait on a 720p canvas, smoother, 47.6 dB: see
# docs/figures/templates_storage.json). A frame decoded into the wrong slot measures under 30 dB.
MIN_PSNR_DB = 38.0
OLD_INFO = {"name": "Old friend", "welcome": "Hallo!", "language": "de"}
OLD_SETTINGS = {"fps": 25, "frame_size": 512, "face_fraction": 0.42}
OLD_SOURCE_SHA256 = "ab" * 32
OLD_CREATED = "2024-05-06T07:08:09Z"


def picture_frames(width: int, height: int, count: int) -> np.ndarray:
    """(count, height, width, 3) BGR frames of a real photo (the astronaut, at 3/4 of its scale, the face
    in the middle) filling the canvas, drifting a pixel or two per frame like a person sitting still."""
    photo = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    scale, face_x, face_y = 0.75, 250, 150
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        tx = width / 2 - face_x * scale + 1.5 * np.sin(i / 3)
        ty = height / 2 - face_y * scale + 1.0 * np.cos(i / 4)
        matrix = np.array([[scale, 0, tx], [0, scale, ty]])
        frames[i] = cv2.warpAffine(
            photo, matrix, (width, height), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT
        )
    return frames


def picture_template(
    template_id: str, width: int = 160, height: int = 96, count: int = 6, **extras: np.ndarray
) -> Template:
    rng = np.random.default_rng(5)
    return Template(
        id=template_id,
        fps=25,
        frames=picture_frames(width, height, count),
        landmarks=rng.random((count, face.LANDMARK_COUNT, 2), dtype=np.float32) * min(width, height),
        source="test.mp4",
        extras={"boxes": rng.random((count, 4), dtype=np.float32) * 100, **extras},
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def jpeg_round_trip(frame: np.ndarray, quality: int = store.JPEG_QUALITY) -> np.ndarray:
    encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)


def assert_same_template(loaded: Template, original: Template) -> None:
    assert loaded.frames.shape == original.frames.shape and loaded.frames.dtype == np.uint8
    for index, (frame, source) in enumerate(zip(loaded.frames, original.frames, strict=True)):
        np.testing.assert_array_equal(frame, jpeg_round_trip(source), err_msg=f"frame {index}")
        assert psnr(frame, source) >= MIN_PSNR_DB, f"frame {index}: {psnr(frame, source):.1f} dB"
    np.testing.assert_array_equal(loaded.landmarks, original.landmarks)
    assert loaded.extras.keys() == original.extras.keys()
    for name, value in original.extras.items():
        np.testing.assert_array_equal(loaded.extras[name], value)
    assert (loaded.id, loaded.fps, loaded.source) == (original.id, original.fps, original.source)


def directory_digest(directory: Path) -> dict[str, str]:
    """Every file of a directory by name with its content hash: 'exactly as it was'."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def write_v2(cache_dir: Path, template: Template, renderer_extras: Iterable[str] = ()) -> Path:
    """A format-2 cache entry, written the way the format-2 store wrote it (raw ``frames.npy``)."""
    directory = cache_dir / template.id
    directory.mkdir(parents=True)
    arrays = {"frames": template.frames, "landmarks": template.landmarks}
    arrays.update({f"extra_{name}": value for name, value in template.extras.items()})
    files: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        path = directory / f"{name}.npy"
        np.save(path, array, allow_pickle=False)
        data = path.read_bytes()
        files[path.name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "description": "format-2 file",
        }
        if name.removeprefix("extra_") in renderer_extras:
            files[path.name]["renderer"] = True
    thumbnail = store.thumbnail_jpeg(template.frames[0])
    (directory / "thumbnail.jpg").write_bytes(thumbnail)
    manifest = {
        "format_version": 2,
        "id": template.id,
        "fps": template.fps,
        "frame_count": template.frame_count,
        "width": template.size[0],
        "height": template.size[1],
        "source": template.source,
        "source_sha256": OLD_SOURCE_SHA256,
        "settings": OLD_SETTINGS,
        "info": OLD_INFO,
        "created": OLD_CREATED,
        "files": files,
        "thumbnail": {
            "file": "thumbnail.jpg",
            "sha256": hashlib.sha256(thumbnail).hexdigest(),
            "bytes": len(thumbnail),
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def manifest_of(cache_dir: Path, template_id: str) -> dict[str, Any]:
    return json.loads((cache_dir / template_id / "manifest.json").read_text())


# -- format 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("width", "height"), [(96, 160), (160, 96)])
def test_non_square_template_round_trips(tmp_path: Path, width: int, height: int) -> None:
    cache = TemplateStore(tmp_path)
    original = picture_template("tall" if height > width else "wide", width, height)
    cache.save(original, info={"name": "N"})
    loaded = cache.load(original.id)
    assert_same_template(loaded, original)
    assert loaded.size == (width, height)
    manifest = manifest_of(tmp_path, original.id)
    assert manifest["format_version"] == store.FORMAT_VERSION == 3
    assert (manifest["frame_count"], manifest["width"], manifest["height"]) == (6, width, height)
    frames = manifest["files"]["frames.jpgs"]
    assert frames["shape"] == [6, height, width, 3] and frames["codec"] == "jpeg"
    assert frames["quality"] == store.JPEG_QUALITY and len(frames["sha256"]) == 64
    assert "frames.npy" not in manifest["files"] and not (tmp_path / original.id / "frames.npy").exists()
    offsets = np.load(tmp_path / original.id / "frame_offsets.npy")
    assert (
        offsets[0] == 0
        and offsets[-1] == frames["bytes"] == (tmp_path / original.id / "frames.jpgs").stat().st_size
    )
    assert len(offsets) == 7 and np.all(np.diff(offsets) > 0)


def test_full_frame_is_well_below_raw_on_disk(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    original = picture_template("hd", 640, 360, count=8)
    cache.save(original)
    stored = (tmp_path / "hd" / "frames.jpgs").stat().st_size
    assert stored < original.frames.nbytes / 8, f"{stored} bytes for {original.frames.nbytes} raw"
    assert_same_template(cache.load("hd"), original)


def test_frames_encoded_by_the_caller_are_stored_as_given(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    original = picture_template("given", 160, 96)
    with ThreadPoolExecutor(2) as pool:  # as preparation would: on its own threads, while it works
        encoded = list(pool.map(lambda frame: store.encode_frame(frame, 90), original.frames))
    cache.save(original, encoded_frames=encoded)
    loaded = cache.load("given")
    for jpeg, frame in zip(encoded, loaded.frames, strict=True):
        np.testing.assert_array_equal(frame, cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
    assert manifest_of(tmp_path, "given")["files"]["frames.jpgs"]["quality"] is None

    wrong_size = [*encoded[:-1], store.encode_frame(original.frames[-1][:, :-2])]
    with pytest.raises(ValueError, match="not a 160x96 colour JPEG"):
        cache.save(picture_template("bad", 160, 96), encoded_frames=wrong_size)
    gray = cv2.imencode(".jpg", cv2.cvtColor(original.frames[0], cv2.COLOR_BGR2GRAY))[1].tobytes()
    with pytest.raises(ValueError, match="colour JPEG"):
        cache.save(picture_template("bad", 160, 96), encoded_frames=[gray, *encoded[1:]])
    with pytest.raises(ValueError, match="5 encoded frames for a template of 6"):
        cache.save(picture_template("bad", 160, 96), encoded_frames=encoded[:5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given"], "nothing half-written is left"


def test_jpeg_size_reads_the_frame_header() -> None:
    image = picture_frames(70, 30, 1)[0]
    assert store.jpeg_size(store.encode_frame(image)) == (70, 30, 3)
    gray = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes()
    assert store.jpeg_size(gray) == (70, 30, 1)
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert store.jpeg_size(progressive) == (70, 30, 3)
    png = cv2.imencode(".png", image)[1].tobytes()
    assert store.jpeg_size(png) is None and store.jpeg_size(b"\xff\xd8") is None
    assert store.jpeg_size(store.encode_frame(image)[:20]) is None


def test_damaged_frames_file_is_refused(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    cache.save(picture_template("t"))
    path = tmp_path / "t" / "frames.jpgs"
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10  # same size: only the checksum can tell
    path.write_bytes(bytes(flipped))
    with pytest.raises(TemplateCacheError, match=r"frames\.jpgs checksum mismatch"):
        cache.load("t")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TemplateCacheError, match="truncated"):
        cache.check("t")
    with pytest.raises(TemplateCacheError, match=r"frames\.jpgs checksum mismatch"):
        cache.load("t")
    path.unlink()
    with pytest.raises(TemplateCacheError, match="missing"):
        cache.load("t")


def _rewrite_frames(directory: Path, jpegs: list[bytes]) -> None:
    """Replace the frames file and make the manifest and offsets agree with it: what a buggy writer (or
    a tool that edits caches) could leave, which only decoding can catch."""
    data = b"".join(jpegs)
    (directory / "frames.jpgs").write_bytes(data)
    offsets = np.cumsum([0, *map(len, jpegs)]).astype(np.int64)
    np.save(directory / "frame_offsets.npy", offsets)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["frames.jpgs"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    raw = (directory / "frame_offsets.npy").read_bytes()
    manifest["files"]["frame_offsets.npy"].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_frame_that_does_not_decode_to_its_size_is_refused(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    template = picture_template("t")
    cache.save(template)
    directory = tmp_path / "t"
    jpegs = [store.encode_frame(frame) for frame in template.frames]
    _rewrite_frames(directory, [*jpegs[:3], store.encode_frame(template.frames[3][:-8]), *jpegs[4:]])
    with pytest.raises(TemplateCacheError, match="frame 3 decodes to 160x88, expected 160x96"):
        cache.load("t")
    _rewrite_frames(directory, [*jpegs[:2], b"\xff\xd8 not a picture", *jpegs[3:]])
    with pytest.raises(TemplateCacheError, match="frame 2 decodes to nothing"):
        cache.load("t")
    _rewrite_frames(directory, jpegs)
    assert_same_template(cache.load("t"), template)


def test_add_extras_keeps_the_frames_file(tmp_path: Path) -> None:
    cache = TemplateStore(tmp_path)
    template = picture_template("t")
    cache.save(template)
    inode = (tmp_path / "t" / "frames.jpgs").stat().st_ino
    rig = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    cache.add_extras("t", {"rig": rig}, based_on=cache.read_manifest("t"))
    assert (tmp_path / "t" / "frames.jpgs").stat().st_ino == inode, "hard-linked, not rewritten"
    loaded = cache.load("t")
    np.testing.assert_array_equal(loaded.extras["rig"], rig)
    assert_same_template(
        loaded,
        Template("t", 25, template.frames, template.landmarks, "test.mp4", {**template.extras, "rig": rig}),
    )


# -- format 2 --------------------------------------------------------------------------------------------
def test_v2_cache_is_converted_at_start_with_its_info(tmp_path: Path) -> None:
    rig = np.linspace(0, 1, 6 * 4, dtype=np.float32).reshape(6, 4)
    old = picture_template("old", 96, 160, rig=rig)
    write_v2(tmp_path, old, renderer_extras=["rig"])
    old_thumbnail = (tmp_path / "old" / "thumbnail.jpg").read_bytes()
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)
    manifest = manifest_of(tmp_path, "old")
    assert manifest["format_version"] == 3 and manifest["migrated_from"] == 2
    assert manifest["info"] == OLD_INFO and manifest["settings"] == OLD_SETTINGS
    assert manifest["source_sha256"] == OLD_SOURCE_SHA256 and manifest["created"] == OLD_CREATED
    assert manifest["files"]["extra_rig.npy"]["renderer"] is True
    assert sorted(manifest["files"]) == [
        "extra_boxes.npy",
        "extra_rig.npy",
        "frame_offsets.npy",
        "frames.jpgs",
        "landmarks.npy",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "no work directory or old copy left"
    info = library.info("old")
    assert (info.state, info.name, info.welcome, info.language) == ("ready", "Old friend", "Hallo!", "de")
    assert (info.width, info.height, info.frame_count) == (96, 160, 6)
    assert library.thumbnail("old") == old_thumbnail
    assert_same_template(library.get("old"), old)


def test_v2_crop_boxes_become_the_face_box_in_the_frame(tmp_path: Path) -> None:
    """Format 2 cut each frame from a square of the source and recorded that square in source pixels;
    that square is the whole converted frame, and format 3 records face boxes in frame pixels."""
    source_square = np.tile(np.array([300, 120, 812, 632], np.float32), (6, 1))
    write_v2(tmp_path, picture_template("old", 96, 96, crop_boxes=source_square))
    boxes = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30).get("old").extras["crop_boxes"]
    np.testing.assert_array_equal(boxes, np.tile(np.array([0, 0, 96, 96], np.float32), (6, 1)))


def test_v2_cache_that_turns_up_later_is_converted_on_first_load(tmp_path: Path) -> None:
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)
    old = picture_template("late")
    write_v2(tmp_path, old)
    info = library.info("late")
    assert info.state == "outdated" and "converted to 3 when it is first used" in (info.error or "")
    assert_same_template(library.get("late"), old)
    assert manifest_of(tmp_path, "late")["migrated_from"] == 2
    assert library.info("late").state == "warm" and library.info("late").name == "Old friend"


def test_a_failed_conversion_leaves_the_v2_cache_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = picture_template("old", 160, 96)
    directory = write_v2(tmp_path, old)
    before = directory_digest(directory)
    real_write_frames = store._write_frames

    def disk_full(path: Path, jpegs: Iterable[bytes]) -> tuple[dict[str, Any], np.ndarray]:
        with path.open("wb") as f:
            f.write(next(iter(jpegs)))  # part of the new frames file is on disk when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_frames", disk_full)
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)  # a server starting: it must not fail
    assert directory_digest(directory) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    info = library.info("old")
    assert info.state == "outdated" and "No space left on device" in (info.error or "")
    with pytest.raises(TemplateCacheError, match="cannot be converted from cache format 2"):
        library.get("old")
    assert directory_digest(directory) == before

    monkeypatch.setattr(store, "_write_frames", real_write_frames)  # space again: the next load converts it
    assert_same_template(library.get("old"), old)
    assert library.info("old").name == "Old friend"


def test_a_template_prepared_again_during_conversion_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = TemplateStore(tmp_path)
    write_v2(tmp_path, picture_template("t"))
    newer = picture_template("t", 96, 160)
    real_write_frames = store._write_frames

    def meanwhile(path: Path, jpegs: Iterable[bytes]) -> tuple[dict[str, Any], np.ndarray]:
        result = real_write_frames(path, jpegs)
        monkeypatch.setattr(store, "_write_frames", real_write_frames)
        TemplateStore(tmp_path).save(newer, info={"name": "Newer"})  # another process prepares it
        return result

    monkeypatch.setattr(store, "_write_frames", meanwhile)
    with pytest.raises(TemplateCacheError, match="changed while it was migrated"):
        cache.migrate("t")
    monkeypatch.undo()
    assert "migrated_from" not in manifest_of(tmp_path, "t")
    assert_same_template(cache.load("t"), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_damaged_v2_cache_is_not_converted(tmp_path: Path) -> None:
    rig = np.ones((6, 2), dtype=np.float32)
    directory = write_v2(tmp_path, picture_template("t", rig=rig), renderer_extras=["rig"])
    # A damaged renderer extra is dropped (the renderer computes it again); the rest converts.
    (directory / "extra_rig.npy").write_bytes(b"garbage")
    TemplateStore(tmp_path).migrate("t")
    assert "rig" not in TemplateStore(tmp_path).load("t").extras
    second = tmp_path / "second"
    directory = write_v2(second, picture_template("t"))
    frames = directory / "frames.npy"
    data = bytearray(frames.read_bytes())
    data[-100] ^= 0x01
    frames.write_bytes(bytes(data))
    before = directory_digest(directory)
    with pytest.raises(TemplateCacheError, match=r"frames\.npy checksum mismatch"):
        TemplateStore(second).migrate("t")
    assert directory_digest(directory) == before


@pytest.mark.parametrize("version", [1, 4, None])
def test_other_versions_are_outdated(tmp_path: Path, version: int | None) -> None:
    directory = write_v2(tmp_path, picture_template("t"))
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = version
    (directory / "manifest.json").write_text(json.dumps(manifest))
    before = directory_digest(directory)
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)
    assert directory_digest(directory) == before, "only format 2 is converted"
    info = library.info("t")
    assert info.state == "outdated" and f"format version {version!r}" in (info.error or "")
    assert "prepare it again" in (info.error or "")
    with pytest.raises(OutdatedTemplateError, match="this build reads 3; prepare it again"):
        library.get("t")
    with pytest.raises(TemplateCacheError, match="only 2 is migrated"):
        TemplateStore(tmp_path).migrate("t")
    # Preparing it again keeps what its user set (the library reads the info of any version).
    assert TemplateStore(tmp_path).read_info("t") == OLD_INFO


_KILL_SCRIPT = """
import sys, time
from avatar_rtc.avatar import store
from avatar_rtc.avatar.library import TemplateLibrary

def slow_write_frames(path, jpegs):
    with path.open("wb") as f:
        f.write(next(iter(jpegs)))
        f.flush()
    print("WRITING", path.parent.name, flush=True)
    time.sleep(30)  # killed here, the new version half written beside the old one
    raise AssertionError("not killed")

store._write_frames = slow_write_frames
TemplateLibrary(sys.argv[1], ram_budget_bytes=1 << 30)
"""


def test_killed_conversion_leaves_the_v2_cache_and_the_next_start_converts_it(tmp_path: Path) -> None:
    old = picture_template("old")
    directory = write_v2(tmp_path, old)
    before = directory_digest(directory)
    process = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("WRITING .tmp-"), f"the conversion should reach its write, got {line!r}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert directory_digest(directory) == before
    assert TemplateStore(tmp_path).format_version("old") == 2
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)  # the next start cleans up and converts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert library.info("old").name == "Old friend"
    assert_same_template(library.get("old"), old)


def test_conversion_and_loads_of_one_template_at_once(tmp_path: Path) -> None:
    """Two sessions asking for a format-2 template at the same moment: converted once, both get it."""
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)
    old = picture_template("old")
    write_v2(tmp_path, old)
    results: list[Template] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            results.append(library.acquire("old"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 3 and all(r is results[0] for r in results)
    assert_same_template(results[0], old)
    assert library.pins("old") == 3


def test_a_warm_switch_reads_nothing_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding happens once, into the RAM tier: a template already there is switched to without the disk."""
    TemplateStore(tmp_path).save(picture_template("t", 640, 360))
    library = TemplateLibrary(tmp_path, ram_budget_bytes=1 << 30)
    warm = library.get("t")

    def no_disk(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm switch touched the cache")

    monkeypatch.setattr(store, "_read_jpeg_frames", no_disk)
    monkeypatch.setattr(library.store, "load", no_disk)
    assert library.get_warm("t") is warm and library.acquire("t") is warm
    library.release("t")


def test_work_directories_on_a_shared_cache_are_cleaned_only_by_their_own_host(tmp_path: Path) -> None:
    """A pid says whether a writer is alive only on its own host: another host's work directory is
    left alone while anything in it is recent, and removed once it has been abandoned for hours."""
    from avatar_rtc.avatar.store import _HOST_TAG, _OTHER_HOST_STALE_S

    dead_pid = 2**22 + 7  # above Linux's pid_max: no process has it
    other_host = "0" * 8 if _HOST_TAG != "0" * 8 else "1" * 8
    at_work = tmp_path / f".tmp-{dead_pid}@{other_host}-talker-abc"  # its pid is on its own host
    abandoned = tmp_path / f".tmp-{dead_pid}@{other_host}-talker-def"
    ours_dead = tmp_path / f".tmp-{dead_pid}@{_HOST_TAG}-talker-ghi"
    ours_live = tmp_path / f".tmp-{os.getpid()}@{_HOST_TAG}-talker-jkl"
    for directory in (at_work, abandoned, ours_dead, ours_live):
        directory.mkdir()
        (directory / "frames.jpgs").write_bytes(b"...")
    long_ago = time.time() - _OTHER_HOST_STALE_S - 60
    for path in (abandoned, abandoned / "frames.jpgs"):
        os.utime(path, (long_ago, long_ago))

    removed = TemplateStore(tmp_path).remove_stale()

    assert sorted(removed) == sorted([abandoned.name, ours_dead.name])
    assert at_work.is_dir() and ours_live.is_dir()
