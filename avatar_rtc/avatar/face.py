"""Face landmarks: MediaPipe's face mesh (478 points with the refined iris), in pixel coordinates.

Index constants name the points renderers and preparation need. "Left"/"right" are as seen in the
image (MediaPipe's own naming), so LEFT_EYE_* is the eye on the image's left side.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import TracebackType
from typing import Any

import cv2
import numpy as np

LANDMARK_COUNT = 478

# Mouth.
MOUTH_LEFT_CORNER = 61
MOUTH_RIGHT_CORNER = 291
UPPER_LIP_INNER_CENTRE = 13
LOWER_LIP_INNER_CENTRE = 14
UPPER_LIP_OUTER_CENTRE = 0
LOWER_LIP_OUTER_CENTRE = 17
# Outer lip contour, corner to corner: upper edge then lower edge (both left to right).
LIP_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIP_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
# Inner lip contour (where the lips meet), inner corner to inner corner, left to right. Entries at the
# same position are the points that touch when the mouth is closed.
LIP_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIP_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_INNER_LEFT_CORNER = 78
MOUTH_INNER_RIGHT_CORNER = 308

# Nose and chin.
NOSE_TIP = 1
NOSE_BOTTOM = 2  # where the columella meets the upper lip
NOSE_LEFT_WING = 129
NOSE_RIGHT_WING = 358
CHIN = 152
NASION = 168  # between the eyes, at the bridge of the nose
FOREHEAD_TOP = 10
# Face outline from the left cheek (at eye level) down round the chin to the right cheek.
JAW_CONTOUR = (
    234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454,
)  # fmt: skip
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176,
    149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip

# Eyes: lid centres and corners, and the lid margins corner to corner (upper and lower paired, so
# entries at the same position meet when the eye closes).
LEFT_EYE_UPPER_LID = 159
LEFT_EYE_LOWER_LID = 145
LEFT_EYE_OUTER_CORNER = 33
LEFT_EYE_INNER_CORNER = 133
RIGHT_EYE_UPPER_LID = 386
RIGHT_EYE_LOWER_LID = 374
RIGHT_EYE_INNER_CORNER = 362
RIGHT_EYE_OUTER_CORNER = 263
LEFT_EYE_UPPER_CONTOUR = (33, 246, 161, 160, 159, 158, 157, 173, 133)
LEFT_EYE_LOWER_CONTOUR = (33, 7, 163, 144, 145, 153, 154, 155, 133)
RIGHT_EYE_UPPER_CONTOUR = (362, 398, 384, 385, 386, 387, 388, 466, 263)
RIGHT_EYE_LOWER_CONTOUR = (362, 382, 381, 380, 374, 373, 390, 249, 263)
# Eyebrows: upper and lower edges, outer to inner.
LEFT_EYEBROW_UPPER = (70, 63, 105, 66, 107)
LEFT_EYEBROW_LOWER = (46, 53, 52, 65, 55)
RIGHT_EYEBROW_UPPER = (300, 293, 334, 296, 336)
RIGHT_EYEBROW_LOWER = (276, 283, 282, 295, 285)
LEFT_IRIS_CENTRE = 468
RIGHT_IRIS_CENTRE = 473


class FaceNotFoundError(ValueError):
    """The image has no face the landmarker can find."""


class _DeferredModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module until one of its attributes is used, then imports it."""

    def __getattr__(self, name: str) -> Any:
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, name)


def _defer_pyplot() -> None:
    """Import ``matplotlib.pyplot`` on first use rather than on import.

    MediaPipe's ``solutions`` package imports its drawing helpers, and they import pyplot at module
    level: about 0.5 s of every process that tracks a face (a quarter of preparing a 10 s clip from the
    command line) for plotting functions this project never calls. Anything that does use pyplot gets
    the real module. (importlib's LazyLoader cannot do this on Python 3.11: the import system reads
    the module's spec, which loads it.)
    """
    if "matplotlib.pyplot" not in sys.modules:
        sys.modules["matplotlib.pyplot"] = _DeferredModule("matplotlib.pyplot")


