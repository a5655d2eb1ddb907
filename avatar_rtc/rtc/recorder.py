"""Opt-in recording of one call: exactly the audio and video frames the session's tracks sent, as
an MP4 file (H.264 + AAC).

The tracks are wrapped (``SessionRecorder.tap``): each frame a sender pulls is copied into a bounded
queue and the media loop moves on. A worker thread encodes and writes. When the queue is full the
frame is dropped from the recording (counted), never waited for, so a slow disk cannot stall a call.
Both tracks stamp frames on the session's one media clock, so the file is in sync by construction;
audio the track skipped (it fell behind) is filled with silence to keep it that way.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from avatar_rtc.config import RecordingSettings

log = logging.getLogger(__name__)

AAC_FRAME_SAMPLES = 1024
# Gaps in the audio longer than this are not filled: something is badly wrong upstream, and a file
# padded with minutes of silence helps nobody.
MAX_SILENCE_FILL_S = 10.0


def recording_wanted(settings: RecordingSettings, requested: object) -> bool:
    """Whether a session records: ``requested`` is the offer body's ``record`` field."""
    return settings.mode == "always" or (settings.mode == "on_request" and requested is True)


@dataclass
class RecorderStats:
    video_frames_written: int = 0
    audio_samples_written: int = 0
    silence_samples_filled: int = 0
    frames_dropped: int = 0  # queue full: not recorded


@dataclass(frozen=True)
class _VideoItem:
    index: int  # media frame index (pts in 1/fps)
    yuv: np.ndarray  # yuv420p planes as one (h * 3 / 2, w) array


@dataclass(frozen=True)
class _AudioItem:
    start: int  # media sample index
    pcm: np.ndarray  # mono int16


class SessionRecorder:
    """Records one session to ``path``. Create it, ``tap`` both tracks before they are added to the
    peer connection, and ``await aclose()`` when the session ends."""

    def __init__(self, path: Path, fps: int, sample_rate: int, settings: RecordingSettings) -> None:
        self.path = path
        self.fps = fps
        self.sample_rate = sample_rate
        self.settings = settings
        self.stats = RecorderStats()
        self.error: BaseException | None = None
        self._queue: queue.Queue[_VideoItem | _AudioItem] = queue.Queue(settings.max_queue_frames)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"recorder-{path.stem}", daemon=True)
        self._thread.start()

    @classmethod
    def for_session(
        cls, session_id: str, settings: RecordingSettings, fps: int, sample_rate: int
    ) -> SessionRecorder:
        return cls(settings.directory / f"{session_id}.mp4", fps, sample_rate, settings)

    def tap(self, track: MediaStreamTrack) -> MediaStreamTrack:
        """A track that sends what ``track`` sends and records a copy of each frame."""
        return _TappedTrack(track, self)

    # -- media loop side --------------------------------------------------------------------------
    def offer(self, frame: av.AudioFrame | av.VideoFrame) -> None:
        """Queue a copy of a frame just sent; drops it if the encoder is behind. Never blocks."""
        if self._stopping.is_set() or self.error is not None or frame.pts is None:
            return
        item: _VideoItem | _AudioItem
        if isinstance(frame, av.VideoFrame):
            index = round(float(frame.pts * frame.time_base) * self.fps)
            yuv = frame.to_ndarray() if frame.format.name == "yuv420p" else frame.to_ndarray(format="yuv420p")
            item = _VideoItem(index, yuv)
        else:
            if frame.sample_rate != self.sample_rate:
                return
            samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            pcm = samples[:, 0] if samples.shape[1] > 1 else samples.reshape(-1)
            item = _AudioItem(int(frame.pts), np.ascontiguousarray(pcm, dtype=np.int16))
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats.frames_dropped += 1

    async def aclose(self) -> None:
        """Write what is queued, finish the file, and stop the worker."""
        self._stopping.set()
        await asyncio.to_thread(self._thread.join)

    # -- worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._write_all()
        except Exception as error:  # disk full, bad directory: the call goes on without recording
            self.error = error
            log.error("recording %s failed: %s", self.path, error, exc_info=error)
            self._stopping.set()

    def _items(self) -> list[_VideoItem | _AudioItem]:
        """Block until something is queued (or stopping with nothing left); then take what is there."""
        items: list[_VideoItem | _AudioItem] = []
        while not items:
            try:
                items.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                if self._stopping.is_set():
                    return []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _write_all(self) -> None:
        # The MP4 header needs both streams, and the video stream needs the frame size: hold audio
        # until the first video frame arrives.
        pending: list[_VideoItem | _AudioItem] = []
        writer: _Mp4Writer | None = None
        while batch := self._items():
            if writer is None:
                pending.extend(batch)
                first_video = next((i for i in pending if isinstance(i, _VideoItem)), None)
                if first_video is None:
                    continue
                height, width = first_video.yuv.shape[0] * 2 // 3, first_video.yuv.shape[1]
                writer = _Mp4Writer(self.path, width, height, self.fps, self.sample_rate, self.settings)
                batch, pending = pending, []
            for item in batch:
                writer.write(item, self.stats)
        if writer is not None:
            writer.close(self.stats)
        elif pending:
            log.warning("recording %s: no video frame was sent; nothing written", self.path)


