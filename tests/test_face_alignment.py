"""The pack's own ArcFace alignment (adapters/faces/face_alignment.py) against float64 references and insightface's norm_crop.

The reference fit is written here independently of Umeyama's SVD: a similarity
``x' = a x - b y + tx, y' = b x + a y + ty`` is linear in (a, b, tx, ty), so the least-squares
similarity (rotation + uniform scale, no reflection) is the solution of a 4-unknown linear
least-squares problem. insightface's ``norm_crop`` (through scikit-image's deprecated
``SimilarityTransform.estimate``) is the behaviour to reproduce; its FutureWarning is
silenced only in the comparison test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import toy_faces as toy
from conftest import pack

align = pack("adapters.faces.face_alignment")
fa = pack("adapters.faces.face_analysis")

TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])


def reference_similarity(src, dst):
    """float64 [2, 3]: least squares over (a, b, tx, ty) of the similarity mapping src onto dst."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1.0, 0.0])
        rhs.append(u)
        rows.append([y, x, 0.0, 1.0])
        rhs.append(v)
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def random_landmarks(rng, noise=3.0):
    """The template turned, scaled and moved into a photo, with detector noise."""
    angle = rng.uniform(-np.pi, np.pi)
    scale = rng.uniform(0.3, 4.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (TEMPLATE - TEMPLATE.mean(0)) @ rot.T * scale + rng.uniform(50, 500, size=2)
    return (pts + rng.normal(0, noise, pts.shape)).astype(np.float32)


def test_umeyama_equals_the_linear_least_squares_similarity():
    rng = np.random.default_rng(0)
    for _ in range(200):
        src = random_landmarks(rng)
        m = align.similarity_matrix(src, TEMPLATE)
        np.testing.assert_allclose(m, reference_similarity(src, TEMPLATE), rtol=1e-10, atol=1e-8)
        assert m[0, 0] == pytest.approx(m[1, 1], abs=1e-12) and m[0, 1] == pytest.approx(-m[1, 0], abs=1e-12)


def test_no_reflection_even_for_mirrored_landmarks():
    """Landmarks mirrored left-right (eyes swapped in place) still get a rotation, never a flip."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        src = random_landmarks(rng).astype(np.float64)
        src[:, 0] = -src[:, 0]
        m = align.similarity_matrix(src, TEMPLATE)
        assert np.linalg.det(m[:, :2]) > 0
        np.testing.assert_allclose(m, reference_similarity(src, TEMPLATE), rtol=1e-10, atol=1e-8)


def test_template_scaling_follows_norm_crop():
    np.testing.assert_allclose(align.arcface_template(112), TEMPLATE)
    np.testing.assert_allclose(align.arcface_template(224), TEMPLATE * 2)
    expected_128 = TEMPLATE * (128 / 128)
    expected_128[:, 0] += 8.0
    np.testing.assert_allclose(align.arcface_template(128), expected_128)
    expected_256 = TEMPLATE * 2.0
    expected_256[:, 0] += 16.0
    np.testing.assert_allclose(align.arcface_template(256), expected_256)
    for bad in (0, 100, 200, -112):
        with pytest.raises(ValueError, match="multiple of 112 or 128"):
            align.arcface_template(bad)
    with pytest.raises(ValueError, match="all at one point"):
        align.alignment_matrix(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"\[5, 2\]"):
        align.alignment_matrix(np.ones((4, 2)))


@pytest.mark.parametrize("size", [112, 224, 128, 256])
def test_equals_insightface_norm_crop(size):
    from insightface.utils import face_align

    rng = np.random.default_rng(size)
    for trial in range(20):
        image = rng.integers(0, 256, (600, 700, 3), dtype=np.uint8)
        kps = random_landmarks(rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-image's deprecated estimate, inside insightface
            theirs_m = face_align.estimate_norm(kps, image_size=size)
            theirs = face_align.norm_crop(image, landmark=kps, image_size=size)
        ours_m = align.alignment_matrix(kps, size)
        np.testing.assert_allclose(ours_m, theirs_m, rtol=0, atol=2e-4 * max(1.0, np.abs(theirs_m).max()))
        ours = align.align_face(image, kps, size)
        assert ours.shape == theirs.shape == (size, size, 3) and ours.dtype == np.uint8
        diff = np.abs(ours.astype(int) - theirs.astype(int))
        assert diff.max() <= 1, f"trial {trial}: differs by {diff.max()} grey levels"
        assert (diff > 0).mean() < 0.01  # a float32-vs-float64 rounding at a few pixels, nothing more


def test_encoding_a_face_emits_no_future_warning():
    model = fa.load_face_analysis(toy.toy_pack(), "CPU", 640)
    img = toy.blank(480, 640)
    toy.plant(img, 256, 192, 32, toy.astronaut_face())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fa.encode_identity(model, img, flip=True, crops_224=True)
    assert result.identity.count == 2
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future
