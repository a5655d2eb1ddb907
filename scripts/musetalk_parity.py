"""Parity of avatar_rtc's MuseTalk path against upstream MuseTalk's own code, on the same weights.

    python scripts/musetalk_parity.py --upstream ~/src/MuseTalk          # tiny seeded models, ~1 min
    python scripts/musetalk_parity.py --upstream ~/src/MuseTalk --size full --frames 6

``--upstream`` is a checkout of github.com/TMElyralab/MuseTalk. Nothing of it is copied here: its modules
are imported from that directory at run time. The script writes one set of seeded random weights in the
official layout (musetalkV15/, sd-vae/, whisper/; ``--size tiny`` shrinks the widths as the tests do,
``--size full`` uses the real architectures), synthesises speech with espeak-ng, takes one face crop from
the default template, runs both sides and prints:

- features: relative L2 of our per-frame whisper tokens against ``AudioProcessor.get_whisper_chunk``;
- latents: relative L2 of our template latents against upstream's ``VAE.get_latents_for_unet``, with the
  posterior's mean on both sides (upstream draws a sample; the sample's own distance is printed too);
- faces: PSNR of our generated faces against upstream's UNet + ``decode_latents``, fed our own features
  and latents, and fed upstream's;
- compositing: PSNR of our compositor against upstream's ``get_image_blending`` on the same face, mask
  and box, over the face box.

Upstream's imports that this environment may lack are stood in for, and only where absent: ``librosa``
(only ``librosa.load`` is used, on the 16 kHz wav written here, read with the wave module) and
``torchvision`` (only ``transforms.Normalize`` is used). einops is needed: ``pip install -e .[parity]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import types
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SAMPLE_RATE = 16000
FPS = 25
DEFAULT_TEXT = (
    "Hello there, and welcome. I can answer questions about the weather, the news, or your calendar. "
    "What would you like to talk about today?"
)


# -- seeded weights in the official layout -----------------------------------------------------------
def model_configs(size: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """UNet, VAE and whisper configs: the published architectures, or the tests' tiny widths."""
    from avatar_rtc.render.musetalk.models import MUSETALK_V15_UNET_CONFIG, SD_VAE_CONFIG

    unet, vae = dict(MUSETALK_V15_UNET_CONFIG), dict(SD_VAE_CONFIG)
    # openai/whisper-tiny's encoder; a one-layer decoder, which nothing here runs.
    whisper: dict[str, Any] = {
        "d_model": 384,
        "encoder_layers": 4,
        "encoder_attention_heads": 6,
        "encoder_ffn_dim": 1536,
        "decoder_layers": 1,
        "decoder_attention_heads": 6,
        "decoder_ffn_dim": 1536,
        "vocab_size": 64,
        "max_target_positions": 16,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 1,
        "suppress_tokens": [],
        "begin_suppress_tokens": [],
    }
    if size == "tiny":
        width = 32
        unet.update(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8)
        unet["cross_attention_dim"] = width
        vae.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
        whisper.update(
            d_model=width, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_attention_heads=2
        )
        whisper["decoder_ffn_dim"] = 64
    return unet, vae, whisper


def write_seeded_models(models_dir: Path, size: str, seed: int) -> None:
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from avatar_rtc.render.musetalk.models import build_unet, build_vae

    unet_config, vae_config, whisper_config = model_configs(size)
    torch.manual_seed(seed)
    for name in ("musetalkV15", "sd-vae", "whisper"):
        (models_dir / name).mkdir(parents=True, exist_ok=True)
    (models_dir / "musetalkV15" / "musetalk.json").write_text(json.dumps(unet_config, indent=2))
    torch.save(build_unet(unet_config, on_meta=False).state_dict(), models_dir / "musetalkV15" / "unet.pth")
    (models_dir / "sd-vae" / "config.json").write_text(json.dumps(vae_config, indent=2))
    vae = build_vae(vae_config, on_meta=False)
    torch.save(vae.state_dict(), models_dir / "sd-vae" / "diffusion_pytorch_model.bin")
    config = WhisperConfig(**whisper_config)
    config.to_json_file(str(models_dir / "whisper" / "config.json"))
    whisper = WhisperForConditionalGeneration(config)
    torch.save(whisper.state_dict(), models_dir / "whisper" / "pytorch_model.bin")
    WhisperFeatureExtractor().save_pretrained(str(models_dir / "whisper"))


