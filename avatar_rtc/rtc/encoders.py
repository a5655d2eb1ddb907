"""Which H.264 encoder the calls' video senders use: NVENC on a GPU when FFmpeg has it and it opens,
else libx264 at the configured preset (aiortc's own encoder uses x264's default, ``medium``: about
40 ms of CPU per 720p frame here, a whole core per call; ``veryfast`` takes a third of that for a
picture that barely differs at call bitrates; see scripts/bench_encode.py).

aiortc 1.16 gives no per-call way to pick an encoder: each ``RTCRtpSender`` asks
``aiortc.rtcrtpsender.get_encoder`` for one when its first frame arrives, and ``H264Encoder`` builds
a libx264 context on its own. So the choice is process-wide, made from one setting
(``media.hardware_encoder``) by :func:`use_h264_encoder`, which sessions call before their first frame.
With NVENC the factory is wrapped to hand out :class:`NvencH264Encoder`; otherwise aiortc's own factory
is left in place untouched.
"""

from __future__ import annotations

import fractions
import functools
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import aiortc.codecs
import aiortc.rtcrtpsender
import av
import numpy as np
from aiortc.codecs.base import Encoder
from aiortc.codecs.h264 import MAX_FRAME_RATE, H264Encoder
from aiortc.codecs.vpx import Vp8Encoder, number_of_threads
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.video.codeccontext import VideoCodecContext

log = logging.getLogger(__name__)

HardwareEncoderMode = Literal["auto", "off"]
H264EncoderName = Literal["h264_nvenc", "libx264"]
# x264's presets, fastest first; aiortc leaves the preset at x264's default, medium.
X264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
]

_AIORTC_GET_ENCODER = aiortc.codecs.get_encoder
# aiortc rebuilds its encoder context when the target bitrate moves by more than this share; ours must
# use the same rule, or aiortc's check would replace the NVENC context with libx264.
_BITRATE_CHANGE = 0.1


@dataclass(frozen=True)
class NvencProbe:
    available: bool
    reason: str


def open_nvenc_context(width: int, height: int, bitrate: int) -> VideoCodecContext:
    """An h264_nvenc context set up as aiortc sets up libx264: constrained baseline (every browser
    decodes it), no B-frames, nothing held back for lookahead, a forced keyframe is an IDR frame."""
    codec = av.CodecContext.create("h264_nvenc", "w")
    assert isinstance(codec, VideoCodecContext)
    codec.width = width
    codec.height = height
    codec.bit_rate = bitrate
    codec.pix_fmt = "yuv420p"
    codec.framerate = fractions.Fraction(MAX_FRAME_RATE, 1)
    codec.time_base = fractions.Fraction(1, MAX_FRAME_RATE)
    codec.options = {
        "profile": "baseline",
        "preset": "p2",
        "tune": "ull",
        "rc": "cbr",
        "zerolatency": "1",
        "delay": "0",
        "bf": "0",
        "forced-idr": "1",
    }
    codec.open()
    return codec


def probe_nvenc() -> NvencProbe:
    """Whether this process can encode H.264 on NVENC: the codec is in FFmpeg's build, a context opens
    (needs an NVIDIA GPU and driver) and a frame encodes."""
    try:
        av.codec.Codec("h264_nvenc", "w")
    except Exception as error:
        return NvencProbe(False, f"FFmpeg has no h264_nvenc: {error}")
    try:
        codec = open_nvenc_context(256, 256, 1_000_000)
        frame = av.VideoFrame.from_ndarray(np.zeros((384, 256), np.uint8), format="yuv420p")
        frame.pts = 0
        codec.encode(frame)
    except Exception as error:
        return NvencProbe(False, f"h264_nvenc does not open: {error}")
    return NvencProbe(True, "h264_nvenc opened")


@functools.cache
def cached_nvenc_probe() -> NvencProbe:
    """:func:`probe_nvenc`, once per process: opening NVENC initialises CUDA, which takes a while."""
    probe = probe_nvenc()
    log.info("NVENC H.264 %s: %s", "available" if probe.available else "unavailable", probe.reason)
    return probe


def choose_h264_encoder(mode: HardwareEncoderMode, probe: Callable[[], NvencProbe]) -> H264EncoderName:
    """``auto``: NVENC when ``probe`` finds it works; ``off``: libx264 without probing."""
    if mode == "off":
        return "libx264"
    return "h264_nvenc" if probe().available else "libx264"


class X264PresetEncoder(H264Encoder):
    """aiortc's H.264 encoder with libx264 at ``preset`` (aiortc's own settings otherwise: constrained
    baseline, level 3.1, zerolatency): it makes the codec context, aiortc's ``_encode_frame`` uses it."""

    def __init__(self, preset: X264Preset) -> None:
        super().__init__()
        self.preset = preset

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        codec = self.codec
        if (
            codec is None
            or frame.width != codec.width
            or frame.height != codec.height
            or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > _BITRATE_CHANGE
        ):
            context = av.CodecContext.create("libx264", "w")
            assert isinstance(context, VideoCodecContext)
            context.width = frame.width
            context.height = frame.height
            context.bit_rate = self.target_bitrate
            context.pix_fmt = "yuv420p"
            context.framerate = fractions.Fraction(MAX_FRAME_RATE, 1)
            context.time_base = fractions.Fraction(1, MAX_FRAME_RATE)
            context.options = {"level": "31", "tune": "zerolatency", "preset": self.preset}
            context.profile = "Baseline"
            self.codec = context
        return super()._encode_frame(frame, force_keyframe)


