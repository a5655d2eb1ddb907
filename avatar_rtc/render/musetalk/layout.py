"""Where MuseTalk v1.5's published weights live under the models directory, and what fetches them.

Nothing here imports torch: the server checks the files (and reports what is missing) before it pays
for the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FETCH_COMMAND = "python scripts/download_models.py musetalk"


class MuseTalkUnavailableError(RuntimeError):
    """MuseTalk cannot run here: weights missing or malformed, or its Python packages absent.

    The message says what is wrong and how to fix it, so the server can log it and fall back.
    """


@dataclass(frozen=True)
class ModelFile:
    """One file of the official layout: where it goes locally and which Hugging Face file it is."""

    local: str  # relative to the models directory
    repo_id: str
    repo_file: str
    # Another name for the same content (a safetensors copy) that is accepted instead of ``local``.
    alternative: str | None = None


UNET_CONFIG = ModelFile("musetalkV15/musetalk.json", "TMElyralab/MuseTalk", "musetalkV15/musetalk.json")
UNET_WEIGHTS = ModelFile("musetalkV15/unet.pth", "TMElyralab/MuseTalk", "musetalkV15/unet.pth")
VAE_CONFIG = ModelFile("sd-vae/config.json", "stabilityai/sd-vae-ft-mse", "config.json")
VAE_WEIGHTS = ModelFile(
    "sd-vae/diffusion_pytorch_model.bin",
    "stabilityai/sd-vae-ft-mse",
    "diffusion_pytorch_model.bin",
    alternative="sd-vae/diffusion_pytorch_model.safetensors",
)
WHISPER_CONFIG = ModelFile("whisper/config.json", "openai/whisper-tiny", "config.json")
WHISPER_WEIGHTS = ModelFile(
    "whisper/pytorch_model.bin",
    "openai/whisper-tiny",
    "pytorch_model.bin",
    alternative="whisper/model.safetensors",
)
WHISPER_PREPROCESSOR = ModelFile(
    "whisper/preprocessor_config.json", "openai/whisper-tiny", "preprocessor_config.json"
)

# Everything the renderer reads. Landmarks come from MediaPipe and masks from landmarks, so MuseTalk's
# DWPose and BiSeNet face-parsing weights are not needed.
REQUIRED_FILES: tuple[ModelFile, ...] = (
    UNET_CONFIG,
    UNET_WEIGHTS,
    VAE_CONFIG,
    VAE_WEIGHTS,
    WHISPER_CONFIG,
    WHISPER_WEIGHTS,
    WHISPER_PREPROCESSOR,
)


def resolve(models_dir: Path, entry: ModelFile) -> Path | None:
    """The file on disk for ``entry`` (or its accepted alternative), None if neither is there."""
    for name in (entry.local, entry.alternative):
        if name is not None and (models_dir / name).is_file():
            return models_dir / name
    return None


def missing_files(models_dir: Path) -> list[ModelFile]:
    return [entry for entry in REQUIRED_FILES if resolve(models_dir, entry) is None]


def require_files(models_dir: Path) -> None:
    """Raise :class:`MuseTalkUnavailableError` naming every missing file and the fetch command."""
    missing = missing_files(Path(models_dir))
    if missing:
        lines = "\n".join(f"  - {Path(models_dir) / entry.local}" for entry in missing)
        raise MuseTalkUnavailableError(
            f"MuseTalk weights missing under {models_dir}:\n{lines}\nFetch them with: {FETCH_COMMAND}"
        )


def require_packages() -> None:
    """Raise :class:`MuseTalkUnavailableError` if torch, diffusers or transformers cannot be imported."""
    import importlib.util

    absent = [
        name for name in ("torch", "diffusers", "transformers") if importlib.util.find_spec(name) is None
    ]
    if absent:
        raise MuseTalkUnavailableError(
            f"MuseTalk needs the Python packages {', '.join(absent)}: "
            "pip install torch diffusers transformers safetensors accelerate"
        )
