"""Whisper audio features for MuseTalk, computed frame by frame as audio arrives.

Upstream runs whisper-tiny's encoder once over a whole file (30 s at a time, zero-padded), stacks the
five hidden states to (T, 5, 384) at 50 steps/s, pads 4 zero steps in front and 12 behind, and gives
frame f the padded steps [2f, 2f + 10) (:func:`window_frames`, the reference).

A stream cannot wait for the whole file, and the encoder attends across its whole input, so here each
frame's steps come from the encoder run over a fixed window of audio around the frame
(:class:`FeatureWindowing`): ``left_context_steps`` before the frame's 10 steps and
``right_context_steps`` after them. A frame therefore needs audio up to 6 + right_context steps past its
own time (``lookahead_s``: 200 ms by default). Steps outside the utterance are zero, as upstream pads them.
Because a frame's tokens depend only on the audio in its window, the streamed features equal the ones
computed from the whole utterance at once, however the audio was chunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avatar_rtc.render.musetalk.models import MuseTalkModels

SAMPLE_RATE = 16000
STEPS_PER_SECOND = 50
SAMPLES_PER_STEP = SAMPLE_RATE // STEPS_PER_SECOND
FRONT_PAD_STEPS = 4  # upstream's zero steps before the first: 2 frames of left context at 25 fps
BACK_PAD_STEPS = 12  # ... and after the last: 3 frames x 2 steps of right context, and slack
FRAME_STEPS = 10  # steps per frame window
HIDDEN_STATES = 5  # embedding output + 4 encoder layers (the last after the final layer norm)
TOKENS_PER_FRAME = FRAME_STEPS * HIDDEN_STATES
UPSTREAM_CHUNK_S = 30  # whisper's window; upstream encodes longer audio in 30 s pieces


def frame_start_step(frame: int, fps: int) -> int:
    """First padded step of frame ``frame``'s window (2f at 25 fps; the nearest step at other rates)."""
    return math.floor(frame * STEPS_PER_SECOND / fps + 0.5)


def window_frames(states: np.ndarray, n_frames: int, fps: int = 25) -> np.ndarray:
    """Upstream's windowing: (T, 5, D) states -> (n_frames, 50, D) tokens, time-major (step, then state)."""
    steps, n_states, width = states.shape
    front = np.zeros((FRONT_PAD_STEPS, n_states, width), states.dtype)
    back = np.zeros((BACK_PAD_STEPS, n_states, width), states.dtype)
    padded = np.concatenate([front, states, back])
    tokens = np.empty((n_frames, FRAME_STEPS * n_states, width), states.dtype)
    for frame in range(n_frames):
        start = frame_start_step(frame, fps)
        window = padded[start : start + FRAME_STEPS]
        if len(window) != FRAME_STEPS:
            raise ValueError(f"frame {frame} lies beyond {steps} feature steps")
        tokens[frame] = window.reshape(-1, width)
    return tokens


