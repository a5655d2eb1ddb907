"""The on-disk template cache: one directory per template, written atomically, checked on load.

Layout: ``<cache_dir>/<id>/manifest.json`` plus ``frames.npy``, ``landmarks.npy``, one
``extra_<name>.npy`` per extras key and a ``thumbnail.jpg``. The manifest records the format version,
the source file's sha256 and the preparation settings (so a stale cache is recognised), the per-template
settings (name, welcome line, language), and each file's sha256, size, shape, dtype and what it holds,
so a truncated or altered file is caught at load rather than rendered. Renderer extras (computed by the
renderer engine, see :class:`avatar_rtc.avatar.engine.TemplateEngine`) are marked ``"renderer": true``:
they can always be computed again, so a damaged one is dropped at load (and recomputed by the library)
instead of making the whole template unusable. :meth:`TemplateStore.add_extras` adds them to a cached
template later without rewriting its frames.

A template is written into a work directory whose name starts with a dot and is moved into place in one
rename, manifest last: a half-written template is never visible under its id. Work directories left by
a killed process are removed by :meth:`TemplateStore.remove_stale`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from avatar_rtc.avatar.template import Template

if TYPE_CHECKING:
    from avatar_rtc.avatar.engine import TemplateEngine
    from avatar_rtc.avatar.prepare import PrepareSettings

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
THUMBNAIL_NAME = "thumbnail.jpg"
THUMBNAIL_SIZE = 160
TEMPLATE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_EXTRA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Work directories start with a dot, so they can never be mistaken for (or collide with) a template id.
# The writer's pid follows the prefix, so a later process can tell an abandoned one from a live one.
_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
# The built-in template's "source hash": it is made from a photo inside scikit-image, not a file.
DEFAULT_SOURCE_SHA256 = "builtin:skimage.data.astronaut"
# Keys of the per-template settings kept in the manifest, changeable without preparing again.
INFO_KEYS = ("name", "welcome", "language")

FILE_DESCRIPTIONS = {
    "frames.npy": "template frames, (N, H, W, 3) uint8 BGR, played forward then back as the idle loop",
    "landmarks.npy": "MediaPipe face mesh per frame, (N, 478, 2) float32 pixel xy in the frame",
    "extra_crop_boxes.npy": "square each frame was cropped from, (N, 4) float32 x0 y0 x1 y1 source pixels",
    "extra_face_found.npy": "1 where the face was tracked in the frame, 0 where landmarks were interpolated",
    "extra_lower_face_mask.npy": "feathered lower-face blend mask per frame, (N, M, M) uint8 over the frame",
}

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


def thumbnail_jpeg(frame: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small square JPEG of ``frame`` (BGR) for pickers."""
    height, width = frame.shape[:2]
    side = min(height, width)
    y0, x0 = (height - side) // 2, (width - side) // 2
    small = cv2.resize(frame[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("JPEG encoding of the thumbnail failed")
    return encoded.tobytes()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_verified_array(path: Path, meta: Mapping[str, Any], template_id: str) -> np.ndarray:
    """The array in ``path`` after checking it against its manifest entry.

    One read and one hash over the bytes: the array is a view into the buffer that was hashed, so what
    is checked is exactly what is used.
    """
    name = path.name
    try:
        data = bytearray(path.read_bytes())
    except FileNotFoundError:
        raise TemplateCacheError(f"template {template_id!r}: {name} is missing") from None
    except OSError as exc:
        raise TemplateCacheError(f"template {template_id!r}: cannot read {name}: {exc}") from exc
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise TemplateCacheError(
            f"template {template_id!r}: {name} checksum mismatch (truncated, corrupt or changed on disk)"
        )
    try:
        header = io.BytesIO(memoryview(data)[:4096])
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(header)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(header)
        if fortran_order or dtype.hasobject:
            raise ValueError("only C-ordered plain arrays are stored")
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header.tell()).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise TemplateCacheError(f"template {template_id!r}: cannot read {name}: {exc}") from exc
    if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
        raise TemplateCacheError(
            f"template {template_id!r}: {name} is {array.shape} {array.dtype}, manifest says "
            f"{meta.get('shape')} {meta.get('dtype')}"
        )
    return array


class TemplateStore:
    """Templates cached under ``cache_dir``, one directory each."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)

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
    ) -> Path:
        """Write ``template``, replacing any older version; readers see the old or the new, never half.

        ``source_sha256`` and ``settings`` identify what it was prepared from and how (a later
        preparation of the same file with the same settings is a cache hit); ``info`` holds the
        per-template settings (:data:`INFO_KEYS`); ``descriptions`` says what renderer extras hold;
        ``renderer_extras`` names the extras keys a renderer engine computed (recomputable).
        """
        final = self.path(template.id)
        arrays: dict[str, np.ndarray] = {"frames": template.frames, "landmarks": template.landmarks}
        for name, value in template.extras.items():
            if not _EXTRA_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"invalid extras key {name!r}: use letters, digits and '_'")
            arrays[f"extra_{name}"] = np.asarray(value)
        unknown = set(info or {}) - set(INFO_KEYS)
        if unknown:
            raise ValueError(f"unknown template settings {sorted(unknown)}; known: {list(INFO_KEYS)}")
        described = {**FILE_DESCRIPTIONS, **{f"extra_{k}.npy": v for k, v in (descriptions or {}).items()}}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(
            tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-{template.id}-", dir=self.cache_dir)
        )
        try:
            files: dict[str, dict[str, Any]] = {}
            for name, array in arrays.items():
                file_name = f"{name}.npy"
                files[file_name] = _write_array(work / file_name, array)
                files[file_name]["description"] = described.get(file_name, "renderer data per frame")
                if name.removeprefix("extra_") in renderer_extras and name.startswith("extra_"):
                    files[file_name]["renderer"] = True
            thumbnail = _write_bytes(work / THUMBNAIL_NAME, thumbnail_jpeg(template.frames[0]))
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
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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

    def _install(self, work: Path, final: Path) -> None:
        # os.replace cannot swap onto a non-empty directory, so move the old version aside first
        # (still a complete template under another name) and delete it only once the new one is in.
        old: Path | None = None
        if final.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{os.getpid()}-{final.name}-", dir=self.cache_dir)
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
            tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-{template_id}-", dir=self.cache_dir)
        )
        try:
            kept = [name for name in manifest["files"] if name not in replaced]
            thumbnail = (manifest.get("thumbnail") or {}).get("file", THUMBNAIL_NAME)
            for file_name in [*kept, thumbnail]:
                source = final / file_name
                try:
                    os.link(source, work / file_name)
                except OSError:  # a file system without hard links: copy instead
                    shutil.copy2(source, work / file_name)
            files = {name: manifest["files"][name] for name in kept}
            for name, array in extras.items():
                file_name = f"extra_{name}.npy"
                files[file_name] = _write_array(work / file_name, np.asarray(array))
                files[file_name]["description"] = (descriptions or {}).get(name, "renderer data per frame")
                files[file_name]["renderer"] = True
            updated = {
                **manifest,
                "files": files,
                "extras_added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
        old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{os.getpid()}-{template_id}-", dir=self.cache_dir))
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
                pid_text = entry.name[len(prefix) :].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else None
                # This process's own writers may still be at work; so may another live process's.
                if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
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

    def read_manifest(self, template_id: str) -> dict[str, Any]:
        """The manifest, checked for format version and id (not the files: see :meth:`check`)."""
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
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise OutdatedTemplateError(
                f"template {template_id!r} has cache format version {version!r}, this build reads "
                f"{FORMAT_VERSION}; prepare it again"
            )
        if manifest.get("id") != template_id:
            raise TemplateCacheError(f"template {template_id!r}: manifest is for {manifest.get('id')!r}")
        files = manifest.get("files")
        if not isinstance(files, dict) or "frames.npy" not in files or "landmarks.npy" not in files:
            raise TemplateCacheError(f"template {template_id!r}: manifest lists no frames/landmarks")
        for file_name in [*files, (manifest.get("thumbnail") or {}).get("file", THUMBNAIL_NAME)]:
            if (
                not isinstance(file_name, str)
                or Path(file_name).name != file_name
                or file_name.startswith(".")
            ):
                raise TemplateCacheError(f"template {template_id!r}: bad file name {file_name!r} in manifest")
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
        fd, temp = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=directory)
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
        arrays: dict[str, np.ndarray] = {}
        for file_name, meta in files.items():
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
                frames=arrays["frames"],
                landmarks=arrays["landmarks"],
                source=str(manifest.get("source", "")),
                extras=extras,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateCacheError(f"template {template_id!r}: inconsistent cache entry: {exc}") from exc
        if template.frame_count != manifest.get("frame_count"):
            raise TemplateCacheError(f"template {template_id!r}: frame count differs from the manifest")
        return template

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
