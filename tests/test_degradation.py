"""Blind-restoration degradations (adapters/training/degradation.py): seeded, each op against a float64 / Pillow reference, ranges."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack

deg = pack("adapters.training.degradation")


def images(b=2, h=48, w=40, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def reference_correlate(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """float64 per-channel correlation with reflect (mirror without edge repeat) padding, by loops over taps."""
    r = (kernel.shape[0] - 1) // 2
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.zeros_like(img, dtype=np.float64)
    h, w = img.shape[1:]
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            out += kernel[dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    return out


def test_same_seed_same_degradation_and_positions_are_independent():
    x = images()
    a, steps_a = deg.degrade(x, seed=5, indices=[10, 11])
    b, steps_b = deg.degrade(x, seed=5, indices=[10, 11])
    assert torch.equal(a, b) and steps_a == steps_b
    c, _ = deg.degrade(x, seed=6, indices=[10, 11])
    assert not torch.equal(a, c)
    alone, steps_alone = deg.degrade(x[1:], seed=5, indices=[11])  # image 11 does not depend on its batch mates
    assert torch.equal(alone[0], a[1]) and steps_alone[0] == steps_a[1]
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-3)


def test_order_is_random_and_every_op_appears_with_probability_one():
    orders = set()
    for i in range(40):
        steps = deg.draw_steps(deg.DegradationSettings(), deg.degradation_generator(0, i))
        kinds = ["blur" if s.op.endswith("_blur") else s.op for s in steps]
        assert sorted(kinds) == sorted(deg.OPS)
        orders.add(tuple(kinds))
    assert len(orders) > 5
    none = deg.DegradationSettings(probability=(("blur", 0.0), ("downscale", 0.0), ("noise", 0.0), ("jpeg", 0.0)))
    x = images(1)
    out, steps = deg.degrade(x, seed=1, settings=none)
    assert steps == [[]] and torch.equal(out, x)


def test_drawn_strengths_stay_in_the_documented_ranges_and_strength_narrows_them():
    s = deg.DegradationSettings()
    seen = {}
    for i in range(300):
        for step in deg.draw_steps(s, deg.degradation_generator(3, i)):
            seen.setdefault(step.op, []).append(step.value)
            if step.op == "motion_blur":
                assert 0.0 <= step.angle < 180.0
    assert 0.1 <= min(seen["gaussian_blur"]) and max(seen["gaussian_blur"]) <= 10.0 and max(seen["gaussian_blur"]) > 7
    assert 1.0 <= min(seen["motion_blur"]) and max(seen["motion_blur"]) <= 21.0
    assert 0.8 <= min(seen["downscale"]) and max(seen["downscale"]) <= 8.0 and max(seen["downscale"]) > 6
    assert 0.0 <= min(seen["noise"]) and max(seen["noise"]) <= 20 / 255
    assert 60 <= min(seen["jpeg"]) and max(seen["jpeg"]) <= 100 and min(seen["jpeg"]) < 65
    assert 0.3 < len(seen["motion_blur"]) / (len(seen["motion_blur"]) + len(seen["gaussian_blur"])) < 0.7
    mild = s.with_strength(0.25)
    for i in range(100):
        for step in deg.draw_steps(mild, deg.degradation_generator(3, i)):
            if step.op == "gaussian_blur":
                assert step.value <= 0.1 + 0.25 * 9.9 + 1e-9
            if step.op == "downscale":
                assert step.value <= 0.8 + 0.25 * 7.2 + 1e-9
            if step.op == "jpeg":
                assert step.value >= 90


def test_gaussian_blur_is_the_float64_gaussian_with_reflect_padding_scaled_to_512px():
    x = images(1, 256, 256).permute(0, 3, 1, 2)
    sigma512 = 4.0
    sigma = sigma512 * 256 / 512  # 2 px on a 256 px face
    r = math.ceil(3 * sigma)
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-(t**2) / (2 * sigma**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    want = reference_correlate(x[0].double().numpy(), k)
    got = deg.gaussian_blur(x, sigma512)[0].double().numpy()
    assert np.abs(got - want).max() < 1e-5


def test_motion_kernel_is_a_normalised_streak_at_its_angle():
    k0 = deg.motion_kernel(5.0, 0.0)
    r = (k0.shape[0] - 1) // 2
    assert abs(float(k0.sum()) - 1) < 1e-12
    row = k0[r]
    assert torch.all(row[: r - 2] == 0) and torch.all(row[r + 3 :] == 0)  # end points: the centres of the end pixels
    assert torch.allclose(row, torch.flip(row, dims=(0,))) and torch.allclose(row[r - 1 : r + 2], row[r].expand(3))
    assert float(k0.sum() - k0[r].sum()) < 1e-12  # horizontal: all weight on the centre row
    k90 = deg.motion_kernel(5.0, 90.0)
    assert torch.allclose(k90, k0.T, atol=1e-9)
    k45 = deg.motion_kernel(7.0, 45.0)
    assert torch.allclose(k45, torch.flip(k45, dims=(0, 1)), atol=1e-9)  # symmetric about the centre
    assert float(torch.diagonal(torch.flip(k45, dims=(1,))).sum()) > 0.6  # along the anti-diagonal (y points down)
    x = images(1, 64, 64).permute(0, 3, 1, 2)
    want = reference_correlate(x[0].double().numpy(), deg.motion_kernel(10.0 * 64 / 512, 30.0).numpy())
    assert np.abs(deg.motion_blur(x, 10.0, 30.0)[0].double().numpy() - want).max() < 1e-5
    assert torch.equal(deg.motion_kernel(0.5, 10.0), deg.motion_kernel(0.5, 10.0)) and float(deg.motion_kernel(0.5, 10.0).max()) == 1.0


def test_downscale_is_a_box_average_and_noise_uses_the_generator():
    x = images(1, 32, 24).permute(0, 3, 1, 2)
    got = deg.downscale(x, 4.0)
    want = x.double().reshape(1, 3, 8, 4, 6, 4).mean(dim=(3, 5))
    assert got.shape == (1, 3, 8, 6) and torch.allclose(got.double(), want, atol=1e-6)
    assert deg.downscale(x, 0.8).shape == (1, 3, 40, 30)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    noisy = deg.add_noise(x, 0.05, g1)
    assert torch.allclose(noisy, x + 0.05 * torch.randn(x.shape, generator=g2), atol=0)


def test_jpeg_is_pillows_encoder_at_that_quality_in_memory():
    x = images(1, 32, 32)
    got = deg.jpeg(x.permute(0, 3, 1, 2), 70)[0].permute(1, 2, 0)
    pixels = (x[0] * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=70)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float32) / 255
    assert torch.equal(got, torch.from_numpy(want))
    assert not torch.equal(got, deg.jpeg(x.permute(0, 3, 1, 2), 95)[0].permute(1, 2, 0))


def test_every_op_in_a_pipeline_matches_running_it_alone_in_the_drawn_order():
    x = images(1, 64, 64)
    settings = deg.DegradationSettings()
    g = deg.degradation_generator(9, 2)
    steps = deg.draw_steps(settings, g)
    y = x.permute(0, 3, 1, 2).float()
    for s in steps:  # the same ops by hand
        if s.op == "gaussian_blur":
            y = deg.gaussian_blur(y, s.value)
        elif s.op == "motion_blur":
            y = deg.motion_blur(y, s.value, s.angle)
        elif s.op == "downscale":
            y = deg.downscale(y, s.value)
        elif s.op == "noise":
            y = deg.add_noise(y, s.value, g)
        else:
            y = deg.jpeg(y, int(s.value))
        y = y.clamp(0, 1)
    y = torch.nn.functional.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1) if y.shape[-1] != 64 else y
    got, drawn = deg.degrade(x, seed=9, indices=[2])
    assert drawn[0] == steps and torch.equal(got[0], y[0].permute(1, 2, 0))
    assert "->" in deg.describe(steps)


def test_bad_indices_are_refused():
    with pytest.raises(ValueError):
        deg.degrade(images(2), seed=0, indices=[1])


def test_degrade_photos_node_gives_the_seeded_degradation_pairs_and_a_report():
    node_mod = pack("nodes.identity.restoration_nodes")
    node = node_mod.DegradePhotos()
    x = images(2, 40, 40)
    degraded, pairs, report = node.degrade(x, 7, 1.0)
    want, steps = deg.degrade(x, 7)
    assert torch.equal(degraded, want) and pairs.shape == (2, 40, 80, 3)
    assert torch.equal(pairs[:, :, :40], x) and torch.equal(pairs[:, :, 40:], want)
    assert report.splitlines()[1] == "image 1: " + deg.describe(steps[1])
    rgba = torch.cat([x, torch.ones(2, 40, 40, 1)], dim=-1)
    assert torch.equal(node.degrade(rgba, 7, 1.0)[0], want)
    spec = node_mod.DegradePhotos.INPUT_TYPES()["required"]
    assert all(opts[1].get("tooltip") for opts in spec.values())
    with pytest.raises(Exception, match="Degrade photos"):
        node.degrade(torch.zeros(2, 40), 0, 1.0)
