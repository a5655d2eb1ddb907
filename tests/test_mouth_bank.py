"""Real mouths from the template itself: a talking video's own mouths, banked per viseme at preparation,
stored in the template cache, and blended into frames for the poses near them."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.avatar.template import Template
from avatar_rtc.config import Settings
from avatar_rtc.render import mouth_bank
from avatar_rtc.render.mouth_bank import MouthBank
from avatar_rtc.render.visemes import VISEME_POSES, TimedViseme, Viseme
from avatar_rtc.render.warp import WarpEngine, bank_choice
from avatar_rtc.testing.talking import talking_video


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Template]:
    """A video of the closed-lips default face saying open, closed, rounded and spread visemes,
    prepared by a library with the warp engine: (its cache directory, the template)."""
    folder = tmp_path_factory.mktemp("talking")
    video = talking_video(folder / "talking.mp4")
    library = TemplateLibrary(folder / "cache", ram_budget_bytes=1 << 30, engine=WarpEngine())
    result = library.prepare(video, "talking")
    assert not result.cache_hit
    return folder / "cache", library.get("talking")


@pytest.fixture(scope="module")
def cached(prepared: tuple[Path, Template]) -> Template:
    """The template as a fresh process reads it: a new store on the same cache directory."""
    return TemplateStore(prepared[0]).load("talking")


def test_preparation_banks_open_closed_and_rounded_mouths(prepared: tuple[Path, Template]) -> None:
    _, template = prepared
    bank = MouthBank.from_template(template)
    assert bank is not None
    for viseme in (Viseme.OPEN, Viseme.CLOSED, Viseme.ROUNDED, Viseme.SPREAD):
        assert bank.entry_for(viseme) is not None, f"no {viseme.value} mouth in the bank"
    gap = dict(zip(bank.visemes, bank.gaps, strict=True))
    width = dict(zip(bank.visemes, bank.widths, strict=True))
    # Each entry is a frame that shows that shape: open wider than rounded wider than closed, rounded
    # narrower than spread.
    assert gap[Viseme.OPEN] > gap[Viseme.ROUNDED] + 0.03 > gap[Viseme.CLOSED] + 0.03
    assert width[Viseme.ROUNDED] < width[Viseme.SPREAD] - 0.08
    # The masks are feathered from 255 around the lips to 0 before the box's edge.
    crops, masks = template.extras[mouth_bank.CROPS_KEY], template.extras[mouth_bank.MASKS_KEY]
    assert crops.dtype == np.uint8 and crops.shape[0] == len(bank) and crops.shape[1:3] == masks.shape[1:]
    for mask in masks:
        assert mask.max() == 255 and mask[0].max() < 128 and mask[-1].max() < 128
        assert np.count_nonzero((mask > 20) & (mask < 235)) > 0.1 * np.count_nonzero(mask > 235)
    # The crops are the template's own pixels: its entry frame, aligned by the eyes and nose.
    for entry, frame in enumerate(bank.frames):
        to_box = mouth_bank.similarity(template.landmarks[frame][list(mouth_bank.ANCHORS)], bank.anchors)
        to_box[:, 2] -= bank.box_origin
        size = (crops.shape[2], crops.shape[1])
        own = cv2.warpAffine(template.frames[frame], to_box, size, flags=cv2.INTER_CUBIC)
        lips = masks[entry] > 128
        assert np.abs(own[lips].astype(int) - crops[entry][lips]).mean() < 1.0


def test_the_bank_is_stored_in_the_template_cache(prepared: tuple[Path, Template], cached: Template) -> None:
    cache_dir, template = prepared
    manifest = TemplateStore(cache_dir).read_manifest("talking")
    for key in mouth_bank.KEYS:
        entry = manifest["files"][f"extra_{key}.npy"]
        # Renderer data: recomputed rather than refusing the template if it is ever damaged.
        assert entry["renderer"] is True
        assert np.array_equal(cached.extras[key], template.extras[key])
    assert WarpEngine().has_extras(cached)
    # A fresh library on the same cache finds the bank there, with nothing to compute.
    library = TemplateLibrary(cache_dir, ram_budget_bytes=1 << 30, engine=WarpEngine())
    loaded = library.get("talking")
    assert not library.needs_extras(loaded)
    assert len(MouthBank.from_template(loaded) or ()) == len(MouthBank.from_template(template) or ())


def test_a_bank_of_another_version_is_computed_again(cached: Template) -> None:
    engine = WarpEngine()
    meta = cached.extras[mouth_bank.META_KEY].copy()
    meta[0] = mouth_bank.BANK_VERSION + 1
    other = dataclasses.replace(cached, extras={**cached.extras, mouth_bank.META_KEY: meta})
    assert engine.has_extras(cached) and not engine.has_extras(other)
    assert engine.open(other).mouth_bank is None  # never used as if it were current
    incomplete = {k: v for k, v in cached.extras.items() if k != mouth_bank.MASKS_KEY}
    assert not engine.has_extras(dataclasses.replace(cached, extras=incomplete))


def _mouth_box(bank: MouthBank, landmarks: np.ndarray, image_shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The frame region the bank's canonical box lands on."""
    height, width = bank.masks.shape[1:]
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)
    placed = corners @ bank.placement(landmarks)[:, :2].T + bank.placement(landmarks)[:, 2]
    x0, y0 = np.maximum(np.floor(placed.min(axis=0)).astype(int), 0)
    x1 = min(int(np.ceil(placed[:, 0].max())) + 1, image_shape[1])
    y1 = min(int(np.ceil(placed[:, 1].max())) + 1, image_shape[0])
    return slice(y0, y1), slice(x0, x1)


