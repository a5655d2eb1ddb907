"""Rendering to a file: an MP4 (H.264 + AAC) with audio and video of equal length, whose mouth moves with
its audio, made through the same speaker, renderer and playout as a live call."""

from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from avatar_rtc.avatar import face
from avatar_rtc.avatar.template import Template
from avatar_rtc.conversation.offline import AudioClipSpeech, decode_audio, render_to_file
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.render.warp import WarpEngine

TEXT = "Hello there! I am rendered to a file. Every word moves my mouth, and the pauses close it."


def _probe(path: Path) -> tuple[list[np.ndarray], np.ndarray, dict[str, float | str]]:
    """Decoded video frames (gray), decoded audio (mono float), and what the streams say about themselves."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        meta: dict[str, float | str] = {
            "video_codec": video.codec_context.name,
            "audio_codec": audio.codec_context.name,
            "video_s": float(video.duration * video.time_base),
            "audio_s": float(audio.duration * audio.time_base),
            "fps": float(video.average_rate),
            "sample_rate": float(audio.sample_rate),
        }
        frames = [f.to_ndarray(format="gray").astype(np.float32) for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        samples = [f.to_ndarray().mean(axis=0) for f in container.decode(audio=0)]
    return frames, np.concatenate(samples), meta


@pytest.fixture(scope="module")
def rendered(
    tmp_path_factory: pytest.TempPathFactory, default_template: Template, piper_tts: TextToSpeech
) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("render") / "speech.mp4"
    seen: list[tuple[int, int | None]] = []
    result = asyncio.run(
        render_to_file(
            path, default_template, WarpEngine(), piper_tts, TEXT, progress=lambda d, t: seen.append((d, t))
        )
    )
    assert result.frames == seen[-1][0] == seen[-1][1], "the progress ends at the total"
    assert result.speech_s > 3.0
    return path, result.speech_s


def test_mp4_has_h264_and_aac_of_equal_length(rendered: tuple[Path, float]) -> None:
    path, speech_s = rendered
    frames, audio, meta = _probe(path)
    assert meta["video_codec"] == "h264" and meta["audio_codec"] == "aac"
    assert meta["fps"] == 25 and meta["sample_rate"] == 48000
    frame_s = 1 / 25
    assert abs(float(meta["video_s"]) - float(meta["audio_s"])) <= frame_s
    assert abs(len(frames) * frame_s - len(audio) / 48000) <= frame_s
    assert speech_s <= len(frames) * frame_s <= speech_s + 0.3


def test_mouth_moves_with_the_audio(rendered: tuple[Path, float], default_template: Template) -> None:
    frames, audio, _ = _probe(rendered[0])
    landmarks = default_template.landmarks[0]
    corners = landmarks[[face.MOUTH_LEFT_CORNER, face.MOUTH_RIGHT_CORNER]]
    top, chin = landmarks[face.UPPER_LIP_OUTER_CENTRE, 1], landmarks[face.CHIN, 1]
    x0, x1 = int(corners[:, 0].min()), int(corners[:, 0].max())
    y0, y1 = int(top), int(0.5 * (top + chin))
    darkness = np.array([255.0 - frame[y0:y1, x0:x1].mean() for frame in frames])
    per_frame = 48000 // 25
    envelope = np.array(
        [np.sqrt(np.mean(audio[i * per_frame : (i + 1) * per_frame] ** 2)) for i in range(len(frames))]
    )
    correlation = float(np.corrcoef(darkness, envelope)[0, 1])
    # Visemes shape the mouth by the phonemes (lips shut on a loud "m"), so darkness follows loudness
    # only in part, and piper samples its voice anew each run: r was 0.48-0.58 over nine runs here. A
    # mouth that does not move gives no correlation at all (nan), one a few frames late much less.
    assert correlation > 0.35, f"mouth darkness should follow the audio envelope (r = {correlation:.2f})"
    quiet = envelope < 0.1 * envelope.max()
    assert darkness[~quiet].mean() > darkness[quiet].mean() + 3, "an open mouth is darker than a shut one"


async def test_audio_file_renders_to_its_own_length(
    tmp_path: Path, default_template: Template, piper_tts: TextToSpeech
) -> None:
    pcm = np.concatenate([chunk async for chunk in piper_tts.synthesize("Lip sync to a recording.")])
    wav_path = tmp_path / "speech.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(piper_tts.sample_rate)
        wav.writeframes(pcm.tobytes())
    clip = decode_audio(wav_path)
    clip_s = len(clip) / 48000
    assert abs(clip_s - len(pcm) / piper_tts.sample_rate) < 0.01
    out = tmp_path / "clip.mp4"
    result = await render_to_file(
        out, default_template, WarpEngine(), AudioClipSpeech(clip, 48000), tail_s=0.0
    )
    frames, _, meta = _probe(out)
    assert abs(result.duration_s - clip_s) <= 1 / 25
    assert abs(float(meta["video_s"]) - float(meta["audio_s"])) <= 1 / 25
    assert len(frames) == result.frames


async def test_nothing_to_say_is_refused(
    tmp_path: Path, default_template: Template, piper_tts: TextToSpeech
) -> None:
    with pytest.raises(ValueError, match="nothing to say"):
        await render_to_file(tmp_path / "empty.mp4", default_template, WarpEngine(), piper_tts, "   ")
    assert not (tmp_path / "empty.mp4").exists()


async def test_a_cancelled_render_waits_for_its_encoder_before_closing(
    tmp_path: Path, default_template: Template, piper_tts: TextToSpeech, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a render (its client went away) abandons the await on an encoder call that is still
    running in a thread; closing the container under that call crashed the process inside FFmpeg."""
    from avatar_rtc.conversation import offline

    in_write = asyncio.Event()
    real_write = offline.Mp4Writer._write
    loop = asyncio.get_running_loop()

    def slow_write(self: offline.Mp4Writer, image: np.ndarray, pcm: np.ndarray) -> None:
        loop.call_soon_threadsafe(in_write.set)
        real_write(self, image, pcm)
        time.sleep(0.3)  # the encoder is busy when the cancellation arrives

    closes: list[float] = []
    real_abort = offline.Mp4Writer.abort

    def timed_abort(self: offline.Mp4Writer) -> None:
        real_abort(self)
        closes.append(time.monotonic())

    monkeypatch.setattr(offline.Mp4Writer, "_write", slow_write)
    monkeypatch.setattr(offline.Mp4Writer, "abort", timed_abort)
    output = tmp_path / "cancelled.mp4"
    task = asyncio.ensure_future(render_to_file(output, default_template, WarpEngine(), piper_tts, TEXT))
    await in_write.wait()
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closes and closes[0] - cancelled_at >= 0.2, "the container was closed while a write was running"
    assert not output.exists()
