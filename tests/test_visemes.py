"""The face's mouth in speech: a natural range of opening, lip shapes from the TTS's phonemes at their
times, and an interior that reads as a mouth (teeth, tongue, a dark cavity with depth)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from avatar_rtc.avatar import face
from avatar_rtc.avatar.photo import prepare_photo
from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.conversation.phonemes import (
    SpeechChunk,
    TimedPhoneme,
    align_to_energy,
    expose_duration_output,
)
from avatar_rtc.conversation.tts import TextToSpeech
from avatar_rtc.render.stream import FrameJob
from avatar_rtc.render.visemes import (
    VISEME_POSES,
    TimedViseme,
    Viseme,
    VisemeTrack,
    viseme_of_phoneme,
    visemes_from_phonemes,
)
from avatar_rtc.render.warp import (
    MouthRange,
    WarpEngine,
    WarpRenderer,
    drawn_inner_lip_gap,
    pose_from_audio,
    warp_maps,
)
from avatar_rtc.testing.frames import first_frames

SAMPLE_RATE = 16000
FPS = 25
FRAME_S = 1.0 / FPS


@pytest.fixture(scope="module")
def engine() -> WarpEngine:
    return WarpEngine()


@pytest.fixture(scope="module")
def closed_template(default_template: Template, engine: WarpEngine) -> Template:
    """The default face with its lips closed (its own smile shows its teeth): a template whose teeth
    the renderer draws itself."""
    renderer = engine.open(default_template)
    closed = renderer.render_pose(0, VISEME_POSES[Viseme.CLOSED])
    return prepare_photo(closed, "closed-lips", seconds=1.0)


def _loud_vowel(seconds: float, level: float = 0.9) -> np.ndarray:
    """A harmonic buzz far louder than speech, clipped like an over-driven recording."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buzz = sum(np.sin(2 * np.pi * 140.0 * k * t + k) / k for k in range(1, 20))
    return np.clip(buzz / np.max(np.abs(buzz)) * level * 1.5, -1.0, 1.0).astype(np.float32)


def _face_height(landmarks: np.ndarray) -> float:
    return float(np.hypot(*(landmarks[face.CHIN] - landmarks[face.NASION])))


def _mouth_width(landmarks: np.ndarray) -> float:
    return float(np.hypot(*(landmarks[face.MOUTH_RIGHT_CORNER] - landmarks[face.MOUTH_LEFT_CORNER])))


# -- 1. natural range --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["default", "closed"])
def test_very_loud_speech_stays_within_the_natural_range(
    which: str, default_template: Template, closed_template: Template, engine: WarpEngine
) -> None:
    template = default_template if which == "default" else closed_template
    renderer = engine.open(template)
    landmarks = template.landmarks[0]
    limit = min(0.30 * _mouth_width(landmarks), 0.14 * _face_height(landmarks))
    loud = _loud_vowel(0.08)
    job = FrameJob(index=0, template_index=0, audio=loud)
    # Audio alone, and every viseme at full loudness.
    poses = [renderer.frame_pose(job)]
    for roundness in (-1.0, 0.0, 1.0):
        poses.append(pose_from_audio(1.0, roundness))
    for viseme in Viseme:
        poses.append(VISEME_POSES[viseme].scaled(1.5))
    rig = renderer._rigs.rig(0)
    gaps = [drawn_inner_lip_gap(rig, pose, landmarks) for pose in poses]
    assert max(gaps) <= limit + 0.5, f"opened {max(gaps):.1f} px, the natural limit is {limit:.1f} px"
    # ... and it does open (beyond the template's own lips) for loud sound.
    assert gaps[0] > rig.rest_gap + 0.5 * (limit - rig.rest_gap)


def test_the_range_is_a_setting(closed_template: Template) -> None:
    settings = Settings()
    settings.renderer.mouth_max_opening_mouth_widths = 0.12
    from avatar_rtc.wiring import build_renderer

    engine = build_renderer(settings)
    assert isinstance(engine, WarpEngine) and engine.mouth_range.mouth_widths == 0.12
    renderer = engine.open(closed_template)
    landmarks = closed_template.landmarks[0]
    gap = drawn_inner_lip_gap(renderer._rigs.rig(0), pose_from_audio(1.0, 0.0), landmarks)
    assert gap <= 0.12 * _mouth_width(landmarks) + 0.5
    wider = WarpEngine(mouth_range=MouthRange(mouth_widths=0.3, face_heights=1.0)).open(closed_template)
    assert drawn_inner_lip_gap(wider._rigs.rig(0), pose_from_audio(1.0, 0.0), landmarks) > gap + 5


