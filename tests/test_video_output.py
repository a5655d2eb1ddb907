"""The video a call sends: full-frame templates at their own size (capped by max_output_long_side, aspect
kept, even sides), the resolution ladder under CPU pressure, and the H.264 encoder choice."""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiortc.codecs
import aiortc.rtcrtpsender
import av
import cv2
import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.template import Template
from avatar_rtc.media.playout import Playout
from avatar_rtc.rtc import encoders
from avatar_rtc.rtc.encoders import (
    NvencH264Encoder,
    NvencProbe,
    TunedVp8Encoder,
    Vp8Tuning,
    X264PresetEncoder,
    cached_nvenc_probe,
    choose_h264_encoder,
    use_h264_encoder,
)
from avatar_rtc.rtc.resolution import LadderTuning, ResolutionLadder, ladder_sizes, output_size
from avatar_rtc.rtc.tracks import AvatarVideoTrack
from avatar_rtc.testing.receiver import CallReceiver

FPS = 25
INTERVAL = 1 / FPS
H264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=99)
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)


class ScriptedClock:
    """A media clock whose sleeps return at once, as late as the test says."""

    def __init__(self) -> None:
        self.lateness = 0.0

    async def sleep_until(self, media_time: float) -> float:
        return self.lateness


def gradient_template(width: int, height: int, frames: int = 3) -> Template:
    """Frames with structure in both directions, so a crop or a stretch would show."""
    ys, xs = np.mgrid[0:height, 0:width]
    images = []
    for i in range(frames):
        image = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys + 10 * i) % 256], axis=-1)
        images.append(image.astype(np.uint8))
    return Template("t", FPS, np.stack(images), np.zeros((frames, 478, 2), np.float32))


def make_track(template: Template, **options: Any) -> tuple[AvatarVideoTrack, ScriptedClock, Playout]:
    clock = ScriptedClock()
    playout = Playout(lambda: 0.0, template, fps=FPS)
    return AvatarVideoTrack(clock, playout, **options), clock, playout  # type: ignore[arg-type]


# -- sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "cap", "expected"),
    [
        ((720, 1280), 640, (360, 640)),  # portrait
        ((1280, 720), 640, (640, 360)),  # landscape
        ((1920, 1080), 1000, (1000, 562)),  # 562.5: nearest even short side
        ((1080, 1920), 1280, (720, 1280)),
        ((512, 896), 640, (366, 640)),
        ((1280, 720), 1920, (1280, 720)),  # never up
        ((1280, 720), 0, (1280, 720)),  # 0: the template's own size
        ((641, 361), 0, (640, 360)),  # odd sides: even, for I420
    ],
)
def test_output_size_keeps_aspect_and_even_sides(
    source: tuple[int, int], cap: int, expected: tuple[int, int]
) -> None:
    size = output_size(source, cap)
    assert size == expected
    assert size[0] % 2 == 0 and size[1] % 2 == 0
    if cap:
        assert max(size) <= cap
    # Within one pixel (the even rounding) of the source's aspect.
    assert abs(size[0] / size[1] - source[0] / source[1]) * size[1] <= 1.0


def test_ladder_levels_shrink_and_stop_at_360_px() -> None:
    assert ladder_sizes((1280, 720)) == [
        ("video_full", (1280, 720)),
        ("video_reduced", (960, 540)),
        ("video_low", (640, 360)),
    ]
    assert [size for _, size in ladder_sizes((720, 1280))] == [(720, 1280), (540, 960), (360, 640)]
    # 512 px: 3/4 is 384; half would be under 360 and 360 saves too little over 384.
    assert [size for _, size in ladder_sizes((512, 512))] == [(512, 512), (384, 384)]
    assert ladder_sizes((360, 360)) == [("video_full", (360, 360))]


@pytest.mark.parametrize(("source", "expected"), [((720, 1280), (360, 640)), ((1920, 1080), (640, 360))])
async def test_track_scales_frames_to_max_output_long_side(
    source: tuple[int, int], expected: tuple[int, int]
) -> None:
    template = gradient_template(*source)
    track, _, _ = make_track(template, max_long_side=640)
    assert track.output_size == expected  # known before the first frame (the hello says it)
    for index in range(3):
        frame = await track.recv()
        assert (frame.width, frame.height) == expected
        # Scaled, not cropped or stretched: the picture is the template frame made smaller.
        reference = cv2.resize(
            template.frames[template.loop_index(index)], expected, interpolation=cv2.INTER_AREA
        )
        difference = np.abs(frame.to_ndarray(format="bgr24").astype(np.int16) - reference.astype(np.int16))
        assert float(difference.mean()) < 4.0


