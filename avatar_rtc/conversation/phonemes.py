"""The phonemes said in a chunk of synthesised speech, with their times, so the face can shape its lips
for what is being said instead of guessing from the sound alone.

Two sources of timing:

* piper's own durations: the VITS duration predictor decides how many audio frames each phoneme id
  gets (its ``Ceil`` output, which piper turns into samples per phoneme when the model exposes it).
  :func:`load_piper_voice_with_alignments` exposes it without the ``onnx`` package (which would pull
  a protobuf that mediapipe cannot use): it edits the model's protobuf bytes to list that tensor as a
  graph output before onnxruntime loads it. Exact, and free: the same inference produces it.
* :func:`align_to_energy`: for a TTS that only gives the phoneme string (espeak-ng, or a piper model
  whose graph lacks the tensor), a forced alignment of the known phonemes to the audio's energy
  envelope: pauses go to the silent gaps, and within each run of sound the phonemes share its time by
  their typical relative durations.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimedPhoneme:
    """One phoneme (an IPA symbol as espeak-ng writes it; " " between words, punctuation for pauses)
    and when it is said, in seconds from the first sample of its chunk."""

    phoneme: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class SpeechChunk:
    """Synthesised speech (mono int16) and, when the TTS knows them, the phonemes said in it."""

    pcm: np.ndarray
    phonemes: tuple[TimedPhoneme, ...] | None = None


# -- piper: the duration predictor's output -------------------------------------------------------------
def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _protobuf_fields(buffer: memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, field start, field end, payload start, payload end) of each top-level field of a
    protobuf message; the payload is only meaningful for length-delimited fields (wire type 2)."""
    position, size = 0, len(buffer)
    while position < size:
        start = position
        key, position = _read_varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        payload_start = position
        if wire_type == 0:
            _, position = _read_varint(buffer, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, payload_start = _read_varint(buffer, position)
            position = payload_start + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, start, position, payload_start, position


# Field numbers in onnx.proto: ModelProto.graph, GraphProto.node / .output, NodeProto.output / .op_type,
# ValueInfoProto.name.
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_OUTPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _VALUE_INFO_NAME = 7, 1, 12, 2, 4, 1


def expose_duration_output(model: bytes) -> bytes | None:
    """``model`` (ONNX bytes of a piper voice) with its one ``Ceil`` tensor (frames per phoneme id)
    added to the graph outputs, or None when the graph has no single such tensor."""
    view = memoryview(model)
    for number, start, end, payload_start, payload_end in _protobuf_fields(view):
        if number != _MODEL_GRAPH:
            continue
        graph = view[payload_start:payload_end]
        ceil_outputs: list[bytes] = []
        existing_outputs: set[bytes] = set()
        for g_number, _, _, g_start, g_end in _protobuf_fields(graph):
            if g_number == _GRAPH_NODE:
                node = graph[g_start:g_end]
                op_type, outputs = b"", []
                for n_number, _, _, n_start, n_end in _protobuf_fields(node):
                    if n_number == _NODE_OP_TYPE:
                        op_type = bytes(node[n_start:n_end])
                    elif n_number == _NODE_OUTPUT:
                        outputs.append(bytes(node[n_start:n_end]))
                if op_type == b"Ceil":
                    ceil_outputs.extend(outputs)
            elif g_number == _GRAPH_OUTPUT:
                info = graph[g_start:g_end]
                for i_number, _, _, i_start, i_end in _protobuf_fields(info):
                    if i_number == _VALUE_INFO_NAME:
                        existing_outputs.add(bytes(info[i_start:i_end]))
        if len(ceil_outputs) != 1 or ceil_outputs[0] in existing_outputs:
            return None
        # Repeated fields may come in any order, so a new output can simply be appended to the graph.
        name = ceil_outputs[0]
        value_info = bytes([(_VALUE_INFO_NAME << 3) | 2]) + _encode_varint(len(name)) + name
        new_output = bytes([(_GRAPH_OUTPUT << 3) | 2]) + _encode_varint(len(value_info)) + value_info
        new_graph = bytes(graph) + new_output
        graph_field = bytes([(_MODEL_GRAPH << 3) | 2]) + _encode_varint(len(new_graph)) + new_graph
        return bytes(view[:start]) + graph_field + bytes(view[end:])
    return None


def load_piper_voice_with_alignments(voice_path: Path, config_path: Path) -> Any:
    """A ``piper.PiperVoice`` whose synthesis also reports samples per phoneme (its chunks'
    ``phoneme_alignments``); the plain voice when the model cannot be patched."""
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    patched = expose_duration_output(voice_path.read_bytes())
    if patched is None:
        log.info("piper voice %s exposes no phoneme durations: lips follow an energy alignment", voice_path)
        return PiperVoice.load(voice_path, config_path=config_path)
    config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    options = onnxruntime.SessionOptions()
    # onnxruntime's worker threads spin between operators by default; beside the calls' media threads
    # that steals the core they wait for (a 5-word chunk: 302 ms spinning, 265 ms not, beside one busy
    # core; 196 and 179 ms on an idle host).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(patched, sess_options=options, providers=["CPUExecutionProvider"])
    return PiperVoice(config=config, session=session)


_PIPER_EOS = "$"


def piper_chunk_phonemes(chunk: Any, offset_s: float, pad_ids: int = 1) -> list[TimedPhoneme] | None:
    """The timed phonemes of one piper ``AudioChunk`` (shifted by ``offset_s``), None without
    alignments.

    piper interleaves a padding id after every phoneme id and counts each phoneme's samples with the
    padding after it. Measured on the bundled voice (vowels loud, stops quiet), that puts the sound
    40-60 ms after where its energy is; the padding *before* a phoneme holds the transition into it,
    and counting that instead lines the two up within about 20 ms. So each phoneme here runs from the
    start of the padding before it to the end of its own ids (``pad_ids``: the voice's padding ids
    per phoneme).
    """
    alignments = chunk.phoneme_alignments
    id_samples = chunk.phoneme_id_samples
    if not alignments or id_samples is None:
        return None
    rate = float(chunk.sample_rate)
    # The durations are in model frames; the audio may differ by a fraction of a frame: scale to fit.
    total = float(np.sum(id_samples))
    scale = len(chunk.audio_float_array) / total if total else 1.0
    timed: list[TimedPhoneme] = []
    position = 0  # index into id_samples
    previous_end = previous_pad = 0.0  # samples
    for alignment in alignments:
        count = len(alignment.phoneme_ids)
        own = count if alignment.phoneme == _PIPER_EOS else max(count - pad_ids, 1)
        own_samples = float(np.sum(id_samples[position : position + own])) * scale
        pad_samples = float(np.sum(id_samples[position + own : position + count])) * scale
        end = previous_end + previous_pad + own_samples
        timed.append(TimedPhoneme(alignment.phoneme, offset_s + previous_end / rate, offset_s + end / rate))
        previous_end, previous_pad = end, pad_samples
        position += count
    if timed and previous_pad:  # padding after the last phoneme closes the chunk
        last = timed[-1]
        timed[-1] = TimedPhoneme(last.phoneme, last.start_s, offset_s + (previous_end + previous_pad) / rate)
    return timed


# -- espeak-ng's phonemes ---------------------------------------------------------------------------------
def espeak_phonemes(text: str, voice: str) -> list[str]:
    """``text`` as a list of phoneme symbols (single code points, " " between words, "." between
    clauses), by espeak-ng's ``--ipa``; empty when espeak-ng is missing."""
    binary = shutil.which("espeak-ng") or shutil.which("espeak")
    if binary is None:
        return []
    result = subprocess.run(
        [binary, "-q", "--ipa", "-v", voice, "--", text], capture_output=True, text=True, check=False
    )
    symbols: list[str] = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        if symbols:
            symbols.append(".")  # espeak writes one line per clause
        symbols.extend(unicodedata.normalize("NFD", line))
    return symbols


# -- forced alignment to the energy envelope ----------------------------------------------------------------
PAUSE_SYMBOLS = frozenset(".,;:!?…—-")
_VOWELS = frozenset("aeiouyæɑɒɐəɘɛɜɞɪʊʌɔøœɤɯɵɶʉɨɚɝ")
_STOPS = frozenset("pbtdkgʔcɟq")
_MODIFIERS = frozenset("ˈˌːˑ̩̯̃͡")
# Typical relative durations: vowels are long, stops short (their closure is the silence before them).
_RELATIVE_DURATION = {"vowel": 1.6, "stop": 0.8, "modifier": 0.15, "other": 1.0}
_HOP_S = 0.01
_SPEECH_LEVEL_DB = -35.0  # below the loudest 10 ms by this much counts as a gap
_MIN_GAP_S = 0.08  # shorter quiet stretches are stop closures inside words, not pauses


def _weight(symbol: str) -> float:
    if symbol == " ":
        return 0.0  # words run into each other; pauses are the punctuation's
    if symbol in _VOWELS:
        return _RELATIVE_DURATION["vowel"]
    if symbol in _STOPS:
        return _RELATIVE_DURATION["stop"]
    if symbol in _MODIFIERS or unicodedata.combining(symbol):
        return _RELATIVE_DURATION["modifier"]
    return _RELATIVE_DURATION["other"]


def _speech_runs(pcm: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
    """(start_s, end_s) of each stretch of sound, quiet gaps shorter than ``_MIN_GAP_S`` bridged."""
    hop = max(1, round(_HOP_S * sample_rate))
    frames = len(pcm) // hop
    if frames == 0:
        return []
    power = np.mean(np.square(pcm[: frames * hop].astype(np.float64).reshape(frames, hop)), axis=1)
    level = 10.0 * np.log10(power + 1e-9)
    loud = level > level.max() + _SPEECH_LEVEL_DB
    runs: list[list[int]] = []
    for index in np.flatnonzero(loud):
        if runs and index - runs[-1][1] <= round(_MIN_GAP_S / _HOP_S):
            runs[-1][1] = int(index) + 1
        else:
            runs.append([int(index), int(index) + 1])
    return [(lo * hop / sample_rate, hi * hop / sample_rate) for lo, hi in runs]


def align_to_energy(symbols: Sequence[str], pcm: np.ndarray, sample_rate: int) -> tuple[TimedPhoneme, ...]:
    """Times for ``symbols`` (said in this order in ``pcm``) from the audio's energy envelope.

    The phonemes are cut into groups at pause symbols; the groups go to the runs of sound in order,
    each run to the group whose share of the total typical duration it best matches; within a run the
    phonemes divide its time by their typical durations. Pauses and the silences between runs are
    given to the pause symbols (or a " " when the text had none there).
    """
    runs = _speech_runs(pcm, sample_rate)
    if not runs or not symbols:
        return ()
    groups: list[list[str]] = [[]]
    for symbol in symbols:
        if symbol in PAUSE_SYMBOLS:
            if groups[-1]:
                groups.append([])
        else:
            groups[-1].append(symbol)
    groups = [group for group in groups if any(s.strip() for s in group)] or [list(symbols)]
    # More runs than groups: merge the runs closest together; fewer: merge neighbouring groups.
    while len(runs) > len(groups):
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = int(np.argmin(gaps))
        runs[i : i + 2] = [(runs[i][0], runs[i + 1][1])]
    while len(groups) > len(runs):
        sizes = [
            sum(map(_weight, groups[i])) + sum(map(_weight, groups[i + 1])) for i in range(len(groups) - 1)
        ]
        i = int(np.argmin(sizes))
        groups[i : i + 2] = [[*groups[i], " ", *groups[i + 1]]]
    timed: list[TimedPhoneme] = []
    previous_end = 0.0
    for group, (run_start, run_end) in zip(groups, runs, strict=True):
        if run_start > previous_end:
            timed.append(TimedPhoneme(".", previous_end, run_start))
        weights = np.array([_weight(s) for s in group])
        edges = (
            run_start + (run_end - run_start) * np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum()
        )
        timed.extend(
            TimedPhoneme(symbol, float(lo), float(hi))
            for symbol, lo, hi in zip(group, edges[:-1], edges[1:], strict=True)
        )
        previous_end = run_end
    total_s = len(pcm) / sample_rate
    if total_s > previous_end:
        timed.append(TimedPhoneme(".", previous_end, total_s))
    return tuple(timed)
