"""InstantID's face-keypoints image: the hint its IdentityNet (ControlNet) was trained on.

InstantID conditions its ControlNet on a picture of the five face landmarks only
(eyes, nose tip, mouth corners: a weak spatial condition, so the pose and place of
the face follow it but not its shape). The official pipeline draws it with
``draw_kps``; :func:`draw_face_keypoints` draws the same pixels:

- a black RGB canvas (float), four limbs from each other point to the nose (limbs
  (0, 2), (1, 2), (3, 2), (4, 2); each coloured with its first point's colour): a
  filled ellipse polygon (``cv2.ellipse2Poly`` at the limb's midpoint, half-axes
  ``(int(length / 2), 4)``, the limb's angle in whole degrees, 1-degree steps);
- the canvas times 0.6, truncated to uint8 (the limbs show at 60 % of their colour);
- a filled circle of radius 10 on each point, in its colour, drawn last (on top).

Colours per point: right eye red, left eye green, nose blue, right mouth corner
yellow, left mouth corner magenta (RGB). Coordinates are truncated to integers
where the official code truncates them. cv2 is imported when drawing (it comes
with insightface), so this module loads without it.

:func:`place_keypoints` moves a reference's landmarks onto a canvas of another size:
``"reference"`` fits the whole reference photo into the canvas (scaled to fit,
centred, so the face keeps its place and size relative to the photo and is never
cut off); ``"custom"`` puts the face box centre at ``(x, y)`` (fractions of the
canvas) with the box ``face_height`` x the canvas height tall.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))  # RGB, per landmark
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # every limb ends at the nose
STICK_WIDTH = 4
LIMB_ALPHA = 0.6
POINT_RADIUS = 10
PLACEMENTS = ("reference", "custom")
MAX_SIDE = 16384


class KeypointError(ValueError):
    """Keypoints that cannot be drawn (wrong shape, not finite, canvas size out of range)."""


def _cv2():
    try:
        import cv2
    except ImportError as err:  # insightface needs it, so a pack that found faces has it
        raise ImportError("opencv-python-headless") from err
    return cv2


def _check(kps: np.ndarray, width: int, height: int) -> np.ndarray:
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2):
        raise KeypointError(f"expected 5 face landmarks (x, y), got an array of shape {list(kps.shape)}")
    if not np.isfinite(kps).all():
        raise KeypointError("the face landmarks are not finite numbers")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise KeypointError(f"the canvas must be 1 to {MAX_SIDE} pixels a side, got {width}x{height}")
    return kps


def draw_face_keypoints(kps, width: int, height: int) -> np.ndarray:
    """``kps [5, 2]`` (x, y) in canvas pixels -> ``[height, width, 3]`` uint8 RGB, as InstantID draws it."""
    kps = _check(kps, int(width), int(height))
    cv2 = _cv2()
    canvas = np.zeros((int(height), int(width), 3))  # float64, like the official canvas
    for a, b in LIMBS:
        (x0, y0), (x1, y1) = kps[a], kps[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, COLOURS[a])
    canvas = (canvas * LIMB_ALPHA).astype(np.uint8)
    for (x, y), colour in zip(kps, COLOURS):
        canvas = cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, colour, -1)
    return canvas


def place_keypoints(
    landmarks,
    bbox,
    source_size: Tuple[int, int],
    canvas_size: Tuple[int, int],
    placement: str = "reference",
    x: float = 0.5,
    y: float = 0.5,
    face_height: float = 0.4,
) -> np.ndarray:
    """Landmarks ``[5, 2]`` of a face in a ``source_size`` (H, W) photo -> ``[5, 2]`` in a ``canvas_size`` (H, W) canvas.

    ``bbox`` ``[4]`` (x0, y0, x1, y1) is the face box in the source; "custom" places
    and scales by it. With the canvas the size of the source, "reference" returns
    the landmarks unchanged.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    box = np.asarray(bbox, dtype=np.float64)
    (sh, sw), (ch, cw) = source_size, canvas_size
    if placement == "reference":
        scale = min(cw / sw, ch / sh)
        offset = np.array([(cw - sw * scale) / 2, (ch - sh * scale) / 2])
        return lm * scale + offset
    if placement == "custom":
        box_h = box[3] - box[1]
        if not box_h > 0:
            raise KeypointError("the face box has no height, so the face cannot be scaled")
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        scale = face_height * ch / box_h
        return (lm - centre) * scale + np.array([x * cw, y * ch])
    raise KeypointError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")


def canvas_size(source_size: Sequence[int], width: int, height: int) -> Tuple[int, int]:
    """(H, W) of the canvas: the source's where ``width`` and ``height`` are 0; one of them 0 keeps the source's aspect."""
    sh, sw = int(source_size[0]), int(source_size[1])
    if width <= 0 and height <= 0:
        return sh, sw
    if width <= 0:
        return int(height), max(1, round(sw * height / sh))
    if height <= 0:
        return max(1, round(sh * width / sw)), int(width)
    return int(height), int(width)
