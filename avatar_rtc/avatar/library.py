"""Templates by id, in memory tiers: disk → RAM (LRU under a byte budget) → the renderer's own (GPU).

Sessions pin what they show: :meth:`TemplateLibrary.acquire` loads (if needed) and pins a template, and
:meth:`TemplateLibrary.release` unpins it. A pinned template is never evicted, and the RAM tier
(:mod:`avatar_rtc.avatar.ram_tier`) never holds more than its budget: a template that cannot fit next
to the pinned ones is refused with :class:`TemplateBudgetError` rather than squeezed in.
:meth:`TemplateLibrary.get_warm` answers without any I/O, which is what a mid-call switch needs to show
the new face within a frame or two.

The renderer engine takes part through :class:`~avatar_rtc.avatar.engine.TemplateEngine`: ``warm(template)``
(move its per-frame data to the GPU, build rigs, ...), ``evict(template_id)`` (drop that again when RAM
lets it go), and its extras: a template prepared before the engine was enabled (or for other weights)
lacks them, and :meth:`TemplateLibrary.complete_extras_async` computes them on one background thread
(:mod:`avatar_rtc.avatar.extras_jobs`), stores them in the cache (atomically, next to the frames) and
replaces the RAM copy, so no later process computes them again.
Preparation (:meth:`TemplateLibrary.prepare`) runs one at a time and is a cache hit when the same file
was prepared under the same id with the same settings.

Caches of the previous format (2: raw frames) are converted to the current one when the library starts
(:meth:`TemplateLibrary.migrate_old`), before any call can ask for them: a call that switches to an old
template never waits for its conversion, and listing stays a manifest read (``info`` runs on the event
loop). One that turns up later (copied in, written by an older node on shared storage) or whose
conversion failed at start (a full disk) is converted on its first load instead, on the loading thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from avatar_rtc.avatar.engine import ExtrasProgress, TemplateEngine
from avatar_rtc.avatar.extras_jobs import ExtrasJobs
from avatar_rtc.avatar.ram_tier import RamTier
from avatar_rtc.avatar.store import (
    INFO_KEYS,
    MIGRATABLE_VERSION,
    OutdatedTemplateError,
    TemplateCacheError,
    TemplateStore,
    encode_frame,
    same_settings,
    settings_record,
    validate_template_id,
)
from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.template_info import TemplateInfo, TemplateState

if TYPE_CHECKING:  # prepare is imported when first needed: a process that only serves the cache never does
    from avatar_rtc.avatar.prepare import PrepareSettings, ProgressCallback
    from avatar_rtc.config import Settings

log = logging.getLogger(__name__)


class TemplateNotFoundError(LookupError):
    pass


class TemplateInUseError(RuntimeError):
    """The template is shown in a live call (or being prepared), so it cannot be replaced or deleted."""


class TemplateBudgetError(RuntimeError):
    """The template does not fit in the RAM budget next to the templates pinned by live calls."""


class PreparationBusyError(RuntimeError):
    """Another template is being prepared; preparation runs one at a time."""


@dataclass(frozen=True)
class PrepareResult:
    info: TemplateInfo
    cache_hit: bool
    seconds: float


def _no_progress(stage: str, done: int, total: int | None) -> None:
    pass


@dataclass
class _Locks:
    """One load at a time per id, so two sessions selecting the same template read it once."""

    by_id: dict[str, threading.Lock] = field(default_factory=dict)
    guard: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, template_id: str) -> threading.Lock:
        with self.guard:
            return self.by_id.setdefault(template_id, threading.Lock())


class TemplateLibrary:
    """Every template of one cache directory, shared by all sessions of the process (thread-safe)."""

    def __init__(
        self,
        store: TemplateStore | str | os.PathLike[str],
        ram_budget_bytes: int,
        engine: TemplateEngine | None = None,
        prepare_settings: PrepareSettings | None = None,
        default_id: str = "default",
    ) -> None:
        self._ram = RamTier(ram_budget_bytes, on_drop=self._evict_from_engine)
        self.store = store if isinstance(store, TemplateStore) else TemplateStore(store)
        self.ram_budget = self._ram.budget
        self.engine = engine
        self._prepare_settings = prepare_settings
        self.default_id = validate_template_id(default_id)
        # Guards the RAM tier and the sets below together: checks across them are one atomic step.
        self._lock = threading.RLock()
        self._preparing: set[str] = set()
        self._broken: dict[str, str] = {}  # id -> why its last load failed
        self._load_locks = _Locks()
        self._prepare_lock = threading.Lock()
        self._extras_jobs = ExtrasJobs(self.complete_extras)
        self.store.remove_stale()
        self.migrate_old()

    @property
    def prepare_settings(self) -> PrepareSettings:
        if self._prepare_settings is None:
            from avatar_rtc.avatar.prepare import PrepareSettings

            self._prepare_settings = PrepareSettings()
        return self._prepare_settings

    # -- the RAM tier ------------------------------------------------------------------------------------
    @property
    def ram_bytes(self) -> int:
        with self._lock:
            return self._ram.bytes

    def in_ram(self) -> list[str]:
        """Ids held in RAM, least recently used first."""
        with self._lock:
            return self._ram.ids()

    def pins(self, template_id: str) -> int:
        with self._lock:
            return self._ram.pins(template_id)

    def get_warm(self, template_id: str) -> Template | None:
        """The template if it is in RAM (no I/O, safe on the event loop), else None."""
        with self._lock:
            return self._ram.get(template_id)

    def get(self, template_id: str) -> Template:
        """The template from RAM, or loaded from disk (and kept in RAM if it fits). Blocking."""
        return self._obtain(template_id, pin=False, must_fit=False)

    def acquire(self, template_id: str) -> Template:
        """Load (if needed) and pin: it stays in RAM until the matching :meth:`release`. Blocking."""
        return self._obtain(template_id, pin=True, must_fit=True)

    async def acquire_async(self, template_id: str) -> Template:
        """:meth:`acquire` without blocking the event loop: immediate when warm, a thread when not."""
        with self._lock:
            template = self._ram.get(template_id) if template_id not in self._preparing else None
            if template is not None:
                self._ram.pin(template_id)
                return template
        return await asyncio.to_thread(self.acquire, template_id)

    def release(self, template_id: str) -> None:
        with self._lock:
            self._ram.unpin(template_id)

    def warm(self, template_id: str) -> Template:
        """Bring a template into RAM and into the renderer's own tier (if it has one), ready to switch
        to. Raises :class:`TemplateBudgetError` if it cannot be kept in RAM. Blocking."""
        template = self._obtain(template_id, pin=False, must_fit=True)
        if self.engine is not None:
            self.engine.warm(template)
        return template

    async def warm_async(self, template_id: str) -> Template:
        return await asyncio.to_thread(self.warm, template_id)

    def _obtain(self, template_id: str, pin: bool, must_fit: bool) -> Template:
        validate_template_id(template_id)
        with self._load_locks(template_id):
            with self._lock:
                if template_id in self._preparing and self.store.exists(template_id):
                    raise TemplateInUseError(f"template {template_id!r} is being prepared again")
                template = self._ram.get(template_id)
                if template is not None:
                    if pin:
                        self._ram.pin(template_id)
                    return template
            template = self._load(template_id)
            with self._lock:
                fits = self._ram.admit(template_id, template)
                if not fits and must_fit:
                    raise TemplateBudgetError(self._ram.budget_message(template_id, template))
                if pin:
                    self._ram.pin(template_id)
            return template

    def _load(self, template_id: str) -> Template:
        if not self.store.exists(template_id):
            raise TemplateNotFoundError(f"no template {template_id!r}")
        try:
            try:
                template = self.store.load(template_id)
            except OutdatedTemplateError:
                if self.store.format_version(template_id) != MIGRATABLE_VERSION:
                    raise
                self._migrate(template_id)
                template = self.store.load(template_id)
        except TemplateCacheError as exc:
            with self._lock:
                self._broken[template_id] = str(exc)
            raise
        with self._lock:
            self._broken.pop(template_id, None)
        return template

    def unload(self, template_id: str) -> None:
        """Drop a template from RAM (and the renderer's tier); refused while a call uses it."""
        with self._lock:
            if self._ram.pins(template_id):
                raise TemplateInUseError(f"template {template_id!r} is in use by a live call")
            self._ram.drop(template_id)

    def _evict_from_engine(self, template_id: str) -> None:
        if self.engine is not None:
            try:
                self.engine.evict(template_id)
            except Exception:
                log.exception("renderer engine failed to evict template %r", template_id)

    # -- older cache formats ------------------------------------------------------------------------------
    def migrate_old(self) -> list[str]:
        """Convert every template cached in the previous format; returns the ids converted.

        Blocking: the frames of each are read, verified and encoded again (3 s for 30 s of a 512x512
        template on two shared cores). One that cannot be converted is left as it was and logged; its
        ``info`` says why, and its next load tries again.
        """
        migrated: list[str] = []
        for template_id in self.store.template_ids():
            if self.store.format_version(template_id) != MIGRATABLE_VERSION:
                continue
            try:
                self._migrate(template_id)
            except TemplateCacheError:
                continue  # logged and recorded by _migrate
            migrated.append(template_id)
        return migrated

    def _migrate(self, template_id: str) -> None:
        started = time.perf_counter()
        try:
            manifest = self.store.migrate(template_id)
        except (TemplateCacheError, OSError) as exc:
            # A full disk is an OSError: to callers it is this template failing, like a damaged cache.
            reason = (
                f"template {template_id!r} cannot be converted from cache format {MIGRATABLE_VERSION}: {exc}"
            )
            log.warning("%s; the old version is kept as it was", reason)
            with self._lock:
                self._broken[template_id] = reason
            raise TemplateCacheError(reason) from exc
        with self._lock:
            self._broken.pop(template_id, None)
        log.info(
            "template %r: converted from cache format %d (%d frames) in %.1f s",
            template_id,
            MIGRATABLE_VERSION,
            manifest["frame_count"],
            time.perf_counter() - started,
        )

    # -- renderer extras ----------------------------------------------------------------------------------
    def needs_extras(self, template: Template) -> bool:
        """Whether ``template`` lacks the engine's current extras (cheap: safe on the event loop)."""
        return self.engine is not None and not self.engine.has_extras(template)

    def complete_extras(self, template_id: str, progress: ExtrasProgress | None = None) -> Template:
        """The template with the engine's extras, computed and stored in the cache if it lacks them (or
        has them for other weights); the RAM copy is replaced. Blocking and heavy (seconds on a GPU)."""
        manifest = self.store.read_manifest(validate_template_id(template_id))
        template = self.get(template_id)
        engine = self.engine
        if engine is None or engine.has_extras(template):
            return template
        started = time.perf_counter()
        extras = engine.template_extras(template, progress)
        completed = dataclasses.replace(template, extras={**template.extras, **extras})
        with self._lock:
            replaced = template_id in self._preparing
        try:
            if replaced:
                raise TemplateCacheError(f"template {template_id!r} is being prepared again")
            self.store.add_extras(template_id, extras, based_on=manifest)
        except (TemplateCacheError, OSError) as exc:
            # Replaced meanwhile (extras for frames that are no longer the cached ones), or the disk
            # refused the write (the cache is left as it was): good for whoever holds these frames now,
            # not for the cache.
            log.warning("renderer data for template %r not stored: %s", template_id, exc)
            return completed
        with self._lock:
            if self._ram.holds(template_id, template):
                self._ram.replace(template_id, completed)
            self._broken.pop(template_id, None)
        log.info(
            "template %r: %s data for %d frames computed and cached in %.1f s",
            template_id,
            engine.name,
            template.frame_count,
            time.perf_counter() - started,
        )
        return completed

    async def complete_extras_async(
        self, template_id: str, progress: ExtrasProgress | None = None
    ) -> Template:
        """:meth:`complete_extras` on the library's extras thread, one job per template however many
        sessions wait for it. ``progress(done, total)`` is called from that thread."""
        return await self._extras_jobs.run(template_id, progress)

    def close(self) -> None:
        """Stop the extras thread (after any job it is running)."""
        self._extras_jobs.close()

    # -- listing -----------------------------------------------------------------------------------------
    def list(self) -> list[TemplateInfo]:
        with self._lock:
            ids = sorted(set(self.store.template_ids()) | self._preparing)
        return [self.info(template_id) for template_id in ids]

    def info(self, template_id: str) -> TemplateInfo:
        validate_template_id(template_id)
        with self._lock:
            preparing = template_id in self._preparing
            pinned = bool(self._ram.pins(template_id))
            warm = template_id in self._ram
            broken = self._broken.get(template_id)
        try:
            manifest = self.store.check(template_id)
        except OutdatedTemplateError as exc:
            return TemplateInfo(
                template_id, template_id, "preparing" if preparing else "outdated", error=broken or str(exc)
            )
        except TemplateCacheError as exc:
            if preparing:
                return TemplateInfo(template_id, template_id, "preparing")
            if not self.store.exists(template_id):
                raise TemplateNotFoundError(f"no template {template_id!r}") from None
            return TemplateInfo(template_id, template_id, "corrupt", error=str(exc))
        state: TemplateState = "ready"
        if broken is not None:
            state = "corrupt"
        elif preparing:
            state = "preparing"
        elif pinned:
            state = "in_use"
        elif warm:
            state = "warm"
        return TemplateInfo.from_manifest(template_id, manifest, state, error=broken)

    def thumbnail(self, template_id: str) -> bytes:
        validate_template_id(template_id)
        if not self.store.exists(template_id):
            raise TemplateNotFoundError(f"no template {template_id!r}")
        return self.store.thumbnail(template_id)

    def update_info(self, template_id: str, **info: Any) -> TemplateInfo:
        """Change per-template settings (``name``, ``welcome``, ``language``) without preparing again."""
        if not self.store.exists(validate_template_id(template_id)):
            raise TemplateNotFoundError(f"no template {template_id!r}")
        self.store.update_info(template_id, info)
        return self.info(template_id)

    # -- changing the set ----------------------------------------------------------------------------------
    def delete(self, template_id: str) -> None:
        validate_template_id(template_id)
        with self._lock:
            if self._ram.pins(template_id):
                raise TemplateInUseError(f"template {template_id!r} is in use by a live call")
            if template_id in self._preparing:
                raise TemplateInUseError(f"template {template_id!r} is being prepared")
            self._ram.drop(template_id)
            self._broken.pop(template_id, None)
            if not self.store.delete(template_id):
                raise TemplateNotFoundError(f"no template {template_id!r}")

    def ensure_default(self) -> Template:
        """The built-in template, prepared on first use, kept in RAM."""
        warm = self.get_warm(self.default_id)
        if warm is not None:
            return warm
        with self._load_locks(self.default_id):
            template = self.store.ensure_default(self.default_id, self.prepare_settings, self.engine)
            with self._lock:
                self._ram.admit(self.default_id, template)
        return template

    def begin_prepare(self, template_id: str, wait: bool = True) -> None:
        """Claim the (single) preparation slot for ``template_id``; raises if busy or the id is in use.

        :meth:`prepare` does this itself; a server calls it first to refuse a request before it streams.
        Pair with :meth:`end_prepare`.
        """
        validate_template_id(template_id)
        if not self._prepare_lock.acquire(blocking=wait):
            raise PreparationBusyError("another template is being prepared; try again when it is done")
        with self._lock:
            if self._ram.pins(template_id):
                self._prepare_lock.release()
                raise TemplateInUseError(
                    f"template {template_id!r} is in use by a live call; switch away from it before "
                    "replacing it"
                )
            self._preparing.add(template_id)

    def end_prepare(self, template_id: str) -> None:
        with self._lock:
            self._preparing.discard(template_id)
        self._prepare_lock.release()

    def prepare(
        self,
        source: str | os.PathLike[str],
        template_id: str,
        *,
        info: Mapping[str, Any] | None = None,
        progress: ProgressCallback | None = None,
        force: bool = False,
        claimed: bool = False,
        source_name: str | None = None,
    ) -> PrepareResult:
        """Prepare ``source`` (a photo or video file) as ``template_id``, or find it already prepared.

        Blocking and CPU-heavy: call it from a worker thread. ``claimed`` says the caller already holds
        the slot from :meth:`begin_prepare` (and will call :meth:`end_prepare`). ``source_name`` is
        the file name to record (an upload's own name; default: ``source``'s).
        """
        from avatar_rtc.avatar.prepare import file_sha256, prepare_source

        progress = progress or _no_progress
        unknown = set(info or {}) - set(INFO_KEYS)
        if unknown:
            raise ValueError(f"unknown template settings {sorted(unknown)}; known: {list(INFO_KEYS)}")
        started = time.perf_counter()
        if not claimed:
            self.begin_prepare(template_id)
        try:
            progress("hash", 0, 1)
            source_sha256 = file_sha256(source)
            progress("hash", 1, 1)
            record = settings_record(self.prepare_settings)
            if not force and self._is_cached(template_id, source_sha256, record):
                if info:
                    self.store.update_info(template_id, dict(info))
                return PrepareResult(self.info(template_id), True, time.perf_counter() - started)
            # The cache's JPEGs are encoded on a thread while the face is tracked, not after.
            encoded: list[concurrent.futures.Future[bytes]] = []
            with concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"encode-{template_id}"
            ) as encoder:

                def encode(index: int, frame: np.ndarray) -> None:
                    encoded.append(encoder.submit(encode_frame, frame, self.store.jpeg_quality))

                template = prepare_source(
                    source,
                    template_id,
                    self.prepare_settings,
                    progress,
                    self.engine,
                    source_name=source_name,
                    frame_sink=encode,
                )
                progress("write", 0, 1)
                jpegs = [future.result() for future in encoded]
            kept_info = self._existing_info(template_id)
            merged = {**kept_info, **(info or {})}
            merged.setdefault("name", template_id)
            self.store.save(
                template,
                source_sha256=source_sha256,
                settings=record,
                info=merged,
                renderer_extras=self.engine.extras_keys if self.engine is not None else (),
                encoded_frames=jpegs if len(jpegs) == template.frame_count else None,
            )
            progress("write", 1, 1)
            with self._lock:
                self._ram.drop(template_id)
                self._broken.pop(template_id, None)
                self._ram.admit(template_id, template)
        finally:
            if not claimed:
                self.end_prepare(template_id)
        return PrepareResult(self.info(template_id), False, time.perf_counter() - started)

    def _existing_info(self, template_id: str) -> dict[str, Any]:
        # Of any format version: preparing an old template again keeps what its user set.
        return {key: value for key, value in self.store.read_info(template_id).items() if value is not None}

    def _is_cached(self, template_id: str, source_sha256: str, record: Mapping[str, Any]) -> bool:
        """Whether ``template_id`` holds exactly this source prepared this way, all files intact."""
        if not self.store.exists(template_id):
            return False
        try:
            manifest = self.store.read_manifest(template_id)
            if manifest.get("source_sha256") != source_sha256 or not same_settings(
                manifest.get("settings"), record
            ):
                log.info("template %r: source or settings changed, preparing again", template_id)
                return False
            template = self.store.load(template_id)
        except TemplateCacheError as exc:
            log.warning("template %r: cache unusable (%s), preparing again", template_id, exc)
            return False
        with self._lock:
            self._broken.pop(template_id, None)
            self._ram.admit(template_id, template)
        return True


def library_from_settings(settings: Settings, engine: TemplateEngine | None = None) -> TemplateLibrary:
    """A library configured from the settings tree (``settings.avatar`` and ``settings.media.fps``)."""
    from avatar_rtc.avatar.prepare import PrepareSettings
    from avatar_rtc.avatar.video import MediaLimits

    avatar = settings.avatar
    limits = MediaLimits(
        max_bytes=int(avatar.max_upload_mb * 2**20),
        max_seconds=float(avatar.max_video_s),
        max_pixels=int(avatar.max_video_pixels),
    )
    prepare_settings = PrepareSettings(
        fps=int(settings.media.fps), max_long_side=avatar.max_long_side, limits=limits
    )
    return TemplateLibrary(
        avatar.cache_dir,
        ram_budget_bytes=int(avatar.ram_budget_mb * 2**20),
        engine=engine,
        prepare_settings=prepare_settings,
        default_id=avatar.default_template,
    )
