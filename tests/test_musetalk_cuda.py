"""MuseTalk on a CUDA device: the same official-layout files (tiny, seeded) give the same faces on the GPU
as on the CPU, in fp32 and in fp16 (the GPU default), eager and through CUDA graphs. Skipped without
CUDA. Needs no fixture from conftest.py, so ``scripts/gpu_check.sh`` runs it with ``--noconftest`` on a
machine that has torch, diffusers and transformers but not the whole project's dependencies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SAMPLE_RATE = 16000


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buzz = sum(np.sin(2 * np.pi * 140 * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None)
    return (buzz * envelope * 4000).astype(np.int16)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from musetalk_fixtures import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("musetalk_models"))


def _pipeline(models_dir: Path, device: str, dtype: str) -> Any:
    from avatar_rtc.render.musetalk.models import load_models
    from avatar_rtc.render.musetalk.pipeline import MuseTalkPipeline

    return MuseTalkPipeline(load_models(models_dir, device=device, dtype=dtype))


def _faces(pipeline: Any, crops: np.ndarray, count: int = 6) -> np.ndarray:
    """Faces for ``count`` frames: template latents from ``crops``, tokens from seeded speech."""
    from avatar_rtc.render.musetalk.features import ClipFeatures
    from avatar_rtc.render.musetalk.pipeline import FaceJob

    latents = torch.from_numpy(pipeline.encode_faces(crops)).to(pipeline.models.device)
    tokens = ClipFeatures(pipeline.features).frame_tokens(
        _speech(2.0, 1), [0.2 + 0.08 * i for i in range(count)]
    )
    jobs = [FaceJob(latents[i % len(latents)], tokens[i].to(pipeline.models.device)) for i in range(count)]
    return np.stack(pipeline.render(jobs)).astype(int)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = cv2_smooth(rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8))
    return np.ascontiguousarray(base)


def cv2_smooth(images: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(image, (9, 9), 0) for image in images])


@pytest.fixture(scope="module")
def cpu_faces(models_dir: Path, crops: np.ndarray) -> np.ndarray:
    return _faces(_pipeline(models_dir, "cpu", "float32"), crops)


def test_fp32_faces_on_the_gpu_match_the_cpu(
    models_dir: Path, crops: np.ndarray, cpu_faces: np.ndarray
) -> None:
    gpu = _faces(_pipeline(models_dir, "cuda", "float32"), crops)
    # TF32 matmuls and other kernels round differently: a few levels at most.
    assert np.abs(gpu - cpu_faces).max() <= 4
    assert np.abs(gpu - cpu_faces).mean() < 0.5


def test_fp16_faces_on_the_gpu_match_fp32(models_dir: Path, crops: np.ndarray, cpu_faces: np.ndarray) -> None:
    pipeline = _pipeline(models_dir, "cuda", "float16")
    assert pipeline.models.dtype == torch.float16
    half = _faces(pipeline, crops)
    # End to end in fp16 (template latents, whisper features and the UNet): the same path on a CPU
    # measured at most 16 levels apart, 0.42 on average.
    assert np.abs(half - cpu_faces).max() <= 32
    assert np.abs(half - cpu_faces).mean() < 1.0


def test_cuda_graphs_give_the_eager_faces(models_dir: Path, crops: np.ndarray) -> None:
    eager = _faces(_pipeline(models_dir, "cuda", "float16"), crops, count=3)
    graphed = _pipeline(models_dir, "cuda", "float16")
    graphed.compile("cuda-graphs", max_batch=4)
    for _ in range(3):  # recorded on an early call, replayed after
        faces = _faces(graphed, crops, count=3)
    assert np.abs(faces - eager).max() <= 1
