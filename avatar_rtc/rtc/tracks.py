"""The session's two outgoing tracks. Each paces itself against the shared media clock and reads
the playout at its own media time, so audio and video of the same instant leave together."""

from __future__ import annotations

import fractions
import time
from collections.abc import Callable
from typing import Any

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_rtc.media.clock import MediaClock
from avatar_rtc.media.playout import Playout
from avatar_rtc.rtc.resolution import (
    LadderTuning,
    ResolutionLadder,
    Size,
    interpolation,
    ladder_sizes,
    output_size,
)

VIDEO_CLOCK_RATE = 90000
# A sender that falls further behind than this skips ahead rather than sending a burst, so its
# RTP timestamps keep matching wall time (the receiver's A/V sync depends on that mapping).
_MAX_AUDIO_BACKLOG_S = 0.2


class AvatarAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, clock: MediaClock, playout: Playout, frame_ms: int = 20) -> None:
        super().__init__()
        self._clock = clock
        self._playout = playout
        self._rate = playout.sample_rate
        self._samples = self._rate * frame_ms // 1000
        self._time_base = fractions.Fraction(1, self._rate)
        self._next_sample = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        late = await self._clock.sleep_until(self._next_sample / self._rate)
        if late > _MAX_AUDIO_BACKLOG_S:
            skipped = int(late * self._rate) // self._samples * self._samples
            self._playout.read_audio(self._next_sample, skipped, sent=False)  # too late to play
            self._next_sample += skipped
        pcm = self._playout.read_audio(self._next_sample, self._samples)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._next_sample
        frame.time_base = self._time_base
        self._next_sample += self._samples
        return frame


class AvatarVideoTrack(MediaStreamTrack):
    """25 fps (configurable) video with its own pts in a 90 kHz time base.

    aiortc's ``VideoStreamTrack.next_timestamp`` assumes 30 fps, hence the own stamping.

    Frames leave at the template's own size, scaled down (aspect kept) to ``max_long_side`` when that
    is set. With ``adaptive``, a call whose sender falls behind (encoding costs more CPU than it gets)
    steps its size down a level before frames have to be dropped, and back up once there is clear
    headroom; each change goes to ``emit_event`` as a ``quality`` event.
    """

    kind = "video"

    def __init__(
        self,
        clock: MediaClock,
        playout: Playout,
        max_long_side: int = 0,
        adaptive: bool = True,
        emit_event: Callable[[dict[str, Any]], None] | None = None,
        tuning: LadderTuning | None = None,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._playout = playout
        self._fps = playout.fps
        self._pts_step = VIDEO_CLOCK_RATE // self._fps
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        self._next_index = 0
        self._max_long_side = max_long_side
        self._adaptive = adaptive
        self._emit_event = emit_event
        self._ladder = ResolutionLadder(self._fps, levels=1, tuning=tuning)
        # The levels for the size frames come in at; recomputed only when that size changes (another
        # template), so a frame costs one comparison here.
        self._source_size: Size | None = None
        self._levels: list[tuple[str, Size]] = []
        self._returned_at: float | None = None

    @property
    def quality_level(self) -> str:
        return self._levels[self._ladder.level][0] if self._levels else "video_full"

    @property
    def output_size(self) -> Size:
        """The size frames leave at now (before the first frame: the size the template's will)."""
        if self._levels:
            return self._levels[self._ladder.level][1]
        return output_size(self._playout.template.size, self._max_long_side)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        # From handing over the last frame to asking for this one the sender was encoding and sending:
        # the share of a frame interval that takes says whether a larger picture would still fit.
        asked_at = time.monotonic()
        busy = None if self._returned_at is None else asked_at - self._returned_at
        index = self._next_index
        late = await self._clock.sleep_until(index / self._fps)
        skip = 0
        if late >= 1.0 / self._fps:
            # Too late for this frame: skip to the frame due now instead of queueing a burst.
            skip = int(late * self._fps)
            self._playout.stats.frames_dropped += skip
            index += skip
            late -= skip / self._fps
        self._playout.stats.video_send_lateness.append(late)
        image = self._playout.frame_for(index)
        width, height = self._size_for(image, late, skip, busy)
        if image.shape[1] != width or image.shape[0] != height:
            # Scaled before the I420 conversion, which then has fewer pixels to convert.
            source = (image.shape[1], image.shape[0])
            image = cv2.resize(image, (width, height), interpolation=interpolation(source, (width, height)))
        frame = av.VideoFrame.from_ndarray(_bgr_to_i420(image), format="yuv420p")
        frame.pts = index * self._pts_step
        frame.time_base = self._time_base
        self._next_index = index + 1
        self._returned_at = time.monotonic()
        return frame

    def _size_for(self, image: np.ndarray, late: float, skip: int, busy: float | None) -> Size:
        source = (int(image.shape[1]), int(image.shape[0]))
        if source != self._source_size:
            self._source_size = source
            base = output_size(source, self._max_long_side)
            self._levels = ladder_sizes(base) if self._adaptive else [("video_full", base)]
            self._ladder.set_levels(len(self._levels))
        if len(self._levels) > 1:
            level = self._ladder.level
            up_ratio = _area(self._levels[level - 1][1]) / _area(self._levels[level][1]) if level else 1.0
            changed = self._ladder.observe(late, skip, busy, up_ratio)
            if changed is not None and self._emit_event is not None:
                name, size = self._levels[changed]
                event = {"type": "quality", "level": name, "output_size": list(size), "reason": "cpu"}
                self._emit_event(event)
        return self._levels[self._ladder.level][1]


def _area(size: Size) -> int:
    return size[0] * size[1]


def _bgr_to_i420(image: np.ndarray) -> np.ndarray:
    # The encoders want yuv420p; OpenCV's conversion is several times faster than swscale's here.
    return cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
