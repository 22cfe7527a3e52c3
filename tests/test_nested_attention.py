"""Nested attention: float64 reference (the subject's value replaced per query), dispatcher stage, sampling."""

from __future__ import annotations

import math

import pytest
import torch

import comfy.sample
from conftest import pack
from testkit import contribution, make_dummy_stage
from testkit.synthetic import synthetic_adapter, synthetic_identity

na = pack("adapters.attention.nested_attention")
core = pack("adapters.attention.attention_core")
id_adapter = pack("adapters.projectors.id_adapter")
dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
nodes_mod = pack("nodes.nested.nested_attention_nodes")
errors = pack("nodes.common.errors")


def reference_nested(q, k, v, kn, vn, s, heads):
    """out_q = softmax(q K^T/sqrt(d)) V_q with V_q[s] = softmax(q Kn^T/sqrt(d)) Vn: explicit, per query, float64."""
    B, N, HD = q.shape
    d = HD // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh, knh, vnh = map(split, (q, k, v, kn.expand(B, -1, -1), vn.expand(B, -1, -1)))
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, N, M]
    v_star = torch.softmax(qh @ knh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vnh  # [B, H, N, d]
    out = torch.empty(B, heads, N, d, dtype=q.dtype)
    for i in range(N):
        values = vh.clone()  # [B, H, M, d]
        values[:, :, s] = v_star[:, :, i]
        out[:, :, i] = (p[:, :, i : i + 1] @ values)[:, :, 0]
    return out.permute(0, 2, 1, 3).reshape(B, N, HD)


def reference_nested_batched(q, k, v, kn, vn, s, heads):
    """The same definition without the Python loop: every query gets its own value table V_q."""
    B, N, HD = q.shape
    d = HD // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh, knh, vnh = map(split, (q, k, v, kn.expand(B, -1, -1), vn.expand(B, -1, -1)))
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, N, M]
    v_star = torch.softmax(qh @ knh.transpose(-1, -2) / math.sqrt(d), dim=-1) @ vnh  # [B, H, N, d]
    table = vh.unsqueeze(2).expand(-1, -1, N, -1, -1).clone()  # [B, H, N, M, d]
    table[:, :, :, s] = v_star
    out = torch.einsum("bhnm,bhnmd->bhnd", p, table)
    return out.permute(0, 2, 1, 3).reshape(B, N, HD)


