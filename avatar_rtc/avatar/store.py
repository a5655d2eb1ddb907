"""The on-disk template cache: one directory per template, written atomically, checked on load.

Layout: ``<cache_dir>/<id>/manifest.json`` plus ``frames.npy``, ``landmarks.npy`` and one
``extra_<name>.npy`` per extras key. The manifest records each file's sha256, shape and dtype, so a
truncated or altered file is caught at load rather than rendered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from avatar_rtc.avatar.template import Template

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TEMPLATE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_EXTRA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Work directories start with a dot, so they can never be mistaken for (or collide with) a template id.
_TEMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"

log = logging.getLogger(__name__)


class TemplateCacheError(RuntimeError):
    """A cached template is missing, incomplete, corrupt or from another format version."""


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


def _write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    with path.open("wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": _sha256(path), "shape": list(array.shape), "dtype": str(array.dtype)}


class TemplateStore:
    """Templates cached under ``cache_dir``, one directory each."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, template_id: str) -> Path:
        return self.cache_dir / validate_template_id(template_id)

    def exists(self, template_id: str) -> bool:
        """Whether a finished template directory is there (its contents are checked by :meth:`load`)."""
        return (self.path(template_id) / MANIFEST_NAME).is_file()

    def save(self, template: Template) -> Path:
        """Write ``template``, replacing any older version; readers see the old or the new, never half."""
        final = self.path(template.id)
        arrays: dict[str, np.ndarray] = {"frames": template.frames, "landmarks": template.landmarks}
        for name, value in template.extras.items():
            if not _EXTRA_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"invalid extras key {name!r}: use letters, digits and '_'")
            arrays[f"extra_{name}"] = np.asarray(value)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{template.id}-", dir=self.cache_dir))
        try:
            files = {
                f"{name}.npy": _write_array(work / f"{name}.npy", array) for name, array in arrays.items()
            }
            manifest = {
                "format_version": FORMAT_VERSION,
                "id": template.id,
                "fps": template.fps,
                "frame_count": template.frame_count,
                "width": template.size[0],
                "height": template.size[1],
                "source": template.source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            # The manifest is written last: a directory without one is never a template.
            manifest_path = work / MANIFEST_NAME
            with manifest_path.open("w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
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
            old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{final.name}-", dir=self.cache_dir))
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

    def load(self, template_id: str) -> Template:
        """The cached template; raises :class:`TemplateCacheError` if it is missing or fails its checks."""
        directory = self.path(template_id)
        manifest_path = directory / MANIFEST_NAME
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
            raise TemplateCacheError(
                f"template {template_id!r} has cache format version {version!r}, this build reads "
                f"{FORMAT_VERSION}; prepare it again"
            )
        if manifest.get("id") != template_id:
            raise TemplateCacheError(f"template {template_id!r}: manifest is for {manifest.get('id')!r}")
        files = manifest.get("files")
        if not isinstance(files, dict) or "frames.npy" not in files or "landmarks.npy" not in files:
            raise TemplateCacheError(f"template {template_id!r}: manifest lists no frames/landmarks")
        arrays: dict[str, np.ndarray] = {}
        for file_name, meta in files.items():
            path = directory / file_name
            if Path(file_name).name != file_name or not file_name.endswith(".npy"):
                raise TemplateCacheError(f"template {template_id!r}: bad file name {file_name!r} in manifest")
            if not path.is_file():
                raise TemplateCacheError(f"template {template_id!r}: {file_name} is missing")
            checksum = _sha256(path)
            if checksum != meta.get("sha256"):
                raise TemplateCacheError(
                    f"template {template_id!r}: {file_name} checksum mismatch (corrupt or changed on disk)"
                )
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise TemplateCacheError(f"template {template_id!r}: cannot read {file_name}: {exc}") from exc
            if list(array.shape) != meta.get("shape") or str(array.dtype) != meta.get("dtype"):
                raise TemplateCacheError(
                    f"template {template_id!r}: {file_name} is {array.shape} {array.dtype}, manifest says "
                    f"{meta.get('shape')} {meta.get('dtype')}"
                )
            arrays[file_name[: -len(".npy")]] = array
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

    def ensure_default(self, template_id: str = "default") -> Template:
        """The built-in avatar (the public-domain astronaut photo), prepared and cached on first use.

        A cache entry that fails its checks is rebuilt rather than served.
        """
        validate_template_id(template_id)
        if self.exists(template_id):
            try:
                return self.load(template_id)
            except TemplateCacheError as exc:
                log.warning("rebuilding template %r: %s", template_id, exc)
        # Imported here: preparation pulls in MediaPipe, which a cache hit does not need.
        from avatar_rtc.avatar.prepare import DEFAULT_PHOTO_SOURCE, default_photo, prepare_photo

        template = prepare_photo(default_photo(), template_id, source=DEFAULT_PHOTO_SOURCE)
        self.save(template)
        return template
