"""The MuseTalk renderer behind the common seam: one engine per process (models, one batching worker per
device, template latents in a device tier under a budget), one light renderer per session.

A session's frames follow the same streaming rules as the warp renderer (:class:`StreamingRenderer`):
a frame is generated once ``lookahead_s`` of audio after it is known or its audio is flushed. Its
whisper tokens are upstream's features of the answer so far (:class:`ClipFeatures`): audio that
continues where the last audio ended, flushed or not, belongs to the same answer, so a sentence sees
the sentences before it. A frame is generated once and never changed; its tokens and the cached
template latents go to the shared worker with the frame's deadline; the worker batches frames of all
sessions into one UNet + VAE forward; the generated face comes back to this session alone and is
composited on the CPU (:mod:`avatar_rtc.avatar.blend`). The session's frame loop awaits the worker's
futures (``asyncio.wrap_future``): no thread waits on them; the features and the compositing run in
worker threads.

Template data (boxes, masks, VAE latents) is the engine's ``template_extras``: computed at preparation
or, for a template prepared before MuseTalk was enabled, in the background by the template library,
and stored in the template cache. The engine never computes it on the event loop: a template without
it gets the warp renderer (quality level ``preparing``) until it is there. ``warm`` moves a template's
latents into the device tier (:class:`~avatar_rtc.render.device_tier.DeviceTier`: a VRAM budget, least
recently used out first, pinned while a session shows it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avatar_rtc.avatar.blend import BlendPlans, build_blend_plan, composite
from avatar_rtc.avatar.engine import ExtrasProgress
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.base import EventSink, RenderedFrame, Renderer, RendererEngine, TierStats
from avatar_rtc.render.batching import QUALITY_LEVELS, BatchingWorker, QualityPolicy
from avatar_rtc.render.device_tier import DeviceTier
from avatar_rtc.render.musetalk import layout
from avatar_rtc.render.musetalk.prepare import KEYS, has_current_data, latents_key, musetalk_template_data
from avatar_rtc.render.stream import FrameJob, StreamingRenderer, _Segment
from avatar_rtc.render.visemes import TimedViseme

if TYPE_CHECKING:
    import torch

    from avatar_rtc.render.musetalk.features import ClipFeatures
    from avatar_rtc.render.musetalk.models import MuseTalkModels
    from avatar_rtc.render.musetalk.pipeline import FaceJob, MuseTalkPipeline

log = logging.getLogger(__name__)

HALF_RATE = QUALITY_LEVELS.index("half_rate")
CPU_FALLBACK = QUALITY_LEVELS.index("cpu_fallback")


def quality_event(level: str, renderer: str) -> dict[str, Any]:
    """The data-channel event saying which quality level a session is on."""
    return {"type": "quality", "level": level, "renderer": renderer}


class Answer:
    """Continuous speech: audio pushed without a gap since the last break, and its whisper features.

    Appended to on the event loop, read by the session's render thread: the lock guards the chunks."""

    def __init__(self, start: float, sample_rate: int, features: ClipFeatures) -> None:
        self.start = start
        self.sample_rate = sample_rate
        self.features = features
        self.samples = 0
        self._chunks: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def end(self) -> float:
        return self.start + self.samples / self.sample_rate

    def append(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(pcm)
            self.samples += len(pcm)

    def audio(self, samples: int) -> np.ndarray:
        """The first ``samples`` samples (int16)."""
        with self._lock:
            if len(self._chunks) > 1:
                self._chunks = [np.concatenate(self._chunks)]
            whole = self._chunks[0] if self._chunks else np.zeros(0, np.int16)
        return whole[:samples]


@dataclass(frozen=True)
class MuseTalkFrameJob(FrameJob):
    """A frame job: its features are the answer's, computed over the audio known when the job was made
    (``audio`` is unused)."""

    answer: Answer | None = None
    known_samples: int = 0


class TemplateFaces:
    """One template's MuseTalk data on the engine's device, shared by every session on that template."""

    def __init__(self, template: Template, data: dict[str, np.ndarray], latents: torch.Tensor) -> None:
        self.template = template
        self.latents = latents  # (N, 8, 32, 32) on the models' device and dtype
        self.boxes = data["musetalk_bbox"]
        masks = data["musetalk_mask"]
        boxes = self.boxes
        self.plans = BlendPlans(
            template.size, lambda i: build_blend_plan(template.size, tuple(boxes[i]), masks[i])
        )

    @property
    def nbytes(self) -> int:
        """What this entry holds on the device (the blend plans live in RAM, built as frames need them)."""
        return int(self.latents.element_size() * self.latents.nelement())


class MuseTalkRenderer(StreamingRenderer):
    """One session's MuseTalk renderer."""

    def __init__(self, engine: MuseTalkEngine, template: Template, faces: TemplateFaces) -> None:
        super().__init__(template)
        self.engine = engine
        self.faces = faces
        self.lookahead_s = engine.lookahead_s
        self.max_batch = engine.session_batch
        self._answer: Answer | None = None
        # media_clock (attach) gives frames their real deadlines; without one a frame is due
        # ``engine.latency_budget_s`` after its submission.
        self._reported_level: str | None = None
        self._last_image: tuple[int, np.ndarray] | None = None
        self._in_flight: set[concurrent.futures.Future[np.ndarray]] = set()
        self._lock = threading.Lock()
        self._pinned = True
        engine.tier.pin(template.id)  # the latents this session renders from stay on the device

    @property
    def quality_level(self) -> str:
        """This session's level: the engine's, except that running sessions stay generated at half rate
        when new ones go to the CPU renderer."""
        return QUALITY_LEVELS[min(self.engine.policy.level_index, HALF_RATE)]

    @property
    def render_delay_s(self) -> float:
        """Time from a frame's audio being known to its image: batching wait plus the forward."""
        worker = self.engine.worker
        return worker.wait_s + worker.expected_forward_s(worker.max_batch)

    def push_audio(self, pcm: np.ndarray, media_time: float) -> None:
        super().push_audio(pcm, media_time)  # checks the samples, schedules the frames
        from avatar_rtc.render.musetalk.features import ClipFeatures

        answer = self._answer
        # Contiguous audio continues the answer even after a flush (the next sentence of the same
        # reply): its frames then see the sentences before it, as upstream's would in one file.
        if answer is None or abs(answer.end - media_time) > 0.5 / self.sample_rate:
            answer = self._answer = Answer(
                media_time, self.sample_rate, ClipFeatures(self.engine.pipeline.features)
            )
        answer.append(pcm)

    def _job(self, seg: _Segment, index: int) -> MuseTalkFrameJob:
        answer = self._answer
        assert answer is not None  # a segment exists only after audio was pushed
        no_audio = np.zeros(0, np.float32)
        return MuseTalkFrameJob(index, self.template.loop_index(index), no_audio, answer, answer.samples)

    def frame_tokens(self, jobs: Sequence[FrameJob]) -> list[torch.Tensor]:
        """Each job's (50, D) tokens: upstream's features of its answer as far as it was known when the
        job was made (one encoder run for the jobs of one batch)."""
        tokens: list[torch.Tensor | None] = [None] * len(jobs)
        groups: dict[tuple[int, int], list[int]] = {}
        for position, job in enumerate(jobs):
            assert isinstance(job, MuseTalkFrameJob) and job.answer is not None
            groups.setdefault((id(job.answer), job.known_samples), []).append(position)
        for positions in groups.values():
            first = jobs[positions[0]]
            assert isinstance(first, MuseTalkFrameJob) and first.answer is not None
            answer = first.answer
            offsets = [jobs[p].index / self.fps - answer.start for p in positions]
            batch = answer.features.frame_tokens(answer.audio(first.known_samples), offsets)
            for p, row in zip(positions, batch, strict=True):
                tokens[p] = row
        return [t for t in tokens if t is not None]

    def clear(self) -> None:
        super().clear()
        self._answer = None
        with self._lock:
            in_flight, self._in_flight = self._in_flight, set()
        for future in in_flight:
            future.cancel()  # not rendered if the worker has not taken it yet
        self._last_image = None

    def _deadline(self, index: int) -> float:
        if self.media_clock is None:
            return time.monotonic() + self.engine.latency_budget_s
        return time.monotonic() + (index / self.fps - self.media_clock())

    async def render_jobs(self, jobs: Sequence[FrameJob]) -> list[np.ndarray]:
        """Submit the batch to the shared worker, await its futures on the loop (no thread blocks on
        them), then composite in a worker thread."""
        half_rate = self.engine.policy.level_index >= HALF_RATE
        # The whisper encoder runs over the answer so far: seconds of CPU, never on the event loop.
        tokens = await asyncio.to_thread(self.frame_tokens, jobs)
        futures: list[concurrent.futures.Future[np.ndarray] | None] = []
        previous = self._last_image[0] if self._last_image is not None else None
        for job, job_tokens in zip(jobs, tokens, strict=True):
            # At half rate odd frames repeat the frame before; an utterance starting on one renders it.
            repeat = half_rate and job.index % 2 == 1 and previous == job.index - 1
            futures.append(None if repeat else self._submit(job, job_tokens))
            previous = job.index
        submitted = [future for future in futures if future is not None]
        try:
            if submitted:
                await asyncio.wait([asyncio.wrap_future(future) for future in submitted])
        except asyncio.CancelledError:
            for future in submitted:
                future.cancel()  # abandoned: not rendered if the worker has not taken it yet
            raise
        finally:
            with self._lock:
                self._in_flight.difference_update(submitted)
        faces = [self._face(job, future) for job, future in zip(jobs, futures, strict=True)]
        return await asyncio.to_thread(self._composite, jobs, faces)

    def _submit(self, job: FrameJob, tokens: torch.Tensor) -> concurrent.futures.Future[np.ndarray]:
        from avatar_rtc.render.musetalk.pipeline import FaceJob

        face_job = FaceJob(self.faces.latents[job.template_index], tokens)
        future = self.engine.worker.submit(face_job, self._deadline(job.index))
        with self._lock:
            self._in_flight.add(future)
        return future

    def _face(
        self, job: FrameJob, future: concurrent.futures.Future[np.ndarray] | None
    ) -> np.ndarray | bool | None:
        """The generated face; True to repeat the previous image; None for the template frame."""
        if future is None:
            return True
        if future.cancelled():
            return None  # cleared while waiting: StreamingRenderer.frames drops this batch
        error = future.exception()
        if error is not None:
            # A failed forward (out of device memory, say) costs this frame its mouth movement, not the
            # session its video: the idle frame goes out on time instead.
            log.error(
                "musetalk forward failed; showing the template frame for frame %d",
                job.index,
                exc_info=error,
            )
            return None
        return future.result()

    def _composite(
        self, jobs: Sequence[FrameJob], faces: Sequence[np.ndarray | bool | None]
    ) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for job, face in zip(jobs, faces, strict=True):
            frame = self.template.frames[job.template_index]
            if face is True and self._last_image is not None:
                image = self._last_image[1]
            elif isinstance(face, np.ndarray):
                image = composite(frame, face, self.faces.plans[job.template_index])
            else:
                image = frame
            self._last_image = (job.index, image)
            images.append(image)
        return images

    async def aclose(self) -> None:
        if self._pinned:
            self._pinned = False
            self.engine.tier.unpin(self.template.id)
        await super().aclose()

    def _report_level(self) -> None:
        level = self.quality_level
        if level != self._reported_level:
            self._reported_level = level
            if self.emit_event is not None:
                self.emit_event(quality_event(level, "musetalk"))

    async def frames(self) -> AsyncIterator[RenderedFrame]:
        async for frame in super().frames():
            self._report_level()  # on the event loop, so the sink needs no locking
            yield frame


class CpuFallbackRenderer:
    """The light CPU renderer, given to new sessions while the MuseTalk worker is overloaded
    (``cpu_fallback``), or while their template's MuseTalk data is being computed (``preparing``)."""

    def __init__(self, inner: Renderer, quality_level: str = "cpu_fallback") -> None:
        self._quality_level = quality_level
        self.inner = inner
        self.template = inner.template
        self.sample_rate = inner.sample_rate
        self.lookahead_s = inner.lookahead_s
        self.emit_event: EventSink | None = None
        self._reported = False

    @property
    def quality_level(self) -> str:
        return self._quality_level

    def attach(self, media_clock: Callable[[], float], emit_event: EventSink) -> None:
        self.emit_event = emit_event
        self.inner.attach(media_clock, emit_event)

    def push_audio(self, pcm: np.ndarray, media_time: float) -> None:
        self.inner.push_audio(pcm, media_time)

    def push_visemes(self, visemes: Sequence[TimedViseme], media_time: float) -> None:
        self.inner.push_visemes(visemes, media_time)

    def flush(self) -> None:
        self.inner.flush()

    def clear(self) -> None:
        self.inner.clear()

    async def frames(self) -> AsyncIterator[RenderedFrame]:
        async for frame in self.inner.frames():
            if not self._reported and self.emit_event is not None:
                self._reported = True
                self.emit_event(quality_event(self.quality_level, "fallback"))
            yield frame

    async def aclose(self) -> None:
        await self.inner.aclose()


class MuseTalkEngine:
    """Process-wide MuseTalk: the models, one batching worker for the device, the template tier.

    Raises :class:`MuseTalkUnavailableError` (missing files listed with the fetch command, or a bad weights
    file, or missing packages) so the server can fall back to the warp renderer.
    """

    name = "musetalk"
    extras_keys = KEYS

    def __init__(
        self,
        models_dir: str | Path = "models",
        device: str = "auto",
        *,
        dtype: str = "auto",
        compile_mode: str = "off",
        max_batch: int = 16,
        max_wait_s: float = 0.008,
        session_batch: int = 8,
        latency_budget_s: float = 0.3,
        vram_budget_mb: float = 2048,
        feature_right_context_steps: int = 4,
        bbox_shift: int = 0,
        policy: QualityPolicy | None = None,
        fallback: RendererEngine | None = None,
        models: MuseTalkModels | None = None,
    ) -> None:
        # Cheap checks first: a server falling back to warp should not pay for importing torch.
        if models is None:
            layout.require_files(Path(models_dir))
        layout.require_packages()
        from avatar_rtc.render.musetalk.features import lookahead_s
        from avatar_rtc.render.musetalk.models import load_models
        from avatar_rtc.render.musetalk.pipeline import MuseTalkPipeline

        self.models = models if models is not None else load_models(Path(models_dir), device, dtype)
        self.pipeline: MuseTalkPipeline = MuseTalkPipeline(self.models)
        if compile_mode != "off":
            self.pipeline.compile(compile_mode, max_batch)
        # Only audio that arrives piecemeal waits for it: a sentence handed over whole is flushed.
        self.lookahead_s = lookahead_s(feature_right_context_steps)
        self.session_batch = session_batch
        self.latency_budget_s = latency_budget_s
        self.policy = policy or QualityPolicy()
        self.policy.add_listener(lambda level: log.warning("musetalk quality level now %s", level))
        self.worker: BatchingWorker[FaceJob, np.ndarray] = BatchingWorker(
            self.pipeline.render,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            policy=self.policy,
            name=f"musetalk-{self.models.device}",
        )
        self._fallback = fallback
        dtype_name = str(self.models.dtype).removeprefix("torch.")
        self.bbox_shift = bbox_shift
        self.latents_key = latents_key(self.models.vae_id, dtype_name, bbox_shift)
        self.tier: DeviceTier[TemplateFaces] = DeviceTier(
            max(int(vram_budget_mb * 2**20), 1), name=f"musetalk-{self.models.device}"
        )
        self._extras_computed = 0
        self._lock = threading.Lock()
        if compile_mode != "off":
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile every batch size before the first call needs it, on the worker's thread. A compiler
        that fails (no C++ compiler or Triton, an unsupported op) leaves the engine running eager."""
        import torch

        from avatar_rtc.render.musetalk.pipeline import LATENT_SIZE, FaceJob

        on_device = {"device": self.models.device, "dtype": self.models.dtype}
        silence = FaceJob(
            torch.zeros(8, LATENT_SIZE, LATENT_SIZE, **on_device),  # type: ignore[arg-type]
            torch.zeros(50, self.models.feature_width, **on_device),  # type: ignore[arg-type]
        )
        started = time.perf_counter()
        mode = self.pipeline.compile_mode
        try:
            seconds = self.worker.run_on_worker(lambda: self.pipeline.warm_up([silence])).result()
        except Exception as error:  # torch.compile's failures span many exception types
            log.warning("musetalk: torch.compile (%s) failed, running uncompiled: %s", mode, error)
            self.pipeline.uncompile()
            return
        log.info(
            "musetalk compiled (%s) for batch sizes %s in %.0f s",
            self.pipeline.compile_mode,
            ", ".join(f"{size} ({s:.1f} s)" for size, s in seconds.items()),
            time.perf_counter() - started,
        )

    # -- the template tier ------------------------------------------------------------------------------
    def has_extras(self, template: Template) -> bool:
        return has_current_data(template, self.latents_key)

    def template_extras(
        self, template: Template, progress: ExtrasProgress | None = None
    ) -> dict[str, np.ndarray]:
        """Boxes, masks and VAE latents of every frame (VAE-encoding each one: blocking, heavy). The
        encodes run on the calling thread, beside the worker's forwards: both are mostly device time."""
        started = time.perf_counter()
        data = musetalk_template_data(template, self.pipeline, self.latents_key, progress, self.bbox_shift)
        with self._lock:
            self._extras_computed += 1
        log.info(
            "musetalk data for template %r: %d frames in %.1f s",
            template.id,
            template.frame_count,
            time.perf_counter() - started,
        )
        return data

    def warm(self, template: Template) -> None:
        if self.has_extras(template):
            self._faces(template)
        else:
            self.fallback().warm(template)  # what open() will give it meanwhile

    def evict(self, template_id: str) -> None:
        self.tier.evict(template_id)
        self.fallback().evict(template_id)

    def tier_stats(self) -> TierStats:
        with self._lock:
            computed = self._extras_computed
        return self.tier.stats(computed)

    def _faces(self, template: Template) -> TemplateFaces:
        """The template's entry in the device tier, uploading its stored latents if it is not there."""
        import torch

        cached = self.tier.get(template.id, lambda faces: faces.template.frames is template.frames)
        if cached is not None:
            return cached
        latents = np.ascontiguousarray(template.extras["musetalk_latents"])
        on_device = torch.from_numpy(latents).to(self.models.device, self.models.dtype)
        return self.tier.admit(template.id, TemplateFaces(template, template.extras, on_device))

    def template_faces(self, template: Template) -> TemplateFaces:
        """The template's device data, computing its extras first if it lacks them (blocking: for
        offline rendering, benchmarks and tests; sessions get them from the library's cache)."""
        if not self.has_extras(template):
            cached = self.tier.get(template.id, lambda faces: faces.template.frames is template.frames)
            if cached is not None:
                return cached
            extras = self.template_extras(template)
            template = dataclasses.replace(template, extras={**template.extras, **extras})
        return self._faces(template)

    def open(self, template: Template) -> Renderer:
        if self.policy.level_index >= CPU_FALLBACK:
            return CpuFallbackRenderer(self.fallback().open(template))
        if not self.has_extras(template):
            # Never computed here (open runs on the event loop): the library completes the template in
            # the background, and the session shows it on the light renderer meanwhile.
            return CpuFallbackRenderer(self.fallback().open(template), "preparing")
        return MuseTalkRenderer(self, template, self._faces(template))

    def fallback(self) -> RendererEngine:
        if self._fallback is None:
            from avatar_rtc.render.warp import WarpEngine

            self._fallback = WarpEngine()
        return self._fallback

    def close(self) -> None:
        self.worker.close()
