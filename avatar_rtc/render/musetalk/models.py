"""Loading MuseTalk v1.5's three networks from the official layout, with strict state-dict checks.

Each network is built from its config on the meta device (no random initialisation to pay for) and
then takes its weights by assignment, so a missing, misnamed or mis-shaped tensor is refused with a
message naming the file and the keys, never silently left random.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from avatar_rtc.render.musetalk import layout
from avatar_rtc.render.musetalk.layout import MuseTalkUnavailableError

# The published musetalkV15/musetalk.json, for building the full-size architecture without the file
# (benchmarks). When the file is present it wins.
MUSETALK_V15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# stabilityai/sd-vae-ft-mse config.json.
SD_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
VAE_SCALING = 0.18215

# Old diffusers attention names in raw VAE checkpoints (sd-vae-ft-mse's .bin predates the rename).
_OLD_ATTENTION_KEY = re.compile(r"^(.*attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LISTED_KEYS = 8


class ModelWeightsError(MuseTalkUnavailableError):
    """A weights file does not match the architecture its config describes."""


@dataclass
class MuseTalkModels:
    """The three networks on one device, in the dtype they run in."""

    unet: nn.Module
    vae: nn.Module
    whisper: nn.Module  # transformers' WhisperEncoder
    mel_filters: torch.Tensor  # (n_mels, n_fft // 2 + 1) float32, Whisper's filterbank
    n_fft: int
    hop_length: int
    device: torch.device
    dtype: torch.dtype
    vae_id: str  # identifies the VAE weights, so cached template latents can be checked against them

    @property
    def feature_width(self) -> int:
        return int(self.whisper.config.d_model)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype. ``dtype`` auto: fp16 on CUDA (as upstream), fp32 on CPU (where
    half precision is slower on the CPUs measured here, and not more accurate)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MuseTalkUnavailableError(f"device {device!r} asked for, but torch sees no CUDA device")
    if dtype == "auto":
        return resolved, (torch.float16 if resolved.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return resolved, DTYPES[dtype]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise several unrelated types for a bad file
        raise ModelWeightsError(f"cannot read weights {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelWeightsError(f"{path} is not a plain state dict of tensors")
    return state


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Raise :class:`ModelWeightsError` listing missing, unexpected and mis-shaped keys, if any."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", mis_shaped),
    ):
        if keys:
            more = f" ... and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
            problems.append(f"{label} ({len(keys)}): {', '.join(keys[:_LISTED_KEYS])}{more}")
    if problems:
        raise ModelWeightsError(
            f"{what} weights in {source} do not match its config:\n  " + "\n  ".join(problems) + "\n"
            f"Re-fetch the official files with: {layout.FETCH_COMMAND}"
        )


def _assign(module: nn.Module, state: dict[str, torch.Tensor], source: Path, what: str) -> nn.Module:
    check_state_dict(module, state, source, what)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelWeightsError(f"cannot read config {path}: {error}") from error
    if not isinstance(config, dict):
        raise ModelWeightsError(f"{path} is not a JSON object")
    return config


def _file(models_dir: Path, entry: layout.ModelFile) -> Path:
    path = layout.resolve(models_dir, entry)
    if path is None:
        layout.require_files(models_dir)  # raises, listing everything missing
        raise AssertionError("unreachable")
    return path


def build_unet(config: dict[str, Any], on_meta: bool = True) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if on_meta:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    return UNet2DConditionModel.from_config(config)


def build_vae(config: dict[str, Any], on_meta: bool = True) -> nn.Module:
    from diffusers import AutoencoderKL

    if on_meta:
        with torch.device("meta"):
            return AutoencoderKL.from_config(config)
    return AutoencoderKL.from_config(config)


def build_whisper_encoder(config: Any, on_meta: bool = True) -> nn.Module:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if on_meta:
        with torch.device("meta"):
            return WhisperEncoder(config)
    return WhisperEncoder(config)


def load_unet(models_dir: Path) -> nn.Module:
    config_path, weights_path = _file(models_dir, layout.UNET_CONFIG), _file(models_dir, layout.UNET_WEIGHTS)
    unet = build_unet(_read_json(config_path))
    return _assign(unet, read_state_dict(weights_path), weights_path, "MuseTalk UNet")


def rename_old_vae_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old attention names (query/key/value/proj_attn, 1x1-conv shaped) to diffusers' current ones."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _OLD_ATTENTION_KEY.match(key)
        if match is None:
            renamed[key] = value
            continue
        prefix, old, kind = match.groups()
        if kind == "weight" and value.ndim == 4:
            value = value[:, :, 0, 0]
        renamed[f"{prefix}{_NEW_ATTENTION_NAME[old]}.{kind}"] = value
    return renamed


def load_vae(models_dir: Path) -> tuple[nn.Module, str]:
    """The VAE and an id of it: a hash of its config and its whole weights file, so swapped weights
    (even of the same size) never reuse template latents made with the old ones."""
    import hashlib

    config_path, weights_path = _file(models_dir, layout.VAE_CONFIG), _file(models_dir, layout.VAE_WEIGHTS)
    config_text = config_path.read_bytes()
    vae = build_vae(_read_json(config_path))
    vae = _assign(vae, rename_old_vae_keys(read_state_dict(weights_path)), weights_path, "VAE")
    digest = hashlib.sha256(config_text)
    with weights_path.open("rb") as f:  # ~0.3 s for the published 335 MB, once per process
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return vae, digest.hexdigest()[:32]


def load_whisper(models_dir: Path) -> tuple[nn.Module, np.ndarray, int, int]:
    """Whisper's encoder (from a full WhisperForConditionalGeneration checkpoint) and its mel front end:
    the filterbank (n_mels, n_freqs), n_fft and hop length."""
    from transformers import WhisperConfig, WhisperFeatureExtractor

    config_path = _file(models_dir, layout.WHISPER_CONFIG)
    weights_path = _file(models_dir, layout.WHISPER_WEIGHTS)
    preprocessor_path = _file(models_dir, layout.WHISPER_PREPROCESSOR)
    try:
        config = WhisperConfig.from_pretrained(config_path.parent)
        extractor = WhisperFeatureExtractor.from_pretrained(preprocessor_path.parent)
    except (OSError, ValueError) as error:
        raise ModelWeightsError(f"cannot read whisper config in {config_path.parent}: {error}") from error
    state = read_state_dict(weights_path)
    # A WhisperForConditionalGeneration checkpoint keeps the encoder under `model.encoder.`; a bare
    # WhisperModel under `encoder.`. The decoder is not used.
    prefix = "model.encoder." if any(k.startswith("model.encoder.") for k in state) else "encoder."
    encoder_state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not encoder_state:
        raise ModelWeightsError(
            f"{weights_path} has no whisper encoder weights (no keys under 'model.encoder.')\n"
            f"Re-fetch the official files with: {layout.FETCH_COMMAND}"
        )
    encoder = _assign(build_whisper_encoder(config), encoder_state, weights_path, "Whisper encoder")
    filters = np.asarray(extractor.mel_filters, dtype=np.float32).T  # stored (n_freqs, n_mels)
    return encoder, filters, int(extractor.n_fft), int(extractor.hop_length)


def load_models(models_dir: str | Path, device: str = "auto", dtype: str = "auto") -> MuseTalkModels:
    """All three networks from the official layout, ready for inference on ``device`` in ``dtype``."""
    models_dir = Path(models_dir)
    layout.require_files(models_dir)
    target, compute_dtype = pick_device(device, dtype)
    unet = load_unet(models_dir)
    vae, vae_id = load_vae(models_dir)
    whisper, filters, n_fft, hop = load_whisper(models_dir)
    return assemble(unet, vae, whisper, filters, n_fft, hop, target, compute_dtype, vae_id)


def assemble(
    unet: nn.Module,
    vae: nn.Module,
    whisper: nn.Module,
    filters: np.ndarray,
    n_fft: int,
    hop_length: int,
    device: torch.device,
    dtype: torch.dtype,
    vae_id: str,
) -> MuseTalkModels:
    for module in (unet, vae, whisper):
        # nn.Module.to, not diffusers' override: that one warns about fp32-pinned modules these have none of.
        nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)
    if int(unet.config.cross_attention_dim) != int(whisper.config.d_model):
        raise ModelWeightsError(
            f"UNet cross_attention_dim {unet.config.cross_attention_dim} does not match the whisper "
            f"feature width {whisper.config.d_model}"
        )
    return MuseTalkModels(
        unet=unet,
        vae=vae,
        whisper=whisper,
        mel_filters=torch.from_numpy(filters).to(device),
        n_fft=n_fft,
        hop_length=hop_length,
        device=device,
        dtype=dtype,
        vae_id=vae_id,
    )