@dataclass(frozen=True)
class FeatureWindowing:
    """The audio window each frame's features are computed from (see the module docstring)."""

    left_context_steps: int = 20
    right_context_steps: int = 4

    @property
    def window_steps(self) -> int:
        return self.left_context_steps + FRAME_STEPS + self.right_context_steps

    @property
    def window_samples(self) -> int:
        return self.window_steps * SAMPLES_PER_STEP

    @property
    def before_s(self) -> float:
        """Audio a window holds before its frame's own time."""
        return (FRONT_PAD_STEPS + self.left_context_steps) / STEPS_PER_SECOND

    @property
    def lookahead_s(self) -> float:
        """Audio a frame needs after its own time: its last step ends 6 steps (120 ms) after it, the
        encoder's right context follows, and half a step covers rounding the frame time to a step."""
        after_steps = FRAME_STEPS - FRONT_PAD_STEPS + self.right_context_steps + 0.5
        return after_steps / STEPS_PER_SECOND

    def first_step(self, offset_s: float) -> int:
        """Utterance step where the window of the frame at ``offset_s`` into the utterance begins."""
        padded_start = math.floor(offset_s * STEPS_PER_SECOND + 0.5)
        return padded_start - FRONT_PAD_STEPS - self.left_context_steps

    def window(self, pcm: np.ndarray, offset_s: float) -> tuple[np.ndarray, int, int]:
        """The window for the frame at ``offset_s`` into an utterance whose audio so far is ``pcm``
        (int16 or float32 in [-1, 1]): float32 samples (zero outside the audio) and the range of window
        steps [lo, hi) that lie inside the utterance's complete steps."""
        first = self.first_step(offset_s)
        lo = first * SAMPLES_PER_STEP
        window = np.zeros(self.window_samples, np.float32)
        src_lo, src_hi = max(lo, 0), min(lo + self.window_samples, len(pcm))
        if src_hi > src_lo:
            chunk = pcm[src_lo:src_hi]
            if chunk.dtype == np.int16:
                chunk = chunk.astype(np.float32) * (1.0 / 32768.0)
            window[src_lo - lo : src_hi - lo] = chunk
        complete_steps = len(pcm) // SAMPLES_PER_STEP
        valid_lo = min(max(-first, 0), self.window_steps)
        valid_hi = min(max(complete_steps - first, 0), self.window_steps)
        return window, valid_lo, valid_hi

    def windows(self, pcm: np.ndarray, offsets_s: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Windows for many frames of one complete utterance: (F, samples) audio, (F, 2) valid ranges."""
        parts = [self.window(pcm, offset) for offset in offsets_s]
        audio = np.stack([p[0] for p in parts]) if parts else np.zeros((0, self.window_samples), np.float32)
        valid = np.array([(p[1], p[2]) for p in parts], np.int64).reshape(-1, 2)
        return audio, valid


def select_frame_steps(states: torch.Tensor, valid: torch.Tensor, left_context_steps: int) -> torch.Tensor:
    """(B, W, 5, D) window states -> (B, 50, D): the frame's 10 steps after the left context, time-major,
    zero where a step lies outside the window's valid range [valid[:, 0], valid[:, 1])."""
    left = left_context_steps
    frame_states = states[:, left : left + FRAME_STEPS]
    steps = torch.arange(left, left + FRAME_STEPS, device=states.device)
    valid = valid.to(states.device)
    inside = (steps[None, :] >= valid[:, :1]) & (steps[None, :] < valid[:, 1:])
    frame_states = frame_states * inside[:, :, None, None].to(states.dtype)
    return frame_states.reshape(states.shape[0], FRAME_STEPS * states.shape[2], states.shape[-1])


def positional_encoding(length: int, width: int) -> torch.Tensor:
    """Sinusoidal encoding (length, width): sin on even dims, cos on odd (added to the audio tokens)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate)
    return encoding


class WhisperFeatures:
    """Whisper's log-mel front end and encoder hidden states, batched, on the models' device."""

    def __init__(self, models: MuseTalkModels, windowing: FeatureWindowing | None = None) -> None:
        self.models = models
        self.windowing = windowing or FeatureWindowing()
        self._window = torch.hann_window(models.n_fft, periodic=True, device=models.device)
        encoder: nn.Module = models.whisper
        self._encoder = encoder
        self.max_steps = int(encoder.config.max_source_positions)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) float32 samples -> (B, n_mels, S // hop) Whisper log-mel, each row normalised alone.

        The same arithmetic as WhisperFeatureExtractor: power STFT (centred, reflect-padded, the last
        frame dropped), mel filterbank, log10, floor at max - 8, then (x + 4) / 4."""
        stft = torch.stft(
            audio.float(),
            self.models.n_fft,
            self.models.hop_length,
            window=self._window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        power = stft[..., :-1].abs() ** 2
        mel = self.models.mel_filters @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
        return (torch.maximum(log_spec, floor) + 4.0) / 4.0

    @torch.inference_mode()
    def hidden_states(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) samples (S a multiple of 320) -> (B, S // 320, 5, D) stacked encoder hidden states."""
        if audio.shape[-1] % SAMPLES_PER_STEP:
            raise ValueError(f"audio length {audio.shape[-1]} is not a whole number of 20 ms steps")
        encoder = self._encoder
        mel = self.log_mel(audio.to(self.models.device)).to(self.models.dtype)
        # transformers' forward insists on exactly 30 s of input; the layers themselves do not, so run
        # them directly over the window (positions from 0, as for audio at the start of a file).
        x = nn.functional.gelu(encoder.conv1(mel))
        x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
        steps = x.shape[1]
        if steps > self.max_steps:
            raise ValueError(f"{steps} steps exceed whisper's {self.max_steps} positions")
        hidden = x + encoder.embed_positions.weight[:steps]
        states = [hidden]
        for layer in encoder.layers:
            output = layer(hidden, None)
            hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden)
        states[-1] = encoder.layer_norm(hidden)
        return torch.stack(states, dim=2)

    def frame_tokens(self, windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens (B, 50, D) from :class:`FeatureWindowing` windows (B, S) and their valid step
        ranges (B, 2): the frame's 10 steps x 5 states, zero for steps outside the utterance."""
        return select_frame_steps(self.hidden_states(windows), valid, self.windowing.left_context_steps)

    def whole_file_states(self, pcm: np.ndarray) -> np.ndarray:
        """Upstream's features for a whole recording: (floor(seconds * 50), 5, D) float32, encoded 30 s
        at a time with each piece zero-padded to the full window."""
        audio = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        chunk = self.max_steps * SAMPLES_PER_STEP
        pieces = []
        for lo in range(0, max(len(audio), 1), chunk):
            padded = np.zeros(chunk, np.float32)
            part = audio[lo : lo + chunk]
            padded[: len(part)] = part
            pieces.append(self.hidden_states(torch.from_numpy(padded)[None])[0].float().cpu().numpy())
        states = np.concatenate(pieces)
        return states[: len(audio) * STEPS_PER_SECOND // SAMPLE_RATE]
