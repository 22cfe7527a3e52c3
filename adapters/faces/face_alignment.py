"""Face alignment: the 5 landmarks of a detected face onto the ArcFace template, and the warped crop.

This is what insightface's ``face_align.norm_crop`` does, done here so no face encode goes
through scikit-image's ``SimilarityTransform.estimate`` (deprecated in scikit-image 0.26 with a
FutureWarning on every call, removed in 2.2):

1. the template: insightface's ArcFace 112 x 112 points (``arcface_dst``: eyes, nose tip, mouth
   corners). For a crop size that is a multiple of 112 the template is scaled by ``size / 112``;
   otherwise (a multiple of 128) by ``size / 128`` and shifted right by ``8 * size / 128``
   (norm_crop's rule for the 128-pixel framing). Other sizes are refused, as norm_crop does.
2. the transform: the least-squares similarity (rotation, uniform scale, translation; no
   reflection) from the landmarks to the template, Umeyama's closed form (PAMI 1991, eqs. 38-43).
3. the crop: OpenCV ``warpAffine`` with that ``[2, 3]`` matrix, bilinear, black outside the photo.

Choice: the fit is computed in float64 (scikit-image computes in the landmarks' dtype, float32
for insightface's detections), so crops can differ from norm_crop's by one grey level at a few
pixels where a bilinear sample sits on a rounding boundary; the matrices agree to ~1e-5.

Landmark order: subject's right eye, left eye, nose, right mouth corner, left mouth corner
(``[5, 2]`` (x, y) in source pixels), as insightface's detectors give them.
"""

from __future__ import annotations

import numpy as np

ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """``[5, 2]`` float64: the ArcFace points for a ``size`` x ``size`` crop (norm_crop's scaling rule)."""
    size = int(size)
    if size <= 0 or (size % 112 and size % 128):
        raise ValueError(f"an aligned face crop must be a multiple of 112 or 128 pixels, not {size}")
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        shift = 8.0 * ratio
    dst = ARCFACE_TEMPLATE_112 * ratio
    dst[:, 0] += shift
    return dst


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``[2, 3]`` float64 ``M`` minimising ``sum_i |M [src_i; 1] - dst_i|^2`` over similarities (no reflection).

    ``src``, ``dst``: ``[K, 2]`` points (K >= 2). Umeyama's closed form: with the centred
    points and ``Sigma = dst_c^T src_c / K = U S V^T``, the rotation is ``U D V^T`` with
    ``D = diag(1, sign)`` chosen so the rotation has determinant +1, the scale is
    ``trace(S D) / var(src)``, the translation ``mean(dst) - scale R mean(src)``.
    Raises ValueError when the source points are all the same point.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"need two matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_s, dst - mu_d
    var_s = float((src_c ** 2).sum(axis=1).mean())
    if not np.isfinite(var_s) or var_s <= 0.0:
        raise ValueError("the landmarks are all at one point: no transform can be fitted")
    sigma = dst_c.T @ src_c / src.shape[0]
    u, s, vt = np.linalg.svd(sigma)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / var_s
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rotation
    m[:, 2] = mu_d - scale * rotation @ mu_s
    return m


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """``[2, 3]``: source pixels -> the aligned ``size`` crop (insightface's ``estimate_norm``, arcface mode)."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"alignment needs the 5 face landmarks as [5, 2], got {list(landmarks.shape)}")
    return similarity_matrix(landmarks, arcface_template(size))


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """``[size, size, C]`` crop of ``image`` (``[H, W, C]`` uint8, any channel order) aligned on ``landmarks``."""
    import cv2

    m = alignment_matrix(landmarks, size)
    return cv2.warpAffine(np.ascontiguousarray(image), m, (int(size), int(size)), borderValue=0.0)