# -- speech ------------------------------------------------------------------------------------------
def synthesize(text: str, path: Path) -> np.ndarray:
    """espeak-ng speech as 16 kHz int16, also written to ``path`` (the file upstream reads)."""
    from avatar_rtc.conversation.audio import resample_pcm

    out = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout", "--", text], capture_output=True, check=True
    )
    raw = Path(path.with_suffix(".espeak.wav"))
    raw.write_bytes(out.stdout)
    with wave.open(str(raw)) as source:
        pcm = np.frombuffer(source.readframes(source.getnframes()), np.int16)
        rate = source.getframerate()
    pcm = resample_pcm(pcm, rate, SAMPLE_RATE)
    with wave.open(str(path), "wb") as target:
        target.setnchannels(1)
        target.setsampwidth(2)
        target.setframerate(SAMPLE_RATE)
        target.writeframes(pcm.tobytes())
    return pcm


def loudest_frames(pcm: np.ndarray, count: int) -> list[int]:
    """The ``count`` frames with the most speech energy (0 = every frame), in order."""
    frames = len(pcm) * FPS // SAMPLE_RATE
    if count <= 0 or count >= frames:
        return list(range(frames))
    per = SAMPLE_RATE // FPS
    energy = [float(np.mean(pcm[f * per : (f + 1) * per].astype(np.float64) ** 2)) for f in range(frames)]
    return sorted(np.argsort(energy)[-count:].tolist())


# -- upstream's code, imported from the checkout -----------------------------------------------------
def _stand_in_librosa() -> types.ModuleType:
    module = types.ModuleType("librosa")

    def load(path: str, sr: int = 22050) -> tuple[np.ndarray, int]:
        with wave.open(path) as source:
            if source.getframerate() != sr or source.getnchannels() != 1 or source.getsampwidth() != 2:
                raise ValueError("the librosa stand-in reads only 16-bit mono wav at the asked rate")
            pcm = np.frombuffer(source.readframes(source.getnframes()), np.int16)
        return pcm.astype(np.float32) / 32768.0, sr

    module.load = load  # type: ignore[attr-defined]
    return module


def _stand_in_torchvision() -> types.ModuleType:
    module = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")

    class Normalize:
        def __init__(self, mean: list[float], std: list[float]) -> None:
            self.mean, self.std = mean, std

        def __call__(self, x: Any) -> Any:
            import torch

            mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
            std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
            return (x - mean) / std

    transforms.Normalize = Normalize  # type: ignore[attr-defined]
    module.transforms = transforms  # type: ignore[attr-defined]
    return module


def import_upstream(upstream: Path) -> tuple[types.SimpleNamespace, list[str]]:
    if not (upstream / "musetalk" / "utils" / "audio_processor.py").is_file():
        raise SystemExit(f"{upstream} is not a MuseTalk checkout (no musetalk/utils/audio_processor.py)")
    # diffusers and transformers probe for optional packages when first imported: let them see what is
    # really installed before any stand-in exists.
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    stood_in = []
    if importlib.util.find_spec("librosa") is None:
        sys.modules["librosa"] = _stand_in_librosa()
        stood_in.append("librosa.load")
    if importlib.util.find_spec("torchvision") is None:
        stand_in = _stand_in_torchvision()
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = stand_in, stand_in.transforms
        stood_in.append("torchvision.transforms.Normalize")
    if importlib.util.find_spec("einops") is None:
        raise SystemExit("upstream's audio module needs einops: pip install -e .[parity]")
    sys.path.insert(0, str(upstream))
    from musetalk.models.unet import PositionalEncoding, UNet
    from musetalk.models.vae import VAE
    from musetalk.utils.audio_processor import AudioProcessor
    from musetalk.utils.blending import get_image_blending

    return types.SimpleNamespace(
        UNet=UNet,
        PositionalEncoding=PositionalEncoding,
        VAE=VAE,
        AudioProcessor=AudioProcessor,
        get_image_blending=get_image_blending,
    ), stood_in