def case(B=2, N=12, M=77, T=6, heads=4, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return r(B, N, heads * d), r(B, M, heads * d), r(B, M, heads * d), r(1, T, heads * d), r(1, T, heads * d)


@pytest.mark.parametrize("heads", [1, 4])
def test_matches_float64_reference(heads):
    q, k, v, kn, vn = case(heads=heads, d=32 // heads)
    std = core.reference_attention(q, k, v, heads)
    got = na.nested_attention(std, q, k, v, kn, vn, [5], heads, core.reference_attention)
    torch.testing.assert_close(got, reference_nested(q, k, v, kn, vn, 5, heads), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference_nested_batched(q, k, v, kn, vn, 5, heads), reference_nested(q, k, v, kn, vn, 5, heads))
    half = na.nested_attention(std, q, k, v, kn, vn, [5], heads, core.reference_attention, weight=0.5)
    torch.testing.assert_close(half, 0.5 * (std + got))
    assert not torch.allclose(got, std)


def test_repeated_context_and_region():
    q, k, v, kn, vn = case()
    std = core.reference_attention(q, k, v, 4)
    once = na.nested_attention(std, q, k, v, kn, vn, [9], 4, core.reference_attention)
    k2, v2 = k.repeat(1, 2, 1), v.repeat(1, 2, 1)  # ComfyUI repeats a 77-token prompt to batch with a 154-token one
    positions = na.subject_positions(9, 77, 154)
    assert positions == [9, 86]
    twice = na.nested_attention(core.reference_attention(q, k2, v2, 4), q, k2, v2, kn, vn, positions, 4, core.reference_attention)
    torch.testing.assert_close(twice, once, rtol=1e-10, atol=1e-10)
    assert na.subject_positions(100, 154, 154) == [100] and na.subject_positions(80, 77, 77) == []
    region = torch.zeros(2, 12, 1, dtype=torch.float64)
    region[:, :5] = 1.0
    masked = na.nested_attention(std, q, k, v, kn, vn, [9], 4, core.reference_attention, region=region)
    assert torch.equal(masked[:, 5:], std[:, 5:])
    torch.testing.assert_close(masked[:, :5], once[:, :5])


def test_fused_path_equals_the_unfused_formula():
    """What the stage runs (per-row dense K/V and one-hot values, SDPA, gap + addcmul) = the formula, float64."""
    q, k, v, kn, vn = case(heads=4)
    std = core.reference_attention(q, k, v, 4)
    region = torch.rand(2, 12, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    region[:, :3] = 0.0
    hot = na.subject_values(na.one_hot(77, [5], dtype=torch.float64), 2, 32, torch.float64)
    assert hot.shape == (2, 77, 32) and hot.is_contiguous() and torch.equal(hot[:, 5], torch.ones(2, 32, dtype=torch.float64))
    rows = kn.expand(2, -1, -1).contiguous(), vn.expand(2, -1, -1).contiguous()
    expected = reference_nested(q, k, v, kn, vn, 5, 4)
    for w, r in ((1.0, None), (0.6, None), (0.6, region)):
        got = na.nested_attention(std, q, k, v, *rows, [5], 4, core.fused_attention, weight=w, region=r, hot=hot)
        scale = w if r is None else w * r
        torch.testing.assert_close(got, std + scale * (expected - std), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, :3], std[:, :3])
    # the last step written out: out + w r a (v* - V[s])
    a, nested = torch.rand_like(q), torch.randn_like(q)
    torch.testing.assert_close(na.add_subject_change(std, a, nested, v[:, 5:6], 0.6, region), std + 0.6 * region * a * (nested - v[:, 5:6]), rtol=1e-15, atol=1e-15)
    assert torch.equal(na.add_subject_change(std, a, nested, v[:, 5:6], 0.0), std)


def test_stage_caches_rows_once_per_sampling():
    """The stage's per-row nested K/V and one-hot values are made once per sampling; the result is the formula."""
    stage_mod = pack("nodes.nested.nested_attention_stage")
    sampling_scope = pack("nodes.common.sampling_scope")
    key, heads, C, Dt = ("input", 1, 0), 4, 32, 24
    gen = torch.Generator().manual_seed(8)
    adapter = id_adapter.IdAdapter(
        format="ip_adapter", base="sd15", context_dim=Dt,
        layers={key: {"to_k": torch.randn(C, Dt, generator=gen, dtype=torch.float64), "to_v": torch.randn(C, Dt, generator=gen, dtype=torch.float64)}},
    )
    tokens = id_adapter.IdentityTokens(cond=torch.randn(1, 6, Dt, generator=gen, dtype=torch.float64), uncond=torch.randn(1, 6, Dt, generator=gen, dtype=torch.float64))
    stage = stage_mod.NestedAttentionStage(dispatcher.StageSchedule(weight=0.7), tokens, "adapter", 5, 77, adapter=adapter)
    q, k, v, _, _ = case(B=4, heads=heads, d=C // heads, seed=1)
    eo = {"block": key[:2], "block_index": key[2], "n_heads": heads, "dim_head": C // heads, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0])}
    std = core.reference_attention(q, k, v, heads)
    without_scope = stage.forward(dispatcher.AttentionCall(q, k, v, eo, key), std, None)
    eo[sampling_scope.SAMPLING_CACHE_KEY] = cache = sampling_scope.SamplingCache()
    call = dispatcher.AttentionCall(q, k, v, eo, key)
    first = stage.forward(call, std, None)
    assert len(cache) == 2  # the K/V rows and the one-hot values
    kn, vn = stage._kv_rows(call)
    assert kn is stage._kv_rows(call)[0]  # the same tensors in later calls: no launch
    W = adapter.layer(key)
    for t, rows in ((tokens.uncond, slice(0, 2)), (tokens.cond, slice(2, 4))):
        torch.testing.assert_close(kn[rows], (t @ W["to_k"].T).expand(2, -1, -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vn[rows], (t @ W["to_v"].T).expand(2, -1, -1), rtol=1e-12, atol=1e-12)
        nested = reference_nested(q[rows], k[rows], v[rows], t @ W["to_k"].T, t @ W["to_v"].T, 5, heads)
        torch.testing.assert_close(first[rows], std[rows] + 0.7 * (nested - std[rows]), rtol=1e-12, atol=1e-12)
    assert torch.equal(stage.forward(call, std, None), first) and torch.equal(first, without_scope)
    assert len(cache) == 2


# --- in the model ------------------------------------------------------------------------------------


def sample(model, arch, steps=2, size=8, seed=0, cfg=5.0):
    from testkit.tiny_models import random_conditioning

    pos, neg = random_conditioning(arch, 100), random_conditioning(arch, 200)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)


def assert_close_scaled(got, expected):
    """Close up to float32 noise: the tiny random UNets reach latents of several hundred after 2 CFG steps,
    and the reference computes the nested term in float64 while the host attention is float32."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def apply_node(model, adapter, identity, projection, weight, index=4, **kw):
    args = dict(subject="token index", token_index=index, start_percent=0.0, end_percent=1.0, apply_to="cond", references="fused")
    args.update(kw)
    return nodes_mod.ApplyNestedAttention().apply(model, adapter, identity, projection, weight=weight, **args)[0]


def hand_model(model, tokens, weights_of, index, w, then=None):
    """A plain attn2 replace with the nested formula on the positive prompt's rows (no dispatcher)."""
    m = model.clone()
    for info in host.cross_attention_layers(m):

        def replace(q, k, v, eo, key=info.key):
            out = host.host_attention(q, k, v, eo["n_heads"], eo)
            wk, wv = weights_of(key)
            rows = q.shape[0] // len(eo["cond_or_uncond"])
            parts = []
            for j, code in enumerate(eo["cond_or_uncond"]):
                sl = slice(j * rows, (j + 1) * rows)
                if code == 0:
                    t = tokens.cond.to(q.dtype)
                    kn, vn = t @ wk.T.to(q.dtype), t @ wv.T.to(q.dtype)
                    nested = reference_nested_batched(q[sl].double(), k[sl].double(), v[sl].double(), kn.double(), vn.double(), index, eo["n_heads"])
                    std = core.reference_attention(q[sl].double(), k[sl].double(), v[sl].double(), eo["n_heads"])
                    parts.append(out[sl] + w * (nested - std).to(q.dtype))
                else:
                    parts.append(out[sl])
            out = torch.cat(parts)
            return contribution(then[0], then[1], q, out) if then else out

        m.set_model_attn2_replace(replace, *info.key)
    return m


def test_adapter_projection_sampling_matches_hand_written_patch(tiny):
    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_adapter(layers, "sd15", 768, num_tokens=4, seed=2)
    identity = synthetic_identity(1, seed=3, clip=False)
    tokens = adapter.identity_tokens(identity)
    plain = sample(model, "sd15")
    assert torch.equal(sample(apply_node(model, adapter, identity, "adapter K/V (to_k, to_v)", 0.0), "sd15"), plain)
    nested = apply_node(model, adapter, identity, "adapter K/V (to_k, to_v)", 0.8)
    got = sample(nested, "sd15")
    weights_of = lambda key: (adapter.layer(key)["to_k"], adapter.layer(key)["to_v"])  # noqa: E731
    assert_close_scaled(got, sample(hand_model(model, tokens, weights_of, 4, 0.8), "sd15"))
    assert not torch.allclose(got, plain, atol=1e-3)
    # stacked with a dispatcher stage after it: runs in node order, as by hand
    stacked = dispatcher.apply_attention_stage(nested, make_dummy_stage("add_tanh_q", dispatcher.StageSchedule(weight=0.5)))
    expected = sample(hand_model(model, tokens, weights_of, 4, 0.8, then=("add_tanh_q", 0.5)), "sd15")
    assert_close_scaled(sample(stacked, "sd15"), expected)


def test_native_and_layer_projections(tiny):
    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_adapter(layers, "sd15", 768, num_tokens=4, seed=5)
    gen = torch.Generator().manual_seed(6)
    native = id_adapter.IdAdapter(
        format="native",
        base="sd15",
        context_dim=768,
        projector=adapter.projector,
        layers={info.key: {"nested.to_k": torch.randn(info.inner_dim, 768, generator=gen) / 28.0, "nested.to_v": torch.randn(info.inner_dim, 768, generator=gen) / 28.0} for info in layers},
        mechanism="nested",
    )
    identity = synthetic_identity(1, seed=7, clip=False)
    tokens = native.identity_tokens(identity)
    got = sample(apply_node(model, native, identity, "native nested weights (nested.to_k, nested.to_v)", 1.0, index=2), "sd15")
    native_weights = lambda key: (native.layer(key)["nested.to_k"], native.layer(key)["nested.to_v"])  # noqa: E731
    assert_close_scaled(got, sample(hand_model(model, tokens, native_weights, 2, 1.0), "sd15"))

    diffusion_model = model.model.diffusion_model
    modules = {info.key: diffusion_model.get_submodule(info.module_path).attn2 for info in layers}
    own = lambda key: (modules[key].to_k.weight.detach(), modules[key].to_v.weight.detach())  # noqa: E731
    got = sample(apply_node(model, adapter, identity, "model's own K/V (training-free)", 1.0, index=2), "sd15")
    assert_close_scaled(got, sample(hand_model(model, adapter.identity_tokens(identity), own, 2, 1.0), "sd15"))

    with pytest.raises(errors.IdentityAttentionError, match="nested.to_k"):
        apply_node(model, adapter, identity, "native nested weights (nested.to_k, nested.to_v)", 1.0)
    with pytest.raises(errors.IdentityAttentionError, match="last prompt token"):
        apply_node(model, adapter, identity, "adapter K/V (to_k, to_v)", 1.0, subject="last prompt token")


def test_sdxl_weight_zero_exact(tiny):
    model = tiny.unet("sdxl")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_adapter(layers, "sdxl", 2048, num_tokens=4, seed=2)
    identity = synthetic_identity(1, seed=3, clip=False)
    plain = sample(model, "sdxl", steps=1)
    assert torch.equal(sample(apply_node(model, adapter, identity, "adapter K/V (to_k, to_v)", 0.0), "sdxl", steps=1), plain)
    got = sample(apply_node(model, adapter, identity, "adapter K/V (to_k, to_v)", 1.0), "sdxl", steps=1)
    assert torch.isfinite(got).all() and not torch.allclose(got, plain, atol=1e-4)


@torch.inference_mode()
def test_find_subject_token(tmp_path):
    from real_clip import build_small_sd15_clip

    clip = build_small_sd15_clip(tmp_path)
    find = nodes_mod.FindSubjectToken().find
    assert find(clip, "a photo of a person", "")[0] == 5  # [start] a photo of a person -> "person" is token 5
    index, listing = find(clip, "a photo of a person, smiling", "person")
    assert index == 5 and ">5:person</w>" in listing
    assert find(clip, "a photo of a person, smiling", "")[0] == 7  # the comma is token 6, "smiling" 7
    with pytest.raises(errors.IdentityAttentionError, match="not a word"):
        find(clip, "a photo", "cat")
    index, length = nodes_mod.ApplyNestedAttention._subject("last prompt token", 0, clip, "a photo of a man", "n")
    assert (index, length) == (5, 77)


def test_layer_projection_follows_a_replaced_layer_weight(tiny):
    """A LoRA applied after the node (or removed) swaps the layers' weight tensors: the nested K/V follow."""
    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_adapter(layers, "sd15", 768, num_tokens=4, seed=5)
    identity = synthetic_identity(1, seed=7, clip=False)
    tokens = adapter.identity_tokens(identity)
    diffusion_model = model.model.diffusion_model
    modules = {info.key: diffusion_model.get_submodule(info.module_path).attn2 for info in layers}
    own = lambda key: (modules[key].to_k.weight.detach(), modules[key].to_v.weight.detach())  # noqa: E731
    nested = apply_node(model, adapter, identity, "model's own K/V (training-free)", 1.0, index=2)
    assert_close_scaled(sample(nested, "sd15"), sample(hand_model(model, tokens, own, 2, 1.0), "sd15"))
    originals = {key: m.to_k.weight for key, m in modules.items()}
    try:  # what ComfyUI's weight patching does: a new Parameter object in each module
        for key, m in modules.items():
            m.to_k.weight = torch.nn.Parameter(originals[key].detach() * 1.5, requires_grad=False)
        assert_close_scaled(sample(nested, "sd15"), sample(hand_model(model, tokens, own, 2, 1.0), "sd15"))
    finally:
        for key, m in modules.items():
            m.to_k.weight = originals[key]
    assert_close_scaled(sample(nested, "sd15"), sample(hand_model(model, tokens, own, 2, 1.0), "sd15"))