def test_an_open_viseme_shows_the_banked_mouth(cached: Template) -> None:
    renderer = WarpEngine().open(cached)
    drawn = WarpEngine(mouth_bank=False).open(cached)
    bank = renderer.mouth_bank
    assert bank is not None
    entry = bank.entry_for(Viseme.OPEN)
    assert entry is not None
    index = 0
    landmarks = cached.landmarks[index]
    pose = VISEME_POSES[Viseme.OPEN]
    rig = renderer._rigs.rig(index)
    choice = bank_choice(bank, rig, pose, bank.frame(index, cached.frames[index], landmarks))
    assert choice is not None and choice.entries[0] == entry and choice.alpha > 0.9

    image = renderer.render_pose(index, pose)
    assert renderer.mouth_bank_frames == 1
    # Inside the masks the pixels are the bank's crops (as weighted) put in place by the frame's own
    # landmark transform.
    rows, cols = _mouth_box(bank, landmarks, image.shape)
    local = bank.placement(landmarks)
    local[:, 2] -= (cols.start, rows.start)
    size = (cols.stop - cols.start, rows.stop - rows.start)
    crop = sum(
        w * bank.crops[i].astype(np.float32) for i, w in zip(choice.entries, choice.weights, strict=True)
    )
    expected = cv2.warpAffine(np.asarray(crop, np.float32), local, size, flags=cv2.INTER_LINEAR)
    masks = [cv2.warpAffine(bank.masks[i], local, size, flags=cv2.INTER_LINEAR) for i in choice.entries]
    inside = np.minimum.reduce(masks) > 250
    assert inside.sum() > 500
    bank_difference = np.abs(image[rows, cols][inside] - expected[inside]).mean(axis=1)
    drawn_image = drawn.render_pose(index, pose)
    drawn_difference = np.abs(drawn_image[rows, cols][inside] - expected[inside]).mean(axis=1)
    # Every pixel equal up to the colour match (an even shift of a few levels) and rounding; the drawn
    # mouth is clearly another.
    assert np.percentile(bank_difference, 99) < 4.0
    assert np.percentile(drawn_difference, 90) > 15.0


def test_the_rest_pose_keeps_the_template_frame(cached: Template) -> None:
    renderer = WarpEngine().open(cached)
    for index in (0, 10, 40):
        assert np.array_equal(renderer.render_pose(index, VISEME_POSES[Viseme.REST]), cached.frames[index])
    assert renderer.mouth_bank_frames == 0


