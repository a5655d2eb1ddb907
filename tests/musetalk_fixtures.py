"""Tiny MuseTalk models in the official layout: the same config keys and state-dict key names as the
published files, random weights, small widths, so the whole path runs on CPU in a test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_FEATURE_WIDTH = 32


def tiny_unet_config(for_live_calls: bool = False) -> dict[str, Any]:
    """MuseTalk v1.5's UNet at tiny widths. ``for_live_calls`` keeps attention only at the 8x8 and 4x4
    sizes: at the 32x32 latent, self-attention over 1,024 positions is most of a forward on a CPU, and
    a live call needs the tiny model well ahead of real time on a busy machine."""
    from avatar_rtc.render.musetalk.models import MUSETALK_V15_UNET_CONFIG

    config = dict(MUSETALK_V15_UNET_CONFIG)
    config.update(
        block_out_channels=[16, 16, 32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_FEATURE_WIDTH,
    )
    if for_live_calls:
        config.update(
            down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        )
    return config


def tiny_vae_config(for_live_calls: bool = False) -> dict[str, Any]:
    """sd-vae-ft-mse's VAE at tiny widths; ``for_live_calls`` halves them again and drops the attention
    at 32x32 (the decoder is then most of a tiny forward: 25 ms a frame here against 170 ms for the
    parity tests' models, so a call keeps ahead of real time on a busy machine)."""
    from avatar_rtc.render.musetalk.models import SD_VAE_CONFIG

    config = dict(SD_VAE_CONFIG)
    config.update(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4)
    if for_live_calls:
        config.update(block_out_channels=[4, 4, 8, 8], mid_block_add_attention=False)
    return config


def _old_vae_key(key: str) -> str:
    """Current diffusers attention names back to the raw checkpoint's (as in sd-vae-ft-mse's .bin)."""
    for new, old in (
        ("to_q.", "query."),
        ("to_k.", "key."),
        ("to_v.", "value."),
        ("to_out.0.", "proj_attn."),
    ):
        if ".attentions." in key and new in key:
            return key.replace(new, old)
    return key


def write_tiny_models(models_dir: Path, seed: int = 0, for_live_calls: bool = False) -> Path:
    """Write musetalkV15/, sd-vae/ and whisper/ under ``models_dir`` and return it."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from avatar_rtc.render.musetalk.models import build_unet, build_vae

    torch.manual_seed(seed)
    unet_dir, vae_dir, whisper_dir = models_dir / "musetalkV15", models_dir / "sd-vae", models_dir / "whisper"
    for directory in (unet_dir, vae_dir, whisper_dir):
        directory.mkdir(parents=True, exist_ok=True)

    unet_config = tiny_unet_config(for_live_calls)
    (unet_dir / "musetalk.json").write_text(json.dumps(unet_config, indent=2))
    torch.save(build_unet(unet_config, on_meta=False).state_dict(), unet_dir / "unet.pth")

    vae_config = tiny_vae_config(for_live_calls)
    (vae_dir / "config.json").write_text(json.dumps(vae_config, indent=2))
    vae_state = {_old_vae_key(k): v for k, v in build_vae(vae_config, on_meta=False).state_dict().items()}
    torch.save(vae_state, vae_dir / "diffusion_pytorch_model.bin")

    whisper_config = WhisperConfig(
        d_model=TINY_FEATURE_WIDTH,
        encoder_layers=4,  # whisper-tiny's depth: 5 hidden states
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        vocab_size=64,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    whisper_config.to_json_file(str(whisper_dir / "config.json"))
    torch.save(
        WhisperForConditionalGeneration(whisper_config).state_dict(), whisper_dir / "pytorch_model.bin"
    )
    WhisperFeatureExtractor().save_pretrained(str(whisper_dir))
    return models_dir
