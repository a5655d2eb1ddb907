"""Pictures of the warp renderer's mouth: the visemes on the default photo, and a strip of frames from
a spoken sentence. Writes small PNGs under ``docs/visemes/``.

Usage::

    python scripts/viseme_gallery.py                 # visemes.png, visemes_closed_lips.png, sentence_after.png,
                                                     # visemes_bank.png
    python scripts/viseme_gallery.py --bank-only     # visemes_bank.png
    # The same strip from another checkout (an older renderer), audio-driven as that one was:
    PYTHONPATH=/path/to/old/checkout python scripts/viseme_gallery.py --strip-only before

The strip shows the mouth every other frame (12.5 per second) from the sentence's start, the same frames in
both versions, so the two strips compare frame by frame.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SENTENCE = "Move your lips for me, please: a bee, a bow, a fine view."
OUT_DIR = Path("docs/visemes")
FPS = 25
TILE_SCALE = 1.0
# The PNGs are kept small (a few hundred KB in all): tiles at the photo's own scale, 128 colours.
PNG_COLOURS = 128
STRIP_TILES = 18


def _mouth_box(landmarks: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the mouth with some of the chin and nose: the same for every frame."""
    from avatar_rtc.avatar import face

    left, right = landmarks[face.MOUTH_LEFT_CORNER], landmarks[face.MOUTH_RIGHT_CORNER]
    width = float(np.hypot(*(right - left)))
    centre = 0.5 * (left + right)
    x0, x1 = int(centre[0] - 0.7 * width), int(centre[0] + 0.7 * width)
    y0, y1 = int(centre[1] - 0.35 * width), int(centre[1] + 0.5 * width)
    return max(x0, 0), max(y0, 0), min(x1, image_size[0]), min(y1, image_size[1])


def _tile(image: np.ndarray, box: tuple[int, int, int, int], label: str) -> np.ndarray:
    x0, y0, x1, y1 = box
    tile = cv2.resize(image[y0:y1, x0:x1], None, fx=TILE_SCALE, fy=TILE_SCALE, interpolation=cv2.INTER_CUBIC)
    if label:
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.full_like(tiles[0], 255)
    rows = []
    for start in range(0, len(tiles), columns):
        row = tiles[start : start + columns]
        row += [blank] * (columns - len(row))
        rows.append(np.hstack(row))
    return np.vstack(rows)


