"""Whisper audio features for MuseTalk, computed the way upstream computes them for a file.

Upstream (``AudioProcessor``) cuts a file into 30 s segments, lets Whisper's feature extractor pad each
one to 30 s and normalise its log-mel over the padded segment (floor at max - 8, then (x + 4) / 4), and
runs whisper-tiny's encoder over all 1,500 positions of each segment (absolute positions, attention
across the whole segment). The five hidden states are stacked to (T, 5, D) at 50 steps/s, trimmed to
floor(seconds * 50), padded with 4 zero steps in front and 12 behind, and frame f takes the padded
steps [2f, 2f + 10) (:func:`window_frames`). The UNet was trained on exactly these features.

Because the encoder attends across the whole segment, a frame's features depend on all the audio of
its segment, not only on the ±120 ms around it. :class:`ClipFeatures` therefore computes them over a
clip's audio *so far*: for a clip handed over whole (a TTS sentence, an uploaded recording) they are
upstream's features of that clip; for an answer made of several sentences they are upstream's features
of the answer up to the sentence just received, so later sentences see the earlier ones as context.
Frames already rendered are never recomputed. Audio that truly arrives piecemeal gets the same
computation over what has arrived when a frame is due (``lookahead_s`` after it): a stated
approximation, measured against the whole-clip features in tests/test_musetalk.py.
"""

from __future__ import annotations

import math

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
SEGMENT_SECONDS = 30  # whisper's window; upstream encodes longer audio in 30 s segments
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE


def frame_start_step(offset_s: float) -> int:
    """First padded step of the window of the frame ``offset_s`` into its clip (2f at 25 fps)."""
    return math.floor(offset_s * STEPS_PER_SECOND + 0.5)


def lookahead_s(right_context_steps: int = 0) -> float:
    """Audio a frame of a piecemeal stream waits for after its own time: its window's last step ends
    6 steps (120 ms) after it, ``right_context_steps`` more give the encoder some of what follows, and
    half a step covers rounding the frame time to a step."""
    return (FRAME_STEPS - FRONT_PAD_STEPS + right_context_steps + 0.5) / STEPS_PER_SECOND


def step_count(samples: int) -> int:
    """Upstream's trim: floor(seconds * 50) feature steps for ``samples`` of audio."""
    return samples // SAMPLES_PER_STEP


def window_frames(states: np.ndarray, n_frames: int, fps: int = 25) -> np.ndarray:
    """Upstream's windowing: (T, 5, D) states -> (n_frames, 50, D) tokens, time-major (step, then state)."""
    padded = pad_steps(torch.from_numpy(states))
    starts = [frame_start_step(frame / fps) for frame in range(n_frames)]
    if starts and starts[-1] + FRAME_STEPS > padded.shape[0]:
        raise ValueError(f"frame {n_frames - 1} lies beyond {states.shape[0]} feature steps")
    return select_windows(padded, starts).numpy()


def pad_steps(states: torch.Tensor) -> torch.Tensor:
    """(T, 5, D) -> (4 + T + 12, 5, D): upstream's zero steps around the trimmed states."""
    front = states.new_zeros((FRONT_PAD_STEPS, *states.shape[1:]))
    back = states.new_zeros((BACK_PAD_STEPS, *states.shape[1:]))
    return torch.cat([front, states, back])


