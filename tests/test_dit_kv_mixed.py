"""KV-mixed attention on the tiny Flux (nodes/kv_mixed/dit_kv_mixed.py) against float64 references.

Written from the math: per block, ``K_id`` is the block's text-side key (modulation, norm,
qkv, RMS key norm) of ``txt_in(E_key)``, ``V_id`` its text-side value of ``txt_in(E_value)``;
joint: the image queries attend over ``[txt; img; id]`` with ``log w`` on the identity
columns; decoupled: the unpatched image output plus ``w softmax(q K_id^T / sqrt D) V_id``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import pack
from testkit import tiny_flux
from test_dit_joint_identity import recorder, run

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)

T_ID = 3
HEAD_DIM = tiny_flux.HIDDEN // tiny_flux.HEADS


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def token_sets(seed=11):
    IdentityTokens = pack("adapters.projectors.id_adapter").IdentityTokens
    gen = torch.Generator().manual_seed(seed)
    make = lambda: IdentityTokens(cond=torch.randn(1, T_ID, tiny_flux.CONTEXT, generator=gen), uncond=torch.randn(1, T_ID, tiny_flux.CONTEXT, generator=gen))
    return make(), make()


def kv_stage(flux, keys, values, mode="joint", weight=1.0, apply_to="both", mask=None):
    dispatcher = pack("nodes.dispatch.dispatcher")
    layout = pack("nodes.common.dit_layout")
    kv = pack("nodes.kv_mixed.dit_kv_mixed")
    schedule = dispatcher.StageSchedule(weight=weight, apply_to=apply_to, mask=mask)
    return kv.DitKVMixedStage(schedule, keys, values, lambda t: layout.identity_hidden(flux, t), mode)


def patched(flux, model, keys, values, **kw):
    return pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(model, kv_stage(flux, keys, values, **kw))


def hidden64(flux, toks, chunks):
    net = copy.deepcopy(flux.model.diffusion_model.txt_in).double()
    return net(torch.cat([toks.cond if c == 0 else toks.uncond for c in chunks]).double())


def text_side_kv64(rec, hidden):
    """float64 text-side key (after RMS key norm) and value of ``hidden`` ``[B, T, C]`` in rec's block."""
    block = copy.deepcopy(rec["block"].module).double()
    vec = rec["vec"].double()
    if rec["key"][0] == "double_block":
        mod = block.txt_mod(vec)[0]
        qkv = block.txt_attn.qkv(block.txt_norm1(hidden) * (1 + mod.scale) + mod.shift)
        scale = block.txt_attn.norm.key_norm.scale
    else:
        mod = block.modulation(vec)[0]
        qkv = block.linear1(block.pre_norm(hidden) * (1 + mod.scale) + mod.shift)[..., : 3 * tiny_flux.HIDDEN]
        scale = block.norm.key_norm.scale
    b, t = qkv.shape[:2]
    k = qkv[..., tiny_flux.HIDDEN : 2 * tiny_flux.HIDDEN].view(b, t, tiny_flux.HEADS, HEAD_DIM).transpose(1, 2)
    v = qkv[..., 2 * tiny_flux.HIDDEN :].view(b, t, tiny_flux.HEADS, HEAD_DIM).transpose(1, 2)
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * scale.double()
    return k, v


