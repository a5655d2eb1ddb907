"""Render speech to an MP4 file through the same speaker, renderer, template and playout as a live call.

The only difference from a call is the clock: a virtual media clock that moves one video frame at a
time, as soon as that frame's audio and picture are known, instead of with the wall clock. So a file
is made as fast as the renderer can go, and it shows exactly what a caller would have seen: the same
media-time scheduling, the same idle loop between sentences, the same frames.

Audio and video have equal length by construction: each video frame is written with the
``sample_rate / fps`` audio samples that play during it. The file is H.264 (yuv420p) + AAC, written
by :class:`~avatar_rtc.media.mp4.Mp4Writer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from avatar_rtc.avatar.template import Template
from avatar_rtc.avatar.video import NotMediaError, SourceTooLargeError
from avatar_rtc.conversation.fair import NO_SESSION
from avatar_rtc.conversation.phonemes import SpeechChunk
from avatar_rtc.conversation.sentences import split_sentences
from avatar_rtc.conversation.speaker import Speaker
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.media import executors
from avatar_rtc.media.mp4 import Mp4Encoding, Mp4Writer
from avatar_rtc.media.playout import Playout, Utterance
from avatar_rtc.render.base import RenderedFrame, RendererEngine

RenderProgress = Callable[[int, int | None], None]
"""Called as ``progress(frames_written, total_frames)``; the total is None until all speech is known."""

# veryfast keeps encoding well under the renderer's cost per frame; crf 20 looks clean at 512 px.
_ENCODING = Mp4Encoding(preset="veryfast", crf=20, audio_bitrate=96_000)

# Waiting for one rendered frame longer than this means the renderer is stuck, not slow.
_FRAME_TIMEOUT_S = 60.0
# A frame whose time is this close to where speech ends is not waited for: the renderer and the
# playout compute that boundary in different floating-point steps and may disagree about it.
_BOUNDARY_S = 1e-6


class VirtualClock:
    """A media clock that only moves when told to."""

    def __init__(self) -> None:
        self.time = 0.0

    def now(self) -> float:
        return self.time


class AudioClipSpeech:
    """A recorded clip in the place of TTS: "synthesising" any text yields the clip, once."""

    name = "audio-file"

    def __init__(self, pcm: np.ndarray, sample_rate: int, chunk_s: float = 2.0) -> None:
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError("expected mono int16 PCM")
        self.pcm = pcm
        self.sample_rate = sample_rate
        self._chunk = max(1, int(chunk_s * sample_rate))

    async def synthesize(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[np.ndarray]:
        for lo in range(0, len(self.pcm), self._chunk):
            yield self.pcm[lo : lo + self._chunk]

    async def synthesize_timed(self, text: str, *, session: str = NO_SESSION) -> AsyncIterator[SpeechChunk]:
        # A recording comes with no phonemes: the face estimates its mouth from the sound.
        async for pcm in self.synthesize(text, session=session):
            yield SpeechChunk(pcm)


def decode_audio(
    path: str | os.PathLike[str], sample_rate: int = 48000, max_seconds: float = 120.0
) -> np.ndarray:
    """The first audio stream of ``path`` as mono int16 at ``sample_rate``."""
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, ValueError) as exc:
        raise NotMediaError(f"not an audio file that can be decoded ({exc})") from exc
    with container:
        if not container.streams.audio:
            raise NotMediaError("the file has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        parts: list[np.ndarray] = []
        samples = 0
        limit = int(max_seconds * sample_rate)
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    samples += len(parts[-1])
                if samples > limit:
                    raise SourceTooLargeError(f"the audio is longer than the limit of {max_seconds:g} s")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as exc:
            raise NotMediaError(f"the audio cannot be decoded ({exc})") from exc
    pcm = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    if len(pcm) == 0:
        raise NotMediaError("the audio stream holds no samples")
    return pcm


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    fps: int
    audio_samples: int
    sample_rate: int
    speech_s: float

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


async def render_to_file(
    output: str | os.PathLike[str],
    template: Template,
    engine: RendererEngine,
    speech: TextToSpeech,
    text: str = "",
    *,
    fps: int | None = None,
    sample_rate: int = 48000,
    tail_s: float = 0.2,
    progress: RenderProgress | None = None,
) -> RenderResult:
    """Speak ``text`` with ``speech`` (a TTS, or :class:`AudioClipSpeech` for a recording) as
    ``template`` and write the result to ``output`` (MP4). ``tail_s`` of idle loop follows the speech.

    Encoding runs in a worker thread; on error the partial file is removed.
    """
    fps = fps or template.fps
    sentences = split_sentences(text) if text.strip() else []
    if isinstance(speech, AudioClipSpeech):
        sentences = [text or "(audio)"]
    if not sentences:
        raise ValueError("nothing to say: give text or an audio file")
    clock = VirtualClock()
    # No lead and no bound on how far ahead speech is queued: nothing plays in real time here, and the
    # clock never runs ahead of the audio the speaker has placed.
    playout = Playout(clock.now, template, fps=fps, sample_rate=sample_rate, lead_s=0.0, max_ahead_s=1e9)
    if not engine.has_extras(template):
        # Nothing waits on this file in real time: compute the renderer's data rather than render on
        # the stand-in renderer a live call would get meanwhile.
        extras = await executors.run_media(engine.template_extras, template)
        template = dataclasses.replace(template, extras={**template.extras, **extras})
    await executors.run_media(engine.warm, template)
    renderer = engine.open(template)
    speaker = Speaker(speech, playout, renderer)
    utterance = Utterance(text)
    samples_per_frame = sample_rate // fps
    frame_s = 1.0 / fps
    output = Path(output)
    writer = Mp4Writer(output, template.size, fps, sample_rate, _ENCODING)
    frames_iter = aiter(renderer.frames())
    waiting: RenderedFrame | None = None
    speak_task = asyncio.create_task(speaker.speak(sentences, utterance))
    index = 0
    end_frame: int | None = None
    done_ok = False
    try:
        while end_frame is None or index < end_frame:
            t = index * frame_s
            # What plays during this frame must be known before the clock may reach it.
            while not speak_task.done() and playout.ahead_s() < frame_s - _BOUNDARY_S:
                await asyncio.wait({speak_task}, timeout=0.002)
            if speak_task.done() and end_frame is None:
                speak_task.result()
                speech_end = utterance.end_time or 0.0
                end_frame = math.ceil(speech_end * fps - _BOUNDARY_S) + round(tail_s * fps)
            if any(s.start_time - _BOUNDARY_S <= t < s.end_time - _BOUNDARY_S for s in utterance.sentences):
                while waiting is None or waiting.index < index:
                    waiting = await asyncio.wait_for(anext(frames_iter), _FRAME_TIMEOUT_S)
                if waiting.index == index:
                    await playout.put_frame(index, waiting.image)
                    waiting = None
            image = playout.frame_for(index)
            pcm = playout.read_audio(index * samples_per_frame, samples_per_frame)
            await executors.run_media(writer.write, image, pcm)
            index += 1
            clock.time = index * frame_s
            if progress is not None:
                progress(index, end_frame)
        await executors.run_media(writer.close)
        done_ok = True
    finally:
        if not speak_task.done():
            speak_task.cancel()
        await asyncio.gather(speak_task, return_exceptions=True)
        await renderer.aclose()
        await frames_iter.aclose()  # type: ignore[attr-defined]
        if not done_ok:
            await executors.run_media(writer.abort)  # also removes the partial file
    return RenderResult(
        path=output,
        frames=index,
        fps=fps,
        audio_samples=index * samples_per_frame,
        sample_rate=sample_rate,
        speech_s=(utterance.end_time or 0.0) - (utterance.start_time or 0.0),
    )