# -- 2. visemes from phonemes ----------------------------------------------------------------------------
def test_phonemes_map_to_lip_shapes() -> None:
    expected = {"m": Viseme.CLOSED, "b": Viseme.CLOSED, "p": Viseme.CLOSED, "u": Viseme.ROUNDED}
    expected |= {"w": Viseme.ROUNDED, "o": Viseme.ROUNDED_OPEN, "i": Viseme.SPREAD, "e": Viseme.SPREAD}
    expected |= {"f": Viseme.LABIODENTAL, "v": Viseme.LABIODENTAL, "a": Viseme.OPEN, "ɑ": Viseme.OPEN}
    expected |= {"θ": Viseme.DENTAL, "ʃ": Viseme.POSTALVEOLAR, "s": Viseme.TEETH, ".": Viseme.REST}
    for phoneme, viseme in expected.items():
        assert viseme_of_phoneme(phoneme) == viseme, phoneme
    assert viseme_of_phoneme("ˈ") is None
    # Stress marks join the vowel after them, length marks the one before; equal neighbours merge.
    timed = visemes_from_phonemes(
        [("m", 0.0, 0.1), ("ˈ", 0.1, 0.15), ("ɑ", 0.15, 0.3), ("ː", 0.3, 0.35), ("m", 0.35, 0.4)]
    )
    assert timed == [
        TimedViseme(Viseme.CLOSED, 0.0, 0.1),
        TimedViseme(Viseme.OPEN, 0.1, 0.35),
        TimedViseme(Viseme.CLOSED, 0.35, 0.4),
    ]


def test_a_short_closure_shuts_the_mouth_between_open_vowels() -> None:
    track = VisemeTrack()
    track.push(
        [
            TimedViseme(Viseme.OPEN, 0.0, 0.3),
            TimedViseme(Viseme.CLOSED, 0.3, 0.37),  # a quick /p/: 70 ms
            TimedViseme(Viseme.OPEN, 0.37, 0.7),
        ],
        media_time=10.0,
    )
    closed = track.pose_at(10.335)
    assert closed is not None and closed.opening <= 0.0 and closed.rest < 0.05
    open_pose = track.pose_at(10.15)
    assert open_pose is not None and open_pose.opening > 0.8
    assert track.pose_at(9.9) is None and track.pose_at(10.75) is None  # audio decides there


class _KnownSpeech:
    """A TTS with a fixed answer: a 140 Hz buzz over the phonemes' voiced parts, with their times."""

    name = "known"
    sample_rate = 16000

    def __init__(self, phonemes: list[TimedPhoneme]) -> None:
        self.phonemes = phonemes
        total = phonemes[-1].end_s
        pcm = np.zeros(int(total * self.sample_rate), np.float32)
        loud = _loud_vowel(total, level=0.3)
        for phoneme in phonemes:
            if viseme_of_phoneme(phoneme.phoneme) not in (Viseme.CLOSED, Viseme.REST):
                lo, hi = int(phoneme.start_s * self.sample_rate), int(phoneme.end_s * self.sample_rate)
                pcm[lo:hi] = loud[lo:hi]
        self.pcm = (pcm * 32767).astype(np.int16)

    async def synthesize(self, text: str, *, session: str = ""):
        yield self.pcm

    async def synthesize_timed(self, text: str, *, session: str = ""):
        yield SpeechChunk(self.pcm, tuple(self.phonemes))


KNOWN_PHONEMES = [
    TimedPhoneme("^", 0.0, 0.1),
    TimedPhoneme("p", 0.1, 0.22),
    TimedPhoneme("ɑ", 0.22, 0.42),
    TimedPhoneme("m", 0.42, 0.54),
    TimedPhoneme("u", 0.54, 0.74),
    TimedPhoneme("f", 0.74, 0.86),
    TimedPhoneme("i", 0.86, 1.06),
    TimedPhoneme("$", 1.06, 1.2),
]


async def _speak_known(template: Template, engine: WarpEngine) -> tuple[WarpRenderer, float, list]:
    """Speak KNOWN_PHONEMES through the real speaker and playout; the renderer, where speech starts on
    the media timeline, and its frames."""
    from avatar_rtc.conversation.speaker import Speaker
    from avatar_rtc.media.playout import Playout, Utterance

    tts: TextToSpeech = _KnownSpeech(KNOWN_PHONEMES)  # type: ignore[assignment]
    playout = Playout(lambda: 0.0, template, fps=FPS, lead_s=0.0, max_ahead_s=1e9)
    renderer = engine.open(template)
    utterance = Utterance("pa moo fee")
    await Speaker(tts, playout, renderer).speak(["pa moo fee"], utterance)
    start = utterance.sentences[0].start_time
    expected = int(np.ceil((start + KNOWN_PHONEMES[-1].end_s) * FPS)) - int(np.ceil(start * FPS))
    frames = await first_frames(renderer, expected)
    return renderer, start, frames