def _write(name: str, image: np.ndarray) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    from PIL import Image  # pillow (a test dependency): a palette PNG is a third of the size

    rgb = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    rgb.quantize(colors=PNG_COLOURS, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {image.shape[1]}x{image.shape[0]}, {path.stat().st_size // 1024} KiB")


def _default_template() -> Any:
    from avatar_rtc.avatar.store import TemplateStore

    cache = Path(tempfile.mkdtemp(prefix="viseme-gallery-"))
    return TemplateStore(cache).ensure_default()


def viseme_tiles(template: Any) -> list[np.ndarray]:
    from avatar_rtc.render.visemes import VISEME_POSES, Viseme
    from avatar_rtc.render.warp import WarpEngine

    renderer = WarpEngine().open(template)
    box = _mouth_box(template.landmarks[0], template.size)
    return [_tile(renderer.render_pose(0, VISEME_POSES[viseme]), box, viseme.value) for viseme in Viseme]


def bank_rows() -> np.ndarray:
    """A talking video template (the closed-lips face saying visemes, made on the spot) with each
    bankable viseme drawn (top row) and from the template's own mouth bank (bottom row)."""
    from avatar_rtc.avatar.library import TemplateLibrary
    from avatar_rtc.render.mouth_bank import BANK_VISEMES
    from avatar_rtc.render.visemes import VISEME_POSES
    from avatar_rtc.render.warp import WarpEngine
    from avatar_rtc.testing.talking import talking_video

    folder = Path(tempfile.mkdtemp(prefix="viseme-gallery-bank-"))
    library = TemplateLibrary(folder / "cache", ram_budget_bytes=1 << 30, engine=WarpEngine())
    library.prepare(talking_video(folder / "talking.mp4"), "talking")
    template = library.get("talking")
    box = _mouth_box(template.landmarks[0], template.size)
    drawn, banked = WarpEngine(mouth_bank=False).open(template), WarpEngine().open(template)
    bank = banked.mouth_bank
    top, bottom = [], []
    for viseme in BANK_VISEMES:
        pose = VISEME_POSES[viseme]
        top.append(_tile(drawn.render_pose(0, pose), box, f"drawn {viseme.value}"))
        entry = bank.entry_for(viseme) if bank is not None else None
        label = f"bank {viseme.value}" if entry is not None else f"{viseme.value}: none"
        bottom.append(_tile(banked.render_pose(0, pose), box, label))
    return _grid(top + bottom, len(top))


async def sentence_strip(template: Any, with_visemes: bool) -> np.ndarray:
    """The mouth every other frame while the default voice says SENTENCE, through the streaming path."""
    from avatar_rtc.conversation.audio import resample_pcm
    from avatar_rtc.conversation.tts import PiperTTS, find_piper_voice
    from avatar_rtc.render.warp import WarpEngine

    voice = find_piper_voice()
    if voice is None:
        raise SystemExit("no piper voice installed")
    tts = PiperTTS(voice)
    renderer = WarpEngine().open(template)
    labels: dict[int, str] = {}
    if with_visemes:
        from avatar_rtc.render.visemes import visemes_from_phonemes

        chunks = [c async for c in tts.synthesize_timed(SENTENCE)]
        pcm = np.concatenate([c.pcm for c in chunks])
        timed = visemes_from_phonemes((p.phoneme, p.start_s, p.end_s) for p in chunks[0].phonemes or ())
        renderer.push_audio(resample_pcm(pcm, tts.sample_rate, renderer.sample_rate), 0.0)
        renderer.push_visemes(timed, 0.0)
        for index in range(int(len(pcm) / tts.sample_rate * FPS) + 1):
            found = [v.viseme.value for v in timed if v.start_s <= index / FPS < v.end_s]
            labels[index] = found[0] if found else ""
    else:
        pcm = np.concatenate([c async for c in tts.synthesize(SENTENCE)])
        renderer.push_audio(resample_pcm(pcm, tts.sample_rate, renderer.sample_rate), 0.0)
    renderer.flush()
    count = int(np.ceil(len(pcm) / tts.sample_rate * FPS))
    frames: dict[int, np.ndarray] = {}
    async for frame in renderer.frames():
        frames[frame.index] = frame.image
        if len(frames) == count:
            break
    await renderer.aclose()
    box = _mouth_box(template.landmarks[0], template.size)
    # From the first sound on, every other frame.
    picked = [index for index in sorted(frames) if index % 2 == 0][2 : 2 + STRIP_TILES]
    tiles = [_tile(frames[index], box, labels.get(index, "") or f"{index / FPS:.2f}s") for index in picked]
    return _grid(tiles, STRIP_TILES // 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strip-only", metavar="NAME", help="only the sentence strip, audio-driven, as NAME")
    parser.add_argument("--bank-only", action="store_true", help="only the mouth bank's picture")
    args = parser.parse_args()
    if args.bank_only:
        _write("visemes_bank.png", bank_rows())
        return
    template = _default_template()
    if args.strip_only:
        _write(f"sentence_{args.strip_only}.png", asyncio.run(sentence_strip(template, with_visemes=False)))
        return

    from avatar_rtc.avatar.photo import prepare_photo
    from avatar_rtc.render.visemes import VISEME_POSES, Viseme
    from avatar_rtc.render.warp import WarpEngine

    _write("visemes.png", _grid(viseme_tiles(template), 6))
    # The same face with its lips closed first (its photo smiles with its teeth showing): on such a
    # template the renderer draws the teeth, the tongue and the cavity itself.
    closed = WarpEngine().open(template).render_pose(0, VISEME_POSES[Viseme.CLOSED])
    _write(
        "visemes_closed_lips.png", _grid(viseme_tiles(prepare_photo(closed, "closed-lips", seconds=1.0)), 6)
    )
    _write("sentence_after.png", asyncio.run(sentence_strip(template, with_visemes=True)))
    _write("visemes_bank.png", bank_rows())


if __name__ == "__main__":
    main()
