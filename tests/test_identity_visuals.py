"""Face masks, previews and crop batches (adapters/faces/face_visuals.py), against formulas written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import pack

fv = pack("adapters.faces.face_visuals")


def reference_mask(h, w, bbox, eye_angle, grow, feather):
    """Float64 ellipse mask written independently: pixel centres, rotated frame, smoothstep edge."""
    x0, y0, x1, y1 = bbox
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * grow, (y1 - y0) / 2 * grow
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            px, py = x + 0.5 - cx, y + 0.5 - cy
            u = px * math.cos(eye_angle) + py * math.sin(eye_angle)
            v = -px * math.sin(eye_angle) + py * math.cos(eye_angle)
            r = math.hypot(u / a, v / b)
            if feather == 0:
                out[y, x] = float(r <= 1)
            else:
                t = min(max((1 + feather / 2 - r) / feather, 0.0), 1.0)
                out[y, x] = t * t * (3 - 2 * t)
    return out


@pytest.mark.parametrize("feather", [0.0, 0.3])
@pytest.mark.parametrize("tilt", [0.0, 0.35])
def test_face_mask_matches_the_ellipse_formula(feather, tilt):
    bbox = (20.0, 14.0, 52.0, 58.0)
    cx, cy = 36.0, 30.0
    eyes = [[cx - 8 * math.cos(tilt), cy - 8 * math.sin(tilt)], [cx + 8 * math.cos(tilt), cy + 8 * math.sin(tilt)]]
    landmarks = torch.tensor(eyes + [[cx, cy + 6], [cx - 6, cy + 14], [cx + 6, cy + 14]])
    mask = fv.face_mask(64, 80, bbox, landmarks, grow=1.2, feather=feather)
    assert mask.shape == (64, 80) and mask.dtype == torch.float32
    np.testing.assert_allclose(mask.numpy(), reference_mask(64, 80, bbox, tilt, 1.2, feather), atol=1e-6)
    assert mask[36, 36] == 1.0 and mask[0, 0] == 0.0 and mask[63, 79] == 0.0


def test_face_mask_without_landmarks_is_axis_aligned_and_grows():
    small = fv.face_mask(50, 50, (15, 15, 35, 35), None, grow=1.0, feather=0.0)
    big = fv.face_mask(50, 50, (15, 15, 35, 35), None, grow=2.0, feather=0.0)
    assert small.sum() < big.sum() and bool((big >= small).all())
    assert small.sum().item() == pytest.approx(math.pi * 10 * 10, rel=0.05)


def test_draw_faces_draws_boxes_and_landmarks_and_leaves_the_input_alone():
    image = torch.full((64, 96, 3), 0.5)
    before = image.clone()
    kps = torch.tensor([[30.0, 30.0], [50.0, 30.0], [40.0, 38.0], [33.0, 46.0], [47.0, 46.0]])
    out = fv.draw_faces(image, [((20, 20, 60, 56), kps, True, "0.873"), ((70, 10, 90, 30), None, False, None)])
    assert torch.equal(image, before) and out.shape == (64, 96, 3)
    green, grey = torch.tensor(fv.GREEN), torch.tensor(fv.GREY)
    assert torch.equal(out[40, 60], green) and torch.equal(out[19, 40], green)  # right edge, top edge (drawn just outside the box)
    assert torch.equal(out[20, 90], grey) and torch.equal(out[9, 80], grey)  # the other face's box
    for (x, y), colour in zip(kps.tolist(), fv.LANDMARK_COLOURS):
        assert torch.equal(out[int(y), int(x)], torch.tensor(colour))
    assert torch.equal(out[62, 2], before[62, 2])  # far from everything: unchanged
    label = out[:20, 20:60]  # the score is written above the box in the chosen colour
    assert bool((label == green).all(-1).any())


def test_text_bitmap_and_banner():
    bits = fv.text_mask("0.5", scale=2)
    assert bits.shape == (14, 36)
    zero = fv.text_mask("0")[:, :5]
    assert zero[0].tolist() == [False, True, True, True, False] and zero[3].tolist() == [True, False, True, False, True]
    out = fv.banner(torch.zeros(40, 80, 3), "NO FACE")
    assert out[:12].sum() > 0 and out[20:].sum() == 0


def test_crops_image_is_an_image_batch():
    crops = [torch.rand(112, 112, 3) for _ in range(3)]
    batch = fv.crops_image(crops)
    assert batch.shape == (3, 112, 112, 3) and torch.equal(batch[1], crops[1])
