"""Mixture-of-attention routing on the tiny Flux (nodes/moa/dit_moa.py) against float64 references.

Written from the math: per block and image token, ``R0 * prior + R1 * personalized`` with prior =
the host's joint attention output, personalized = the output of the identity stages before the
router; ``identity_attention``: ``R1 = sigmoid(10 (a / max(max a, 0.2) - 1/2) / T)`` with ``a`` the
summed heads-averaged softmax mass on each identity stage's columns (``log w`` for joint stages),
clipped to [0, 1]; ``mask``: ``R1`` = the mask at the 2x2 patch; result ``lerp(out, routed, weight)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack
from testkit import tiny_flux
from test_dit_joint_identity import recorder, run
from test_dit_kv_mixed import HEAD_DIM, hidden64, text_side_kv64, token_sets

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)

JOINT_W, KV_W = 2.0, 0.7


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def left_half():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    return mask


INSIDE = torch.tensor([c < 2 for r in range(4) for c in range(4)])


def identity_model(flux, before, middle, apply_to="both"):
    """recorder(before) -> joint identity (w 2) -> KV-mixed decoupled (w 0.7) -> recorder(middle)."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    kv = pack("nodes.kv_mixed.dit_kv_mixed")
    layout = pack("nodes.common.dit_layout")
    ident, values = token_sets(31)
    hidden = lambda t: layout.identity_hidden(flux, t)  # noqa: E731
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(model, joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=JOINT_W, apply_to=apply_to), ident, hidden))
    model = dit.apply_dit_stage(model, kv.DitKVMixedStage(dispatcher.StageSchedule(weight=KV_W, apply_to=apply_to), ident, values, hidden, "decoupled"))
    return dit.apply_dit_stage(model, recorder(middle)), (ident, values)


def routed(model, router="identity_attention", weight=1.0, temperature=1.0, mask=None, apply_to="both", record=True):
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    moa = pack("nodes.moa.dit_moa")
    routing = pack("adapters.attention.attention_routing")
    stages = [s for s in dit.installed_dit_dispatcher(model).stages if s.label != "recorder"]
    stage = moa.DitMixtureOfAttentionStage(dispatcher.StageSchedule(weight=weight, apply_to=apply_to), router, temperature, mask, stages, routing.RouterRecorder() if record else None)
    return dit.apply_dit_stage(model, stage)


def share64(rec, h_ident):
    """float64 summed identity share ``[B, N]``: joint stage (log w) + decoupled KV-mixed stage (no bias), clipped."""
    k_id, _ = text_side_kv64(rec, h_ident)
    q, k = rec["q"].double(), rec["k"].double()
    q_img = q[:, :, rec["m"] :]
    total = 0
    for bias in (math.log(JOINT_W), 0.0):
        logits = torch.cat([q_img @ k.transpose(-1, -2), q_img @ k_id.transpose(-1, -2) + bias * math.sqrt(HEAD_DIM)], -1) / math.sqrt(HEAD_DIM)
        total = total + torch.softmax(logits, -1)[..., k.shape[2] :].sum(-1).mean(1)
    return total.clamp(0, 1)


def test_mask_router_is_prior_outside_and_personalized_inside_exactly(flux):
    before, middle, after = [], [], []
    model, _ = identity_model(flux, before, middle)
    model = pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(routed(model, "mask", mask=left_half()), recorder(after))
    run(model, (0, 1))
    for b, mid, a in zip(before, middle, after):
        m = a["m"]
        img, prior, pers = a["out"][:, m:], b["out"][:, m:], mid["out"][:, m:]
        assert torch.equal(img[:, ~INSIDE], prior[:, ~INSIDE]) and torch.equal(img[:, INSIDE], pers[:, INSIDE])
        assert not torch.equal(prior, pers)
        assert torch.equal(a["out"][:, :m], mid["out"][:, :m])


def test_empty_mask_gives_the_unpatched_model_bit_for_bit(flux):
    model, _ = identity_model(flux, [], [])
    base = run(flux, (0, 1))
    assert torch.equal(run(routed(model, "mask", mask=torch.zeros(1, 64, 64)), (0, 1)), base)
    assert not torch.equal(run(model, (0, 1)), base)


def test_weight_zero_leaves_the_personalized_model_bit_for_bit(flux):
    model, _ = identity_model(flux, [], [])
    assert torch.equal(run(routed(model, weight=0.0), (0, 1)), run(model, (0, 1)))


