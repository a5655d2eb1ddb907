"""Pictures of MuseTalk's face geometry on the default avatar, for docs/:

- ``docs/musetalk_nose_point.jpg``: the face mesh's nose-bridge points, where the 68-point convention
  puts landmarks 27..30 (evenly from the nasion to the nose tip), and mesh point 5, which stands in for
  68-point 29 in the face box rule.
- ``docs/musetalk_blend_region.jpg``: the blend region before (the jaw outline pulled in by 2 %) and now
  (v1.5's jaw mode: room below the chin down to the box's extra margin, cheeks pulled in beside the
  central band), over the face box (green), the blend crop (blue), the central band (yellow) and the
  box's bottom margin (red).

Usage: ``python scripts/musetalk_face_pictures.py [--out docs]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.avatar import face  # noqa: E402
from avatar_rtc.avatar.store import TemplateStore  # noqa: E402
from avatar_rtc.render.musetalk import prepare  # noqa: E402

SCALE = 2  # drawn at twice the template's size, so labels stay readable
BRIDGE = (168, 6, 197, 195, 5, 4, 1)


def _pt(point: np.ndarray) -> tuple[int, int]:
    return round(float(point[0]) * SCALE), round(float(point[1]) * SCALE)


def nose_point_picture(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    image = cv2.resize(frame, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
    nasion, tip = landmarks[prepare.NASION], landmarks[prepare.NOSE_TIP_POINT]
    for k, label in enumerate(("27", "28", "29", "30")):
        p = _pt(nasion + (tip - nasion) * (k / 3))
        cv2.drawMarker(image, p, (0, 0, 255), cv2.MARKER_CROSS, 18, 2)
        cv2.putText(image, label, (p[0] - 44, p[1] + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2)
    for point in BRIDGE:
        p = _pt(landmarks[point])
        colour = (0, 200, 0) if point == prepare.NOSE_BRIDGE_LOWER else (255, 200, 0)
        cv2.circle(image, p, 5 if point == prepare.NOSE_BRIDGE_LOWER else 3, colour, -1)
        cv2.putText(image, f"mesh {point}", (p[0] + 12, p[1] + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1)
    height = float(np.linalg.norm(landmarks[face.CHIN] - landmarks[face.FOREHEAD_TOP]))
    gap = float(np.linalg.norm(landmarks[prepare.NOSE_BRIDGE_LOWER] - prepare.nose_point_29(landmarks)))
    x0, y0 = _pt(landmarks[prepare.NASION] - (130, 90))
    crop = image[max(y0, 0) : y0 + 420, max(x0, 0) : x0 + 520].copy()
    cv2.putText(
        crop,
        f"red: 68-point 27..30; green: mesh 5 ({gap / height:.1%} of face height from 29)",
        (8, 20),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5,
        (255, 255, 255),
        1,
    )
    return crop


def previous_region(
    landmarks: np.ndarray, box: tuple[int, int, int, int], crop: tuple[int, int, int, int]
) -> np.ndarray:
    """The rule this replaced, for the comparison only: the jaw outline below the nose, inside the box,
    pulled in by 2 % of the crop all round (so it stopped short of the chin), feathered the same way."""
    cx0, cy0, cx1, cy1 = crop
    mask = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
    cv2.fillPoly(mask, [np.round(landmarks[list(face.JAW_CONTOUR)] - (cx0, cy0)).astype(np.int32)], 255)
    mask[: max(int(np.ceil(landmarks[face.NOSE_BOTTOM, 1] - cy0)), (cy1 - cy0) // 2)] = 0
    inside = np.zeros_like(mask)
    inside[box[1] - cy0 : box[3] - cy0, box[0] - cx0 : box[2] - cx0] = 1
    shrink = max(int(0.02 * (cx1 - cx0)), 1)
    mask = cv2.erode(mask * inside, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * shrink + 1,) * 2))
    kernel = int(0.1 * (cx1 - cx0)) // 2 * 2 + 1
    mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
    in_box = mask[box[1] - cy0 : box[3] - cy0, box[0] - cx0 : box[2] - cx0]
    return cv2.resize(in_box, (prepare.FACE_SIZE,) * 2, interpolation=cv2.INTER_AREA)


def region_panel(
    frame: np.ndarray, landmarks: np.ndarray, box: tuple[int, int, int, int], box_mask: np.ndarray, title: str
) -> np.ndarray:
    x0, y0, x1, y1 = box
    full = np.zeros(frame.shape[:2], np.float32)
    full[y0:y1, x0:x1] = cv2.resize(box_mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR) / 255.0
    tint = frame.astype(np.float32)
    tint = tint * (1 - 0.55 * full[..., None]) + np.array([255, 0, 255], np.float32) * 0.55 * full[..., None]
    image = cv2.resize(tint.astype(np.uint8), None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
    crop = prepare.crop_box(box)
    cv2.rectangle(image, _pt(np.array(box[:2])), _pt(np.array(box[2:])), (0, 200, 0), 2)
    cv2.rectangle(image, _pt(np.array(crop[:2])), _pt(np.array(crop[2:])), (255, 120, 0), 2)
    chin = landmarks[face.CHIN]
    cv2.line(image, _pt(np.array([x0, chin[1]])), _pt(np.array([x1, chin[1]])), (0, 0, 255), 1)
    half_band = prepare.JAW_CENTRAL_BAND * (crop[2] - crop[0]) / 2
    for x in (chin[0] - half_band, chin[0] + half_band):
        cv2.line(image, _pt(np.array([x, chin[1] - 60])), _pt(np.array([x, y1])), (0, 220, 255), 1)
    top, bottom = (
        max(_pt(np.array(crop[:2]))[1] - 10, 0),
        min(_pt(np.array(crop[2:]))[1] + 10, image.shape[0]),
    )
    left, right = (
        max(_pt(np.array(crop[:2]))[0] - 10, 0),
        min(_pt(np.array(crop[2:]))[0] + 10, image.shape[1]),
    )
    panel = image[top:bottom, left:right].copy()
    cv2.putText(panel, title, (10, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2)
    return panel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    template = TemplateStore(Path(tempfile.mkdtemp())).ensure_default()
    frame, landmarks = template.frames[0], template.landmarks[0]
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(
        str(args.out / "musetalk_nose_point.jpg"),
        nose_point_picture(frame, landmarks),
        [cv2.IMWRITE_JPEG_QUALITY, 90],
    )
    box = prepare.face_box(landmarks, template.size)
    crop = prepare.crop_box(box)
    before = region_panel(
        frame, landmarks, box, previous_region(landmarks, box, crop), "before: outline pulled in"
    )
    now = region_panel(
        frame, landmarks, box, prepare.jaw_region_mask(landmarks, box, crop), "now: v1.5 jaw mode"
    )
    height = min(before.shape[0], now.shape[0])
    side_by_side = np.hstack([before[:height], np.full((height, 8, 3), 255, np.uint8), now[:height]])
    cv2.imwrite(str(args.out / "musetalk_blend_region.jpg"), side_by_side, [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {args.out / 'musetalk_nose_point.jpg'} and {args.out / 'musetalk_blend_region.jpg'}")


if __name__ == "__main__":
    main()
