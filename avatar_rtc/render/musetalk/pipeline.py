"""One MuseTalk step for a batch of frames: audio windows -> tokens -> UNet at t=0 -> VAE decode -> faces."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from avatar_rtc.render.musetalk.features import FeatureWindowing, WhisperFeatures, positional_encoding
from avatar_rtc.render.musetalk.models import VAE_SCALING, MuseTalkModels

FACE_SIZE = 256
LATENT_SIZE = FACE_SIZE // 8


@dataclass(frozen=True)
class FaceJob:
    """One frame to generate: which cached template latents, and the audio window around the frame."""

    latents: torch.Tensor  # (8, 32, 32) on the models' device, [masked target, reference]
    window: np.ndarray  # float32 samples, FeatureWindowing.window_samples long
    valid: tuple[int, int]  # window steps inside the utterance


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over calls (the bench reads them)."""

    features: float = 0.0
    unet: float = 0.0
    vae: float = 0.0
    frames: int = 0
    batches: int = 0

    def reset(self) -> None:
        self.features = self.unet = self.vae = 0.0
        self.frames = self.batches = 0


class MuseTalkPipeline:
    def __init__(self, models: MuseTalkModels, windowing: FeatureWindowing | None = None) -> None:
        self.models = models
        self.features = WhisperFeatures(models, windowing)
        self.windowing = self.features.windowing
        width = models.feature_width
        self._positions = positional_encoding(50, width).to(models.device, models.dtype)
        self.times = StageTimes()

    def _sync(self) -> None:
        if self.models.device.type == "cuda":
            torch.cuda.synchronize(self.models.device)

    @torch.inference_mode()
    def encode_faces(self, faces_rgb: np.ndarray, batch: int = 8) -> np.ndarray:
        """Template latents (N, 8, 32, 32) float32 from (N, 256, 256, 3) uint8 RGB face crops: the lower
        half masked, then both copies through the VAE encoder (distribution mean, x 0.18215)."""
        models = self.models
        out = []
        for lo in range(0, len(faces_rgb), batch):
            pixels = torch.from_numpy(np.ascontiguousarray(faces_rgb[lo : lo + batch])).to(models.device)
            pixels = pixels.permute(0, 3, 1, 2).to(models.dtype)
            masked = pixels.clone()
            masked[:, :, FACE_SIZE // 2 :, :] = 0
            both = torch.cat([masked, pixels]) / 127.5 - 1.0
            latents = models.vae.encode(both).latent_dist.mean * VAE_SCALING
            n = pixels.shape[0]
            out.append(torch.cat([latents[:n], latents[n:]], dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 8, LATENT_SIZE, LATENT_SIZE), np.float32)

    @torch.inference_mode()
    def tokens(self, windows: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """(B, 50, D) audio tokens, positional encoding not yet added."""
        audio = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.models.device)
        return self.features.frame_tokens(audio, torch.from_numpy(np.asarray(valid, np.int64)))

    @torch.inference_mode()
    def generate(self, latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 8, 32, 32) latents + (B, 50, D) tokens -> (B, 256, 256, 3) float faces, RGB, 0..255."""
        models = self.models
        start = time.perf_counter()
        audio = tokens.to(models.dtype) + self._positions
        timestep = torch.zeros(latents.shape[0], device=models.device, dtype=models.dtype)
        predicted = models.unet(latents.to(models.dtype), timestep, encoder_hidden_states=audio).sample
        self._sync()
        mid = time.perf_counter()
        image = models.vae.decode(predicted / VAE_SCALING).sample
        faces = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)
        self._sync()
        self.times.unet += mid - start
        self.times.vae += time.perf_counter() - mid
        return faces

    @torch.inference_mode()
    def render(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        """The batched forward the worker runs: one face per job, (256, 256, 3) uint8 BGR."""
        start = time.perf_counter()
        windows = np.stack([job.window for job in jobs])
        valid = np.array([job.valid for job in jobs], np.int64)
        tokens = self.tokens(windows, valid)
        self._sync()
        self.times.features += time.perf_counter() - start
        latents = torch.stack([job.latents for job in jobs])
        faces = self.generate(latents, tokens)
        # Round, then BGR (the project's image order) on the device: one small copy back per batch.
        faces_bgr = (faces + 0.5).to(torch.uint8).flip(-1).cpu().numpy()
        self.times.frames += len(jobs)
        self.times.batches += 1
        return list(faces_bgr)