class NvencH264Encoder(H264Encoder):
    """aiortc's H.264 encoder (its packetisation, keyframe requests and bitrate control) with the
    encoding itself on NVENC. It only makes the codec context: when one of the right size and bitrate
    is there, aiortc's ``_encode_frame`` uses it instead of making a libx264 one.

    If NVENC stops opening (a consumer GPU allows only a few encoding sessions at once, a driver
    reset) this call goes on with libx264 rather than losing its video."""

    def __init__(self) -> None:
        super().__init__()
        self.hardware = True

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        codec = self.codec
        if self.hardware and (
            codec is None
            or frame.width != codec.width
            or frame.height != codec.height
            or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > _BITRATE_CHANGE
        ):
            try:
                self.codec = open_nvenc_context(frame.width, frame.height, self.target_bitrate)
            except Exception as error:
                log.warning("h264_nvenc failed to open (%s); this call continues with libx264", error)
                self.hardware = False
                self.codec = None
        return super()._encode_frame(frame, force_keyframe)


@dataclass(frozen=True)
class Vp8Tuning:
    """libvpx's speed settings for VP8 calls. aiortc uses cpu-used -6 with the temporal denoiser at 4;
    the denoiser is for camera noise, and the avatar's frames are a prepared template's: without it a
    720p frame takes 9 ms instead of 12.4 at the same bitrate here (scripts/bench_encode.py)."""

    cpu_used: int = -6
    noise_sensitivity: int = 0

    @property
    def is_aiortcs(self) -> bool:
        return self.cpu_used == -6 and self.noise_sensitivity == 4


class TunedVp8Encoder(Vp8Encoder):
    """aiortc's VP8 encoder (its packetisation, picture ids, keyframes and bitrate control) with the
    codec context made at ``tuning``'s speed; aiortc's ``encode`` uses a context of the right size."""

    def __init__(self, tuning: Vp8Tuning) -> None:
        super().__init__()
        self.tuning = tuning
        self.tuned_context: VideoCodecContext | None = None  # the last context made here

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        codec = self.codec
        if (
            codec is None
            or frame.width != codec.width
            or frame.height != codec.height
            or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > _BITRATE_CHANGE
        ):
            bitrate = self.target_bitrate
            context = av.CodecContext.create("libvpx", "w")
            assert isinstance(context, VideoCodecContext)
            context.width = frame.width
            context.height = frame.height
            context.bit_rate = bitrate
            context.pix_fmt = "yuv420p"
            context.gop_size = 3000
            context.qmin = 2
            context.qmax = 56
            # aiortc's options (CBR with a one-second buffer, one token partition), but the speed.
            context.options = {
                "bufsize": str(bitrate),
                "cpu-used": str(self.tuning.cpu_used),
                "deadline": "realtime",
                "lag-in-frames": "0",
                "minrate": str(bitrate),
                "maxrate": str(bitrate),
                "noise-sensitivity": str(self.tuning.noise_sensitivity),
                "overshoot-pct": "15",
                "partitions": "0",
                "static-thresh": "1",
                "undershoot-pct": "100",
            }
            context.thread_count = number_of_threads(frame.width * frame.height, multiprocessing.cpu_count())
            self.codec = self.tuned_context = context
        return super().encode(frame, force_keyframe)


def _get_encoder_with_nvenc(codec: RTCRtpCodecParameters) -> Encoder:
    if codec.mimeType.lower() == "video/h264":
        return NvencH264Encoder()
    return _AIORTC_GET_ENCODER(codec)


@functools.cache
def _tuned_get_encoder(
    h264: H264EncoderName, preset: X264Preset, vp8: Vp8Tuning
) -> Callable[[RTCRtpCodecParameters], Encoder]:
    # One function per choice, so installing the same choice twice is recognised as no change.
    def get_encoder(codec: RTCRtpCodecParameters) -> Encoder:
        kind = codec.mimeType.lower()
        if kind == "video/h264":
            if h264 == "h264_nvenc":
                return NvencH264Encoder()
            return X264PresetEncoder(preset) if preset != "medium" else _AIORTC_GET_ENCODER(codec)
        if kind == "video/vp8" and not vp8.is_aiortcs:
            return TunedVp8Encoder(vp8)
        return _AIORTC_GET_ENCODER(codec)

    return get_encoder


def use_h264_encoder(
    mode: HardwareEncoderMode,
    probe: Callable[[], NvencProbe] = cached_nvenc_probe,
    x264_preset: X264Preset = "medium",
    vp8: Vp8Tuning = Vp8Tuning(-6, 4),
) -> H264EncoderName:
    """Make the senders created from now on encode H.264 with the encoder ``mode`` picks (libx264 at
    ``x264_preset`` without NVENC) and VP8 at ``vp8``'s speed; returns the H.264 choice. Idempotent;
    blocking the first time NVENC is probed (call it off the event loop)."""
    chosen = choose_h264_encoder(mode, probe)
    if chosen == "h264_nvenc" and vp8.is_aiortcs:
        wanted = _get_encoder_with_nvenc
    elif chosen == "libx264" and x264_preset == "medium" and vp8.is_aiortcs:
        wanted = _AIORTC_GET_ENCODER
    else:
        wanted = _tuned_get_encoder(chosen, x264_preset, vp8)
    if aiortc.rtcrtpsender.get_encoder is not wanted:
        aiortc.rtcrtpsender.get_encoder = wanted
        log.info(
            "H.264 calls now encode with %s", chosen if chosen != "libx264" else f"libx264 {x264_preset}"
        )
    return chosen
