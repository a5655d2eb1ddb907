"""Opt-in recording of one call: exactly the audio and video frames the session's tracks sent, as
an MP4 file (H.264 + AAC).

The tracks are wrapped (``SessionRecorder.tap``): each frame a sender pulls is copied into a bounded
queue and the media loop moves on. A worker thread encodes and writes. When the queue is full the
frame is dropped from the recording (counted), never waited for, so a slow disk cannot stall a call.
Both tracks stamp frames on the session's one media clock, so the file is in sync by construction;
audio the track skipped (it fell behind) is filled with silence to keep it that way
(:class:`~avatar_rtc.media.mp4.Mp4Writer`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamTrack

from avatar_rtc.config import RecordingSettings
from avatar_rtc.media.mp4 import Mp4Encoding, Mp4Writer

log = logging.getLogger(__name__)


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
            writer.close()
        elif pending:
            log.warning("recording %s: no video frame was sent; nothing written", self.path)


class _Mp4Writer:
    """The worker's queued items into the MP4 file, counted in the recorder's stats."""

    def __init__(
        self, path: Path, width: int, height: int, fps: int, sample_rate: int, settings: RecordingSettings
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        encoding = Mp4Encoding(
            preset=settings.video_preset,
            crf=settings.video_crf,
            audio_bitrate=settings.audio_bitrate,
            threads=settings.encoder_threads,
        )
        self.file = Mp4Writer(path, (width, height), fps, sample_rate, encoding)

    def write(self, item: _VideoItem | _AudioItem, stats: RecorderStats) -> None:
        if isinstance(item, _VideoItem):
            if self.file.write_video(item.index, av.VideoFrame.from_ndarray(item.yuv, format="yuv420p")):
                stats.video_frames_written += 1
        else:
            written = self.file.write_audio(item.start, item.pcm)
            stats.audio_samples_written += written.samples
            stats.silence_samples_filled += written.silence

    def close(self) -> None:
        self.file.close()


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
