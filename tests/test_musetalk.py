"""MuseTalk v1.5 path on CPU with tiny models in the official layout: loading and key checks, audio
features and template latents against upstream's computation, the compositor, cross-session batching,
the renderer behind the seam, and the adaptive quality policy."""

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


@pytest.fixture(scope="module")
def upstream_tokens(models_dir: Path) -> Any:
    """Upstream's per-frame features for a whole clip, computed the way its AudioProcessor does, from
    transformers' own pieces: the feature extractor on each <= 30 s segment (it pads to 30 s and
    normalises the padded segment), WhisperModel's encoder with hidden states over all positions, the
    five states stacked, trimmed to floor(seconds * 50), 4 zero steps in front and 12 behind, frame f
    taking steps [2f, 2f + 10)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperModel

    extractor = WhisperFeatureExtractor.from_pretrained(str(models_dir / "whisper"))
    whisper = WhisperModel.from_pretrained(str(models_dir / "whisper")).eval()

    def tokens(pcm: np.ndarray) -> np.ndarray:
        audio = pcm.astype(np.float32) / 32768.0
        segment = 30 * SAMPLE_RATE
        parts = []
        for lo in range(0, len(audio), segment):
            mel = extractor(audio[lo : lo + segment], sampling_rate=SAMPLE_RATE, return_tensors="pt")
            with torch.no_grad():
                hidden = whisper.encoder(mel.input_features, output_hidden_states=True).hidden_states
            parts.append(torch.stack(hidden, dim=2)[0])
        states = torch.cat(parts)[: int(np.floor(len(audio) / SAMPLE_RATE * 50))].numpy()
        padded = np.concatenate([np.zeros((4, *states.shape[1:])), states, np.zeros((12, *states.shape[1:]))])
        frames = int(np.floor(len(audio) / SAMPLE_RATE * 25))
        return np.stack([padded[2 * f : 2 * f + 10].reshape(50, -1) for f in range(frames)]).astype(
            np.float32
        )

    return tokens


def _relative_error(mine: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(mine - reference) / np.linalg.norm(reference))


def _drain(renderer: Any) -> dict[int, np.ndarray]:
    """Every frame the renderer is ready to make now, with the tokens it would make it from."""
    tokens: dict[int, np.ndarray] = {}
    while jobs := renderer._ready_jobs():
        for job, row in zip(jobs, renderer.frame_tokens(jobs), strict=True):
            assert job.index not in tokens
            tokens[job.index] = row.float().numpy()
    return tokens


def test_features_of_a_clip_handed_over_whole_are_upstreams(
    engine: Any, template: Template, upstream_tokens: Any
) -> None:
    """A clip pushed whole (as the speaker hands over a sentence) gets exactly upstream's features, 30 s
    segments included. The windowed features this replaced were 1.1 apart (relative L2)."""
    from avatar_rtc.render.musetalk.renderer import MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    audio = _speech(31.0, seed=3)  # past whisper's 30 s: two segments, frames straddling the seam
    start = 0.4  # frame 10
    renderer.push_audio(audio, start)
    renderer.flush()
    tokens = _drain(renderer)
    assert sorted(tokens) == list(range(10, 10 + int(np.ceil(31.0 * 25))))
    reference = upstream_tokens(audio)
    mine = np.stack([tokens[10 + f] for f in range(len(reference))])
    error = _relative_error(mine, reference)
    seam = slice(30 * 25 - 3, 30 * 25 + 3)
    seam_error = _relative_error(mine[seam], reference[seam])
    print(f"\nclip handed over whole: relative L2 {error:.2e} (30 s seam {seam_error:.2e}) against upstream")
    assert error <= 1e-4 and seam_error <= 1e-4  # the target is 0.01
    assert mine.shape == (len(reference), 50, TINY_FEATURE_WIDTH)


def test_sentences_of_one_answer_keep_their_context(
    engine: Any, template: Template, upstream_tokens: Any
) -> None:
    """Sentences pushed back to back (flushed after each, as the speaker does) are one answer: each
    sentence's frames get upstream's features of the answer up to that sentence, and frames already made
    are never remade. Against features of the whole answer at once, the error left (later sentences'
    audio is not known yet) is printed and bounded, and is smaller than treating each sentence alone."""
    from avatar_rtc.render.musetalk.renderer import MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    sentences = [_speech(1.32, seed=1), _speech(0.88, seed=2) // 2, _speech(1.6, seed=3)]
    start = 0.2
    made: dict[int, np.ndarray] = {}
    so_far = np.zeros(0, np.int16)
    for sentence in sentences:
        renderer.push_audio(sentence, start + len(so_far) / SAMPLE_RATE)
        renderer.flush()
        first = 5 + len(so_far) * 25 // SAMPLE_RATE
        so_far = np.concatenate([so_far, sentence])
        new = _drain(renderer)
        assert sorted(new) == list(range(first, 5 + len(so_far) * 25 // SAMPLE_RATE))
        assert not set(new) & set(made)  # made once, never again
        made.update(new)
        # Exactly upstream's features of the answer so far, for this sentence's frames.
        reference = upstream_tokens(so_far)
        mine = np.stack([new[i] for i in sorted(new)])
        assert _relative_error(mine, reference[first - 5 :]) <= 1e-4
    assert renderer._answer.features.encodes == len(sentences)  # one encoder run per sentence

    whole = upstream_tokens(so_far)
    mine = np.stack([made[5 + f] for f in range(len(whole))])
    alone = np.concatenate([upstream_tokens(s) for s in sentences])  # each sentence its own clip
    error, alone_error = _relative_error(mine, whole), _relative_error(alone, whole)
    print(
        f"\nanswer of 3 sentences against the whole answer: relative L2 {error:.3f} with context, "
        f"{alone_error:.3f} with each sentence alone"
    )
    assert error < alone_error
    assert error <= 0.2  # measured 0.113 on the tiny random whisper (seeded)


def test_audio_arriving_piecemeal_is_a_measured_approximation(
    engine: Any, template: Template, upstream_tokens: Any
) -> None:
    """A stream that arrives in small pieces: each frame waits lookahead_s of audio and gets upstream's
    features of the audio so far. Its error against the whole clip is printed and bounded."""
    from avatar_rtc.render.musetalk.renderer import MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    # Louder as it goes, as speech often is after a quiet start: the log-mel floor (max - 8) of the audio
    # so far moves as louder audio arrives, which is most of this approximation's error here.
    audio = (_speech(3.0, seed=4) * np.linspace(0.05, 1.0, 3 * SAMPLE_RATE)).astype(np.int16)
    rng = np.random.default_rng(2)
    made: dict[int, np.ndarray] = {}
    lo = 0
    while lo < len(audio):
        n = int(rng.integers(160, 4000))
        renderer.push_audio(audio[lo : lo + n], lo / SAMPLE_RATE)
        lo += n
        made.update(_drain(renderer))
    renderer.flush()
    made.update(_drain(renderer))
    reference = upstream_tokens(audio)
    mine = np.stack([made[f] for f in range(len(reference))])
    error = _relative_error(mine, reference)
    print(
        f"\npiecemeal stream (lookahead {renderer.lookahead_s * 1e3:.0f} ms): relative L2 {error:.2e} "
        "against the whole clip"
    )
    assert error <= 0.02  # measured 4.4e-3 on the tiny random whisper (seeded)


def test_lookahead_is_explicit_and_what_frames_wait_for(engine: Any, template: Template) -> None:
    from avatar_rtc.render.musetalk.renderer import MuseTalkRenderer

    renderer = MuseTalkRenderer(engine, template, engine.template_faces(template))
    assert renderer.lookahead_s >= 0.12  # the frame's own steps reach 120 ms past it
    assert renderer.lookahead_s == pytest.approx((6 + 4 + 0.5) / 50)  # the engine's 4 steps of right context
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
    jobs = [
        FaceJob(faces.latents[index], _tokens(engine, _speech(1.0, seed), offset))
        for index, seed, offset in ((0, 1, 0.2), (7, 2, 0.5), (20, 3, 0.32))
    ]
    pipeline = engine.pipeline
    together = pipeline.generate(
        torch.stack([j.latents for j in jobs]), torch.stack([j.tokens for j in jobs])
    )
    for i, job in enumerate(jobs):
        alone = pipeline.generate(job.latents[None], job.tokens[None])
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

    half = MuseTalkPipeline(load_models(models_dir, device="cpu", dtype="float16"))
    assert half.models.dtype == torch.float16
    faces = engine.template_faces(template)
    jobs = [
        FaceJob(faces.latents[index], _tokens(engine, _speech(1.0, seed), offset))
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
            FaceJob(faces.latents[i * 5], _tokens(engine, _speech(1.0, i), 0.2 + 0.1 * i)) for i in range(3)
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
        job = FaceJob(faces.latents[0], _tokens(engine, _speech(1.0), 0.3))
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


def _tokens(engine: Any, pcm: np.ndarray, offset: float) -> Any:
    """The (50, D) tokens of the frame ``offset`` seconds into the clip ``pcm``."""
    from avatar_rtc.render.musetalk.features import ClipFeatures

    return ClipFeatures(engine.pipeline.features).frame_tokens(pcm, [offset])[0]


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


async def test_worker_thread_is_one_per_engine(engine: Any, ready_template: Template) -> None:
    """Sessions share the engine's one batching thread: opening several and rendering with all of them
    at once starts no thread of their own, and every forward runs on that one thread."""

    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("musetalk-")}

    before = workers()
    # The engines other tests make (compiled, degraded) are closed by now: only the shared one is left.
    assert [t.name for t in before] == [f"musetalk-{engine.models.device}"]
    (worker_thread,) = before

    forward_threads: set[int] = set()
    forward = engine.worker.forward

    def recording(items: Any) -> Any:
        forward_threads.add(threading.get_ident())
        return forward(items)

    seen: list[set[threading.Thread]] = []

    async def watch() -> None:
        while True:
            seen.append(workers())
            await asyncio.sleep(0.01)

    engine.worker.forward = recording
    watcher = asyncio.create_task(watch())
    try:
        renderers = [engine.open(ready_template) for _ in range(3)]
        seen.append(workers())  # right after opening, before any frame
        results = await asyncio.gather(
            *(_collect(r, _speech(0.6, seed=i), start=0.0) for i, r in enumerate(renderers))
        )
    finally:
        watcher.cancel()
        engine.worker.forward = forward
    assert all(len(frames) == 15 for frames in results)
    assert seen and all(threads == before for threads in seen), "a session started a worker thread"
    assert forward_threads == {worker_thread.ident}, "frames were generated off the engine's worker thread"
    assert workers() == before


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


def test_template_latents_are_upstreams_from_a_contiguous_nchw_batch(engine: Any, template: Template) -> None:
    """Template latents against upstream's preprocessing (x / 255, the lower half zeroed, (x - 0.5) / 0.5,
    one contiguous NCHW image) through the same VAE encoder, taking the distribution's mean where upstream
    samples it. A channels-last view (a permute without .contiguous()) changes the encoder's GroupNorm
    numerics: up to 8e-4 relative error even on the tiny VAE, 6.5e-3 on the real one."""
    import torch

    from avatar_rtc.render.musetalk.models import VAE_SCALING
    from avatar_rtc.render.musetalk.prepare import face_box, face_crop

    crops = np.stack(
        [face_crop(template.frames[i], face_box(template.landmarks[i], template.size)) for i in (0, 11)]
    )
    mine = engine.pipeline.encode_faces(crops)
    vae = engine.models.vae
    errors = []
    for crop, latents in zip(crops, mine, strict=True):
        image = torch.from_numpy(crop.transpose(2, 0, 1).astype(np.float32) / 255.0)
        masked = image.clone()
        masked[:, 128:, :] = 0
        for half, pixels in ((latents[:4], masked), (latents[4:], image)):
            with torch.no_grad():
                reference = vae.encode(((pixels - 0.5) / 0.5)[None]).latent_dist.mean[0] * VAE_SCALING
            errors.append(_relative_error(half, reference.numpy()))
    print(f"\ntemplate latents against upstream's preprocessing: relative L2 up to {max(errors):.1e}")
    assert max(errors) <= 1e-5
