"""The synchronized playout: scheduling on the media timeline, late frames, barge-in."""

from __future__ import annotations

import asyncio

import numpy as np

from avatar_rtc.avatar.template import Template
from avatar_rtc.conversation.phonemes import SpeechChunk
from avatar_rtc.media.playout import Playout, Utterance


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_template(n: int = 5) -> Template:
    frames = np.stack([np.full((8, 8, 3), i * 10, np.uint8) for i in range(n)])
    return Template("t", 25, frames, np.zeros((n, 478, 2), np.float32))


def make_playout(clock: FakeClock, n: int = 5) -> Playout:
    return Playout(clock, make_template(n), fps=25, sample_rate=48000, lead_s=0.05, max_ahead_s=5.0)


def test_ping_pong_idle_loop_never_jumps() -> None:
    template = make_template(4)
    assert [template.loop_index(i) for i in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert make_template(1).loop_index(7) == 0


async def test_speech_starts_on_a_frame_boundary_after_the_lead_and_continues_seamlessly() -> None:
    clock = FakeClock()
    clock.t = 1.013
    playout = make_playout(clock)
    u = Utterance("hi")
    first = await playout.schedule_audio(np.ones(1000, np.int16), u)
    assert first == 1.08  # 1.013 + 0.05 rounded up to the next 40 ms frame
    second = await playout.schedule_audio(np.ones(500, np.int16), u)
    assert second == first + 1000 / 48000
    # audio before the start is silence, then the scheduled samples
    out = playout.read_audio(int(1.07 * 48000), 960)
    assert np.count_nonzero(out) == 960 - 480
    assert u.first_audio_at is not None


async def test_audio_and_frames_share_the_media_timeline() -> None:
    clock = FakeClock()
    playout = make_playout(clock)
    u = Utterance("x")
    start = await playout.schedule_audio(np.full(1920 * 3, 7, np.int16), u)
    first_index = round(start * 25)
    rendered = np.full((8, 8, 3), 200, np.uint8)
    await playout.put_frame(first_index, rendered)
    assert np.array_equal(playout.frame_for(first_index - 1), playout.template.idle_frame(first_index - 1))
    assert playout.frame_for(first_index) is rendered
    # The next speech frame is missing: the last frame repeats and is counted late.
    assert playout.frame_for(first_index + 1) is rendered
    assert u.frames_late == 1 and playout.stats.frames_late == 1
    # After the speech, idle again.
    assert np.array_equal(playout.frame_for(first_index + 3), playout.template.idle_frame(first_index + 3))


async def test_utterance_finishes_when_its_last_sample_is_read() -> None:
    clock = FakeClock()
    playout = make_playout(clock)
    done: list[Utterance] = []
    playout.on_finished = done.append
    u = Utterance("x")
    start = await playout.schedule_audio(np.ones(960, np.int16), u)
    playout.complete(u)
    assert not done
    playout.read_audio(int(start * 48000), 960)
    assert done == [u] and u.played_until == start + 0.02 and not u.interrupted
    assert not playout.speaking


async def test_clear_drops_everything_and_reports_what_was_heard() -> None:
    clock = FakeClock()
    playout = make_playout(clock)
    u = Utterance("long")
    start = await playout.schedule_audio(np.ones(48000, np.int16), u)
    await playout.put_frame(round(start * 25) + 1, np.zeros((8, 8, 3), np.uint8))
    clock.t = start + 0.3
    cut = playout.clear()
    assert cut == [u] and u.interrupted and u.finished
    assert abs(u.played_until - (start + 0.3)) < 1e-9
    assert not np.any(playout.read_audio(int(clock.t * 48000), 4800))
    index = round(start * 25) + 1
    assert np.array_equal(playout.frame_for(index), playout.template.idle_frame(index))
    # New speech after a clear starts from now, not after the dropped audio.
    v = Utterance("next")
    again = await playout.schedule_audio(np.ones(960, np.int16), v)
    assert again < start + 1.0


def test_heard_text_is_the_played_share_of_the_sentences() -> None:
    from avatar_rtc.media.playout import SpokenSentence

    u = Utterance("")
    u.sentences = [
        SpokenSentence("One two three four.", 48000, 96000, 48000),
        SpokenSentence("Five six seven eight.", 96000, 144000, 48000),
    ]
    u.played_until = 2.5
    assert u.heard_text() == "One two three four. Five six"
    u.played_until = 1.2
    assert u.heard_text() == ""  # not one whole word's share yet
    u.played_until = 3.0
    assert u.heard_text() == "One two three four. Five six seven eight."


async def test_a_sentence_played_to_its_last_sample_is_heard_whole(default_template) -> None:
    """Answers of odd lengths from odd start points, played out: every word is heard. Seconds computed
    as start + length / rate and as end / rate differ by a rounding step for some of them (30 of these
    200), which dropped the answer's last word, and the page then showed the answer as interrupted."""
    from avatar_rtc.conversation.speaker import Speaker
    from avatar_rtc.render.warp import WarpEngine

    rng = np.random.default_rng(8)

    class OddLength:
        name, sample_rate = "odd", 48000

        async def synthesize(self, text: str, *, session: str = ""):
            yield np.full(int(rng.integers(4_000, 30_000)), 800, np.int16)

        async def synthesize_timed(self, text: str, *, session: str = ""):
            async for pcm in self.synthesize(text):
                yield SpeechChunk(pcm)

    text = "Every word of this answer was played, one two three four five six seven."
    engine = WarpEngine()
    dropped = []
    for trial in range(200):
        start = float(rng.uniform(0, 600))
        # A clock that stands still and no bound ahead: the answer is queued at once, then played.
        playout = Playout(lambda start=start: start, default_template, fps=25, lead_s=0.0, max_ahead_s=1e9)
        utterance = Utterance(text)
        await Speaker(OddLength(), playout, engine.open(default_template)).speak([text], utterance)
        playout.complete(utterance)
        first = utterance.sentences[0].start_time
        position = round(first * playout.sample_rate)
        while not utterance.finished:
            playout.read_audio(position, 960)
            position += 960
        assert not utterance.interrupted
        if utterance.heard_text() != text:
            dropped.append((trial, utterance.heard_text()))
    assert not dropped, dropped


async def test_a_cut_during_a_long_first_sentence_still_knows_what_was_heard(default_template) -> None:
    """The speaker records a sentence as soon as its first piece is queued, not after all of it."""
    from avatar_rtc.conversation.speaker import Speaker
    from avatar_rtc.render.warp import WarpEngine

    class LongSpeech:
        name, sample_rate = "fake-clock-free", 16000

        async def synthesize(self, text: str, *, session: str = ""):
            yield (np.sin(np.arange(16000 * 2) / 10) * 8000).astype(np.int16)

        async def synthesize_timed(self, text: str, *, session: str = ""):
            async for pcm in self.synthesize(text):
                yield SpeechChunk(pcm)

    clock = FakeClock()
    playout = Playout(clock, default_template, lead_s=0.05, max_ahead_s=0.5)
    speaker = Speaker(LongSpeech(), playout, WarpEngine().open(default_template))
    u = Utterance("")
    words = " ".join(f"w{i}" for i in range(1, 11))
    task = asyncio.ensure_future(speaker.speak([words], u))
    await asyncio.sleep(0.05)  # blocked on backpressure: 0.8 s of the 2 s sentence is queued
    assert not task.done()
    clock.t = 0.68  # 0.6 s of it (from 0.08) has played: three words' share of ten
    playout.clear()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert u.heard_text() == "w1 w2 w3"


def test_remote_timeline_takes_out_the_jitter_of_handling() -> None:
    """Frames handled in bursts (a busy loop) keep their sender's spacing; a drift of 100 ppm and a
    jump in the sender's timestamps are followed."""
    from avatar_rtc.media.clock import RemoteTimeline

    rng = np.random.default_rng(4)
    timeline = RemoteTimeline(window_s=10.0)
    transit = 0.030
    stamped = []
    for n in range(1500):  # 30 s of 20 ms frames
        sent = 1000.0 + n * 0.02
        arrived = sent * (1 + 1e-4) + transit + float(rng.exponential(0.04))  # queueing: up to ~0.2 s
        stamped.append(timeline.wall_time(n * 0.02, arrived) - sent * (1 + 1e-4))
    errors = np.abs(np.asarray(stamped[100:]) - transit)
    assert errors.max() < 0.01, errors.max()  # within 10 ms of the true transit; jitter was 40 ms mean
    # The sender restarts its timestamps (a replaced track): times follow at once.
    assert abs(timeline.wall_time(0.0, 2000.0) - 2000.0) < 1e-9
