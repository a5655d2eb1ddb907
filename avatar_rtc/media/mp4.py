"""H.264 + AAC into an MP4 file: the one writer of the call recorder and of offline rendering.

Both streams are placed on the media timeline: a video frame by its index (pts in 1/fps), audio by
the media sample it starts at (pts in 1/sample_rate), so a file is in sync by construction. Audio is
encoded in whole AAC frames (the encoder takes no other size except for the last one); a gap in it up
to :data:`MAX_SILENCE_FILL_S` is filled with silence, and audio that overlaps what is written already
is cut. A video frame of another size than the file's is letterboxed into it, never cropped.

Calls may come from a worker thread that a cancelled caller stops waiting for while it still encodes:
every call holds one lock, so :meth:`Mp4Writer.abort` waits for that write instead of freeing the
container under it (which crashes the process inside FFmpeg).
"""

from __future__ import annotations

import fractions
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np

AAC_FRAME_SAMPLES = 1024
# Gaps in the audio longer than this are not filled: something is badly wrong upstream, and a file
# padded with minutes of silence helps nobody.
MAX_SILENCE_FILL_S = 10.0


@dataclass(frozen=True)
class Mp4Encoding:
    """How the streams are encoded: libx264's ``preset`` and ``crf``, its thread count (None: its own
    choice), and the AAC bitrate (bits/s)."""

    preset: str
    crf: int
    audio_bitrate: int
    threads: int | None = None


@dataclass(frozen=True)
class AudioWritten:
    """What one :meth:`Mp4Writer.write_audio` added: samples in all, and how many of them are silence
    filled into a gap before the new audio."""

    samples: int
    silence: int


class Mp4Writer:
    """One MP4 file of ``size`` (width, height) at ``fps`` with mono audio at ``sample_rate``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: tuple[int, int],
        fps: int,
        sample_rate: int,
        encoding: Mp4Encoding,
    ) -> None:
        self.path = Path(path)
        options = {"preset": encoding.preset, "crf": str(encoding.crf)}
        if encoding.threads is not None:
            options["threads"] = str(encoding.threads)
        self._container: Any = av.open(str(path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps, options=options)
        self._video.width, self._video.height = size
        self._video.pix_fmt = "yuv420p"
        self._video_time_base = fractions.Fraction(1, fps)
        self._audio = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._audio.bit_rate = encoding.audio_bitrate
        self._audio_time_base = fractions.Fraction(1, sample_rate)
        self._sample_rate = sample_rate
        self._last_video_index = -1
        self._next_audio_sample: int | None = None  # media sample the audio written so far ends at
        self._audio_buffer = np.zeros(0, np.int16)  # not yet a whole AAC frame
        self._audio_pts = 0  # media sample the buffer starts at
        self._lock = threading.Lock()
        self._closed = False

    # -- writing ------------------------------------------------------------------------------------------
    def write(self, image_bgr: np.ndarray, pcm: np.ndarray) -> None:
        """The next video frame and the mono int16 audio that plays during it, both straight after
        what is written already (from the start of the timeline)."""
        with self._lock:
            self._check_open()
            self._write(image_bgr, pcm)

    def _write(self, image_bgr: np.ndarray, pcm: np.ndarray) -> None:
        self._write_video(self._last_video_index + 1, av.VideoFrame.from_ndarray(image_bgr, format="bgr24"))
        if len(pcm):
            self._write_audio(self._next_audio_sample or 0, pcm)

    def write_video(self, index: int, frame: av.VideoFrame) -> bool:
        """``frame`` as video frame ``index``; False (nothing written) when a frame at or after that
        index is written already."""
        with self._lock:
            self._check_open()
            return self._write_video(index, frame)

    def write_audio(self, start: int, pcm: np.ndarray) -> AudioWritten:
        """Mono int16 ``pcm`` from media sample ``start``; the first audio written places the stream on
        the timeline (where it really started, like the video)."""
        with self._lock:
            self._check_open()
            return self._write_audio(start, pcm)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the MP4 writer is closed")

    def _write_video(self, index: int, frame: av.VideoFrame) -> bool:
        if index <= self._last_video_index:
            return False
        if (frame.width, frame.height) != (self._video.width, self._video.height):
            # The call changed size (a template of another shape, or a lower output resolution under
            # load): the file keeps the size it started with, the new picture fitted in without cropping.
            frame = _letterboxed(frame, self._video.width, self._video.height)
        frame.pts = index
        frame.time_base = self._video_time_base
        self._container.mux(self._video.encode(frame))
        self._last_video_index = index
        return True

    def _write_audio(self, start: int, pcm: np.ndarray) -> AudioWritten:
        if self._next_audio_sample is None:
            self._audio_pts = start
            self._next_audio_sample = start
        gap = start - self._next_audio_sample
        silence = 0
        new = pcm
        if gap < 0:  # overlaps what is already written: keep only the new part
            new = pcm[-gap:]
        elif 0 < gap <= MAX_SILENCE_FILL_S * self._sample_rate:
            new = np.concatenate([np.zeros(gap, np.int16), pcm])
            silence = gap
        elif gap > 0:
            # Too long to fill: end what is buffered on a whole AAC frame and start again at ``start``.
            self._drain_audio(rest="pad")
            self._audio_pts = start
        self._next_audio_sample = start + len(pcm)
        self._audio_buffer = np.concatenate([self._audio_buffer, new])
        self._drain_audio(rest="keep")
        return AudioWritten(samples=len(new), silence=silence)

    def _drain_audio(self, rest: Literal["keep", "pad", "last"]) -> None:
        """Encode the buffered audio in whole AAC frames. What is left over is kept for later
        (``rest="keep"``), padded with silence to a whole frame (``"pad"``: more audio follows), or
        encoded as a shorter last frame (``"last"``: the stream ends, exactly as long as its audio)."""
        buffer = self._audio_buffer
        end = len(buffer) // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES
        if end < len(buffer) and rest == "pad":
            buffer = np.concatenate([buffer, np.zeros(-len(buffer) % AAC_FRAME_SAMPLES, np.int16)])
            end = len(buffer)
        elif rest == "last":
            end = len(buffer)
        for lo in range(0, end, AAC_FRAME_SAMPLES):
            chunk = buffer[lo : lo + AAC_FRAME_SAMPLES].astype(np.float32) / 32768.0
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate = self._sample_rate
            frame.pts = self._audio_pts
            frame.time_base = self._audio_time_base
            self._audio_pts += len(chunk)
            self._container.mux(self._audio.encode(frame))
        self._audio_buffer = buffer[end:]

    # -- ending -------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Encode what is buffered and finish the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._drain_audio(rest="last")
                for stream in (self._video, self._audio):
                    self._container.mux(stream.encode(None))
            finally:
                self._container.close()

    def abort(self) -> None:
        """Give the file up: stop writing (after a write in progress) and remove what was written."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._container.close()
        self.path.unlink(missing_ok=True)


def _letterboxed(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """``frame`` scaled to fit ``width`` x ``height`` whole, centred on black, as yuv420p."""
    image = frame.to_ndarray(format="bgr24")
    scale = min(width / frame.width, height / frame.height)
    fitted = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    canvas = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - fitted[0]) // 2, (height - fitted[1]) // 2
    canvas[y0 : y0 + fitted[1], x0 : x0 + fitted[0]] = cv2.resize(image, fitted, interpolation=cv2.INTER_AREA)
    return av.VideoFrame.from_ndarray(canvas, format="bgr24").reformat(format="yuv420p")
