"""The session's two outgoing tracks. Each paces itself against the shared media clock and reads
the playout at its own media time, so audio and video of the same instant leave together."""

from __future__ import annotations

import fractions

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_rtc.rtc.clock import MediaClock
from avatar_rtc.rtc.playout import Playout

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
            self._playout.read_audio(self._next_sample, skipped)  # consume what can no longer play
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
    """

    kind = "video"

    def __init__(self, clock: MediaClock, playout: Playout) -> None:
        super().__init__()
        self._clock = clock
        self._playout = playout
        self._fps = playout.fps
        self._pts_step = VIDEO_CLOCK_RATE // self._fps
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        self._next_index = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        index = self._next_index
        late = await self._clock.sleep_until(index / self._fps)
        if late >= 1.0 / self._fps:
            # Too late for this frame: skip to the frame due now instead of queueing a burst.
            skip = int(late * self._fps)
            self._playout.stats.frames_dropped += skip
            index += skip
            late -= skip / self._fps
        self._playout.stats.video_send_lateness.append(late)
        image = self._playout.frame_for(index)
        frame = av.VideoFrame.from_ndarray(_bgr_to_i420(image), format="yuv420p")
        frame.pts = index * self._pts_step
        frame.time_base = self._time_base
        self._next_index = index + 1
        return frame


def _bgr_to_i420(image: np.ndarray) -> np.ndarray:
    # The encoders want yuv420p; OpenCV's conversion is several times faster than swscale's here.
    return cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