# -- the ladder -------------------------------------------------------------------------------------
async def test_ladder_steps_down_before_dropping_frames_and_back_up_after_headroom() -> None:
    events: list[dict[str, Any]] = []
    track, clock, playout = make_track(gradient_template(1280, 720), emit_event=events.append)

    async def send(frames: int, lateness: float) -> list[tuple[int, int]]:
        clock.lateness = lateness
        sizes = []
        for _ in range(frames):
            frame = await track.recv()
            sizes.append((frame.width, frame.height))
        return sizes

    assert await send(25, 0.0) == [(1280, 720)] * 25
    assert events == []
    # The sender runs 60% of a frame interval late: within half a second, one step down.
    clock.lateness = 0.6 * INTERVAL
    late_frames = 0
    while not events:
        frame = await track.recv()
        late_frames += 1
        assert late_frames <= 13, "no step down after half a second of late frames"
    assert events == [
        {"type": "quality", "level": "video_reduced", "output_size": [960, 540], "reason": "cpu"}
    ]
    assert (frame.width, frame.height) == (960, 540)
    assert playout.stats.frames_dropped == 0, "resolution goes down before frames are dropped"
    assert track.quality_level == "video_reduced" and track.output_size == (960, 540)

    # Comfortable again: no change for a while (hysteresis), then back to full size.
    calm = await send(60, 0.0)
    assert set(calm) == {(960, 540)} and len(events) == 1
    back = await send(60, 0.0)
    assert events[-1] == {
        "type": "quality",
        "level": "video_full",
        "output_size": [1280, 720],
        "reason": "cpu",
    }
    assert len(events) == 2 and back[-1] == (1280, 720)


def test_ladder_ignores_the_start_of_a_call_and_single_stalls() -> None:
    ladder = ResolutionLadder(FPS, levels=3)
    # Connection set-up, the encoder's start and the first keyframe: the first frames run late.
    for _ in range(20):
        assert ladder.observe(0.9 * INTERVAL, 0, 0.030, 1.0) is None
    for _ in range(30):
        assert ladder.observe(0.0, 0, 0.002, 1.0) is None
    # A 300 ms stall (a GC pause, a model loading) makes the track skip 7 frames: one late frame.
    assert ladder.observe(0.0, 7, 0.300, 1.0) is None
    for _ in range(100):
        assert ladder.observe(0.0, 0, 0.002, 1.0) is None
    assert ladder.level == 0


def test_ladder_keeps_a_level_that_the_next_size_up_would_not_fit() -> None:
    ladder = ResolutionLadder(FPS, levels=3)
    for _ in range(25):  # the warm-up
        ladder.observe(0.0, 0, 0.02, 1.0)
    for _ in range(13):
        ladder.observe(0.5 * INTERVAL, 0, 0.02, 1.0)
    assert ladder.level == 1
    # Never late now, but busy 20 ms a frame: at 1.78x the pixels that is 36 ms of a 40 ms interval.
    for _ in range(500):
        assert ladder.observe(0.0, 0, 0.020, 1.78) is None
    # With the load gone it goes back up.
    changes = [ladder.observe(0.0, 0, 0.008, 1.78) for _ in range(101)]
    assert [c for c in changes if c is not None] == [0]


def test_ladder_waits_longer_after_a_step_up_that_did_not_hold() -> None:
    tuning = LadderTuning()
    ladder = ResolutionLadder(FPS, levels=2, tuning=tuning)

    def frames_until_change(late: float) -> int:
        for count in range(1, 10_000):
            if ladder.observe(late, 0, 0.001, 1.78) is not None:
                return count
        raise AssertionError("no change")

    frames_until_change(0.5 * INTERVAL)  # down
    first_wait = frames_until_change(0.0)  # up after the calm stretch
    assert first_wait == round(tuning.up_after_s * FPS)
    frames_until_change(0.5 * INTERVAL)  # the full size did not hold: down again at once
    assert frames_until_change(0.0) == 2 * first_wait


