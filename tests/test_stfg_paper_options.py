"""STFG as the paper has it, and the pack's two departures as visible options:
the boundary from every cross-attention layer (default) or only the coarse ones,
the update unmasked (default) or multiplied by the mask, the step capped (default) or not.
References are float64 formulas written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import pack
from layer_harness import heads_of, layer_info, layer_inputs, logits64, run_layer
from test_stfg_guidance import F64, case, lp_ref
from test_stfg_sampling import SIZE, apply_stfg, edit_mask, inpaint, latent_mask, original_latent

stfg = pack("adapters.attention.stfg_guidance")
stfg_nodes = pack("nodes.stfg.stfg_nodes")
post_cfg = pack("nodes.stfg.stfg_post_cfg")
attention_stage = pack("nodes.stfg.stfg_attention_stage")
dispatcher = pack("nodes.dispatch.dispatcher")
errors = pack("nodes.common.errors")


def update_reference(denoised, z0, idx, mask, sigma, lam, box, cap):
    """Eq. 10 with eps held constant (numpy float64); ``mask`` None = unmasked, ``cap`` = min(step, |Idx|/2)."""
    d, z, i, bx = denoised.numpy(), z0.numpy(), idx.numpy(), box.numpy()
    count = np.maximum(i.sum(axis=(-2, -1)), 1)
    grad = lp_ref((lp_ref(d, bx) - lp_ref(z, bx)) * i[:, None], bx) * (2.0 / count)[:, None, None, None]
    step = lam * np.asarray(sigma) ** 2
    if cap:
        step = np.minimum(step, i.sum(axis=(-2, -1)) / 2.0)
    step = step[:, None, None, None]
    m = 1.0 if mask is None else mask.numpy()[:, None]
    return d - step * m * grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cap", [False, True])
def test_update_options_against_eq10(masked, cap):
    x0, z0, attention, mask = case(4)
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    sigma = [14.0, 14.0]  # high noise: the cap binds (lambda sigma^2 = 588 > |Idx| / 2)
    assert float(3.0 * 14.0**2) > float(idx.double().sum(dim=(-2, -1)).max()) / 2
    got = stfg.fast_update(x0, z0, idx, mask if masked else None, torch.tensor(sigma, dtype=F64), 3.0, box, cap=cap)
    expected = update_reference(x0, z0, idx, mask if masked else None, sigma, 3.0, box, cap)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max()))
    outside = (mask == 0)[:, None].expand_as(x0)
    moved_outside = bool((got[outside] != x0[outside]).any())
    assert moved_outside != masked  # unmasked (the paper): the low-pass reaches past the mask edge


def content_mass64(inputs):
    """Mean over heads of the softmax mass on every text token but the start token: [B, N] float64."""
    probs = logits64(inputs.q, inputs.k, inputs.info.heads).softmax(-1)  # [B, H, N, M]
    return probs[..., 1:].sum(-1).mean(1)


@pytest.mark.parametrize("layers", ["all", "low_resolution"])
def test_boundary_map_is_the_mean_over_the_recorded_layers(tiny, layers):
    """Appendix Eq. 11: every recorded layer's map upsampled (bilinear) to the latent grid, then averaged."""
    model = tiny.unet("sd15")
    stage = attention_stage.STFGAttentionStage(dispatcher.StageSchedule(apply_to="cond"), layers)
    patched = dispatcher.apply_attention_stage(model, stage)
    latent = (8, 8)
    keys = [("input", 1, 0), ("input", 7, 0), ("middle", 0, 0)]  # grids 8x8, 2x2, 1x1 of an 8x8 latent
    grids = {("input", 1, 0): (8, 8), ("input", 7, 0): (2, 2), ("middle", 0, 0): (1, 1)}
    expected, count = 0, 0
    for i, key in enumerate(keys):
        inputs = layer_inputs(patched, key, codes=(1, 0), rows=1, grid=grids[key], seed=10 + i)
        inputs.extra_options["original_shape"] = [2, 4, *latent]
        out = run_layer(patched, inputs)
        assert torch.equal(out, dispatcher.AttentionCall(inputs.q, inputs.k, inputs.v, inputs.extra_options, key).text_attention())
        if layers == "low_resolution" and key == ("input", 1, 0):
            continue  # the 8x8 layer is the latent's own resolution: not coarse
        mass = content_mass64(inputs)[1:2].reshape(1, 1, *grids[key])  # the cond row (codes 1, 0)
        expected = expected + F.interpolate(mass, size=latent, mode="bilinear", align_corners=False)[:, 0]
        count += 1
    sigma, attention = stage.take()
    assert sigma == 5.0 and attention.shape == (1, *latent)
    torch.testing.assert_close(attention.double(), expected / count, rtol=1e-5, atol=1e-6)


def test_node_defaults_are_the_papers_and_the_options_reach_the_guidance(tiny):
    model = tiny.unet("sd15")
    z0, mask = original_latent(), edit_mask()
    inputs = stfg_nodes.ApplySTFG.INPUT_TYPES()["optional"]
    assert inputs["boundary_layers"][1]["default"] == "all layers (paper)"
    assert inputs["mask_update"][1]["default"] is False and inputs["step_cap"][1]["default"] is True
    guided = apply_stfg(model, z0, mask)
    guidance = post_cfg.installed_guidance(guided)
    assert guidance.stage.layers == "all" and not guidance.mask_update and guidance.step_cap
    (patched,) = stfg_nodes.ApplySTFG().apply(model, {"samples": z0}, mask, 10.0, "fast", 0.5, 0.0, 1.0, None, "low resolution layers", True, False)
    guidance = post_cfg.installed_guidance(patched)
    assert guidance.stage.layers == "low_resolution" and guidance.mask_update and not guidance.step_cap
    with pytest.raises(errors.IdentityAttentionError, match="boundary_layers"):
        stfg_nodes.ApplySTFG().apply(model, {"samples": z0}, mask, 10.0, "fast", 0.5, 0.0, 1.0, None, "some layers")


def test_masked_update_leaves_the_outside_without_a_noise_mask(tiny):
    """Without the sampler's noise mask, only mask_update keeps the outside of the edit mask untouched."""
    import comfy.sample
    from test_stfg_sampling import conditioning

    model = tiny.unet("sd15")
    z0, mask = original_latent(), edit_mask()

    def img2img(m):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample(m, noise, 2, 5.0, "euler", "normal", conditioning("sd15", 100), conditioning("sd15", 200), z0, seed=0, denoise=0.5, disable_pbar=True)

    plain = img2img(model)
    args = ({"samples": z0}, mask, 50.0, "fast", 0.5, 0.0, 1.0, None, "all layers (paper)")
    masked = img2img(stfg_nodes.ApplySTFG().apply(model, *args, True, True)[0])
    unmasked = img2img(stfg_nodes.ApplySTFG().apply(model, *args, False, True)[0])
    far = (F.max_pool2d(latent_mask(mask)[:, None], 5, 1, 2)[:, 0] == 0)[:, None].expand_as(plain)
    assert far.any()
    assert (masked - plain).abs().max() > 0 and (unmasked - masked).abs().max() > 0
    # a 2-step sampler: the masked run differs from the plain one outside the mask only through the model's reaction
    # in the second step, the first step's update itself is zero there
    assert float((masked - plain)[far].abs().max()) < float((unmasked - plain)[far].abs().max())
