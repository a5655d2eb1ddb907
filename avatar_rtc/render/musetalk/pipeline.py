"""One MuseTalk step for a batch of frames: tokens + template latents -> UNet at t=0 -> VAE decode -> face."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avatar_rtc.render.musetalk.features import WhisperFeatures, positional_encoding
from avatar_rtc.render.musetalk.models import VAE_SCALING, MuseTalkModels

FACE_SIZE = 256
LATENT_SIZE = FACE_SIZE // 8
# torch.compile modes, plus cuda-graphs: dynamo's cudagraphs backend, CUDA graphs without inductor's
# code generation, so it is ready in seconds where reduce-overhead compiles for minutes per batch size.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "cuda-graphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "cuda-graphs")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a compiled pipeline runs at: powers of two below ``max_batch``, and ``max_batch``.
    A compiled graph (and a CUDA graph above all) is specialised to its shapes; padding every batch up to
    one of these bounds the graphs to log2(max_batch) + 1 while wasting under half a batch."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def pad_batch(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` with its first row repeated at the end up to ``size`` rows (real values, so no NaN or
    overflow can come from the padding, and each row's result does not depend on the others)."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(missing, *tensor.shape[1:])])


@dataclass(frozen=True)
class FaceJob:
    """One frame to generate: which cached template latents, and the frame's audio tokens."""

    latents: torch.Tensor  # (8, 32, 32) on the models' device, [masked target, reference]
    tokens: torch.Tensor  # (50, D) whisper tokens (features.ClipFeatures), no positional encoding yet


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over calls (the bench reads them)."""

    unet: float = 0.0
    vae: float = 0.0
    frames: int = 0
    batches: int = 0

    def reset(self) -> None:
        self.unet = self.vae = 0.0
        self.frames = self.batches = 0


class MuseTalkPipeline:
    def __init__(self, models: MuseTalkModels) -> None:
        self.models = models
        self.features = WhisperFeatures(models)
        width = models.feature_width
        self._positions = positional_encoding(50, width).to(models.device, models.dtype)
        self.times = StageTimes()
        self.buckets: tuple[int, ...] = ()  # set by compile(): the batch sizes the graphs are built for
        self.compile_mode: str | None = None
        self._unet: Callable[..., Any] = models.unet
        self._decode: Callable[[torch.Tensor], Any] = models.vae.decode

    def compile(self, mode: str, max_batch: int, backend: str | Callable[..., Any] = "inductor") -> None:
        """Run the UNet and the VAE decoder through ``torch.compile`` (``mode`` one of
        :data:`COMPILE_MODES`; reduce-overhead adds CUDA graphs on a GPU), padding batches up to
        :func:`batch_buckets` so each size compiles once. The first batch of each size pays the
        compilation: call :meth:`warm_up` on the thread that will run the batches."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        options: dict[str, Any] = {"dynamic": False}
        if mode == "cuda-graphs" and backend == "inductor":
            backend = "cudagraphs"
        elif backend == "inductor":
            options["mode"] = mode
        self._unet = torch.compile(self.models.unet, backend=backend, **options)
        self._decode = torch.compile(self.models.vae.decode, backend=backend, **options)
        self.buckets = batch_buckets(max_batch)
        self.compile_mode = mode

    def uncompile(self) -> None:
        """Back to the eager modules (after a compilation failed)."""
        self._unet, self._decode = self.models.unet, self.models.vae.decode
        self.buckets, self.compile_mode = (), None

    def warm_up(self, jobs: Sequence[FaceJob]) -> dict[int, float]:
        """Render one batch at every bucket size (from ``jobs``, repeated), so no call waits on a
        compilation; seconds per size."""
        seconds = {}
        for size in self.buckets or (1,):
            start = time.perf_counter()
            self.render([jobs[i % len(jobs)] for i in range(size)])
            seconds[size] = time.perf_counter() - start
        self.times.reset()
        return seconds

    def _sync(self) -> None:
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)

    @torch.inference_mode()
    def encode_faces(self, faces_rgb: np.ndarray, batch: int = 8) -> np.ndarray:
        """Template latents (N, 8, 32, 32) float32 from (N, 256, 256, 3) uint8 RGB face crops: the lower
        half masked, then both copies through the VAE encoder, x 0.18215.

        The latent distribution's mean, where upstream draws a sample from it: the same template frame
        always gives the same latents, so they can be cached and compared."""
        models = self.models
        out = []
        for lo in range(0, len(faces_rgb), batch):
            pixels = torch.from_numpy(np.ascontiguousarray(faces_rgb[lo : lo + batch])).to(models.device)
            # Contiguous NCHW: a permuted (channels-last) view changes the encoder's GroupNorm numerics on
            # CPU enough to move the masked half-image's latents by 0.65 %.
            pixels = pixels.permute(0, 3, 1, 2).contiguous().to(models.dtype)
            masked = pixels.clone()
            masked[:, :, FACE_SIZE // 2 :, :] = 0
            both = torch.cat([masked, pixels]) / 127.5 - 1.0
            latents = models.vae.encode(both).latent_dist.mean * VAE_SCALING
            n = pixels.shape[0]
            out.append(torch.cat([latents[:n], latents[n:]], dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 8, LATENT_SIZE, LATENT_SIZE), np.float32)

    @torch.inference_mode()
    def generate(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 8, 32, 32) latents + (B, 50, D) tokens -> (B, 256, 256, 3) float faces, RGB, 0..255."""
        models = self.models
        start = time.perf_counter()
        count = latents.shape[0]
        if self.buckets:
            size = self.buckets[min(bisect.bisect_left(self.buckets, count), len(self.buckets) - 1)]
            if count > size:
                raise ValueError(f"batch of {count} exceeds the compiled maximum {size}")
            latents, tokens = pad_batch(latents, size), pad_batch(tokens, size)
            if self.compile_mode in CUDA_GRAPH_MODES and models.device.type == "cuda":
                # Each render is one step: CUDA graphs may reuse the last step's output buffers.
                torch.compiler.cudagraph_mark_step_begin()
        audio = tokens.to(models.dtype) + self._positions
        timestep = torch.zeros(latents.shape[0], device=models.device, dtype=models.dtype)
        predicted = self._unet(latents.to(models.dtype), timestep, encoder_hidden_states=audio).sample
        self._sync()
        mid = time.perf_counter()
        image = self._decode(predicted / VAE_SCALING).sample[:count]
        faces = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)
        self._sync()
        self.times.unet += mid - start
        self.times.vae += time.perf_counter() - mid
        return faces

    @torch.inference_mode()
    def render(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        """The batched forward the worker runs: one face per job, (256, 256, 3) uint8 BGR."""
        tokens = torch.stack([job.tokens for job in jobs])
        latents = torch.stack([job.latents for job in jobs])
        faces = self.generate(latents, tokens)
        # Round, then BGR (the project's image order) on the device: one small copy back per batch.
        faces_bgr = (faces + 0.5).to(torch.uint8).flip(-1).cpu().numpy()
        self.times.frames += len(jobs)
        self.times.batches += 1
        return list(faces_bgr)