def reference(rec, h_key, h_value, mode, weight):
    """float64 image-token output ``[B, N, H*D]`` of KV-mixed attention in rec's block."""
    k_id, _ = text_side_kv64(rec, h_key)
    _, v_id = text_side_kv64(rec, h_value)
    q, k, v = (rec[n].double() for n in ("q", "k", "v"))
    m = rec["m"]
    q_img = q[:, :, m:]
    b, n = q.shape[0], q_img.shape[2]
    if mode == "joint":
        logits = torch.cat([q_img @ k.transpose(-1, -2), q_img @ k_id.transpose(-1, -2) + math.sqrt(HEAD_DIM) * math.log(weight)], -1) / math.sqrt(HEAD_DIM)
        out = torch.softmax(logits, -1) @ torch.cat([v, v_id], 2)
        return out.transpose(1, 2).reshape(b, n, -1)
    branch = torch.softmax(q_img @ k_id.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ v_id
    return rec["out"][:, m:].double() + weight * branch.transpose(1, 2).reshape(b, n, -1)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_weight_zero_is_the_unpatched_model_bit_for_bit(flux, mode):
    keys, values = token_sets()
    base = run(flux, (0, 1))
    assert torch.equal(run(patched(flux, flux, keys, values, mode=mode, weight=0.0), (0, 1)), base)
    assert not torch.equal(run(patched(flux, flux, keys, values, mode=mode, weight=1.0), (0, 1)), base)


@pytest.mark.parametrize("mode,weight", [("joint", 1.0), ("joint", 2.5), ("decoupled", 0.7), ("decoupled", -0.4)])
def test_matches_float64_reference_in_every_block(flux, mode, weight):
    dit = pack("nodes.dispatch.dit_dispatcher")
    keys, values = token_sets()
    before, after = [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(patched(flux, model, keys, values, mode=mode, weight=weight), recorder(after))
    run(model, (0, 1))
    assert len(after) == tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    h_key, h_value = hidden64(flux, keys, (0, 1)), hidden64(flux, values, (0, 1))
    for rec_before, rec in zip(before, after):
        m = rec["m"]
        torch.testing.assert_close(rec["out"][:, m:].double(), reference(rec_before, h_key, h_value, mode, weight), rtol=1e-4, atol=1e-5)
        assert torch.equal(rec["out"][:, :m], rec_before["out"][:, :m])  # text queries unpatched


def test_keys_and_values_come_from_their_own_sources(flux):
    """Swapping the key and value sources changes the output (the mix is not symmetric)."""
    keys, values = token_sets()
    a = run(patched(flux, flux, keys, values), (0,))
    b = run(patched(flux, flux, values, keys), (0,))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_cond_only_leaves_uncond_rows_unpatched(flux, mode):
    dit = pack("nodes.dispatch.dit_dispatcher")
    keys, values = token_sets()
    before, after = [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(patched(flux, model, keys, values, mode=mode, apply_to="cond"), recorder(after))
    run(model, (0, 1))
    for b, a in zip(before, after):
        assert torch.equal(a["out"][1:], b["out"][1:])
        assert not torch.equal(a["out"][:1], b["out"][:1])


@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_mask_limits_the_identity_to_its_patches(flux, mode):
    dit = pack("nodes.dispatch.dit_dispatcher")
    keys, values = token_sets()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half: the 4x4 patch grid's columns 0-1
    before, full, after = [], [], []
    run(dit.apply_dit_stage(patched(flux, dit.apply_dit_stage(flux, recorder(before)), keys, values, mode=mode), recorder(full)), (0,))
    run(dit.apply_dit_stage(patched(flux, flux, keys, values, mode=mode, mask=mask), recorder(after)), (0,))
    inside = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    m = after[0]["m"]
    img_masked, img_full, img_base = after[0]["out"][0, m:], full[0]["out"][0, m:], before[0]["out"][0, m:]
    assert torch.equal(img_masked[~inside], img_base[~inside])
    torch.testing.assert_close(img_masked[inside], img_full[inside], rtol=0, atol=1e-6)


def test_stacks_after_joint_identity_attention(flux):
    """Joint identity attention, then KV-mixed (decoupled): KV-mixed adds to the joint stage's output."""
    dit = pack("nodes.dispatch.dit_dispatcher")
    dispatcher = pack("nodes.dispatch.dispatcher")
    joint = pack("nodes.pva.dit_joint_identity")
    layout = pack("nodes.common.dit_layout")
    keys, values = token_sets()
    before, middle, after = [], [], []
    model = dit.apply_dit_stage(flux, recorder(before))
    model = dit.apply_dit_stage(model, joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=1.5), values, lambda t: layout.identity_hidden(flux, t)))
    model = dit.apply_dit_stage(model, recorder(middle))
    model = dit.apply_dit_stage(patched(flux, model, keys, values, mode="decoupled", weight=0.8), recorder(after))
    assert [s.label for s in dit.installed_dit_dispatcher(model).stages][1:4:2] == ["joint identity attention (Flux)", "KV-mixed attention (Flux)"]
    run(model, (0, 1))
    h_key, h_value = hidden64(flux, keys, (0, 1)), hidden64(flux, values, (0, 1))
    for rec_before, rec_mid, rec in zip(before, middle, after):
        m = rec["m"]
        assert not torch.equal(rec_mid["out"], rec_before["out"])  # the joint stage acted first
        expected = reference({**rec_before, "out": rec_mid["out"]}, h_key, h_value, "decoupled", 0.8)
        torch.testing.assert_close(rec["out"][:, m:].double(), expected, rtol=1e-4, atol=1e-5)


def kv_adapter64(seed=0, tokens=2):
    """A trained-kv_mixed-shaped adapter whose encoders make Flux-context-wide tokens (no UNet layers)."""
    enc_mod = pack("adapters.projectors.kv_mixed_encoders")
    IdAdapter = pack("adapters.projectors.id_adapter").IdAdapter
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        e = enc_mod.KVMixedEncoder(in_dim=512, token_dim=tiny_flux.CONTEXT, tokens=tokens, key_bottleneck=8, value_bottleneck=48)
        with torch.no_grad():
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.2))
    e = e.eval().requires_grad_(False)
    return IdAdapter(format="native", base="sd15", context_dim=tiny_flux.CONTEXT, projector=e, layers={}, mechanism="kv_mixed")