class FaceLandmarker:
    """MediaPipe face mesh, one face, refined lips/eyes/iris (478 points).

    ``static_image_mode=True`` runs the detector on every image (photos, unrelated frames);
    ``False`` tracks from frame to frame (video), which is faster and steadier.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, static_image_mode: bool = True, min_detection_confidence: float = 0.5) -> None:
        # MediaPipe takes about a second to import; only pay that when landmarks are wanted.
        _defer_pyplot()
        import mediapipe as mp

        self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode,
            refine_landmarks=True,
            max_num_faces=1,
            min_detection_confidence=min_detection_confidence,
        )

    def detect(self, image_bgr: np.ndarray) -> np.ndarray | None:
        """(478, 2) float32 pixel xy of the face in ``image_bgr`` (H, W, 3 uint8), or None."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 BGR image, got {image_bgr.shape} {image_bgr.dtype}"
            )
        height, width = image_bgr.shape[:2]
        result = self._mesh.process(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB))
        if not result.multi_face_landmarks:
            return None
        points = result.multi_face_landmarks[0].landmark
        normalised = np.array([(p.x, p.y) for p in points], dtype=np.float32)
        if normalised.shape != (LANDMARK_COUNT, 2):
            raise RuntimeError(
                f"face mesh returned {normalised.shape[0]} landmarks, expected {LANDMARK_COUNT}"
            )
        return normalised * np.array([width, height], dtype=np.float32)

    def detect_or_raise(self, image_bgr: np.ndarray, what: str = "image") -> np.ndarray:
        landmarks = self.detect(image_bgr)
        if landmarks is None:
            height, width = image_bgr.shape[:2]
            raise FaceNotFoundError(
                f"no face found in the {what} ({width}x{height}); use a well-lit, frontal photo where the "
                "face is clearly visible"
            )
        return landmarks

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def detect_landmarks(image_bgr: np.ndarray, what: str = "image") -> np.ndarray:
    """Landmarks of the one face in a single image; raises :class:`FaceNotFoundError` if none."""
    with FaceLandmarker(static_image_mode=True) as landmarker:
        return landmarker.detect_or_raise(image_bgr, what)


def _clip_polygon_to_half_plane(polygon: np.ndarray, point: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The part of ``polygon`` (K, 2) where ``(p - point) . normal >= 0`` (Sutherland-Hodgman, one edge)."""
    kept: list[np.ndarray] = []
    side = (polygon - point) @ normal
    for i in range(len(polygon)):
        a, b = polygon[i], polygon[(i + 1) % len(polygon)]
        sa, sb = side[i], side[(i + 1) % len(polygon)]
        if sa >= 0:
            kept.append(a)
        if (sa >= 0) != (sb >= 0):
            kept.append(a + (b - a) * (sa / (sa - sb)))
    return np.array(kept, dtype=np.float64).reshape(-1, 2)


def lower_face_mask(landmarks: np.ndarray, image_size: tuple[int, int], mask_size: int) -> np.ndarray:
    """Where a mouth renderer may repaint: the face below the nose tip, inside the jaw line, feathered.

    ``landmarks`` are (478, 2) pixel xy in an image of ``image_size`` (width, height); the mask is
    (mask_size, mask_size) uint8 (255 inside) over that whole image. The cut below the nose runs across
    the face (perpendicular to the eyes-to-chin axis), so a tilted head gets a tilted mask. The edge is
    a Gaussian fade of about a tenth of the face width, centred on the contour, so a blend with it has
    no visible seam.
    """
    width, height = image_size
    scale = np.array([mask_size / width, mask_size / height], dtype=np.float64)
    points = landmarks.astype(np.float64) * scale
    jaw = points[list(JAW_CONTOUR)]
    eyes = 0.5 * (points[LEFT_EYE_OUTER_CORNER] + points[RIGHT_EYE_OUTER_CORNER])
    axis = points[CHIN] - eyes
    length = float(np.hypot(*axis))
    mask = np.zeros((mask_size, mask_size), dtype=np.uint8)
    if length < 1e-3:
        return mask
    down = axis / length
    polygon = _clip_polygon_to_half_plane(jaw, points[NOSE_TIP], down)
    if len(polygon) >= 3:
        # Sub-pixel vertices: fillPoly takes fixed-point coordinates with ``shift`` fractional bits.
        cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    face_width = float(np.hypot(*(jaw[-1] - jaw[0])))
    sigma = max(0.5, 0.05 * face_width)
    return cv2.GaussianBlur(mask, (0, 0), sigmaX=sigma, sigmaY=sigma)


def portrait_box(landmarks: np.ndarray, face_fraction: float = 0.42) -> tuple[float, float, float]:
    """(left, top, side) of the square where the face (outline width) is ``face_fraction`` of the side,
    with the face centre about 8% of the side above the square's centre: the renderers' working area
    in a template frame, and the framing of the default photo."""
    oval = landmarks[list(FACE_OVAL)]
    face_width = float(oval[:, 0].max() - oval[:, 0].min())
    face_centre_x = float(oval[:, 0].mean())
    face_centre_y = 0.5 * float(oval[:, 1].min() + oval[:, 1].max())
    side = face_width / face_fraction
    return face_centre_x - side / 2, face_centre_y - side * 0.42, side