# -- the H.264 encoder --------------------------------------------------------------------------------
@pytest.fixture
def restore_encoder_factory() -> Iterator[None]:
    yield
    aiortc.rtcrtpsender.get_encoder = aiortc.codecs.get_encoder


def _i420_frame(width: int = 320, height: int = 240) -> av.VideoFrame:
    frame = av.VideoFrame.from_ndarray(np.full((height * 3 // 2, width), 128, np.uint8), format="yuv420p")
    frame.pts = 0
    frame.time_base = fractions.Fraction(1, 90000)
    return frame


def test_h264_encoder_choice(restore_encoder_factory: None) -> None:
    def no_probe() -> NvencProbe:
        raise AssertionError("off must not probe the GPU")

    def found() -> NvencProbe:
        return NvencProbe(True, "fake GPU")

    def missing() -> NvencProbe:
        return NvencProbe(False, "no GPU")

    assert choose_h264_encoder("off", no_probe) == "libx264"
    assert choose_h264_encoder("auto", missing) == "libx264"
    assert choose_h264_encoder("auto", found) == "h264_nvenc"

    assert use_h264_encoder("auto", found) == "h264_nvenc"
    assert isinstance(aiortc.rtcrtpsender.get_encoder(H264), NvencH264Encoder)
    assert isinstance(aiortc.rtcrtpsender.get_encoder(VP8), Vp8Encoder)  # VP8 untouched

    for mode, probe in (("off", no_probe), ("auto", missing)):
        assert use_h264_encoder(mode, probe) == "libx264"  # type: ignore[arg-type]
        # aiortc's own factory again, whose H.264 encoder really encodes with libx264.
        assert aiortc.rtcrtpsender.get_encoder is aiortc.codecs.get_encoder
        encoder = aiortc.rtcrtpsender.get_encoder(H264)
        assert type(encoder) is H264Encoder
        payloads, _ = encoder.encode(_i420_frame())
        assert payloads and encoder.codec is not None and encoder.codec.name == "libx264"


def test_software_h264_encodes_at_the_configured_x264_preset(restore_encoder_factory: None) -> None:
    def missing() -> NvencProbe:
        return NvencProbe(False, "no GPU")

    assert use_h264_encoder("auto", missing, x264_preset="veryfast") == "libx264"
    installed = aiortc.rtcrtpsender.get_encoder
    assert use_h264_encoder("off", missing, x264_preset="veryfast") == "libx264"
    assert aiortc.rtcrtpsender.get_encoder is installed, "the same choice installs nothing new"
    encoder = aiortc.rtcrtpsender.get_encoder(H264)
    assert isinstance(encoder, X264PresetEncoder)
    assert isinstance(aiortc.rtcrtpsender.get_encoder(VP8), Vp8Encoder)
    payloads, _ = encoder.encode(_i420_frame())
    assert payloads and encoder.codec is not None and encoder.codec.name == "libx264"
    # x264 writes its settings into the first keyframe's SEI: veryfast searches with subme 2 (medium: 7).
    assert b"subme=2 " in b"".join(payloads)
    # medium is aiortc's own encoder, untouched.
    use_h264_encoder("off", missing, x264_preset="medium")
    assert aiortc.rtcrtpsender.get_encoder is aiortc.codecs.get_encoder


def test_vp8_encodes_at_the_configured_speed(restore_encoder_factory: None) -> None:
    use_h264_encoder("off", x264_preset="medium", vp8=Vp8Tuning(-6, 4))
    assert aiortc.rtcrtpsender.get_encoder is aiortc.codecs.get_encoder, "aiortc's own settings"
    use_h264_encoder("off", x264_preset="medium", vp8=Vp8Tuning(-12, 0))
    encoder = aiortc.rtcrtpsender.get_encoder(VP8)
    assert isinstance(encoder, TunedVp8Encoder) and encoder.tuning == Vp8Tuning(-12, 0)
    assert type(aiortc.rtcrtpsender.get_encoder(H264)) is H264Encoder
    payloads, _ = encoder.encode(_i420_frame())
    assert payloads and encoder.codec is not None and encoder.codec.name == "libvpx"
    encoder.encode(_i420_frame())
    assert encoder.codec is encoder.tuned_context, "aiortc's encode keeps the tuned context"


def test_nvenc_encoder_that_cannot_open_continues_on_libx264(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(width: int, height: int, bitrate: int) -> Any:
        raise PermissionError("no NVIDIA device")

    monkeypatch.setattr(encoders, "open_nvenc_context", unavailable)
    encoder = NvencH264Encoder()
    first, _ = encoder.encode(_i420_frame())
    second, _ = encoder.encode(_i420_frame(480, 272))  # a new size: still libx264, no new attempt
    assert first and second
    assert encoder.hardware is False and encoder.codec is not None and encoder.codec.name == "libx264"


# -- a real call ------------------------------------------------------------------------------------
def portrait_template(default: Template) -> Template:
    """The default 512x512 avatar on a 512x896 portrait canvas (the extra height mirrored from the
    picture, as a full-frame portrait video would have background there)."""
    pad = (896 - 512) // 2
    frames = np.stack(
        [cv2.copyMakeBorder(frame, pad, pad, 0, 0, cv2.BORDER_REFLECT_101) for frame in default.frames]
    )
    landmarks = default.landmarks + np.array([0, pad], np.float32)
    return Template("portrait", default.fps, frames, landmarks.astype(np.float32), source="test")


@pytest.fixture(scope="module")
def portrait_library(tmp_path_factory: pytest.TempPathFactory, default_template: Template) -> TemplateLibrary:
    from avatar_rtc.render.warp import WarpEngine

    cache = Path(tmp_path_factory.mktemp("portrait_cache"))
    library = TemplateLibrary(cache, ram_budget_bytes=1 << 30, engine=WarpEngine(), default_id="portrait")
    library.store.save(portrait_template(default_template))
    return library


@pytest.mark.parametrize(
    ("media", "expected"),
    [
        ({"video_codec": "VP8"}, (512, 896)),
        ({"video_codec": "H264", "max_output_long_side": 640}, (366, 640)),
    ],
    ids=["vp8-own-size", "h264-capped"],
)
async def test_call_sends_the_templates_own_non_square_size(
    make_server: Any, portrait_library: TemplateLibrary, media: dict[str, Any], expected: tuple[int, int]
) -> None:
    # The ladder stays out of it: on a loaded test machine it could (rightly) shrink the picture.
    server = await make_server(
        library=portrait_library, settings={"media": {**media, "adaptive_resolution": False}}
    )
    template = portrait_library.get("portrait")
    # Compared at a quarter of the size, so the probe keeps up with 25 fps.
    small = (expected[0] // 4, expected[1] // 4)
    references = [
        cv2.resize(
            cv2.resize(frame, expected, interpolation=cv2.INTER_AREA), small, interpolation=cv2.INTER_AREA
        )
        for frame in template.frames[::4]
    ]

    def distance_to_template(image: np.ndarray) -> float:
        # The nearest template frame (the idle loop shows them in turn; nobody speaks in this call).
        if image.shape[1::-1] != expected:
            return float("inf")
        seen = cv2.resize(image, small, interpolation=cv2.INTER_AREA).astype(np.int16)
        return min(float(np.abs(seen - reference).mean()) for reference in references)

    receiver = CallReceiver(probe=distance_to_template)
    async with aiohttp.ClientSession() as http:
        await receiver.connect_http(server.url, http)
    hello = await receiver.wait_event(lambda e: e["type"] == "hello")
    assert hello["output_size"] == list(expected) and hello["video_quality"] == "video_full"
    await asyncio.sleep(2.0)
    session = server.services.sessions.sessions[receiver.session_id]
    stats = session.stats()
    await receiver.close()
    assert len(receiver.received.video_arrival) >= 25
    assert receiver.received.video_size == expected
    # Every pixel is the template's own frame, within what the codec changes: the whole picture, not a
    # crop, shift or stretch of it (after the first second, once the encoder's quality has settled).
    settled = receiver.received.video_probe[25:]
    assert settled and float(np.median(settled)) < 6.0, f"mean difference {np.median(settled):.1f} levels"
    assert stats["output_size"] == list(expected)
    # Without a usable GPU (as here) H.264 goes through libx264, the software path.
    h264 = "h264_nvenc" if cached_nvenc_probe().available else "libx264"
    assert stats["video_encoder"] == ("libvpx" if media["video_codec"] == "VP8" else h264)
