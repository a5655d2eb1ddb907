"""Recording writes what the tracks sent, in sync, and never holds up the media loop."""

from __future__ import annotations

import asyncio
import fractions
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack

from avatar_rtc.rtc.recorder import RecordingSettings, SessionRecorder, _Mp4Writer, recording_wanted
from avatar_rtc.testing.receiver import CallReceiver

FPS = 25
RATE = 48000
AUDIO_FRAME = RATE // 50  # 20 ms
SIZE = 128
SWITCH_S = 1.0  # the picture turns white and a tone starts at this media time


class _SourceTrack(MediaStreamTrack):
    """Frames stamped like AvatarVideoTrack / AvatarAudioTrack, with a marker at SWITCH_S, and a
    stretch of audio the track 'skipped' (as it does when it falls behind)."""

    def __init__(
        self,
        kind: str,
        skip_audio_frames: tuple[int, ...] = (),
        size_after_switch: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._n = 0
        self._skip = set(skip_audio_frames)
        self._size_after_switch = size_after_switch

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        n = self._n
        self._n += 1
        if self.kind == "video":
            level = 235 if n / FPS >= SWITCH_S else 16
            width, height = SIZE, SIZE
            if n / FPS >= SWITCH_S and self._size_after_switch is not None:
                width, height = self._size_after_switch
            yuv = np.full((height * 3 // 2, width), 128, np.uint8)
            yuv[:height] = level
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts, frame.time_base = n * 3600, fractions.Fraction(1, 90000)
            return frame
        while n in self._skip:
            n = self._n
            self._n += 1
        t = (n * AUDIO_FRAME + np.arange(AUDIO_FRAME)) / RATE
        pcm = np.where(t >= SWITCH_S, 12000 * np.sin(2 * np.pi * 440 * t), 0).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, n * AUDIO_FRAME, fractions.Fraction(1, RATE)
        return frame


def _decode(path: Path) -> tuple[list[tuple[float, float]], np.ndarray, dict[str, str]]:
    """(time, mean luma) per video frame, the mono audio from t=0, and codec names."""
    with av.open(str(path)) as container:
        codecs = {s.type: s.codec_context.name for s in container.streams}
        video = [
            (float(f.pts * f.time_base), float(f.to_ndarray(format="gray").mean()))
            for f in container.decode(video=0)
        ]
    with av.open(str(path)) as container:
        chunks, first = [], None
        for f in container.decode(audio=0):
            if first is None:
                first = float(f.pts * f.time_base)
            chunks.append(f.to_ndarray().reshape(-1))
        audio = np.concatenate(chunks)
        lead = np.zeros(round((first or 0.0) * RATE), np.float32)
    return video, np.concatenate([lead, audio]), codecs


async def test_recording_holds_what_was_sent_in_sync(tmp_path: Path) -> None:
    settings = RecordingSettings(mode="always", directory=tmp_path)
    recorder = SessionRecorder.for_session("s1", settings, FPS, RATE)
    video = recorder.tap(_SourceTrack("video"))
    audio = recorder.tap(_SourceTrack("audio", skip_audio_frames=(20, 21, 22)))
    for _ in range(2 * FPS):
        await video.recv()
    for _ in range(2 * 50 - 3):
        await audio.recv()
    await recorder.aclose()

    assert recorder.error is None and recorder.stats.frames_dropped == 0
    assert recorder.stats.video_frames_written == 2 * FPS
    assert recorder.stats.silence_samples_filled == 3 * AUDIO_FRAME
    frames, pcm, codecs = _decode(tmp_path / "s1.mp4")
    assert codecs == {"video": "h264", "audio": "aac"}
    assert len(frames) == 2 * FPS
    white_at = next(t for t, luma in frames if luma > 128)
    envelope = np.abs(pcm) > 0.1
    tone_at = int(np.argmax(envelope)) / RATE
    assert abs(white_at - SWITCH_S) < 1 / FPS + 1e-6, white_at
    # AAC's encoder delay and the 20 ms frames put the tone within a frame of the picture change.
    assert abs(tone_at - SWITCH_S) < 0.045, tone_at
    assert abs(len(pcm) / RATE - 2.0) < 0.1


async def test_a_change_of_picture_size_is_fitted_into_the_recording(tmp_path: Path) -> None:
    """A template of another shape (or a lower output resolution) mid-call: the file keeps its size and
    shows the new picture whole, centred, instead of failing."""
    settings = RecordingSettings(mode="always", directory=tmp_path)
    recorder = SessionRecorder.for_session("s2", settings, FPS, RATE)
    video = recorder.tap(_SourceTrack("video", size_after_switch=(SIZE // 2, SIZE)))
    for _ in range(2 * FPS):
        await video.recv()
    await recorder.aclose()
    assert recorder.error is None and recorder.stats.video_frames_written == 2 * FPS
    with av.open(str(tmp_path / "s2.mp4")) as container:
        last = [f.to_ndarray(format="gray") for f in container.decode(video=0)][-1]
    assert last.shape == (SIZE, SIZE)
    # The portrait picture fills the height in the middle half; black bars either side.
    assert last[:, SIZE // 4 + 4 : 3 * SIZE // 4 - 4].mean() > 200
    assert last[:, : SIZE // 4 - 4].mean() < 30 and last[:, 3 * SIZE // 4 + 4 :].mean() < 30


async def test_a_slow_encoder_drops_frames_and_never_blocks(tmp_path: Path, monkeypatch) -> None:
    def slow_write(self: _Mp4Writer, item: object, stats: object) -> None:
        time.sleep(0.05)

    monkeypatch.setattr(_Mp4Writer, "write", slow_write)
    settings = RecordingSettings(mode="always", directory=tmp_path, max_queue_frames=8)
    recorder = SessionRecorder.for_session("slow", settings, FPS, RATE)
    video = recorder.tap(_SourceTrack("video"))
    worst = 0.0
    for _ in range(100):
        started = time.perf_counter()
        await video.recv()
        worst = max(worst, time.perf_counter() - started)
    assert recorder.stats.frames_dropped > 50
    assert worst < 0.01, f"recv took {worst * 1000:.1f} ms with a stalled encoder"
    await recorder.aclose()


async def test_unwritable_directory_stops_recording_not_the_call(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recorder = SessionRecorder(blocker / "x.mp4", FPS, RATE, RecordingSettings(mode="always"))
    video = recorder.tap(_SourceTrack("video"))
    for _ in range(10):
        await video.recv()
    await recorder.aclose()
    assert recorder.error is not None


def test_recording_is_opt_in() -> None:
    assert not recording_wanted(RecordingSettings(), True)
    assert not recording_wanted(RecordingSettings(mode="on_request"), None)
    assert not recording_wanted(RecordingSettings(mode="on_request"), "yes")
    assert recording_wanted(RecordingSettings(mode="on_request"), True)
    assert recording_wanted(RecordingSettings(mode="always"), None)


# -- needs the wiring: Settings.recording, `record` in the /offer body, Session taps and closes ------
@pytest.mark.slow
async def test_a_call_that_asks_is_recorded(make_server, tmp_path: Path) -> None:
    server = await make_server(settings={"recording": {"mode": "on_request", "directory": str(tmp_path)}})
    async with aiohttp.ClientSession() as http:

        async def post(offer):  # type: ignore[no-untyped-def]
            body = {"sdp": offer.sdp, "type": offer.type, "record": True}
            async with http.post(f"{server.url}/offer", json=body) as resp:
                resp.raise_for_status()
                return await resp.json()

        receiver = CallReceiver()
        await receiver.connect(post)
        receiver.send({"type": "say", "text": "Recording this."})
        await receiver.wait_event(lambda e: e.get("type") == "metrics", 20)
        plain = CallReceiver()
        await plain.connect_http(server.url, http)
        await asyncio.sleep(0.5)
        await receiver.close()
        await plain.close()
        # The session finishes its file while it closes, then leaves the manager.
        for _ in range(100):
            if not server.services.sessions.sessions:
                break
            await asyncio.sleep(0.1)
    recordings = sorted(await asyncio.to_thread(lambda: list(tmp_path.glob("*.mp4"))))
    assert [p.stem for p in recordings] == [receiver.session_id]
    frames, pcm, codecs = _decode(recordings[0])
    assert codecs == {"video": "h264", "audio": "aac"}
    assert len(frames) > FPS
    assert np.abs(pcm).max() > 0.05  # the speech is in it