@pytest.mark.parametrize("weight,temperature", [(1.0, 1.0), (0.6, 0.5)])
def test_identity_attention_router_matches_float64_reference(flux, weight, temperature):
    before, middle, after = [], [], []
    model, (ident, _) = identity_model(flux, before, middle)
    model = pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(routed(model, weight=weight, temperature=temperature, mask=left_half()), recorder(after))
    run(model, (0, 1))
    h_ident = hidden64(flux, ident, (0, 1))
    for b, mid, a in zip(before, middle, after):
        m = a["m"]
        share = share64(b, h_ident)
        norm = (share / share.amax(1, keepdim=True).clamp_min(0.2)).clamp(0, 1)
        r1 = (torch.sigmoid(10 * (norm - 0.5) / temperature) * INSIDE.double()).unsqueeze(-1).detach()
        pers = mid["out"][:, m:].double()
        expected = (1 - r1) * b["out"][:, m:].double() + r1 * pers
        expected = pers + weight * (expected - pers)
        torch.testing.assert_close(a["out"][:, m:].double(), expected, rtol=1e-4, atol=1e-5)
        assert 0.0 < float(r1.max()) and float(r1[:, INSIDE].min()) < 1.0


def test_cond_only_leaves_uncond_rows_personalized(flux):
    before, middle, after = [], [], []
    model, _ = identity_model(flux, before, middle)
    model = pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(routed(model, apply_to="cond"), recorder(after))
    run(model, (0, 1))
    for mid, a in zip(middle, after):
        assert torch.equal(a["out"][1:], mid["out"][1:])
        assert not torch.equal(a["out"][:1], mid["out"][:1])


def test_share_follows_the_identity_stages_rows(flux):
    """An identity stage on cond only gives the uncond rows no share: they route to the prior."""
    before, middle, after = [], [], []
    model, _ = identity_model(flux, before, middle, apply_to="cond")
    model = pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(routed(model), recorder(after))
    run(model, (0, 1))
    r1_uncond = torch.sigmoid(torch.tensor(-5.0))  # share 0 -> normalised 0 -> sigmoid(-5)
    for b, mid, a in zip(before, middle, after):
        m = a["m"]
        expected = (1 - r1_uncond) * b["out"][1:, m:].double() + r1_uncond * mid["out"][1:, m:].double()
        torch.testing.assert_close(a["out"][1:, m:].double(), expected, rtol=1e-5, atol=1e-6)


def test_moa_nodes_on_flux(flux):
    import comfy.sample
    from testkit.synthetic import synthetic_adapter, synthetic_identity

    moa_nodes = pack("nodes.moa.mixture_of_attention_nodes")
    errors = pack("nodes.common.errors")
    pva = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention()
    node = moa_nodes.ApplyMixtureOfAttention()
    adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT, mechanism="joint")
    personal, = pva.apply(flux, adapter, synthetic_identity(), 1.5, 0.0, 1.0, "both", "auto", "layer", "fused")
    args = dict(router="identity_attention", weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="both", temperature=1.0, record_maps=True, prior="current")
    model, = node.apply(personal, **args)
    out_personal = run(personal, (0, 1))
    assert not torch.equal(run(model, (0, 1)), out_personal)
    zero, = node.apply(personal, **{**args, "weight": 0.0})
    assert torch.equal(run(zero, (0, 1)), out_personal)
    with pytest.raises(errors.IdentityAttentionError, match="set prior to current"):
        node.apply(personal, **{**args, "prior": "base"})
    with pytest.raises(errors.IdentityAttentionError, match="UNet cross-attention layer"):
        node.apply(personal, **{**args, "router": "learned"})
    with pytest.raises(errors.IdentityAttentionError, match="has none"):
        node.apply(flux, **args)
    with pytest.raises(errors.IdentityAttentionError, match="needs a mask"):
        node.apply(personal, **{**args, "router": "mask"})

    model, = node.apply(personal, **args)  # a fresh recorder (the calls above recorded too)
    positive, negative = tiny_flux.random_flux_conditioning(1), tiny_flux.random_flux_conditioning(2)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(model, noise, 2, 2.0, "euler", "simple", positive, negative, torch.zeros(1, 16, 8, 8), seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    maps, per_step = moa_nodes.InspectRouter().show(model, {"samples": out}, "cond", 0)
    assert maps.shape == (1, 64, 64, 3) and per_step.shape[-1] == 3
    assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0 and float(maps.std()) > 0.0
    assert len(moa_nodes.dit_moa_stages(model)[-1].recorder) == 2  # one entry per sampling step