def test_changing_visemes_cross_fade_without_a_pop(cached: Template) -> None:
    """Speech from open to rounded to spread through the viseme track, every 10 ms: the bank's share
    changes gradually, and the mouth never changes more from one step to the next than the drawn mouth
    does for the same poses (entries cross-fade instead of swapping)."""
    renderer = WarpEngine().open(cached)
    drawn = WarpEngine(mouth_bank=False).open(cached)
    said = [Viseme.OPEN, Viseme.ROUNDED, Viseme.OPEN, Viseme.SPREAD]
    renderer.push_visemes([TimedViseme(v, 0.2 * i, 0.2 * (i + 1)) for i, v in enumerate(said)], 0.0)
    bank = renderer.mouth_bank
    assert bank is not None
    landmarks = cached.landmarks[0]
    rows, cols = _mouth_box(bank, landmarks, cached.frames[0].shape)
    ours, theirs, shares, used = [], [], [], set()
    for step in range(4, 76):
        pose = renderer._visemes.pose_at(step / 100)
        assert pose is not None
        choice = bank_choice(bank, renderer._rigs.rig(0), pose, bank.frame(0, cached.frames[0], landmarks))
        shares.append(0.0 if choice is None else choice.alpha)
        used |= set() if choice is None else {bank.visemes[choice.entries[0]]}
        ours.append(renderer.render_pose(0, pose)[rows, cols].astype(np.float32))
        theirs.append(drawn.render_pose(0, pose)[rows, cols].astype(np.float32))
    assert max(shares) > 0.9 and np.abs(np.diff(shares)).max() < 0.5
    # Rounded speech may take the bank's "oo" or its "oh" (both rounded lips): which one is nearest
    # turns on a pixel of the synthetic video's landmarks.
    assert {Viseme.OPEN, Viseme.SPREAD} <= used and used & {Viseme.ROUNDED, Viseme.ROUNDED_OPEN}, used
    for step, ((a, b), (c, d)) in enumerate(
        zip(itertools.pairwise(ours), itertools.pairwise(theirs), strict=True)
    ):
        bank_step, drawn_step = float(np.abs(b - a).mean()), float(np.abs(d - c).mean())
        assert bank_step <= 1.25 * drawn_step + 0.5, f"a jump of {bank_step:.1f} at step {step}"


def test_a_photo_template_keeps_the_drawn_mouth(default_template: Template) -> None:
    engine = WarpEngine()
    extras = engine.template_extras(default_template)
    # An empty bank, stored all the same so it is not computed again.
    assert set(extras) == set(mouth_bank.KEYS) and extras[mouth_bank.CROPS_KEY].shape[0] == 0
    template = dataclasses.replace(default_template, extras={**default_template.extras, **extras})
    assert engine.has_extras(template)
    renderer = engine.open(template)
    assert renderer.mouth_bank is None
    pose = VISEME_POSES[Viseme.OPEN]
    drawn = WarpEngine(mouth_bank=False).open(default_template).render_pose(3, pose)
    assert np.array_equal(renderer.render_pose(3, pose), drawn)
    assert renderer.mouth_bank_frames == 0


def test_the_bank_is_a_setting(cached: Template) -> None:
    settings = Settings()
    settings.renderer.mouth_bank = False
    from avatar_rtc.wiring import build_renderer

    engine = build_renderer(settings)
    assert isinstance(engine, WarpEngine)
    assert engine.extras_keys == () and engine.has_extras(cached) and engine.template_extras(cached) == {}
    renderer = engine.open(cached)
    assert renderer.mouth_bank is None
    renderer.render_pose(0, VISEME_POSES[Viseme.OPEN])
    assert renderer.mouth_bank_frames == 0


def test_a_template_without_a_bank_gets_one_from_the_library(
    prepared: tuple[Path, Template], tmp_path: Path
) -> None:
    """A template cached before the bank existed (no bank extras) has it computed once, stored in its
    cache entry, and used from then on."""
    _, template = prepared
    store = TemplateStore(tmp_path)
    bare = dataclasses.replace(
        template, extras={k: v for k, v in template.extras.items() if k not in mouth_bank.KEYS}
    )
    store.save(bare)
    library = TemplateLibrary(store, ram_budget_bytes=1 << 30, engine=WarpEngine())
    loaded = library.get("talking")
    assert library.needs_extras(loaded)
    completed = library.complete_extras("talking")
    assert MouthBank.from_template(completed) is not None
    assert mouth_bank.is_current(TemplateStore(tmp_path).load("talking").extras)
