"""Throughput of the full-size MuseTalk v1.5 architecture (random weights) per batch size.

Usage: ``python scripts/bench_musetalk.py [--device auto|cpu|cuda] [--dtype auto|float32|float16|bfloat16]
[--compile off|default|reduce-overhead|max-autotune] [--batches 1,4,8,16,32] [--iterations N]
[--budget-s S]``. Builds whisper-tiny's encoder, the v1.5 UNet and sd-vae-ft-mse's VAE at their
published sizes (dtype auto: fp16 on CUDA, fp32 on CPU), then per batch size times the stages of one
batched step: UNet at t=0, VAE decode, and
compositing the faces into 1080p frames on one CPU thread. With ``--compile`` the UNet and VAE decoder go
through torch.compile exactly as the server's ``renderer.musetalk.compile`` setting does (reduce-overhead:
CUDA graphs); each batch size's first, compiling batch is timed apart and left out of the figures. A batch
size whose first iteration took longer than ``--budget-s`` ends the sweep (CPU: the larger sizes would
take minutes each).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from avatar_rtc.avatar.blend import build_blend_plan, composite
from avatar_rtc.render.musetalk.features import ClipFeatures, lookahead_s
from avatar_rtc.render.musetalk.models import (
    MUSETALK_V15_UNET_CONFIG,
    SD_VAE_CONFIG,
    assemble,
    build_unet,
    build_vae,
    build_whisper_encoder,
    pick_device,
)
from avatar_rtc.render.musetalk.pipeline import COMPILE_MODES, FaceJob, MuseTalkPipeline


def build_pipeline(device: str, dtype_name: str = "auto") -> MuseTalkPipeline:
    from transformers import WhisperConfig, WhisperFeatureExtractor

    target, dtype = pick_device(device, dtype_name)
    whisper_tiny = WhisperConfig(
        d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80
    )
    extractor = WhisperFeatureExtractor()
    models = assemble(
        build_unet(MUSETALK_V15_UNET_CONFIG, on_meta=False),
        build_vae(SD_VAE_CONFIG, on_meta=False),
        build_whisper_encoder(whisper_tiny, on_meta=False),
        np.asarray(extractor.mel_filters, np.float32).T,
        extractor.n_fft,
        extractor.hop_length,
        target,
        dtype,
        vae_id="random",
    )
    return MuseTalkPipeline(models)


def synthetic_jobs(pipeline: MuseTalkPipeline, count: int, seed: int = 0) -> list[FaceJob]:
    """``count`` frames' inputs as a live renderer hands them over: template latents and the audio
    features for the frame's time, from 4 s of noise (the weights are random: content does not matter,
    only shapes and work)."""
    models = pipeline.models
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(8, 8, 32, 32, generator=generator).to(models.device, models.dtype)
    audio = (np.random.default_rng(seed).standard_normal(16000 * 4) * 3000).astype(np.int16)
    tokens = ClipFeatures(pipeline.features).frame_tokens(audio, [0.5 + 0.04 * i for i in range(64)])
    return [FaceJob(latents[i % len(latents)], tokens[i % len(tokens)]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="off", choices=["off", *COMPILE_MODES])
    parser.add_argument("--batches", default="1,4,8,16,32")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON object per batch size")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    pipeline = build_pipeline(args.device, args.dtype)
    models = pipeline.models
    batches = [int(b) for b in args.batches.split(",")]
    if args.compile != "off":
        pipeline.compile(args.compile, max(batches))
    device_name = torch.cuda.get_device_name(models.device) if models.device.type == "cuda" else "cpu"
    print(
        f"device {models.device} [{device_name}] ({models.dtype}, compile {args.compile}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, built in {time.perf_counter() - started:.1f} s"
    )
    print(
        f"params: UNet {sum(p.numel() for p in models.unet.parameters()) / 1e6:.0f} M, "
        f"VAE {sum(p.numel() for p in models.vae.parameters()) / 1e6:.0f} M, "
        f"whisper encoder {sum(p.numel() for p in models.whisper.parameters()) / 1e6:.1f} M"
    )
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(16000 * 4) * 3000).astype(np.int16)
    # Features: one encoder run over a whole 30 s segment per sentence (per piece of piecemeal audio).
    ClipFeatures(pipeline.features).states(audio)  # warm-up
    encode_s = []
    for _ in range(3):
        start = time.perf_counter()
        ClipFeatures(pipeline.features).frame_tokens(audio, [0.5 + 0.04 * i for i in range(64)])
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        encode_s.append(time.perf_counter() - start)
    print(
        f"features: {min(encode_s) * 1e3:.1f} ms per answer update (one 30 s segment through whisper), "
        f"piecemeal lookahead {lookahead_s(4) * 1e3:.0f} ms"
    )
    frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[128:, 30:226] = 255
    plan = build_blend_plan((1920, 1080), (730, 300, 1185, 878), cv2.GaussianBlur(mask, (41, 41), 0))

    def jobs(batch: int) -> list[FaceJob]:
        return synthetic_jobs(pipeline, batch)

    pipeline.render(jobs(1))  # warm-up
    header = f"{'batch':>5} {'frames/s':>9} {'ms/frame':>9} | {'UNet':>9} {'VAE dec':>9} {'composite':>9}  (ms per frame)"
    print(header)
    for batch in batches:
        batch_jobs = jobs(batch)
        if pipeline.buckets:
            start = time.perf_counter()
            pipeline.render(batch_jobs)
            print(f"  batch {batch}: first (compiling) batch took {time.perf_counter() - start:.1f} s")
        pipeline.times.reset()
        wall = 0.0
        iterations = 0
        for _ in range(args.iterations):
            start = time.perf_counter()
            faces = pipeline.render(batch_jobs)
            wall += time.perf_counter() - start
            iterations += 1
            if wall > args.budget_s:
                break
        # At least 20 composites, so a batch of 1 does not time one cold call.
        rounds = max(1, -(-20 // len(faces)))
        start = time.perf_counter()
        for _ in range(rounds):
            for face in faces:
                composite(frame, face, plan)
        composite_ms = (time.perf_counter() - start) / (rounds * len(faces)) * 1e3
        times = pipeline.times
        frames = times.frames
        per = 1e3 / frames
        total_ms = wall * per + composite_ms
        print(
            f"{batch:>5} {1e3 / total_ms:>9.2f} {total_ms:>9.1f} | {times.unet * per:>9.1f} "
            f"{times.vae * per:>9.1f} {composite_ms:>9.2f}  ({iterations} it, {wall / iterations:.2f} s per batch)",
            flush=True,
        )
        if args.json is not None:
            row = {
                "batch": batch,
                "device": device_name,
                "dtype": str(models.dtype).removeprefix("torch."),
                "compile": args.compile,
                "fps": 1e3 / total_ms,
                "ms_per_frame": total_ms,
                "features_ms_per_answer": min(encode_s) * 1e3,
                "unet_ms": times.unet * per,
                "vae_ms": times.vae * per,
                "composite_ms": composite_ms,
                "batch_ms": wall / iterations * 1e3,
            }
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if wall / iterations > args.budget_s:
            remaining = [str(b) for b in batches if b > batch]
            if remaining:
                print(
                    f"skipped batch {', '.join(remaining)}: one batch of {batch} took {wall / iterations:.0f} s (> --budget-s)"
                )
            break


if __name__ == "__main__":
    main()
