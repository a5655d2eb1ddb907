"""MuseTalk v1.5 path on CPU with tiny models in the official layout: loading and key checks, feature
windowing and streaming, the compositor, cross-session batching, the renderer behind the seam, and the
adaptive quality policy."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from musetalk_fixtures import TINY_FEATURE_WIDTH, write_tiny_models

from avatar_rtc.avatar.blend import build_blend_plan, composite
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.avatar.template import Template
from avatar_rtc.render.batching import QUALITY_LEVELS, BatchingWorker, QualityPolicy
from avatar_rtc.render.musetalk import layout
from avatar_rtc.render.musetalk.layout import FETCH_COMMAND, MuseTalkUnavailableError

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("musetalk_models"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    full = TemplateStore(tmp_path_factory.mktemp("templates")).ensure_default()
    # A third of the idle loop is plenty, and keeps VAE-encoding the template quick.
    return Template(id="musetalk_test", fps=full.fps, frames=full.frames[:32], landmarks=full.landmarks[:32])


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Iterator[Any]:
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    # A generous budget: a busy CI machine must not push the shared engine into degraded levels.
    engine = MuseTalkEngine(models_dir, device="cpu", max_batch=8, max_wait_s=0.005, latency_budget_s=30.0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ready_template(engine: Any, template: Template) -> Template:
    """``template`` with its MuseTalk extras, as preparation (or the library's completion) stores them."""
    import dataclasses

    return dataclasses.replace(template, extras=engine.template_extras(template))


def _speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of a harmonic buzz: int16 mono at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buzz = sum(np.sin(2 * np.pi * 140 * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None)
    return (buzz * envelope * 4000).astype(np.int16)


# -- loaders ---------------------------------------------------------------------------------------------
def test_missing_files_are_all_named_with_the_fetch_command(tmp_path: Path, models_dir: Path) -> None:
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    with pytest.raises(MuseTalkUnavailableError) as error:
        MuseTalkEngine(tmp_path / "nothing_here")
    message = str(error.value)
    for entry in layout.REQUIRED_FILES:
        assert entry.local in message
    assert FETCH_COMMAND in message

    partial = tmp_path / "partial"
    shutil.copytree(models_dir, partial)
    (partial / "sd-vae" / "diffusion_pytorch_model.bin").unlink()
    assert [entry.local for entry in layout.missing_files(partial)] == ["sd-vae/diffusion_pytorch_model.bin"]


def test_misnamed_or_missing_keys_are_refused(tmp_path: Path, models_dir: Path) -> None:
    import torch

    from avatar_rtc.render.musetalk.models import ModelWeightsError, load_models

    broken = tmp_path / "broken"
    shutil.copytree(models_dir, broken)
    unet_path = broken / "musetalkV15" / "unet.pth"
    state = torch.load(unet_path, weights_only=True)
    state["conv_in.weights"] = state.pop("conv_in.weight")  # misnamed
    torch.save(state, unet_path)
    with pytest.raises(ModelWeightsError) as error:
        load_models(broken, device="cpu")
    message = str(error.value)
    assert "MuseTalk UNet" in message and str(unet_path) in message
    assert "missing keys (1): conv_in.weight" in message
    assert "unexpected keys (1): conv_in.weights" in message
    assert FETCH_COMMAND in message

    shutil.copy(models_dir / "musetalkV15" / "unet.pth", unet_path)
    vae_path = broken / "sd-vae" / "diffusion_pytorch_model.bin"
    vae_state = torch.load(vae_path, weights_only=True)
    del vae_state["decoder.conv_out.bias"]
    torch.save(vae_state, vae_path)
    with pytest.raises(ModelWeightsError, match=r"missing keys \(1\): decoder.conv_out.bias"):
        load_models(broken, device="cpu")


def test_the_official_layout_loads_including_old_vae_attention_names(engine: Any, models_dir: Path) -> None:
    import torch

    raw = torch.load(models_dir / "sd-vae" / "diffusion_pytorch_model.bin", weights_only=True)
    assert any(key.endswith("attentions.0.query.weight") for key in raw)  # as in sd-vae-ft-mse's .bin
    models = engine.models
    assert models.feature_width == TINY_FEATURE_WIDTH
    assert models.unet.config.in_channels == 8 and models.unet.config.out_channels == 4
    assert not any(p.is_meta for m in (models.unet, models.vae, models.whisper) for p in m.parameters())


# -- audio features --------------------------------------------------------------------------------------
def test_log_mel_matches_whisper_feature_extractor(engine: Any, models_dir: Path) -> None:
    import torch
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(str(models_dir / "whisper"))
    audio = _speech(2.0).astype(np.float32) / 32768.0
    expected = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    padded = np.zeros(30 * SAMPLE_RATE, np.float32)
    padded[: len(audio)] = audio
    mine = engine.pipeline.features.log_mel(torch.from_numpy(padded)[None])[0].numpy()
    np.testing.assert_allclose(mine, expected, atol=1e-4)


def test_upstream_windowing_uses_documented_indices() -> None:
    from avatar_rtc.render.musetalk.features import window_frames

    steps, width = 25, 3
    # Each state's value encodes (step, state), so every token says where it came from.
    states = np.arange(steps * 5 * width, dtype=np.float32).reshape(steps, 5, width) + 1
    padded = np.concatenate([np.zeros((4, 5, width)), states, np.zeros((12, 5, width))])
    tokens = window_frames(states, n_frames=12)
    assert tokens.shape == (12, 50, width)
    for f in range(12):
        np.testing.assert_array_equal(tokens[f], padded[2 * f : 2 * f + 10].reshape(50, width))
    # Frame 0 starts with the 4 front zero steps; frame 1 with 2 of them.
    assert not tokens[0][:20].any() and tokens[0][20:].all()
    assert not tokens[1][:10].any() and tokens[1][10:].all()


def test_streaming_windows_pick_the_documented_steps() -> None:
    """The per-frame windows, cut to the frame's steps, give exactly upstream's padded steps [2f, 2f+10),
    zeros outside the utterance included."""
    import torch

    from avatar_rtc.render.musetalk.features import FeatureWindowing, select_frame_steps, window_frames

    windowing = FeatureWindowing(left_context_steps=6, right_context_steps=3)
    seconds = 0.9
    pcm = np.ones(int(seconds * SAMPLE_RATE), np.int16)
    total_steps = int(seconds * 50)
    width = 2
    codes = np.arange(1, total_steps * 5 * width + 1, dtype=np.float32).reshape(total_steps, 5, width)
    frames = int(seconds * 25)
    expected = window_frames(codes, frames)
    for f in range(frames):
        _, lo, hi = windowing.window(pcm, f / 25)
        first = windowing.first_step(f / 25)
        # What an encoder that reproduced its input step codes would give over this window.
        window_states = np.zeros((windowing.window_steps, 5, width), np.float32)
        for j in range(windowing.window_steps):
            if 0 <= first + j < total_steps:
                window_states[j] = codes[first + j]
        tokens = select_frame_steps(
            torch.from_numpy(window_states)[None], torch.tensor([[lo, hi]]), windowing.left_context_steps
        )
        np.testing.assert_array_equal(tokens[0].numpy(), expected[f])


def test_streamed_features_equal_whole_file_features(engine: Any, template: Template) -> None:
    from avatar_rtc.render.musetalk.renderer import MuseTalkFrameJob, MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    audio = _speech(1.7, seed=3)
    start = 0.4  # frame 10
    rng = np.random.default_rng(1)
    jobs: list[MuseTalkFrameJob] = []
    lo = 0
    while lo < len(audio):
        n = int(rng.integers(40, 3000))
        renderer.push_audio(audio[lo : lo + n], start + lo / SAMPLE_RATE)
        lo += n
        while batch := renderer._ready_jobs():
            jobs.extend(batch)  # type: ignore[arg-type]
    renderer.flush()
    while batch := renderer._ready_jobs():
        jobs.extend(batch)  # type: ignore[arg-type]
    assert [job.index for job in jobs] == list(range(10, 10 + int(np.ceil(1.7 * 25))))

    offsets = [job.index / 25 - start for job in jobs]
    whole_windows, whole_valid = engine.windowing.windows(audio, offsets)
    streamed_windows = np.stack([job.audio for job in jobs])
    streamed_valid = np.array([job.valid for job in jobs])
    np.testing.assert_array_equal(streamed_windows, whole_windows)
    np.testing.assert_array_equal(streamed_valid, whole_valid)
    streamed = engine.pipeline.tokens(streamed_windows, streamed_valid).numpy()
    whole = engine.pipeline.tokens(whole_windows, whole_valid).numpy()
    np.testing.assert_array_equal(streamed, whole)
    assert streamed.shape == (len(jobs), 50, TINY_FEATURE_WIDTH)
    assert not streamed[-1, -5:].any()  # the last frame's last step lies past the audio: zero, as upstream


def test_lookahead_is_explicit_and_what_frames_wait_for(engine: Any, template: Template) -> None:
    from avatar_rtc.render.musetalk.renderer import MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    assert renderer.lookahead_s >= 0.12  # the frame's own steps reach 120 ms past it
    assert renderer.lookahead_s == pytest.approx((6 + engine.windowing.right_context_steps + 0.5) / 50)
    chunk = 80  # 5 ms
    audio = _speech(1.0)
    waited: dict[int, float] = {}
    for lo in range(0, len(audio), chunk):
        renderer.push_audio(audio[lo : lo + chunk], lo / SAMPLE_RATE)
        known = (lo + chunk) / SAMPLE_RATE
        while batch := renderer._ready_jobs():
            waited.update({job.index: known - job.index / 25 for job in batch})
    # Measured: every frame became ready exactly once lookahead_s of audio after it was known.
    lookahead = renderer.lookahead_s
    assert sorted(waited) == list(range(int((1.0 - lookahead) * 25) + 1))  # the rest wait for a flush
    assert all(lookahead - 1e-9 <= w < lookahead + chunk / SAMPLE_RATE for w in waited.values())


# -- compositing -----------------------------------------------------------------------------------------
def test_composite_blends_only_the_masked_box() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (360, 640, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = np.zeros((256, 256), np.uint8)
    mask[128:, 40:216] = 255
    mask[128:140] = 128
    box = (300, 100, 420, 260)
    plan = build_blend_plan((640, 360), box, mask)
    out = composite(frame, face, plan)
    assert out is not frame and out.shape == frame.shape
    changed = np.argwhere((out != frame).any(axis=2))
    assert changed[:, 0].min() >= 100 + 60 and changed[:, 0].max() < 260
    assert changed[:, 1].min() >= 300 and changed[:, 1].max() < 420
    # Against a float reference: resize the face to the box, lerp by the resized mask.
    import cv2

    face_box = cv2.resize(face, (120, 160), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    alpha = cv2.resize(mask, (120, 160), interpolation=cv2.INTER_LINEAR).astype(np.float32)[..., None] / 255
    expected = frame.astype(np.float32)
    expected[100:260, 300:420] = face_box * alpha + expected[100:260, 300:420] * (1 - alpha)
    assert np.abs(out.astype(np.float32) - expected).max() <= 2.0  # three uint8 roundings

    offside = build_blend_plan((640, 360), (600, 300, 720, 460), mask)  # box hanging off the frame
    out = composite(frame, face, offside)
    assert out.shape == frame.shape and (out[:, :600] == frame[:, :600]).all()


def test_template_data_box_crop_and_mask(template: Template) -> None:
    from avatar_rtc.avatar import face
    from avatar_rtc.render.musetalk.prepare import NOSE_BRIDGE_LOWER, geometry

    data = geometry(template)
    box, crop, mask = data["musetalk_bbox"][0], data["musetalk_crop"][0], data["musetalk_mask"][0]
    landmarks = template.landmarks[0]
    nose_y, chin_y = landmarks[NOSE_BRIDGE_LOWER, 1], landmarks[face.CHIN, 1]
    assert box[3] == pytest.approx(chin_y + 10, abs=2)
    assert box[1] == pytest.approx(nose_y - (chin_y - nose_y), abs=2)
    half = int(max(box[2] - box[0], box[3] - box[1]) // 2 * 1.5)
    assert crop[2] - crop[0] == 2 * half and crop[3] - crop[1] == 2 * half
    assert mask.dtype == np.uint8 and mask.max() == 255
    rows = np.flatnonzero(mask.any(axis=1))
    assert rows[0] > 256 * 0.4  # lower face only
    mouth = landmarks[face.LOWER_LIP_OUTER_CENTRE]
    mouth_row = int((mouth[1] - box[1]) / (box[3] - box[1]) * 256)
    mouth_col = int((mouth[0] - box[0]) / (box[2] - box[0]) * 256)
    assert mask[mouth_row, mouth_col] == 255
    assert mask[:, 0].max() < 64 and mask[:, -1].max() < 64  # feathered out before the box's sides


def test_template_data_round_trips_through_the_store(engine: Any, template: Template, tmp_path: Path) -> None:
    from avatar_rtc.render.musetalk.prepare import has_current_data, musetalk_template_data

    data = musetalk_template_data(template, engine.pipeline, engine.latents_key)
    assert data["musetalk_latents"].shape == (template.frame_count, 8, 32, 32)
    stored = Template(template.id, template.fps, template.frames, template.landmarks, extras=data)
    store = TemplateStore(tmp_path)
    store.save(stored)
    loaded = store.load(template.id)
    assert has_current_data(loaded, engine.latents_key)
    assert not has_current_data(loaded, "0" * 32)  # another VAE or dtype: recompute
    faces = engine.template_faces(loaded)
    np.testing.assert_array_equal(faces.latents.numpy(), data["musetalk_latents"])


# -- batching --------------------------------------------------------------------------------------------
def test_three_sessions_in_one_batch_equal_each_alone(engine: Any, template: Template) -> None:
    import torch

    from avatar_rtc.render.musetalk.pipeline import FaceJob

    faces = engine.template_faces(template)
    windowing = engine.windowing
    jobs = [
        FaceJob(faces.latents[index], *_window(windowing, _speech(1.0, seed), offset))
        for index, seed, offset in ((0, 1, 0.2), (7, 2, 0.5), (20, 3, 0.32))
    ]
    pipeline = engine.pipeline
    together = pipeline.generate(torch.stack([j.latents for j in jobs]), pipeline.tokens(*_stack(jobs)))
    for i, job in enumerate(jobs):
        alone = pipeline.generate(job.latents[None], pipeline.tokens(*_stack([job])))
        # fp32 kernels pick batch-size-dependent algorithms, so "equal" is to float rounding: 0.05 of
        # 255 (measured ~0.01), far below one uint8 step.
        torch.testing.assert_close(together[i : i + 1], alone, atol=0.05, rtol=0)
    assert not torch.allclose(together[0], together[1])  # different sessions, different faces

    # Through the shared worker: one forward for all three, each result back to its own session.
    worker = BatchingWorker(pipeline.render, max_batch=3, max_wait_s=10.0)
    try:
        with worker._cond:  # all three are in before the worker looks; full, so it runs them at once
            futures = [worker.submit(job, time.monotonic() + 30.0) for job in jobs]
        results = [f.result(timeout=30) for f in futures]
    finally:
        worker.close()
    assert worker.batch_sizes == [3]
    for i, job in enumerate(jobs):
        alone = pipeline.render([job])[0]
        assert np.abs(results[i].astype(int) - alone.astype(int)).max() <= 1


def test_half_precision_as_on_a_gpu_matches_fp32(engine: Any, models_dir: Path, template: Template) -> None:
    """The GPU runs fp16; the same dtype path runs here on CPU, from the same files."""
    import torch

    from avatar_rtc.render.musetalk.models import load_models
    from avatar_rtc.render.musetalk.pipeline import FaceJob, MuseTalkPipeline

    half = MuseTalkPipeline(load_models(models_dir, device="cpu", dtype="float16"), engine.windowing)
    assert half.models.dtype == torch.float16
    faces = engine.template_faces(template)
    jobs = [
        FaceJob(faces.latents[index], *_window(engine.windowing, _speech(1.0, seed), offset))
        for index, seed, offset in ((0, 1, 0.2), (9, 2, 0.44))
    ]
    full_faces = np.stack(engine.pipeline.render(jobs)).astype(int)
    half_faces = np.stack(half.render(jobs)).astype(int)
    # Measured: at most 2 of 255 apart, 0.1 on average.
    assert np.abs(half_faces - full_faces).max() <= 8
    assert np.abs(half_faces - full_faces).mean() < 1.0
    crops = np.ascontiguousarray(template.frames[:2, :256, :256, ::-1])
    half_latents = half.encode_faces(crops)
    full_latents = engine.pipeline.encode_faces(crops)
    assert half_latents.dtype == np.float32 and half_latents.shape == (2, 8, 32, 32)
    assert np.abs(half_latents - full_latents).max() < 0.05 * np.abs(full_latents).max()


def test_batch_buckets_bound_the_compiled_shapes() -> None:
    from avatar_rtc.render.musetalk.pipeline import batch_buckets

    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_compiled_engine_warms_every_batch_size_then_never_recompiles(
    models_dir: Path, engine: Any, template: Template, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile with a backend that records each graph it is given (inductor would take minutes
    per shape on 2 cores; the padding and warm-up logic is the same)."""
    import torch

    from avatar_rtc.render.musetalk.pipeline import FaceJob
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    graphs: list[str] = []
    compile_threads: set[str] = set()

    def recording_backend(graph: Any, example_inputs: Any) -> Any:
        graphs.append(str(graph))
        compile_threads.add(threading.current_thread().name)
        return graph.forward

    real_compile = torch.compile

    def compile_with_recording_backend(model: Any, **options: Any) -> Any:
        return real_compile(model, backend=recording_backend, dynamic=options.get("dynamic"))

    monkeypatch.setattr(torch, "compile", compile_with_recording_backend)
    torch._dynamo.reset()
    compiled = MuseTalkEngine(
        models=engine.models,
        compile_mode="reduce-overhead",
        max_batch=4,
        max_wait_s=0.0,
        latency_budget_s=30.0,
    )
    try:
        assert compiled.pipeline.buckets == (1, 2, 4)
        warmed = len(graphs)
        assert warmed >= 3  # at least one graph per batch size
        assert compile_threads == {f"musetalk-{engine.models.device}"}  # on the worker's thread

        faces = engine.template_faces(template)
        jobs = [
            FaceJob(faces.latents[i * 5], *_window(engine.windowing, _speech(1.0, i), 0.2 + 0.1 * i))
            for i in range(3)
        ]
        for batch in (jobs, jobs[:2], jobs[:1]):  # 3 pads to 4; 2 and 1 are buckets themselves
            together = compiled.pipeline.render(batch)
            assert len(together) == len(batch)
            for face, alone in zip(together, engine.pipeline.render(batch), strict=True):
                assert np.abs(face.astype(int) - alone.astype(int)).max() <= 1
        assert len(graphs) == warmed  # no batch size compiled again
        with pytest.raises(ValueError, match="exceeds the compiled maximum"):
            compiled.pipeline.render(jobs + jobs)
    finally:
        compiled.close()
        torch._dynamo.reset()


def test_a_failing_compiler_leaves_the_engine_running_uncompiled(
    engine: Any, template: Template, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    from avatar_rtc.render.musetalk.pipeline import FaceJob
    from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

    def broken_backend(graph: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no working C++ compiler")

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **options: real_compile(model, backend=broken_backend)
    )
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        compiled = MuseTalkEngine(models=engine.models, compile_mode="default", max_batch=2, max_wait_s=0.0)
    try:
        assert "torch.compile (default) failed, running uncompiled" in caplog.text
        assert "no working C++ compiler" in caplog.text
        assert compiled.pipeline.buckets == () and compiled.pipeline.compile_mode is None
        faces = engine.template_faces(template)
        job = FaceJob(faces.latents[0], *_window(engine.windowing, _speech(1.0), 0.3))
        assert np.array_equal(compiled.pipeline.render([job])[0], engine.pipeline.render([job])[0])
    finally:
        compiled.close()
        torch._dynamo.reset()


def test_worker_runs_calls_on_its_own_thread() -> None:
    worker: BatchingWorker[int, int] = BatchingWorker(lambda items: list(items), name="one-thread")
    try:
        assert worker.run_on_worker(lambda: threading.current_thread().name).result(timeout=5) == "one-thread"

        def failing() -> None:
            raise RuntimeError("compile failed")

        with pytest.raises(RuntimeError, match="compile failed"):
            worker.run_on_worker(failing).result(timeout=5)
        assert worker.submit(3, time.monotonic()).result(timeout=5) == 3  # still serving batches
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.run_on_worker(lambda: None)


def _window(windowing: Any, pcm: np.ndarray, offset: float) -> tuple[np.ndarray, tuple[int, int]]:
    window, lo, hi = windowing.window(pcm, offset)
    return window, (lo, hi)


def _stack(jobs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([j.window for j in jobs]), np.array([j.valid for j in jobs])


def test_worker_waits_for_a_batch_only_while_deadlines_allow() -> None:
    calls: list[list[int]] = []

    def forward(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [item * 10 for item in items]

    worker: BatchingWorker[int, int] = BatchingWorker(forward, max_batch=4, max_wait_s=0.3)
    try:
        now = time.monotonic()
        # Far deadlines: gathered into batches of max_batch, most urgent first.
        with worker._cond:
            futures = [worker.submit(i, now + 10 - i) for i in range(6)]
        assert [f.result(timeout=5) for f in futures] == [0, 10, 20, 30, 40, 50]
        assert calls[0] == [5, 4, 3, 2] and calls[1] == [1, 0]
        # An item due now is not held back to fill a batch.
        calls.clear()
        started = time.monotonic()
        assert worker.submit(7, time.monotonic()).result(timeout=5) == 70
        assert time.monotonic() - started < 0.2 and calls == [[7]]
        # A cancelled item (its session was cleared) is never rendered.
        with worker._cond:
            dropped = worker.submit(8, time.monotonic() + 10)
            dropped.cancel()
            kept = worker.submit(9, time.monotonic() + 10)
        assert kept.result(timeout=5) == 90 and all(8 not in batch for batch in calls)
    finally:
        worker.close()

    def failing(items: list[int]) -> list[int]:
        raise RuntimeError("device lost")

    broken: BatchingWorker[int, int] = BatchingWorker(failing, max_batch=2, max_wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            broken.submit(1, time.monotonic()).result(timeout=5)
    finally:
        broken.close()


def test_quality_policy_degrades_in_order_and_recovers_with_hysteresis() -> None:
    now = [0.0]
    policy = QualityPolicy(
        window=4, degrade_misses=2, min_dwell_s=1.0, recover_after_s=3.0, clock=lambda: now[0]
    )
    seen: list[str] = []
    policy.add_listener(seen.append)

    def batches(slack: float, count: int, step: float = 0.1) -> None:
        for _ in range(count):
            now[0] += step
            policy.observe(slack)

    batches(0.02, 10)
    assert policy.level == "full"
    batches(-0.01, 1)
    assert policy.level == "full"  # one miss is noise
    batches(-0.01, 1)
    assert policy.level == "short_wait"
    batches(-0.01, 3)  # still missing, but the new level has not had its dwell time
    assert policy.level == "short_wait"
    batches(-0.01, 20)
    assert seen == ["short_wait", "half_rate", "cpu_fallback"]
    batches(0.02, 20)  # 2 s clean: not yet
    assert policy.level == "cpu_fallback"
    batches(0.02, 15)
    assert policy.level == "half_rate"  # one level back up at a time
    batches(0.001, 40)  # on time but without margin: stays
    assert policy.level == "half_rate"
    assert tuple(seen) == (*QUALITY_LEVELS[1:], "half_rate")


# -- the renderer behind the seam ------------------------------------------------------------------------
async def _collect(renderer: Any, audio: np.ndarray, start: float, piece: int = 6400) -> list[Any]:
    frames: list[Any] = []

    async def pump() -> None:
        async for frame in renderer.frames():
            frames.append(frame)

    task = asyncio.create_task(pump())
    for lo in range(0, len(audio), piece):
        renderer.push_audio(audio[lo : lo + piece], start + lo / SAMPLE_RATE)
        await asyncio.sleep(0)
    renderer.flush()
    expected = int(np.ceil((start + len(audio) / SAMPLE_RATE) * 25 - 1e-6)) - int(np.ceil(start * 25 - 1e-6))
    for _ in range(600):
        if len(frames) >= expected:
            break
        await asyncio.sleep(0.05)
    await renderer.aclose()
    await asyncio.wait_for(task, 5)
    return frames


async def test_engine_renders_speech_into_the_face_region(engine: Any, ready_template: Template) -> None:
    from avatar_rtc.render.base import Renderer

    renderer = engine.open(ready_template)
    assert isinstance(renderer, Renderer) and engine.name == "musetalk"
    assert renderer.sample_rate == 16000 and renderer.lookahead_s >= 0.12
    events: list[dict[str, Any]] = []
    renderer.emit_event = events.append
    # As MediaClock.now, started well before the speech: deadlines a 2-core test machine can meet (the
    # degraded levels have their own test).
    clock_start = time.monotonic() + 30.0
    renderer.media_clock = lambda: time.monotonic() - clock_start
    frames = await _collect(renderer, _speech(2.0), start=0.2)
    indices = [f.index for f in frames]
    assert indices == list(range(5, 5 + 50))
    faces = engine.template_faces(ready_template)
    for frame in frames[::10]:
        tpl_index = ready_template.loop_index(frame.index)
        original = ready_template.frames[tpl_index]
        plan = faces.plans[tpl_index]
        assert frame.image.shape == original.shape and frame.image.dtype == np.uint8
        changed = (frame.image != original).any(axis=2)
        assert changed[plan.y0 : plan.y1, plan.x0 : plan.x1].mean() > 0.3
        outside = changed.copy()
        outside[plan.y0 : plan.y1, plan.x0 : plan.x1] = False
        assert not outside.any()
    assert events == [{"type": "quality", "level": "full", "renderer": "musetalk"}]


async def test_clear_drops_pending_frames(engine: Any, ready_template: Template) -> None:
    renderer = engine.open(ready_template)
    renderer.push_audio(_speech(2.0), 0.0)
    renderer.clear()
    frames = await _collect(renderer, _speech(0.4), start=5.0)
    assert [f.index for f in frames] == list(range(125, 135))


async def test_degraded_levels_halve_the_rate_then_send_new_sessions_to_the_cpu(
    models_dir: Path, ready_template: Template
) -> None:
    from avatar_rtc.render.musetalk.renderer import CpuFallbackRenderer, MuseTalkEngine, MuseTalkRenderer

    policy = QualityPolicy()
    degraded = MuseTalkEngine(models_dir, device="cpu", policy=policy)
    try:
        running = degraded.open(ready_template)
        assert isinstance(running, MuseTalkRenderer)
        policy.level_index = QUALITY_LEVELS.index("half_rate")
        events: list[dict[str, Any]] = []
        running.emit_event = events.append
        frames = await _collect(running, _speech(1.0), start=0.0)
        assert [f.index for f in frames] == list(range(25))
        for even, odd in zip(frames[0::2], frames[1::2], strict=False):
            assert odd.image is even.image  # generated once, shown twice
        assert degraded.worker.batch_sizes and sum(degraded.worker.batch_sizes) == 13
        assert events == [{"type": "quality", "level": "half_rate", "renderer": "musetalk"}]

        policy.level_index = QUALITY_LEVELS.index("cpu_fallback")
        assert running.quality_level == "half_rate"  # running sessions keep going on the GPU
        newcomer = degraded.open(ready_template)
        assert isinstance(newcomer, CpuFallbackRenderer) and newcomer.quality_level == "cpu_fallback"
        newcomer.emit_event = events.append
        frames = await _collect(newcomer, _speech(0.4), start=0.0)
        assert [f.index for f in frames] == list(range(10))
        assert events[-1] == {"type": "quality", "level": "cpu_fallback", "renderer": "fallback"}
    finally:
        degraded.close()


def test_importing_the_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, avatar_rtc.render.musetalk, avatar_rtc.render.batching, avatar_rtc.avatar.blend; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_worker_thread_is_one_per_engine(engine: Any) -> None:
    names = [t.name for t in threading.enumerate() if t.name.startswith("musetalk-")]
    assert names.count(f"musetalk-{engine.models.device}") >= 1


async def test_a_failed_forward_shows_the_idle_frame_and_keeps_going(
    engine: Any, ready_template: Template
) -> None:
    def failing(items: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    forward, engine.worker.forward = engine.worker.forward, failing
    try:
        frames = await _collect(engine.open(ready_template), _speech(0.4), start=0.0)
    finally:
        engine.worker.forward = forward
    assert [f.index for f in frames] == list(range(10))
    for frame in frames:
        assert np.array_equal(frame.image, ready_template.frames[ready_template.loop_index(frame.index)])
