"""The CA² gate on the tiny Flux (nodes/ca2/dit_ca2.py) against float64 references.

Written from the math: per block, the image queries' output becomes
``out_img + w (1 - Score ⊙ M) softmax(q_img K_vis^T / sqrt D) V_vis`` with ``K_vis / V_vis`` the
block's text-side key (RMS key norm) / value of ``txt_in(photo tokens)``, ``Score`` the
heads-averaged share of the image query's joint softmax on the text columns (fixed scale, or
min-max per image), raised to ``sharpness``, and ``M`` the edit mask at the 2x2 patch grid.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import pack
from testkit import tiny_flux
from test_dit_joint_identity import recorder, run
from test_dit_kv_mixed import HEAD_DIM, hidden64, text_side_kv64, token_sets

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)

TEXT = "text attention (training-free)"


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def edit_mask():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half: patch columns 0-1 of the 4x4 grid
    return mask


INSIDE = torch.tensor([c < 2 for r in range(4) for c in range(4)], dtype=torch.float64)


def gate_stage(flux, photo, weight=1.0, apply_to="both", sharpness=1.0, scale="fixed"):
    dispatcher = pack("nodes.dispatch.dispatcher")
    layout = pack("nodes.common.dit_layout")
    ca2 = pack("nodes.ca2.dit_ca2")
    schedule = dispatcher.StageSchedule(weight=weight, apply_to=apply_to)
    return ca2.DitCA2GateStage(schedule, photo.cond, photo.uncond, lambda t: layout.identity_hidden(flux, t), edit_mask(), sharpness, scale)


def reference(rec, h_photo, weight, sharpness=1.0, scale="fixed", base_out=None, inside=INSIDE):
    """float64 image-token output ``[B, N, H*D]`` of the gate in rec's block (on ``base_out``'s image rows);
    ``inside``: the edit mask per patch (zeros: no suppression anywhere, plain decoupled attention)."""
    k_vis, _ = text_side_kv64(rec, h_photo)
    _, v_vis = text_side_kv64(rec, h_photo)
    q, k = rec["q"].double(), rec["k"].double()
    m = rec["m"]
    q_img = q[:, :, m:]
    b, n = q.shape[0], q_img.shape[2]
    p = torch.softmax(q_img @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1)
    score = p[..., :m].sum(-1).mean(1)  # [B, N]
    if scale == "per_step":
        lo, hi = score.amin(1, keepdim=True), score.amax(1, keepdim=True)
        score = (score - lo) / (hi - lo).clamp_min(0.05)
    score = score.clamp_min(0) ** sharpness
    gate = (1 - score * inside).unsqueeze(-1)
    visual = (torch.softmax(q_img @ k_vis.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ v_vis).transpose(1, 2).reshape(b, n, -1)
    out = (rec["out"] if base_out is None else base_out)[:, m:].double()
    return out + weight * gate * visual


def test_weight_zero_is_the_unpatched_model_bit_for_bit(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    photo, _ = token_sets(21)
    base = run(flux, (0, 1))
    assert torch.equal(run(dit.apply_dit_stage(flux, gate_stage(flux, photo, weight=0.0)), (0, 1)), base)
    assert not torch.equal(run(dit.apply_dit_stage(flux, gate_stage(flux, photo, weight=1.0)), (0, 1)), base)


@pytest.mark.parametrize("weight,sharpness,scale", [(1.0, 1.0, "fixed"), (0.6, 0.5, "fixed"), (1.3, 2.0, "per_step")])
def test_matches_float64_reference_in_every_block(flux, weight, sharpness, scale):
    dit = pack("nodes.dispatch.dit_dispatcher")
    photo, _ = token_sets(21)
    before, after = [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(dit.apply_dit_stage(model, gate_stage(flux, photo, weight, sharpness=sharpness, scale=scale)), recorder(after))
    run(model, (0, 1))
    assert len(after) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    h_photo = hidden64(flux, photo, (0, 1))
    for rec_before, rec in zip(before, after):
        m = rec["m"]
        torch.testing.assert_close(rec["out"][:, m:].double(), reference(rec_before, h_photo, weight, sharpness, scale), rtol=1e-4, atol=1e-5)
        assert torch.equal(rec["out"][:, :m], rec_before["out"][:, :m])  # text queries unpatched


def test_outside_the_edit_mask_the_photo_acts_at_full_strength(flux):
    """Gate exactly 1 outside the mask (plain decoupled attention to the photo), below 1 inside."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    ca2 = pack("nodes.ca2.dit_ca2")
    photo, _ = token_sets(21)
    before, gated = [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    run(dit.apply_dit_stage(dit.apply_dit_stage(model, gate_stage(flux, photo)), recorder(gated)), (0,))
    m = gated[0]["m"]
    score = ca2.text_share(before[0]["q"][:, :, m:], before[0]["k"], m)
    assert float(score.min()) > 0.0  # the text always gets some attention, so inside the gate is < 1
    plain = reference(before[0], hidden64(flux, photo, (0,)), 1.0, inside=torch.zeros_like(INSIDE))[0]
    got = gated[0]["out"][0, m:].double()
    outside = INSIDE == 0
    torch.testing.assert_close(got[outside], plain[outside], rtol=1e-4, atol=1e-5)
    assert (got[~outside] - plain[~outside]).abs().amax() > 1e-3


def test_cond_only_leaves_uncond_rows_unpatched(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    photo, _ = token_sets(21)
    before, after = [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(dit.apply_dit_stage(model, gate_stage(flux, photo, apply_to="cond")), recorder(after))
    run(model, (0, 1))
    for b, a in zip(before, after):
        assert torch.equal(a["out"][1:], b["out"][1:])
        assert not torch.equal(a["out"][:1], b["out"][:1])


def test_stacks_after_joint_identity_attention(flux):
    """Joint identity attention, then the gate: the gate adds to the joint stage's output, its score reads the call's q, k."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    layout = pack("nodes.common.dit_layout")
    photo, ident = token_sets(21)
    before, middle, after = [], [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(model, joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=1.5), ident, lambda t: layout.identity_hidden(flux, t)))
    model = dit.apply_dit_stage(model, recorder(middle))
    model = dit.apply_dit_stage(dit.apply_dit_stage(model, gate_stage(flux, photo, weight=0.9)), recorder(after))
    run(model, (0, 1))
    h_photo = hidden64(flux, photo, (0, 1))
    for rec_before, rec_mid, rec in zip(before, middle, after):
        m = rec["m"]
        assert not torch.equal(rec_mid["out"], rec_before["out"])
        torch.testing.assert_close(rec["out"][:, m:].double(), reference(rec_before, h_photo, 0.9, base_out=rec_mid["out"]), rtol=1e-4, atol=1e-5)


def node_adapter(width=tiny_flux.CONTEXT, seed=0):
    from testkit.synthetic import synthetic_adapter

    return synthetic_adapter([], "sd15", width, num_tokens=4, seed=seed, projector_input="clip_embeds")


def originals(count, seed=3):
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def test_ca2_node_and_inspect_on_flux(flux):
    import comfy.sample
    from testkit.synthetic import SyntheticClipVision

    nodes = pack("nodes.ca2.ca2_nodes")
    errors = pack("nodes.common.errors")
    node = nodes.ApplyCA2Gate()
    encoder = SyntheticClipVision(0)
    adapter = node_adapter()
    images = originals(1)
    base = run(flux, (0, 1))
    patched, = node.apply(flux, adapter, edit_mask(), TEXT, 1.0, 1.0, 0.0, 1.0, "both", clip_vision=encoder, image=images)
    assert not torch.equal(run(patched, (0, 1)), base)
    zero, = node.apply(flux, adapter, edit_mask(), TEXT, 1.0, 0.0, 0.0, 1.0, "both", clip_vision=encoder, image=images)
    assert torch.equal(run(zero, (0, 1)), base)
    with pytest.raises(errors.IdentityAttentionError, match="native score predictor.*text attention"):
        node.apply(flux, adapter, edit_mask(), "native score weights", 1.0, 1.0, 0.0, 1.0, "both", clip_vision=encoder, image=images)
    with pytest.raises(errors.IdentityAttentionError, match="64 wide"):
        node.apply(flux, node_adapter(768), edit_mask(), TEXT, 1.0, 1.0, 0.0, 1.0, "both", clip_vision=encoder, image=images)

    positive, negative = tiny_flux.random_flux_conditioning(1), tiny_flux.random_flux_conditioning(2)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(patched, noise, 2, 2.0, "euler", "simple", positive, negative, torch.zeros(1, 16, 8, 8), seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    recorder_ = nodes.ca2_stages(patched)[-1].recorder
    assert len(recorder_.steps) == 2 and len(recorder_.steps[0][1]) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    assert tuple(next(iter(recorder_.steps[0][1].values())).shape) == (1, 4, 4)  # the 2x2 patch grid of an 8x8 latent
    frames, mean, curve = nodes.InspectCA2Scores().inspect(patched, {"samples": out}, "mean of all layers")
    assert frames.shape == (2, 64, 64, 3) and mean.shape == (1, 64, 64) and curve.shape[-1] == 3
    assert float(frames.std()) > 0.0


def run_rows(model, chunks, per_chunk, seed=0):
    """One diffusion-model call with ``per_chunk`` images in each of ``chunks``."""
    x, t, c, y, g = tiny_flux.flux_inputs(seed, batch=len(chunks) * per_chunk)
    options = copy.copy(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = list(chunks)
    options["wrappers"] = model.wrappers
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g, transformer_options=options)


def test_one_original_per_image_of_the_batch(flux):
    """Two originals for two images: cond row i reads photo i, uncond rows the uncond tokens; three for two refuse."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    layout = pack("nodes.common.dit_layout")
    ca2 = pack("nodes.ca2.dit_ca2")
    errors = pack("nodes.common.errors")
    gen = torch.Generator().manual_seed(5)
    photos = torch.randn(3, 3, tiny_flux.CONTEXT, generator=gen)
    uncond = torch.randn(1, 3, tiny_flux.CONTEXT, generator=gen)
    hidden = lambda t: layout.identity_hidden(flux, t)  # noqa: E731
    stage = ca2.DitCA2GateStage(dispatcher.StageSchedule(weight=1.0), photos[:2], uncond, hidden, edit_mask())
    before, after = [], []
    run_rows(dit.apply_dit_stage(dit.apply_dit_stage(dit.apply_dit_stage(flux, recorder(before)), stage), recorder(after)), (0, 1), 2)
    txt_in = copy.deepcopy(flux.model.diffusion_model.txt_in).double()
    h_photo = txt_in(torch.cat([photos[:2], uncond, uncond]).double())
    for rec_before, rec in zip(before, after):
        torch.testing.assert_close(rec["out"][:, rec["m"] :].double(), reference(rec_before, h_photo, 1.0), rtol=1e-4, atol=1e-5)
    three = ca2.DitCA2GateStage(dispatcher.StageSchedule(weight=1.0), photos, uncond, hidden, edit_mask())
    with pytest.raises(errors.IdentityAttentionError, match="3 original images were given for a batch of 2"):
        run_rows(dit.apply_dit_stage(flux, three), (0, 1), 2)