class _Mp4Writer:
    def __init__(
        self, path: Path, width: int, height: int, fps: int, sample_rate: int, settings: RecordingSettings
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w", format="mp4")
        self.video = self.container.add_stream(
            "libx264",
            rate=fps,
            options={
                "preset": settings.video_preset,
                "crf": str(settings.video_crf),
                "threads": str(settings.encoder_threads),
            },
        )
        self.video.width, self.video.height = width, height
        self.video.pix_fmt = "yuv420p"
        self.video_time_base = fractions.Fraction(1, fps)
        self.audio = self.container.add_stream("aac", rate=sample_rate, layout="mono")
        self.audio.bit_rate = settings.audio_bitrate
        self.audio_time_base = fractions.Fraction(1, sample_rate)
        self.sample_rate = sample_rate
        self.last_video_index = -1
        self.next_audio_sample: int | None = None  # media sample the buffer below ends at
        self.audio_buffer = np.zeros(0, np.int16)
        self.audio_pts = 0  # samples handed to the encoder

    def write(self, item: _VideoItem | _AudioItem, stats: RecorderStats) -> None:
        if isinstance(item, _VideoItem):
            self._write_video(item, stats)
        else:
            self._write_audio(item, stats)

    def _write_video(self, item: _VideoItem, stats: RecorderStats) -> None:
        if item.index <= self.last_video_index:
            return
        frame = av.VideoFrame.from_ndarray(item.yuv, format="yuv420p")
        if (frame.width, frame.height) != (self.video.width, self.video.height):
            # The call changed size (a template of another shape, or a lower output resolution under
            # load): the file keeps the size it started with, the new picture fitted in without cropping.
            frame = _letterboxed(frame, self.video.width, self.video.height)
        frame.pts = item.index
        frame.time_base = self.video_time_base
        self.container.mux(self.video.encode(frame))
        self.last_video_index = item.index
        stats.video_frames_written += 1

    def _write_audio(self, item: _AudioItem, stats: RecorderStats) -> None:
        pcm = item.pcm
        if self.next_audio_sample is None:
            # Start the audio on the media timeline where it really started, like the video.
            self.audio_pts = item.start
            self.next_audio_sample = item.start
        gap = item.start - self.next_audio_sample
        if gap < 0:  # overlaps what is already written: keep only the new part
            pcm = pcm[-gap:]
        elif 0 < gap <= MAX_SILENCE_FILL_S * self.sample_rate:
            pcm = np.concatenate([np.zeros(gap, np.int16), pcm])
            stats.silence_samples_filled += gap
        elif gap > 0:
            self._drain_audio(final=True)
            self.audio_pts = item.start
        self.next_audio_sample = item.start + len(item.pcm)
        self.audio_buffer = np.concatenate([self.audio_buffer, pcm])
        stats.audio_samples_written += len(pcm)
        self._drain_audio(final=False)

    def _drain_audio(self, final: bool) -> None:
        buffer = self.audio_buffer
        whole = len(buffer) // AAC_FRAME_SAMPLES * AAC_FRAME_SAMPLES
        if final and whole < len(buffer):
            buffer = np.concatenate([buffer, np.zeros(-len(buffer) % AAC_FRAME_SAMPLES, np.int16)])
            whole = len(buffer)
        for lo in range(0, whole, AAC_FRAME_SAMPLES):
            chunk = buffer[lo : lo + AAC_FRAME_SAMPLES].astype(np.float32) / 32768.0
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self.audio_pts
            frame.time_base = self.audio_time_base
            self.audio_pts += AAC_FRAME_SAMPLES
            self.container.mux(self.audio.encode(frame))
        self.audio_buffer = buffer[whole:]

    def close(self, stats: RecorderStats) -> None:
        try:
            self._drain_audio(final=True)
            self.container.mux(self.video.encode(None))
            self.container.mux(self.audio.encode(None))
        finally:
            self.container.close()


def _letterboxed(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """``frame`` scaled to fit ``width`` x ``height`` whole, centred on black, as yuv420p."""
    image = frame.to_ndarray(format="bgr24")
    scale = min(width / frame.width, height / frame.height)
    fitted = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    canvas = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - fitted[0]) // 2, (height - fitted[1]) // 2
    canvas[y0 : y0 + fitted[1], x0 : x0 + fitted[0]] = cv2.resize(image, fitted, interpolation=cv2.INTER_AREA)
    return av.VideoFrame.from_ndarray(canvas, format="bgr24").reformat(format="yuv420p")


class _TappedTrack(MediaStreamTrack):
    """Forwards ``source``'s frames unchanged and hands each to the recorder on the way."""

    def __init__(self, source: MediaStreamTrack, recorder: SessionRecorder) -> None:
        super().__init__()
        self.kind = source.kind
        self._source = source
        self._recorder = recorder

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        frame = await self._source.recv()
        self._recorder.offer(frame)
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.stop()