def select_windows(padded: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """Frame tokens (F, 50, D) from padded states (P, 5, D): steps [start, start + 10) of each frame,
    time-major; steps past the end of ``padded`` are zero (a frame whose window reaches past the audio
    known so far)."""
    steps, states, width = padded.shape
    needed = max((start + FRAME_STEPS for start in starts), default=0)
    if needed > steps:
        padded = torch.cat([padded, padded.new_zeros((needed - steps, states, width))])
    index = torch.tensor(starts, device=padded.device)[:, None] + torch.arange(
        FRAME_STEPS, device=padded.device
    )
    return padded[index].reshape(len(starts), FRAME_STEPS * states, width)


def positional_encoding(length: int, width: int) -> torch.Tensor:
    """Sinusoidal encoding (length, width): sin on even dims, cos on odd (added to the audio tokens)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate)
    return encoding


def as_float_audio(pcm: np.ndarray) -> np.ndarray:
    """int16 or float samples -> float32 in [-1, 1] (int16 / 32768, as soundfile and librosa read it)."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) * (1.0 / 32768.0)
    return pcm.astype(np.float32, copy=False)


class WhisperFeatures:
    """Whisper's log-mel front end and encoder hidden states on the models' device: upstream's features
    for whole 30 s segments."""

    def __init__(self, models: MuseTalkModels) -> None:
        self.models = models
        self._window = torch.hann_window(models.n_fft, periodic=True, device=models.device)
        self._encoder: nn.Module = models.whisper
        self.positions = int(models.whisper.config.max_source_positions)
        mel_frames = self.positions * self._encoder.conv1.stride[0] * self._encoder.conv2.stride[0]
        if mel_frames * models.hop_length != SEGMENT_SAMPLES:
            raise ValueError(
                f"whisper's {self.positions} positions do not cover {SEGMENT_SECONDS} s of audio"
            )

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
    def segment_states(self, audio: np.ndarray) -> torch.Tensor:
        """Upstream's states for one segment of at most 30 s (float32 samples): zero-padded to 30 s,
        normalised over the padded segment, encoded at all positions -> (1500, 5, D) in the models'
        dtype on their device (untrimmed: the caller trims to the clip's length)."""
        if len(audio) > SEGMENT_SAMPLES:
            raise ValueError(f"a segment holds at most {SEGMENT_SECONDS} s of audio")
        padded = torch.zeros(1, SEGMENT_SAMPLES, device=self.models.device)
        padded[0, : len(audio)] = torch.from_numpy(np.ascontiguousarray(audio)).to(self.models.device)
        mel = self.log_mel(padded).to(self.models.dtype)
        encoder = self._encoder
        # The encoder's own layers, as its forward with output_hidden_states runs them: the embedding
        # output, then each layer's, the last after the final layer norm.
        x = nn.functional.gelu(encoder.conv1(mel))
        x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
        hidden = x + encoder.embed_positions.weight[: x.shape[1]]
        states = [hidden]
        for layer in encoder.layers:
            output = layer(hidden, None)
            hidden = output[0] if isinstance(output, tuple) else output
            states.append(hidden)
        states[-1] = encoder.layer_norm(hidden)
        return torch.stack(states, dim=2)[0]

    def clip_states(self, pcm: np.ndarray) -> torch.Tensor:
        """Upstream's states for a whole clip: (floor(seconds * 50), 5, D)."""
        return ClipFeatures(self).states(pcm)

    def clip_tokens(self, pcm: np.ndarray, fps: int = 25) -> torch.Tensor:
        """Upstream's per-frame tokens for a whole clip: (floor(seconds * fps), 50, D)."""
        n_frames = len(pcm) * fps // SAMPLE_RATE
        return ClipFeatures(self).frame_tokens(pcm, [frame / fps for frame in range(n_frames)])


class ClipFeatures:
    """Upstream's features of one clip whose audio grows (an answer, sentence by sentence).

    Complete 30 s segments are encoded once; the last, partial segment again whenever frames are asked
    for with more audio than it was encoded with. Callers ask only for frames not yet rendered, so a
    frame's features come from the clip as it stood when the frame was generated.
    """

    def __init__(self, features: WhisperFeatures) -> None:
        self.features = features
        self._complete: list[torch.Tensor] = []  # states of the segments that are full
        self._partial: tuple[int, torch.Tensor] | None = None  # (samples encoded, states)
        self.encodes = 0  # encoder runs so far (the bench and tests read it)

    def states(self, pcm: np.ndarray) -> torch.Tensor:
        """(floor(len(pcm) / 320), 5, D) states of the clip whose audio so far is ``pcm``."""
        audio = as_float_audio(pcm)
        while len(self._complete) < len(audio) // SEGMENT_SAMPLES:
            lo = len(self._complete) * SEGMENT_SAMPLES
            self._complete.append(self._encode(audio[lo : lo + SEGMENT_SAMPLES]))
            self._partial = None
        rest = audio[len(self._complete) * SEGMENT_SAMPLES :]
        parts = list(self._complete)
        if len(rest):
            if self._partial is None or self._partial[0] != len(rest):
                self._partial = (len(rest), self._encode(rest))
            parts.append(self._partial[1])
        if not parts:
            width = self.features.models.feature_width
            empty = torch.zeros((0, HIDDEN_STATES, width), device=self.features.models.device)
            return empty.to(self.features.models.dtype)
        return torch.cat(parts)[: step_count(len(audio))]

    def frame_tokens(self, pcm: np.ndarray, offsets_s: list[float]) -> torch.Tensor:
        """(F, 50, D) tokens of the frames ``offsets_s`` seconds into the clip whose audio so far is
        ``pcm``: upstream's window of padded steps, zero where it reaches past the audio."""
        padded = pad_steps(self.states(pcm))
        return select_windows(padded, [frame_start_step(offset) for offset in offsets_s])

    def _encode(self, audio: np.ndarray) -> torch.Tensor:
        self.encodes += 1
        return self.features.segment_states(audio)