async def test_visemes_from_the_tts_land_at_their_times(
    default_template: Template, engine: WarpEngine
) -> None:
    renderer, start, _ = await _speak_known(default_template, engine)
    track = renderer._visemes
    checked = 0
    for phoneme in KNOWN_PHONEMES[1:-1]:
        viseme = viseme_of_phoneme(phoneme.phoneme)
        # Frames whose time lies inside the phoneme, one frame's grace at each end.
        first = int(np.ceil((start + phoneme.start_s + FRAME_S) * FPS - 1e-9))
        last = int(np.floor((start + phoneme.end_s - FRAME_S) * FPS + 1e-9))
        for index in range(first, last + 1):
            assert track.viseme_at(index / FPS) == viseme, (phoneme, index)
            checked += 1
    assert checked >= 8


async def test_closed_lip_phonemes_close_the_rendered_mouth(
    default_template: Template, engine: WarpEngine
) -> None:
    renderer, start, frames = await _speak_known(default_template, engine)
    landmarks = default_template.landmarks
    by_index = {frame.index: frame.image for frame in frames}

    def frame_gap(at_s: float) -> float:
        index = round((start + at_s) * FPS)
        template_index = default_template.loop_index(index)
        job = FrameJob(index, template_index, np.zeros(1280, np.float32))
        pose = renderer.frame_pose(job)
        return drawn_inner_lip_gap(renderer._rigs.rig(template_index), pose, landmarks[template_index])

    def teeth_pixels(at_s: float) -> int:
        """Bright, unsaturated pixels between the lip corners: the smile's teeth."""
        image = by_index[round((start + at_s) * FPS)]
        lm = default_template.landmarks[default_template.loop_index(round((start + at_s) * FPS))]
        centre_x = 0.5 * (lm[face.MOUTH_INNER_LEFT_CORNER, 0] + lm[face.MOUTH_INNER_RIGHT_CORNER, 0])
        half_width = 0.3 * (lm[face.MOUTH_INNER_RIGHT_CORNER, 0] - lm[face.MOUTH_INNER_LEFT_CORNER, 0])
        x0, x1 = int(centre_x - half_width), int(centre_x + half_width)
        y0 = int(lm[face.UPPER_LIP_INNER_CENTRE, 1]) + 1
        y1 = int(lm[face.LOWER_LIP_INNER_CENTRE, 1]) - 1
        box = image[y0:y1, x0:x1].astype(int)
        return int(np.count_nonzero((box.min(axis=2) > 170) & (box.max(axis=2) - box.min(axis=2) < 45)))

    # Middle of /m/ and of /p/: shut (the template's own smile parts its lips by 16 px).
    assert frame_gap(0.48) <= 1.0
    assert frame_gap(0.16) <= 1.0
    assert frame_gap(0.32) > 15.0  # /a/
    # In pixels: the teeth the smile shows are hidden behind the closed lips. What still counts as
    # bright and unsaturated there is the lower lip's highlight (58-59 px, against 292 for /a/).
    assert teeth_pixels(0.48) < 0.25 * teeth_pixels(0.32)


def test_energy_alignment_puts_words_in_their_sound() -> None:
    rate = 16000
    # Two words with a 250 ms pause: "ba" 0.2-0.5 s, "mi" 0.75-1.05 s.
    pcm = np.zeros(int(1.3 * rate), np.int16)
    loud = (_loud_vowel(0.3, level=0.3) * 32767).astype(np.int16)
    pcm[int(0.2 * rate) : int(0.5 * rate)] = loud[: int(0.3 * rate)]
    pcm[int(0.75 * rate) : int(1.05 * rate)] = loud[: int(0.3 * rate)]
    timed = align_to_energy(list("bˈɑ, mˈi."), pcm, rate)
    by_symbol = {p.phoneme: p for p in timed if p.phoneme not in (".", ",")}
    assert abs(by_symbol["b"].start_s - 0.2) <= FRAME_S
    assert abs(by_symbol["ɑ"].end_s - 0.5) <= FRAME_S
    assert abs(by_symbol["m"].start_s - 0.75) <= FRAME_S
    assert abs(by_symbol["i"].end_s - 1.05) <= FRAME_S
    pauses = [p for p in timed if p.phoneme in (".", ",")]
    assert any(abs(p.start_s - 0.5) <= FRAME_S and abs(p.end_s - 0.75) <= FRAME_S for p in pauses)


