"""The on-disk template cache: one directory per template, written atomically, checked on load.

Layout (format 3): ``<cache_dir>/<id>/manifest.json`` plus ``frames.jpgs`` (every frame as a JPEG, the
JPEGs one after another), ``frame_offsets.npy`` (where each JPEG starts, and the file's end),
``landmarks.npy``, one ``extra_<name>.npy`` per extras key and a ``thumbnail.jpg``. The manifest records
the format version, the source file's sha256 and the preparation settings (so a stale cache is
recognised), the per-template settings (name, welcome line, language), and each file's sha256, size,
shape, dtype and what it holds, so a truncated or altered file is caught at load rather than rendered.
Renderer extras (computed by the renderer engine, see :class:`avatar_rtc.avatar.engine.TemplateEngine`)
are marked ``"renderer": true``: they can always be computed again, so a damaged one is dropped at load
(and recomputed by the library) instead of making the whole template unusable.
:meth:`TemplateStore.add_extras` adds them to a cached template later without rewriting its frames.

Why JPEG: templates are full frames at the source's own resolution, and raw they cost 2.76 MB per
1280x720 frame (69 MB per template second, 2 GB for 30 s). Frames are encoded in parallel (OpenCV
releases the GIL) at :data:`JPEG_QUALITY` 95 with 4:2:0 chroma, and decoded in parallel at load into one
(N, H, W, 3) array: the RAM tier holds decoded frames (as much RAM as raw), because the idle loop and the
renderers read a whole frame every 40 ms. Measured at 1280x720 per template second
(``scripts/bench_templates.py --storage``, ``docs/figures/templates_storage.json``, 2 shared cores):
quality 95 stores 3.0-5.1 MB (1/23-1/14 of raw; the range is a plain backdrop to a busy one with camera
grain) at 47.5-41.2 dB PSNR; quality 90 stores 2.2-3.1 MB at 46.2-40.8 dB. Encoding costs about 0.12 s
and decoding 0.17-0.2 s of CPU either way, so a cold load (read, checksum, decode on both cores) takes
about 90 ms of wall time, less than reading and hashing the raw frames did (150 ms). So 90 would save
30-40% of the disk for 0.4-1.3 dB. The cache is the master copy: the call's video codec compresses every
frame again and MuseTalk reads its face crops from it, so losses compound, and a blocky master cannot be
undone, while 95 is already a twentieth of raw: 95. Chroma stays 4:2:0: video sources arrive 4:2:0, so
full chroma would store detail that was never there (it costs about 40% more).

A template is written into a work directory whose name starts with a dot and is moved into place in one
rename, manifest last: a half-written template is never visible under its id. Work directories left by
a killed process are removed by :meth:`TemplateStore.remove_stale`.

Format 2 (the same layout with raw ``frames.npy``) is migrated by :meth:`TemplateStore.migrate` the same
way: read and verified, written as format 3 in a work directory, swapped in; a crash or a full disk
leaves the format-2 directory as it was. Any other version is :class:`OutdatedTemplateError`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np

from avatar_rtc.avatar.template import Template

if TYPE_CHECKING:
    from avatar_rtc.avatar.engine import TemplateEngine
    from avatar_rtc.avatar.prepare import PrepareSettings

FORMAT_VERSION = 3
# The one older format this build converts in place (TemplateStore.migrate); older ones are prepared again.
MIGRATABLE_VERSION = 2
MANIFEST_NAME = "manifest.json"
THUMBNAIL_NAME = "thumbnail.jpg"
THUMBNAIL_SIZE = 160
FRAMES_NAME = "frames.jpgs"
OFFSETS_NAME = "frame_offsets.npy"
LANDMARKS_NAME = "landmarks.npy"
# Format 2's raw frames, read only to migrate.
_V2_FRAMES_NAME = "frames.npy"
# See the module docstring for the measurements behind 95.
JPEG_QUALITY = 95
TEMPLATE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_EXTRA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Work directories start with a dot, so they can never be mistaken for (or collide with) a template id.
# The writer's pid and host follow the prefix ("<pid>@<host tag>"), so a later process can tell an
# abandoned one from a live one; on a directory shared by several hosts a pid says something only on
# its own host, and another host's work directory is removed only once nothing has touched it for
# _OTHER_HOST_STALE_S (no preparation takes that long).
_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OTHER_HOST_STALE_S = 6 * 3600.0


def _writer_tag() -> str:
    return f"{os.getpid()}@{_HOST_TAG}"


# The built-in template's "source hash": it is made from a photo inside scikit-image, not a file.
DEFAULT_SOURCE_SHA256 = "builtin:skimage.data.astronaut"
# Keys of the per-template settings kept in the manifest, changeable without preparing again.
INFO_KEYS = ("name", "welcome", "language")
# Decoding ignores EXIF orientation: the stored pixels are the frame, whatever metadata a caller's JPEG has.
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
# JPEG start-of-frame markers (all but DHT C4, JPG C8 and DAC CC), which carry the image size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

_CROP_BOXES_NAME = "extra_crop_boxes.npy"
FILE_DESCRIPTIONS = {
    FRAMES_NAME: "template frames, one JPEG each, concatenated; decoded to (N, H, W, 3) uint8 BGR and "
    "played forward then back as the idle loop",
    OFFSETS_NAME: f"byte offset of each frame's JPEG in {FRAMES_NAME}, then the file's size, (N + 1,) int64",
    LANDMARKS_NAME: "MediaPipe face mesh per frame, (N, 478, 2) float32 pixel xy in the frame",
    "extra_crop_boxes.npy": "square face working area per frame, (N, 4) float32 x0 y0 x1 y1 frame pixels",
    "extra_face_found.npy": "1 where the face was tracked in the frame, 0 where landmarks were interpolated",
    "extra_lower_face_mask.npy": "feathered lower-face mask per frame, (N, M, M) uint8 over its face box",
}

_T = TypeVar("_T")
_R = TypeVar("_R")

log = logging.getLogger(__name__)


class TemplateCacheError(RuntimeError):
    """A cached template is missing, incomplete, corrupt or from another format version."""


class OutdatedTemplateError(TemplateCacheError):
    """A cached template from another cache format version: prepare it again."""


def validate_template_id(template_id: str) -> str:
    if not isinstance(template_id, str) or not TEMPLATE_ID_PATTERN.fullmatch(template_id):
        raise ValueError(
            f"invalid template id {template_id!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return template_id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingWriter:
    """A file that hashes what is written to it: one pass over the data instead of write, then read."""

    def __init__(self, f: Any) -> None:
        self._file = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self.size += len(data)
        return int(self._file.write(data))


def _write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    with path.open("wb") as f:
        writer = _HashingWriter(f)
        np.lib.format.write_array(writer, array, allow_pickle=False)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    return {
        "sha256": writer.digest.hexdigest(),
        "bytes": writer.size,
        "shape": list(array.shape),
        "dtype": str(array.dtype),
    }


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_json(path: Path, value: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def thumbnail_jpeg(
    frame: np.ndarray, size: int = THUMBNAIL_SIZE, face_box: np.ndarray | None = None
) -> bytes:
    """A small square JPEG of ``frame`` (BGR) for pickers: the square around ``face_box`` (x0, y0, x1,
    y1; a presenter's face, not the middle of a portrait frame), else the centre square."""
    height, width = frame.shape[:2]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    if face_box is not None:
        side = int(min(side, max(8.0, float(face_box[2] - face_box[0]))))
        centre_x, centre_y = 0.5 * (face_box[0] + face_box[2]), 0.5 * (face_box[1] + face_box[3])
        x0 = int(np.clip(round(centre_x - side / 2), 0, width - side))
        y0 = int(np.clip(round(centre_y - side / 2), 0, height - side))
    small = cv2.resize(frame[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding of the thumbnail failed")
    return encoded.tobytes()


def _modified_at(path: Path) -> float:
    """The latest modification time of ``path`` and what is directly inside it (a writer at work
    keeps adding files), or 0 if it is gone."""
    times = [0.0]
    with contextlib.suppress(OSError):
        times.append(path.stat().st_mtime)
        for child in path.iterdir():
            with contextlib.suppress(OSError):  # a file the writer just renamed or removed
                times.append(child.stat().st_mtime)
    return max(times)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from the ``.npy`` header at ``f``'s position (left just past it); only the plain,
    C-ordered arrays this cache writes are accepted."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran_order or dtype.hasobject:
        raise ValueError("only C-ordered plain arrays are stored")
    return tuple(shape), dtype


def _read_checked(path: Path, meta: Mapping[str, Any], template_id: str) -> bytes:
    """The bytes of a cache file, after checking their size and sha256 against its manifest entry."""
    name = path.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TemplateCacheError(f"template {template_id!r}: {name} is missing") from None
    except OSError as exc:
        raise TemplateCacheError(f"template {template_id!r}: cannot read {name}: {exc}") from exc
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise TemplateCacheError(
            f"template {template_id!r}: {name} checksum mismatch (truncated, corrupt or changed on disk)"
        )
    return data


def _read_verified_array(path: Path, meta: Mapping[str, Any], template_id: str) -> np.ndarray:
    """The array in ``path`` after checking it against its manifest entry.

    One read and one hash over the bytes: the array is a view into the buffer that was hashed, so what
    is checked is exactly what is used.
    """
    name = path.name
    data = bytearray(_read_checked(path, meta, template_id))
    try:
        header = io.BytesIO(memoryview(data)[:4096])
        shape, dtype = _npy_header(header)
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header.tell()).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise TemplateCacheError(f"template {template_id!r}: cannot read {name}: {exc}") from exc
    if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
        raise TemplateCacheError(
            f"template {template_id!r}: {name} is {array.shape} {array.dtype}, manifest says "
            f"{meta.get('shape')} {meta.get('dtype')}"
        )
    return array


def encode_frame(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """One template frame (H, W, 3) uint8 BGR as the JPEG the cache stores.

    Thread-safe and GIL-free while it encodes: preparation may call it on its own threads as frames are
    finished and pass the results to :meth:`TemplateStore.save` as ``encoded_frames``.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"a template frame is (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(frame), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding of a template frame failed")
    return encoded.tobytes()


def jpeg_size(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(width, height, colour components) from a JPEG's start-of-frame header, or None if ``data`` does
    not start like a JPEG. Reads the headers only: a check of caller-encoded frames that costs no decode."""
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= len(view):
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or entropy-coded data, before any frame header
            return None
        length = int.from_bytes(view[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if length < 8 or i + 10 > len(view):
                return None
            height = int.from_bytes(view[i + 5 : i + 7], "big")
            width = int.from_bytes(view[i + 7 : i + 9], "big")
            return width, height, int(view[i + 9])
        i += 2 + length
    return None


def _workers() -> int:
    """Threads for encoding and decoding: the CPUs this process may run on (a container's affinity, not
    the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _ordered_map(function: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map`` on a thread pool, results in order, at most a few items per worker in flight: the frames
    stream through to the file instead of all of them waiting in memory. Stopping early (an error in the
    consumer or in ``function``) cancels what has not started."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="template-jpeg")
    pending: collections.deque[Future[_R]] = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_frames(path: Path, jpegs: Iterable[bytes]) -> tuple[dict[str, Any], np.ndarray]:
    """Write the JPEGs one after another; returns the file's manifest entry and the (N + 1,) offsets."""
    offsets = [0]
    with path.open("wb") as f:
        writer = _HashingWriter(f)
        for jpeg in jpegs:
            writer.write(jpeg)
            offsets.append(writer.size)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": writer.digest.hexdigest(), "bytes": writer.size}, np.asarray(offsets, dtype=np.int64)


def _write_frame_files(
    work: Path, shape: tuple[int, ...], jpegs: Iterable[bytes], quality: int | None
) -> dict[str, dict[str, Any]]:
    """``frames.jpgs`` and ``frame_offsets.npy`` in ``work`` for frames of ``shape``; their manifest
    entries."""
    count, height, width = (int(n) for n in shape[:3])
    entry, offsets = _write_frames(work / FRAMES_NAME, jpegs)
    if len(offsets) != count + 1:
        raise ValueError(f"{len(offsets) - 1} frames written for a template of {count}")
    entry.update(
        shape=[count, height, width, 3],
        dtype="uint8",
        codec="jpeg",
        quality=quality,
        description=FILE_DESCRIPTIONS[FRAMES_NAME],
    )
    offsets_entry = _write_array(work / OFFSETS_NAME, offsets)
    offsets_entry["description"] = FILE_DESCRIPTIONS[OFFSETS_NAME]
    return {FRAMES_NAME: entry, OFFSETS_NAME: offsets_entry}


def _checked_jpegs(encoded: Sequence[bytes], size: tuple[int, int]) -> Iterator[bytes]:
    """Caller-encoded frames, each checked to be a colour JPEG of the template's size (headers only)."""
    for index, jpeg in enumerate(encoded):
        found = jpeg_size(jpeg)
        if found is None or found[:2] != size or found[2] != 3:
            raise ValueError(
                f"encoded frame {index} is not a {size[0]}x{size[1]} colour JPEG (header says {found})"
            )
        yield bytes(jpeg)


def _read_jpeg_frames(
    directory: Path, files: Mapping[str, Any], frame_count: int, template_id: str
) -> np.ndarray:
    """The decoded frames, after their file passed its checksum: one (N, H, W, 3) array, filled by
    parallel decoders. Every frame must decode to exactly the recorded size, or nothing is returned."""
    meta = files[FRAMES_NAME]
    shape = meta.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(n, int) and n > 0 for n in shape)
        or shape[0] != frame_count
        or shape[3] != 3
        or meta.get("dtype") != "uint8"
    ):
        raise TemplateCacheError(f"template {template_id!r}: bad frame shape {shape!r} in manifest")
    count, height, width = shape[0], shape[1], shape[2]
    offsets = _read_verified_array(directory / OFFSETS_NAME, files[OFFSETS_NAME], template_id)
    if (
        offsets.shape != (count + 1,)
        or offsets.dtype.kind not in "iu"
        or offsets[0] != 0
        or offsets[-1] != meta.get("bytes")
        or np.any(np.diff(offsets) <= 0)
    ):
        raise TemplateCacheError(f"template {template_id!r}: {OFFSETS_NAME} does not index {FRAMES_NAME}")
    # The checksum first: what is decoded is exactly what was written.
    data = _read_checked(directory / FRAMES_NAME, meta, template_id)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    starts = offsets.tolist()

    def decode(index: int) -> None:
        jpeg = np.frombuffer(
            data, dtype=np.uint8, count=starts[index + 1] - starts[index], offset=starts[index]
        )
        image = cv2.imdecode(jpeg, _DECODE_FLAGS)
        if image is None or image.shape != (height, width, 3):
            found = "nothing" if image is None else f"{image.shape[1]}x{image.shape[0]}"
            raise TemplateCacheError(
                f"template {template_id!r}: frame {index} decodes to {found}, expected {width}x{height}"
            )
        frames[index] = image

    for _ in _ordered_map(decode, range(count), _workers()):
        pass
    return frames


def _open_verified_npy(path: Path, meta: Mapping[str, Any], template_id: str) -> np.ndarray:
    """A read-only memory map of the array in ``path``, after a streamed checksum over the same open
    file: a format-2 frames file (gigabytes at full frame) is verified and converted without being read
    into memory whole. Cache files are never changed in place, only replaced, so the bytes mapped are the
    bytes hashed."""
    name = path.name
    try:
        with path.open("rb") as f:
            digest = hashlib.sha256()
            size = 0
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
            if size != meta.get("bytes") or digest.hexdigest() != meta.get("sha256"):
                raise TemplateCacheError(
                    f"template {template_id!r}: {name} checksum mismatch "
                    "(truncated, corrupt or changed on disk)"
                )
            f.seek(0)
            shape, dtype = _npy_header(f)
            array = np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=tuple(shape))
    except FileNotFoundError:
        raise TemplateCacheError(f"template {template_id!r}: {name} is missing") from None
    except (OSError, ValueError, TypeError) as exc:
        raise TemplateCacheError(f"template {template_id!r}: cannot read {name}: {exc}") from exc
    if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
        raise TemplateCacheError(
            f"template {template_id!r}: {name} is {array.shape} {array.dtype}, manifest says "
            f"{meta.get('shape')} {meta.get('dtype')}"
        )
    return array


def _link_or_copy(source: Path, destination: Path) -> None:
    # Cache files are never modified in place, so a hard link is as good as a copy and costs nothing.
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _check_file_names(manifest: Mapping[str, Any], required: Collection[str], template_id: str) -> None:
    """The manifest lists ``required`` files, and every file it lists is a plain name in its directory."""
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in required):
        raise TemplateCacheError(f"template {template_id!r}: manifest lacks {', '.join(required)}")
    for file_name in [*files, (manifest.get("thumbnail") or {}).get("file", THUMBNAIL_NAME)]:
        if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name.startswith("."):
            raise TemplateCacheError(f"template {template_id!r}: bad file name {file_name!r} in manifest")
        if file_name in files and not isinstance(files[file_name], dict):
            raise TemplateCacheError(f"template {template_id!r}: bad entry for {file_name!r} in manifest")


class TemplateStore:
    """Templates cached under ``cache_dir``, one directory each."""

    def __init__(self, cache_dir: str | os.PathLike[str], *, jpeg_quality: int = JPEG_QUALITY) -> None:
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"JPEG quality is 1-100, got {jpeg_quality}")
        self.cache_dir = Path(cache_dir)
        self.jpeg_quality = int(jpeg_quality)

    def path(self, template_id: str) -> Path:
        return self.cache_dir / validate_template_id(template_id)

    def exists(self, template_id: str) -> bool:
        """Whether a finished template directory is there (its contents are checked by :meth:`load`)."""
        return (self.path(template_id) / MANIFEST_NAME).is_file()

    def template_ids(self) -> list[str]:
        """Ids of every finished template directory, sorted (work directories are never listed)."""
        if not self.cache_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.cache_dir.iterdir()
            if TEMPLATE_ID_PATTERN.fullmatch(entry.name) and (entry / MANIFEST_NAME).is_file()
        )

    def save(
        self,
        template: Template,
        *,
        source_sha256: str = "",
        settings: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
        descriptions: Mapping[str, str] | None = None,
        renderer_extras: Collection[str] = (),
        encoded_frames: Sequence[bytes] | None = None,
    ) -> Path:
        """Write ``template``, replacing any older version; readers see the old or the new, never half.

        ``source_sha256`` and ``settings`` identify what it was prepared from and how (a later
        preparation of the same file with the same settings is a cache hit); ``info`` holds the
        per-template settings (:data:`INFO_KEYS`); ``descriptions`` says what renderer extras hold;
        ``renderer_extras`` names the extras keys a renderer engine computed (recomputable).
        ``encoded_frames`` are the frames already encoded (:func:`encode_frame`, one per frame, in order),
        for a caller that encoded them while it worked; without them the frames are encoded here, on
        every CPU. Either way :meth:`load` returns the decoded JPEGs, not ``template.frames`` bit for bit.
        """
        final = self.path(template.id)
        arrays: dict[str, np.ndarray] = {"landmarks": template.landmarks}
        for name, value in template.extras.items():
            if not _EXTRA_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"invalid extras key {name!r}: use letters, digits and '_'")
            arrays[f"extra_{name}"] = np.asarray(value)
        unknown = set(info or {}) - set(INFO_KEYS)
        if unknown:
            raise ValueError(f"unknown template settings {sorted(unknown)}; known: {list(INFO_KEYS)}")
        if encoded_frames is not None and len(encoded_frames) != template.frame_count:
            raise ValueError(
                f"{len(encoded_frames)} encoded frames for a template of {template.frame_count} frames"
            )
        described = {**FILE_DESCRIPTIONS, **{f"extra_{k}.npy": v for k, v in (descriptions or {}).items()}}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(
            tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{_writer_tag()}-{template.id}-", dir=self.cache_dir)
        )
        try:
            if encoded_frames is None:
                jpegs = self._encoded(template.frames)
            else:
                jpegs = _checked_jpegs(encoded_frames, template.size)
            # None: encoded by the caller, at a quality the store was not told.
            quality = self.jpeg_quality if encoded_frames is None else None
            files = _write_frame_files(work, template.frames.shape, jpegs, quality)
            for name, array in arrays.items():
                file_name = f"{name}.npy"
                files[file_name] = _write_array(work / file_name, array)
                files[file_name]["description"] = described.get(file_name, "renderer data per frame")
                if name.removeprefix("extra_") in renderer_extras and name.startswith("extra_"):
                    files[file_name]["renderer"] = True
            boxes = template.extras.get("crop_boxes")
            face_box = np.asarray(boxes[0]) if boxes is not None and len(boxes) else None
            thumbnail = _write_bytes(
                work / THUMBNAIL_NAME, thumbnail_jpeg(template.frames[0], face_box=face_box)
            )
            manifest = {
                "format_version": FORMAT_VERSION,
                "id": template.id,
                "fps": template.fps,
                "frame_count": template.frame_count,
                "width": template.size[0],
                "height": template.size[1],
                "source": template.source,
                "source_sha256": source_sha256,
                "settings": dict(settings or {}),
                "info": {key: (info or {}).get(key) for key in INFO_KEYS},
                "created": _now(),
                "files": files,
                "thumbnail": {"file": THUMBNAIL_NAME, **thumbnail},
            }
            # The manifest is written last: a directory without one is never a template.
            _write_json(work / MANIFEST_NAME, manifest)
            self._install(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return final

    def _encoded(self, frames: np.ndarray) -> Iterator[bytes]:
        """``frames`` as JPEGs, encoded on every CPU and yielded in order."""
        quality = self.jpeg_quality
        return _ordered_map(lambda frame: encode_frame(frame, quality), frames, _workers())

    def _install(self, work: Path, final: Path) -> None:
        # os.replace cannot swap onto a non-empty directory, so move the old version aside first
        # (still a complete template under another name) and delete it only once the new one is in.
        old: Path | None = None
        if final.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{_writer_tag()}-{final.name}-", dir=self.cache_dir)
            )
            os.replace(final, old / "template")
        try:
            os.replace(work, final)
        except BaseException:
            if old is not None:
                os.replace(old / "template", final)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def add_extras(
        self,
        template_id: str,
        extras: Mapping[str, np.ndarray],
        *,
        based_on: Mapping[str, Any],
        descriptions: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Add (or replace) renderer extras of a cached template; returns the new manifest.

        As atomic as :meth:`save`, without rewriting the frames: a work directory gets hard links to the
        files kept (they are never modified in place, only replaced with their directory), the new
        arrays and a new manifest, and is swapped in with the same renames. ``based_on`` is the manifest
        the extras were computed from: if the template was replaced since, nothing is written and
        :class:`TemplateCacheError` says so (the new version will get its own extras).
        """
        final = self.path(template_id)
        manifest = self.read_manifest(template_id)
        if manifest.get("files") != based_on.get("files") or manifest.get("created") != based_on.get(
            "created"
        ):
            raise TemplateCacheError(f"template {template_id!r} changed while its renderer data was computed")
        for name in extras:
            if not _EXTRA_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"invalid extras key {name!r}: use letters, digits and '_'")
        replaced = {f"extra_{name}.npy" for name in extras}
        work = Path(
            tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{_writer_tag()}-{template_id}-", dir=self.cache_dir)
        )
        try:
            kept = [name for name in manifest["files"] if name not in replaced]
            thumbnail = (manifest.get("thumbnail") or {}).get("file", THUMBNAIL_NAME)
            for file_name in [*kept, thumbnail]:
                _link_or_copy(final / file_name, work / file_name)
            files = {name: manifest["files"][name] for name in kept}
            for name, array in extras.items():
                file_name = f"extra_{name}.npy"
                files[file_name] = _write_array(work / file_name, np.asarray(array))
                files[file_name]["description"] = (descriptions or {}).get(name, "renderer data per frame")
                files[file_name]["renderer"] = True
            updated = {
                **manifest,
                "files": files,
                "extras_added": _now(),
            }
            _write_json(work / MANIFEST_NAME, updated)
            self._install(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return updated

    def delete(self, template_id: str) -> bool:
        """Remove a template; it disappears from its id in one rename. False if there was none."""
        final = self.path(template_id)
        if not final.exists():
            return False
        aside = f"{_OLD_PREFIX}{_writer_tag()}-{template_id}-"
        old = Path(tempfile.mkdtemp(prefix=aside, dir=self.cache_dir))
        os.replace(final, old / "template")
        shutil.rmtree(old, ignore_errors=True)
        return True

    def remove_stale(self) -> list[str]:
        """Delete work directories whose writer process is gone; returns their names.

        A version moved aside by a writer killed between its two renames is put back if nothing has
        taken its place since, so a crash mid-replace loses neither version.
        """
        removed: list[str] = []
        if not self.cache_dir.is_dir():
            return removed
        for entry in self.cache_dir.iterdir():
            for prefix in (_TEMP_PREFIX, _OLD_PREFIX):
                if not entry.name.startswith(prefix):
                    continue
                writer = entry.name[len(prefix) :].split("-", 1)[0]
                pid_text, _, host = writer.partition("@")
                pid = int(pid_text) if pid_text.isdigit() else None
                if host and host != _HOST_TAG:
                    # Another host's writer: its pid means nothing here.
                    if time.time() - _modified_at(entry) < _OTHER_HOST_STALE_S:
                        continue
                # This process's own writers may still be at work; so may another live process's.
                elif pid is not None and (pid == os.getpid() or _pid_alive(pid)):
                    continue
                if prefix == _OLD_PREFIX:
                    template_id = entry.name[len(prefix) :].split("-", 1)[-1].rsplit("-", 1)[0]
                    kept = entry / "template"
                    if (
                        TEMPLATE_ID_PATTERN.fullmatch(template_id)
                        and (kept / MANIFEST_NAME).is_file()
                        and not (self.cache_dir / template_id).exists()
                    ):
                        with contextlib.suppress(OSError):
                            os.replace(kept, self.cache_dir / template_id)
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def _raw_manifest(self, template_id: str) -> dict[str, Any]:
        """The manifest as stored, of any format version, checked only to be this template's."""
        manifest_path = self.path(template_id) / MANIFEST_NAME
        if not manifest_path.is_file():
            raise TemplateCacheError(
                f"template {template_id!r} is not in the cache ({manifest_path} missing)"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TemplateCacheError(
                f"template {template_id!r}: unreadable manifest {manifest_path}: {exc}"
            ) from exc
        if not isinstance(manifest, dict):
            raise TemplateCacheError(f"template {template_id!r}: manifest {manifest_path} is not an object")
        if manifest.get("id") != template_id:
            raise TemplateCacheError(f"template {template_id!r}: manifest is for {manifest.get('id')!r}")
        return manifest

    def format_version(self, template_id: str) -> object:
        """The cache format version ``template_id`` was written in (None if it has no readable manifest)."""
        try:
            return self._raw_manifest(template_id).get("format_version")
        except TemplateCacheError:
            return None

    def read_info(self, template_id: str) -> dict[str, Any]:
        """The per-template settings (:data:`INFO_KEYS`) from a manifest of any format version; empty if
        there is no readable one."""
        try:
            info = self._raw_manifest(template_id).get("info")
        except TemplateCacheError:
            return {}
        return {key: info.get(key) for key in INFO_KEYS if key in info} if isinstance(info, dict) else {}

    def read_manifest(self, template_id: str) -> dict[str, Any]:
        """The manifest, checked for format version and id (not the files: see :meth:`check`)."""
        manifest = self._raw_manifest(template_id)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            if version == MIGRATABLE_VERSION:
                advice = f"it is converted to {FORMAT_VERSION} when it is first used (or prepare it again)"
            else:
                advice = "prepare it again"
            raise OutdatedTemplateError(
                f"template {template_id!r} has cache format version {version!r}, this build reads "
                f"{FORMAT_VERSION}; {advice}"
            )
        _check_file_names(manifest, (FRAMES_NAME, OFFSETS_NAME, LANDMARKS_NAME), template_id)
        return manifest

    def check(self, template_id: str) -> dict[str, Any]:
        """A quick check without reading the arrays: the manifest, and every file there with its size.
        Catches truncation and missing files; :meth:`load` also verifies checksums."""
        manifest = self.read_manifest(template_id)
        directory = self.path(template_id)
        for file_name, meta in manifest["files"].items():
            path = directory / file_name
            if not path.is_file():
                raise TemplateCacheError(f"template {template_id!r}: {file_name} is missing")
            if path.stat().st_size != meta.get("bytes"):
                raise TemplateCacheError(
                    f"template {template_id!r}: {file_name} is {path.stat().st_size} bytes, the manifest "
                    f"says {meta.get('bytes')} (truncated or changed on disk)"
                )
        return manifest

    def update_info(self, template_id: str, info: Mapping[str, Any]) -> dict[str, Any]:
        """Change per-template settings (name, welcome, language); the manifest is replaced atomically."""
        unknown = set(info) - set(INFO_KEYS)
        if unknown:
            raise ValueError(f"unknown template settings {sorted(unknown)}; known: {list(INFO_KEYS)}")
        manifest = self.read_manifest(template_id)
        manifest["info"] = {**manifest.get("info", {}), **info}
        directory = self.path(template_id)
        fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{_writer_tag()}-", dir=directory)
        os.close(fd)
        try:
            _write_json(Path(temp), manifest)
            os.replace(temp, directory / MANIFEST_NAME)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return manifest

    def thumbnail(self, template_id: str) -> bytes:
        manifest = self.read_manifest(template_id)
        meta = manifest.get("thumbnail") or {}
        path = self.path(template_id) / str(meta.get("file", THUMBNAIL_NAME))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TemplateCacheError(f"template {template_id!r}: no thumbnail ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise TemplateCacheError(f"template {template_id!r}: thumbnail checksum mismatch")
        return data

    def load(self, template_id: str) -> Template:
        """The cached template; raises :class:`TemplateCacheError` if it is missing or fails its checks."""
        directory = self.path(template_id)
        manifest = self.read_manifest(template_id)
        files = manifest["files"]
        frame_count = manifest.get("frame_count")
        if not isinstance(frame_count, int) or frame_count <= 0:
            raise TemplateCacheError(f"template {template_id!r}: bad frame count {frame_count!r} in manifest")
        frames = _read_jpeg_frames(directory, files, frame_count, template_id)
        arrays: dict[str, np.ndarray] = {}
        for file_name, meta in files.items():
            if file_name in (FRAMES_NAME, OFFSETS_NAME):
                continue
            if not file_name.endswith(".npy"):
                raise TemplateCacheError(f"template {template_id!r}: bad file name {file_name!r} in manifest")
            try:
                arrays[file_name[: -len(".npy")]] = _read_verified_array(
                    directory / file_name, meta, template_id
                )
            except TemplateCacheError as exc:
                if not meta.get("renderer"):
                    raise
                # Never half-read: the template loads without it, and the renderer computes it again.
                log.warning("%s; loading without it, the renderer will compute it again", exc)
        extras = {name[len("extra_") :]: value for name, value in arrays.items() if name.startswith("extra_")}
        try:
            template = Template(
                id=template_id,
                fps=int(manifest["fps"]),
                frames=frames,
                landmarks=arrays["landmarks"],
                source=str(manifest.get("source", "")),
                extras=extras,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateCacheError(f"template {template_id!r}: inconsistent cache entry: {exc}") from exc
        if template.size != (manifest.get("width"), manifest.get("height")):
            raise TemplateCacheError(f"template {template_id!r}: frame size differs from the manifest")
        return template

    def migrate(self, template_id: str) -> dict[str, Any]:
        """Convert a format-2 template to the current format in place; returns the new manifest.

        Everything of the old version is verified first (a damaged renderer extra is dropped, to be
        computed again; anything else damaged refuses the migration). The new version is written beside
        it, its frames encoded from a memory map of the old ones, the other files hard-linked, and
        swapped in with the renames of :meth:`save`: a crash, a full disk or a template replaced
        meanwhile (:class:`TemplateCacheError`) leaves the format-2 directory exactly as it was. The
        info, source hash, settings and creation time are kept; ``migrated_from`` records the old
        version. OpenCV encodes in parallel on every CPU; the old frames are never read into memory whole.
        """
        final = self.path(template_id)
        old = self._raw_manifest(template_id)
        if old.get("format_version") != MIGRATABLE_VERSION:
            raise TemplateCacheError(
                f"template {template_id!r} has cache format version {old.get('format_version')!r}, "
                f"only {MIGRATABLE_VERSION} is migrated"
            )
        _check_file_names(old, (_V2_FRAMES_NAME, LANDMARKS_NAME), template_id)
        old_files: dict[str, Any] = old["files"]
        frames = _open_verified_npy(final / _V2_FRAMES_NAME, old_files[_V2_FRAMES_NAME], template_id)
        if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise TemplateCacheError(f"template {template_id!r}: frames are {frames.shape} {frames.dtype}")
        if frames.shape[0] != old.get("frame_count"):
            raise TemplateCacheError(f"template {template_id!r}: frame count differs from the manifest")
        kept: dict[str, Any] = {}
        for file_name, meta in old_files.items():
            if file_name == _V2_FRAMES_NAME:
                continue
            if not file_name.endswith(".npy") or file_name in (FRAMES_NAME, OFFSETS_NAME):
                raise TemplateCacheError(f"template {template_id!r}: bad file name {file_name!r} in manifest")
            try:
                _read_verified_array(final / file_name, meta, template_id)
            except TemplateCacheError as exc:
                if not meta.get("renderer"):
                    raise
                log.warning("%s; migrating without it, the renderer will compute it again", exc)
                continue
            kept[file_name] = meta
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(
            tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{_writer_tag()}-{template_id}-", dir=self.cache_dir)
        )
        try:
            files = _write_frame_files(work, frames.shape, self._encoded(frames), self.jpeg_quality)
            for file_name, meta in kept.items():
                if file_name == _CROP_BOXES_NAME:
                    # Format 2 kept the square each frame was cut from in the source; that square is
                    # the whole frame now, and format 3 records the face box in frame pixels.
                    boxes = np.tile(
                        np.array([0, 0, frames.shape[2], frames.shape[1]], np.float32), (frames.shape[0], 1)
                    )
                    files[file_name] = {
                        **_write_array(work / file_name, boxes),
                        "description": FILE_DESCRIPTIONS[file_name],
                    }
                    continue
                _link_or_copy(final / file_name, work / file_name)
                files[file_name] = meta
            old_thumbnail = old.get("thumbnail") or {}
            thumbnail_path = final / str(old_thumbnail.get("file", THUMBNAIL_NAME))
            if thumbnail_path.is_file() and _sha256(thumbnail_path) == old_thumbnail.get("sha256"):
                _link_or_copy(thumbnail_path, work / THUMBNAIL_NAME)
                thumbnail = {**old_thumbnail, "file": THUMBNAIL_NAME}
            else:  # lost or damaged: it is made from the first frame, so make it again
                thumbnail = {
                    "file": THUMBNAIL_NAME,
                    **_write_bytes(work / THUMBNAIL_NAME, thumbnail_jpeg(np.asarray(frames[0]))),
                }
            manifest = {
                **old,
                "format_version": FORMAT_VERSION,
                "frame_count": int(frames.shape[0]),
                "width": int(frames.shape[2]),
                "height": int(frames.shape[1]),
                "files": files,
                "thumbnail": thumbnail,
                "migrated_from": MIGRATABLE_VERSION,
                "migrated": _now(),
            }
            _write_json(work / MANIFEST_NAME, manifest)
            # Another process may have prepared this id again (or migrated it) while this one encoded:
            # the newer template wins. (The window left is the one add_extras has: two renames long.)
            if self._raw_manifest(template_id) != old:
                raise TemplateCacheError(f"template {template_id!r} changed while it was migrated")
            self._install(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return manifest

    def ensure_default(
        self,
        template_id: str = "default",
        settings: PrepareSettings | None = None,
        engine: TemplateEngine | None = None,
    ) -> Template:
        """The built-in avatar (the public-domain astronaut photo), prepared and cached on first use.

        A cache entry that fails its checks, or was prepared with other settings, is rebuilt rather than
        served.
        """
        # Imported here: preparation pulls in MediaPipe, which a cache hit does not need.
        from avatar_rtc.avatar.prepare import PrepareSettings, prepare_default

        validate_template_id(template_id)
        settings = settings or PrepareSettings()
        if self.exists(template_id):
            try:
                if not same_settings(
                    self.read_manifest(template_id).get("settings"), settings_record(settings)
                ):
                    raise TemplateCacheError("prepared with other settings")
                return self.load(template_id)
            except TemplateCacheError as exc:
                log.warning("rebuilding template %r: %s", template_id, exc)
        template = prepare_default(template_id, settings, engine)
        self.save(
            template,
            source_sha256=DEFAULT_SOURCE_SHA256,
            settings=settings_record(settings),
            info={"name": "Astronaut (default)"},
            renderer_extras=engine.extras_keys if engine is not None else (),
        )
        return template


def settings_record(settings: PrepareSettings) -> dict[str, Any]:
    """What a manifest records about how a template was prepared: the settings that shape it. The
    renderer is not among them: its extras are completed on demand (see ``TemplateLibrary``), so a
    template prepared under one renderer stays valid for any other."""
    return dict(settings.fingerprint())


def same_settings(stored: object, record: Mapping[str, Any]) -> bool:
    """Whether a manifest's settings equal ``record``; the ``renderer`` key older manifests carry is not
    a preparation setting any more, so it is ignored."""
    if not isinstance(stored, Mapping):
        return False
    return {key: value for key, value in stored.items() if key != "renderer"} == dict(record)
