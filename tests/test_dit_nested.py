"""Nested attention on the tiny Flux (nodes/nested/dit_nested.py) against float64 references.

Written from the math: per block and image query, ``out + w r a_S(q) (v*_q - V[s])`` with
``v*_q = softmax(q Kn^T / sqrt D) Vn`` (``Kn / Vn`` the block's text-side key (RMS key norm) /
value of ``txt_in(identity tokens)``), ``a_S(q)`` the query's joint-softmax probability on the
subject's text columns (summed over its copies), ``V[s]`` the block's value of the subject token.
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


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def nested_stage(flux, ident, index=3, prompt_length=0, weight=1.0, apply_to="both", mask=None):
    dispatcher = pack("nodes.dispatch.dispatcher")
    layout = pack("nodes.common.dit_layout")
    nested = pack("nodes.nested.dit_nested")
    schedule = dispatcher.StageSchedule(weight=weight, apply_to=apply_to, mask=mask)
    return nested.DitNestedAttentionStage(schedule, ident, lambda t: layout.identity_hidden(flux, t), index, prompt_length)


def reference(rec, h_ident, positions, weight, base_out=None):
    """float64 image-token output ``[B, N, H*D]``."""
    kn, _ = text_side_kv64(rec, h_ident)
    _, vn = text_side_kv64(rec, h_ident)
    q, k, v = (rec[n].double() for n in ("q", "k", "v"))
    m = rec["m"]
    q_img = q[:, :, m:]
    b, n = q.shape[0], q_img.shape[2]
    nested = torch.softmax(q_img @ kn.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ vn
    a = torch.softmax(q_img @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1)[..., list(positions)].sum(-1, keepdim=True)
    delta = (a * (nested - v[:, :, positions[0] : positions[0] + 1])).transpose(1, 2).reshape(b, n, -1)
    return (rec["out"] if base_out is None else base_out)[:, m:].double() + weight * delta


def test_weight_zero_is_the_unpatched_model_bit_for_bit(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    ident, _ = token_sets(41)
    base = run(flux, (0, 1))
    assert torch.equal(run(dit.apply_dit_stage(flux, nested_stage(flux, ident, weight=0.0)), (0, 1)), base)
    assert not torch.equal(run(dit.apply_dit_stage(flux, nested_stage(flux, ident)), (0, 1)), base)


@pytest.mark.parametrize("index,prompt_length,weight,positions", [(3, 0, 1.0, (3,)), (5, 0, 0.6, (5,)), (1, 4, 1.4, (1, 5))])
def test_matches_float64_reference_in_every_block(flux, index, prompt_length, weight, positions):
    """(1, 4): a 4-token prompt repeated twice in the 8 text tokens: both copies of the subject count."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    ident, _ = token_sets(41)
    stage = nested_stage(flux, ident, index, prompt_length, weight)
    assert stage.positions(8) == positions
    before, after = [], []
    model = dit.apply_dit_stage(dit.apply_dit_stage(dit.apply_dit_stage(flux, recorder(before)), stage), recorder(after))
    run(model, (0, 1))
    assert len(after) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    h_ident = hidden64(flux, ident, (0, 1))
    for rec_before, rec in zip(before, after):
        m = rec["m"]
        torch.testing.assert_close(rec["out"][:, m:].double(), reference(rec_before, h_ident, positions, weight), rtol=1e-4, atol=1e-5)
        assert torch.equal(rec["out"][:, :m], rec_before["out"][:, :m])  # text queries unpatched


def test_cond_only_leaves_uncond_rows_unpatched(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    ident, _ = token_sets(41)
    before, after = [], []
    model = dit.apply_dit_stage(dit.apply_dit_stage(dit.apply_dit_stage(flux, recorder(before)), nested_stage(flux, ident, apply_to="cond")), recorder(after))
    run(model, (0, 1))
    for b, a in zip(before, after):
        assert torch.equal(a["out"][1:], b["out"][1:])
        assert not torch.equal(a["out"][:1], b["out"][:1])


def test_mask_limits_the_change_to_its_patches(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    ident, _ = token_sets(41)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    before, full, after = [], [], []
    run(dit.apply_dit_stage(dit.apply_dit_stage(dit.apply_dit_stage(flux, recorder(before)), nested_stage(flux, ident)), recorder(full)), (0,))
    run(dit.apply_dit_stage(dit.apply_dit_stage(flux, nested_stage(flux, ident, mask=mask)), recorder(after)), (0,))
    inside = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    m = after[0]["m"]
    assert torch.equal(after[0]["out"][0, m:][~inside], before[0]["out"][0, m:][~inside])
    torch.testing.assert_close(after[0]["out"][0, m:][inside], full[0]["out"][0, m:][inside], rtol=0, atol=1e-6)


def test_stacks_after_joint_identity_attention(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    layout = pack("nodes.common.dit_layout")
    ident, other = token_sets(41)
    before, middle, after = [], [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(model, joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=1.5), other, lambda t: layout.identity_hidden(flux, t)))
    model = dit.apply_dit_stage(model, recorder(middle))
    model = dit.apply_dit_stage(dit.apply_dit_stage(model, nested_stage(flux, ident, 2, 0, 0.8)), recorder(after))
    run(model, (0, 1))
    h_ident = hidden64(flux, ident, (0, 1))
    for rec_before, rec_mid, rec in zip(before, middle, after):
        assert not torch.equal(rec_mid["out"], rec_before["out"])
        torch.testing.assert_close(rec["out"][:, rec["m"] :].double(), reference(rec_before, h_ident, (2,), 0.8, base_out=rec_mid["out"]), rtol=1e-4, atol=1e-5)


def test_index_past_the_prompt_names_the_input(flux):
    dit = pack("nodes.dispatch.dit_dispatcher")
    errors = pack("nodes.common.errors")
    ident, _ = token_sets(41)
    with pytest.raises(errors.IdentityAttentionError, match="token_index"):
        run(dit.apply_dit_stage(flux, nested_stage(flux, ident, index=8)), (0,))


def test_nested_node_on_flux(flux):
    from testkit.synthetic import synthetic_adapter, synthetic_identity

    nodes = pack("nodes.nested.nested_attention_nodes")
    errors = pack("nodes.common.errors")
    node = nodes.ApplyNestedAttention()
    adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT)
    identity = synthetic_identity()
    layer = "model's own K/V (training-free)"
    args = dict(projection=layer, subject="token index", token_index=3, weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="cond", references="fused")
    base = run(flux, (0, 1))
    model, = node.apply(flux, adapter, identity, **args)
    out = run(model, (0, 1))
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    zero, = node.apply(flux, adapter, identity, **{**args, "weight": 0.0})
    assert torch.equal(run(zero, (0, 1)), base)
    with pytest.raises(errors.IdentityAttentionError, match="projection"):
        node.apply(flux, adapter, identity, **{**args, "projection": "adapter K/V (to_k, to_v)"})
    with pytest.raises(errors.IdentityAttentionError, match="64 wide"):
        node.apply(flux, synthetic_adapter([], "sd15", 768), identity, **args)
    clip = tiny_flux.build_flux_clip()
    last, = node.apply(flux, adapter, identity, **{**args, "subject": "last prompt token"}, clip=clip, prompt="a photo of a person")
    stage = pack("nodes.dispatch.dit_dispatcher").installed_dit_dispatcher(last).stages[-1]
    assert stage.token_index == 5 and stage.prompt_length == 77  # <start> a photo of a person: CLIP stand-in's tokens