@contextlib.contextmanager
def posterior_mean() -> Iterator[None]:
    """Upstream's encode_latents draws a sample of the latent posterior: make it take the mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    sample = DiagonalGaussianDistribution.sample
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean  # type: ignore[method-assign]
    try:
        yield
    finally:
        DiagonalGaussianDistribution.sample = sample  # type: ignore[method-assign]


# -- measures ----------------------------------------------------------------------------------------
def relative_error(mine: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(mine.astype(np.float64) - reference) / np.linalg.norm(reference))


def psnr(mine: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((mine.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", type=Path, required=True, help="a checkout of TMElyralab/MuseTalk")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--frames", type=int, default=0, help="faces to generate: the loudest N (0 = all)")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where weights and audio go (a temp dir)")
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    upstream, stood_in = import_upstream(args.upstream.resolve())
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="parity-")))
        run(args, upstream, stood_in, workdir)


def run(
    args: argparse.Namespace, upstream: types.SimpleNamespace, stood_in: list[str], workdir: Path
) -> None:
    import torch

    from avatar_rtc.avatar.blend import build_blend_plan, composite
    from avatar_rtc.avatar.store import TemplateStore
    from avatar_rtc.render.musetalk import prepare
    from avatar_rtc.render.musetalk.features import ClipFeatures
    from avatar_rtc.render.musetalk.models import load_models
    from avatar_rtc.render.musetalk.pipeline import FaceJob, MuseTalkPipeline

    started = time.perf_counter()
    models_dir = workdir / "models"
    write_seeded_models(models_dir, args.size, args.seed)
    wav = workdir / "speech.wav"
    pcm = synthesize(args.text, wav)
    frames = loudest_frames(pcm, args.frames)
    print(f"{args.size} seeded weights in {models_dir}; {len(pcm) / SAMPLE_RATE:.2f} s of espeak-ng speech")

    # Ours.
    pipeline = MuseTalkPipeline(load_models(models_dir, device="cpu", dtype="float32"))
    n_frames = len(pcm) * FPS // SAMPLE_RATE
    our_tokens = ClipFeatures(pipeline.features).frame_tokens(pcm, [f / FPS for f in range(n_frames)])

    # Upstream's, as its inference scripts call it (fp32, CPU).
    from transformers import WhisperModel

    whisper_dir = str(models_dir / "whisper")
    processor = upstream.AudioProcessor(feature_extractor_path=whisper_dir)
    whisper = WhisperModel.from_pretrained(whisper_dir).eval()
    features, length = processor.get_audio_feature(str(wav), weight_dtype=torch.float32)
    with torch.no_grad():
        up_tokens = processor.get_whisper_chunk(features, "cpu", torch.float32, whisper, length, fps=FPS)
    feature_error = relative_error(our_tokens.numpy(), up_tokens.numpy())

    # One face crop from the default template.
    template = TemplateStore(workdir / "templates").ensure_default()
    frame_bgr = template.frames[0]
    box = prepare.face_box(template.landmarks[0], template.size)
    crop_rgb = prepare.face_crop(frame_bgr, box)
    our_latents = pipeline.encode_faces(crop_rgb[None])[0]
    up_vae = upstream.VAE(model_path=str(models_dir / "sd-vae"), use_float16=False)
    crop_bgr = np.ascontiguousarray(crop_rgb[..., ::-1])
    with posterior_mean():
        up_latents = up_vae.get_latents_for_unet(crop_bgr)[0].numpy()
    sampled = up_vae.get_latents_for_unet(crop_bgr)[0].numpy()
    latent_error = relative_error(our_latents, up_latents)
    masked_error = relative_error(our_latents[:4], up_latents[:4])

    # Faces: upstream's UNet at t=0 with its positional encoding, then its decode_latents (BGR uint8).
    up_unet = upstream.UNet(
        unet_config=str(models_dir / "musetalkV15" / "musetalk.json"),
        model_path=str(models_dir / "musetalkV15" / "unet.pth"),
        device=torch.device("cpu"),
    )
    positional = upstream.PositionalEncoding(d_model=pipeline.models.feature_width)
    timesteps = torch.tensor([0])
    up_faces, ours_own, ours_fed = [], [], []
    for lo in range(0, len(frames), 8):
        batch = frames[lo : lo + 8]
        latents = torch.from_numpy(up_latents)[None].repeat(len(batch), 1, 1, 1)
        with torch.no_grad():
            audio = positional(up_tokens[batch])
            predicted = up_unet.model(latents, timesteps, encoder_hidden_states=audio).sample
            up_faces.extend(up_vae.decode_latents(predicted))
        mine = torch.from_numpy(our_latents)
        ours_own.extend(pipeline.render([FaceJob(mine, our_tokens[f]) for f in batch]))
        ours_fed.extend(pipeline.render([FaceJob(torch.from_numpy(up_latents), up_tokens[f]) for f in batch]))
    face_psnr_own = min(psnr(a, b) for a, b in zip(ours_own, up_faces, strict=True))
    face_psnr_fed = min(psnr(a, b) for a, b in zip(ours_fed, up_faces, strict=True))

    # Compositing one generated face both ways: our plan from the box mask; upstream's blending with
    # the same mask laid into its crop-sized mask at the box.
    mask = prepare.geometry(template)["musetalk_mask"][0]
    face_bgr = np.ascontiguousarray(up_faces[len(up_faces) // 2])
    ours_composite = composite(frame_bgr, face_bgr, build_blend_plan(template.size, box, mask))
    x0, y0, x1, y1 = box
    crop = prepare.crop_box(box)
    crop_mask = np.zeros((crop[3] - crop[1], crop[2] - crop[0]), np.uint8)
    crop_mask[y0 - crop[1] : y1 - crop[1], x0 - crop[0] : x1 - crop[0]] = cv2.resize(
        mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR
    )
    resized = cv2.resize(face_bgr, (x1 - x0, y1 - y0))  # as upstream's realtime script does
    up_composite = upstream.get_image_blending(frame_bgr, resized, list(box), crop_mask, list(crop))
    blend_psnr = psnr(ours_composite[y0:y1, x0:x1], up_composite[y0:y1, x0:x1])
    blend_max = int(np.abs(ours_composite.astype(int) - up_composite.astype(int)).max())

    rows = [
        ("features, relative L2 (all frames)", f"{feature_error:.2e}", "<= 1e-2"),
        ("latents, relative L2 (mean vs mean)", f"{latent_error:.2e}", "<= 1e-4"),
        ("  masked half only", f"{masked_error:.2e}", ""),
        ("  upstream's posterior sample vs mean", f"{relative_error(sampled, up_latents):.2e}", "(info)"),
        ("face PSNR, fed our features + latents", f"{face_psnr_own:.1f} dB", ">= 40 dB"),
        ("face PSNR, fed upstream's", f"{face_psnr_fed:.1f} dB", ""),
        ("compositing PSNR over the face box", f"{blend_psnr:.1f} dB (max {blend_max} LSB)", ""),
    ]
    print(f"\nMuseTalk parity against {args.upstream} ({args.size} models, seed {args.seed}, CPU fp32)")
    print(f"{len(frames)} of {n_frames} frames through UNet + VAE; face PSNR is the worst frame's")
    if stood_in:
        print(f"stood in for upstream imports absent here: {', '.join(stood_in)}")
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"  {name:<{width}}  {value:>24}  {target}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
