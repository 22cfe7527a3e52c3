"""CA²'s training-free score on one scale over the whole run (the paper's Fig. 5 trend), and the
inspect node showing it: frames on one colour scale and a per-step curve. References in float64."""

from __future__ import annotations

import torch

from conftest import pack
from test_ca2_sampling import apply_gate, edit_mask, image_adapter, originals, sample

ca2 = pack("adapters.attention.ca2_gate")
ca2_nodes = pack("nodes.ca2.ca2_nodes")
map_images = pack("nodes.common.map_images")
spatial = pack("adapters.attention.spatial")

FIXED, PER_STEP = "fixed (trend over steps)", "per step (full contrast)"


def recorded(patched):
    """Per step, per layer: the recorded cond-row score maps (float64)."""
    return [{k: v.double() for k, v in entries.items()} for _, entries in ca2_nodes.ca2_stages(patched)[-1].recorder.steps]


def test_fixed_scale_keeps_the_steps_comparable_and_per_step_erases_it(tiny):
    model = tiny.unet("sd15")
    adapter = image_adapter(model)
    runs = {}
    for scale in (FIXED, PER_STEP):
        patched = apply_gate(model, adapter, originals(1), score_scale=scale)
        sample(patched, "sd15", steps=3)
        runs[scale] = recorded(patched)
    assert len(runs[FIXED]) == len(runs[PER_STEP]) == 3
    # the first layer of the first step sees the same input in both runs (later ones differ as the
    # gates differ): per_step is min-max of the same mass (spread floor 0.05), float64 reference
    for key in [("input", 1, 0)]:
        mass = runs[FIXED][0][key]
        lo, hi = mass.amin(dim=(-2, -1), keepdim=True), mass.amax(dim=(-2, -1), keepdim=True)
        expected = ((mass - lo) / (hi - lo).clamp_min(0.05)).clamp(0, 1)
        torch.testing.assert_close(runs[PER_STEP][0][key], expected, rtol=2e-3, atol=2e-3)  # fp16 record
    # every per_step map with any spread spans 0..1 at every step: the level of a step is gone
    for step in runs[PER_STEP]:
        for m in step.values():
            if float(m.amax() - m.amin()) > 0.5:
                assert float(m.amax()) > 0.99 and float(m.amin()) < 0.01
    # the fixed scale: each step's level is its own (the masses' means differ between steps)
    means = [torch.stack([m.mean() for m in step.values()]).mean() for step in runs[FIXED]]
    assert float(max(means) - min(means)) > 1e-4
    # and is a probability, not stretched: the maps do not all span 0..1
    assert any(float(m.amax() - m.amin()) < 0.9 for step in runs[FIXED] for m in step.values())


def test_inspect_frames_share_one_scale_and_the_curve_is_the_per_step_mean(tiny):
    model = tiny.unet("sd15")
    patched = apply_gate(model, image_adapter(model), originals(1))
    out = sample(patched, "sd15", steps=3)
    frames, mean, curve = ca2_nodes.InspectCA2Scores().inspect(patched, {"samples": out}, "mean of all layers")
    grid = (8, 8)
    per_step = []
    for step in recorded(patched):  # mean over layers, each resized (bilinear) to the latent grid
        per_step.append(torch.stack([map_images.resize_maps(m, grid).double() for m in step.values()]).mean(0))
    pictures = torch.cat([map_images.resize_maps(m, (64, 64)).double() for m in per_step])
    torch.testing.assert_close(frames[..., 0].double(), pictures / pictures.max(), rtol=1e-4, atol=1e-4)
    assert float(frames.max()) == 1.0
    # the curve: inside the edit mask (weighted) per step, drawn on a fixed 0..1 axis
    (inside, overall), _ = ca2_nodes.score_curves([m.float() for m in per_step], edit_mask(), grid)
    w = spatial.mask_to_tokens(edit_mask(), grid).reshape(grid).double()
    for value, m in zip(inside, per_step):
        assert abs(value - float((m[0] * w).sum() / w.sum())) < 1e-5
    for value, m in zip(overall, per_step):
        assert abs(value - float(m[0].mean())) < 1e-5
    assert curve.shape == (1, 160, 320, 3)
    white = (curve[0] == 1.0).all(-1)
    assert white.any()  # the inside line is drawn
    # its height is the value: the white pixels of the first column are around y(inside[0])
    ys = white[:, 8].nonzero()[:, 0].double()
    expected_y = (160 - 1 - 8) - inside[0] * (160 - 1 - 16)
    assert ys.numel() and abs(float(ys.mean()) - expected_y) <= 2.0