NODE_ARGS = dict(weight=1.0, start_percent=0.0, end_percent=1.0, apply_to="both", mode="joint", token_mismatch="resample_values", projections="layer", references="fused")


def test_kv_mixed_node_two_adapters_on_flux(flux):
    from testkit.synthetic import synthetic_adapter, synthetic_identity

    nodes = pack("nodes.kv_mixed.kv_mixed_nodes")
    errors = pack("nodes.common.errors")
    node = nodes.ApplyKVMixedAttention()
    key_adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT, num_tokens=4, seed=1)
    value_adapter = synthetic_adapter([], "sd15", tiny_flux.CONTEXT, num_tokens=2, seed=2)
    identity = synthetic_identity()
    two = dict(value_adapter=value_adapter, value_identity=identity, pairing=nodes.TWO_ADAPTERS)
    base = run(flux, (0, 1))
    for mode in ("joint", "decoupled"):
        model, = node.apply(flux, key_adapter, identity, **{**NODE_ARGS, "mode": mode}, **two)
        assert not torch.equal(run(model, (0, 1)), base)
        stage = pack("nodes.dispatch.dit_dispatcher").installed_dit_dispatcher(model).stages[-1]
        assert stage.mode == mode and stage.tokens["value"].cond.shape[1] == 4  # values resampled to the 4 keys
        zero, = node.apply(flux, key_adapter, identity, **{**NODE_ARGS, "mode": mode, "weight": 0.0}, **two)
        assert torch.equal(run(zero, (0, 1)), base)
    with pytest.raises(errors.IdentityAttentionError, match="projections"):
        node.apply(flux, key_adapter, identity, **{**NODE_ARGS, "projections": "adapter"}, **two)
    with pytest.raises(errors.IdentityAttentionError, match="token"):
        node.apply(flux, key_adapter, identity, **{**NODE_ARGS, "token_mismatch": "error"}, **two)
    with pytest.raises(errors.IdentityAttentionError, match="parallel visual attention"):
        node.apply(flux, key_adapter, identity, **NODE_ARGS, pairing=nodes.SHARED)
    with pytest.raises(errors.IdentityAttentionError, match="cannot be negative"):
        node.apply(flux, key_adapter, identity, **{**NODE_ARGS, "weight": -1.0}, **two)
    wide = synthetic_adapter([], "sd15", 768, seed=3)
    with pytest.raises(errors.IdentityAttentionError, match="64 wide") as info:
        node.apply(flux, key_adapter, identity, **NODE_ARGS, value_adapter=wide, value_identity=identity, pairing=nodes.TWO_ADAPTERS)
    assert "value_adapter" in str(info.value)


def test_kv_mixed_node_trained_pairing_on_flux(flux):
    from testkit.synthetic import synthetic_identity

    nodes = pack("nodes.kv_mixed.kv_mixed_nodes")
    node = nodes.ApplyKVMixedAttention()
    adapter = kv_adapter64()
    identity = synthetic_identity()
    model, = node.apply(flux, adapter, identity, **{**NODE_ARGS, "projections": "adapter"}, pairing=nodes.TRAINED)  # projections: fixed by the pairing
    stage = pack("nodes.dispatch.dit_dispatcher").installed_dit_dispatcher(model).stages[-1]
    keys, values = nodes.trained_tokens(adapter, identity, False, "test")
    assert torch.equal(stage.tokens["key"].cond, keys.cond) and torch.equal(stage.tokens["value"].cond, values.cond)
    assert not torch.equal(keys.cond, values.cond)
    assert not torch.equal(run(model, (0, 1)), run(flux, (0, 1)))