async def test_piper_reports_phoneme_times(piper_tts: TextToSpeech) -> None:
    """The patched voice gives each phoneme its samples. The times are the ones the voice spoke them
    at: vowels fall where the audio is loud and stops where it is quiet, and clearly less so when the
    times are moved by 60-80 ms either way."""
    text = "Bob and Pam paid a poppa. My baby may move for five minutes."
    chunks = [chunk async for chunk in piper_tts.synthesize_timed(text)]
    assert len(chunks) == 1 and chunks[0].phonemes
    pcm, phonemes = chunks[0].pcm, chunks[0].phonemes
    rate = piper_tts.sample_rate
    assert abs(phonemes[-1].end_s - len(pcm) / rate) < 0.02
    assert all(b.start_s == pytest.approx(a.end_s) for a, b in itertools.pairwise(phonemes))

    def log_rms(start_s: float, end_s: float) -> float:
        part = pcm[max(0, int(start_s * rate)) : int(end_s * rate)].astype(np.float64)
        return float(np.log(np.sqrt(np.mean(part**2)) + 1.0)) if part.size else 0.0

    def vowels_over_stops(shift_s: float) -> float:
        vowels = [
            log_rms(p.start_s + shift_s, p.end_s + shift_s) for p in phonemes if p.phoneme in "aɑæeiouɪʊəɐʌɛɔ"
        ]
        stops = [log_rms(p.start_s + shift_s, p.end_s + shift_s) for p in phonemes if p.phoneme in "pbtdkg"]
        assert len(vowels) >= 10 and len(stops) >= 10
        return float(np.mean(vowels) - np.mean(stops))

    aligned = vowels_over_stops(0.0)
    assert aligned > 1.5
    assert aligned > vowels_over_stops(0.06) + 1.0
    assert aligned > vowels_over_stops(-0.08) + 1.0


def test_the_duration_patch_needs_a_ceil_tensor() -> None:
    assert expose_duration_output(b"") is None
    # A model (field 7: graph) whose graph has one node (field 1) of op_type (field 4) "Relu".
    node = b"\x22\x04Relu"
    graph = b"\x0a" + bytes([len(node)]) + node
    model = b"\x3a" + bytes([len(graph)]) + graph
    assert expose_duration_output(model) is None


# -- 3. the interior ---------------------------------------------------------------------------------------
def test_an_open_mouth_shows_teeth_a_tongue_and_a_shaded_cavity(
    closed_template: Template, engine: WarpEngine
) -> None:
    renderer = engine.open(closed_template)
    rig = renderer._rigs.rig(0)
    pose = VISEME_POSES[Viseme.OPEN]
    image = renderer.render_pose(0, pose).astype(int)
    # The opening: pixels more than a pixel inside the parted lips, from the warp's own travel.
    _, _, drop, rise, _ = warp_maps(rig, pose)
    window = rig.mouth_window
    below, lower = rig.below_line[window], rig.is_lower[window]
    inside = lower * (drop - below) + (1.0 - lower) * (rise + below) > 1.0
    (r0, r1), (c0, c1) = rig.mouth_rows, rig.mouth_cols
    crop = np.s_[rig.y0 + r0 : rig.y0 + r1, rig.x0 + c0 : rig.x0 + c1]
    pixels, moved = image[crop], inside
    blue, green, red = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    teeth = moved & (pixels.min(axis=2) > 150) & (red - blue < 40)
    dark = moved & (pixels.max(axis=2) < 60)
    tongue = moved & (red > green + 45) & (red > 90)
    assert teeth.sum() > 40, "no teeth"
    assert dark.sum() > 40, "no dark cavity"
    assert tongue.sum() > 20, "no tongue"
    # The cavity is shaded, darkest deep inside, not one flat colour.
    cavity = pixels[moved & (pixels.max(axis=2) < 80)].sum(axis=1)
    assert np.percentile(cavity, 60) - np.percentile(cavity, 10) > 15
    # Teeth are drawn just under the upper lip, the tongue low in the mouth.
    teeth_rows, tongue_rows = np.nonzero(teeth)[0], np.nonzero(tongue)[0]
    assert np.median(teeth_rows) < np.median(tongue_rows)


async def test_espeak_phonemes_are_aligned_to_its_audio() -> None:
    """The fallback TTS gives phonemes too: espeak-ng's own, placed on its audio by energy."""
    from avatar_rtc.conversation.tts import EspeakTTS, TtsUnavailableError

    try:
        tts = EspeakTTS()
    except TtsUnavailableError as error:
        pytest.skip(str(error))
    chunks = [chunk async for chunk in tts.synthesize_timed("My map, a bee.")]
    assert len(chunks) == 1 and chunks[0].phonemes
    phonemes = chunks[0].phonemes
    assert phonemes[-1].end_s == pytest.approx(len(chunks[0].pcm) / tts.sample_rate)
    assert all(a.end_s <= b.start_s + 1e-9 for a, b in itertools.pairwise(phonemes))
    visemes = [viseme_of_phoneme(p.phoneme) for p in phonemes]
    assert visemes.count(Viseme.CLOSED) >= 3 and Viseme.SPREAD in visemes
