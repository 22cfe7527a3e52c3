"""FACT's gated self-attention face adapter: float64 reference, real ComfyUI blocks, sampling."""

from __future__ import annotations

import math

import pytest
import torch

import comfy.sample
from conftest import pack
from testkit import contribution
from testkit.synthetic import fact_layer_weights, synthetic_fact_adapter, synthetic_identity

gsa = pack("adapters.attention.gated_self_attention")
core = pack("adapters.attention.attention_core")
id_adapter = pack("adapters.projectors.id_adapter")
dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
patch_mod = pack("nodes.fact.face_adapter_patch")
nodes_mod = pack("nodes.fact.face_adapter_nodes")
errors = pack("nodes.common.errors")


# --- the reference, written from FACT's equations (not from the implementation) ----------------------


def ln64(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu64(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_fact(x, t, W, heads, g, region=None):
    """x [B,N,C], t [B,T,Dt] float64: FACT's processor up to (not including) the text cross-attention."""
    B, N, C = x.shape
    d = C // heads
    f = t @ W["linear.weight"].T + W["linear.bias"]
    h = ln64(torch.cat([x, f], dim=1), W["norm1.weight"], W["norm1.bias"])
    q, k, v = (h @ W[f"attn.to_{n}.weight"].T for n in "qkv")
    q, k, v = (z.reshape(B, -1, heads, d).permute(0, 2, 1, 3) for z in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    o = (p @ v).permute(0, 2, 1, 3).reshape(B, -1, C)
    sa = (o @ W["attn.to_out.0.weight"].T + W["attn.to_out.0.bias"])[:, :N]
    r = 1.0 if region is None else region
    x1 = x + g * math.tanh(float(W["alpha_attn"])) * r * sa
    u = ln64(x1, W["norm2.weight"], W["norm2.bias"]) @ W["ff.net.0.proj.weight"].T + W["ff.net.0.proj.bias"]
    a, gate = u[..., : 4 * C], u[..., 4 * C :]
    y = (a * gelu64(gate)) @ W["ff.net.2.weight"].T + W["ff.net.2.bias"]
    return x1 + g * math.tanh(float(W["alpha_dense"])) * r * y


def make_case(C=64, heads=4, N=20, T=16, Dt=48, B=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = fact_layer_weights(C, Dt, gen, alpha=0.7, dtype=torch.float64)
    x = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    t = torch.randn(B, T, Dt, generator=gen, dtype=torch.float64)
    return W, x, t


def run_adapter(W, x, t, heads, g, region=None):
    ga, gd = gsa.gates(W, g)
    return gsa.gated_self_attention(x, gsa.face_keys_values(t, W), W, heads, ga, gd, core.reference_attention, region=region)


@pytest.mark.parametrize("heads", [1, 4])
def test_matches_float64_reference(heads):
    W, x, t = make_case(heads=heads)
    got = run_adapter(W, x, t, heads, g=0.8)
    torch.testing.assert_close(got, reference_fact(x, t, W, heads, 0.8), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, x)


def test_region_confines_the_increment():
    W, x, t = make_case()
    region = torch.zeros(2, x.shape[1], 1, dtype=torch.float64)
    region[:, :7] = 1.0
    region[:, 7:9] = 0.5
    got = run_adapter(W, x, t, 4, g=1.0, region=region)
    assert torch.equal(got[:, 9:], x[:, 9:])  # outside: exactly untouched
    torch.testing.assert_close(got, reference_fact(x, t, W, 4, 1.0, region), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[:, :7], run_adapter(W, x, t, 4, g=1.0)[:, :7], rtol=1e-10, atol=1e-10)


def test_fused_path_equals_the_unfused_formula():
    """What the node runs (q/k/v as one matmul, one cat, SDPA, gated residuals as add/addcmul) = the formula."""
    W, x, t = make_case(heads=4)
    region = torch.rand(2, x.shape[1], 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    region[:, :5] = 0.0
    ga, gd = gsa.gates(W, 0.8)
    face_kv = gsa.face_keys_values(t, W)
    for r in (None, region):
        got = gsa.gated_self_attention(x, face_kv, W, 4, ga, gd, core.fused_attention, region=r, qkv_weight=gsa.fused_qkv_weight(W))
        torch.testing.assert_close(got, reference_fact(x, t, W, 4, 0.8, r), rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, :5], x[:, :5])
    # one residual kernel: x + g * r * delta, written out
    delta = torch.randn_like(x)
    torch.testing.assert_close(gsa.gated_residual(x, delta, 0.3), x + 0.3 * delta, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gsa.gated_residual(x, delta, 0.3, region), x + 0.3 * region * delta, rtol=1e-15, atol=1e-15)
    assert torch.equal(gsa.gated_residual(x, delta, 0.0), x)
    gate = torch.tensor(0.3, dtype=torch.float64)  # training: alpha is a parameter
    torch.testing.assert_close(gsa.gated_residual(x, delta, gate, region), x + 0.3 * region * delta, rtol=1e-15, atol=1e-15)


def test_face_kv_rows_made_once_per_sampling():
    """The face tokens' per-row K/V are stacked once per sampling and equal the per-call stack."""
    sampling_scope = pack("nodes.common.sampling_scope")
    key, C, heads, hw = ("input", 1, 0), 64, 2, (4, 6)
    adapter = fact_adapter_for([(key, C)], token_dim=48)
    tokens = tokens_pair(D=48)
    x = torch.randn(4, hw[0] * hw[1], C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    patch = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.7), adapter, tokens, [key])
    eo = extra_options_for(key, heads, hw, chunks=(1, 0))
    without_scope = patch(x, eo)
    eo[sampling_scope.SAMPLING_CACHE_KEY] = cache = sampling_scope.SamplingCache()
    first = patch(x, eo)
    assert len(cache) == 1
    call = dispatcher.AttentionCall(x, x, x, eo, key)
    rows = patch._face_kv_rows(call)
    assert rows is patch._face_kv_rows(call)  # the same tensor: no launch in later calls
    W = adapter.layer(key)
    expected = torch.cat([gsa.face_keys_values(tokens.uncond, W).expand(2, -1, -1), gsa.face_keys_values(tokens.cond, W).expand(2, -1, -1)])
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(patch(x, eo), first) and torch.equal(first, without_scope)
    assert len(cache) == 1


def test_check_layer_reports_wrong_shapes():
    W, _, _ = make_case()
    assert gsa.check_layer(W, 64, 48) is None
    assert "linear.weight" in gsa.check_layer(W, 64, 32)
    broken = dict(W)
    del broken["alpha_dense"]
    assert "alpha_dense" in gsa.check_layer(broken, 64, 48)


# --- the middle patch on real ComfyUI blocks ---------------------------------------------------------


def fact_adapter_for(keys_and_channels, base="sd15", token_dim=768, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    layers = {key: fact_layer_weights(c, token_dim, gen, alpha=0.6, dtype=dtype) for key, c in keys_and_channels}
    return id_adapter.IdAdapter(format="fact", base=base, context_dim=token_dim, layers=layers, mechanism="gated_self_attention")


def tokens_pair(T=16, D=768, seed=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return id_adapter.IdentityTokens(cond=torch.randn(1, T, D, generator=gen, dtype=dtype), uncond=torch.randn(1, T, D, generator=gen, dtype=dtype))


def extra_options_for(key, heads, latent_hw, chunks=(0,), sigma=1.0):
    return {
        "block": key[:2],
        "block_index": key[2],
        "n_heads": heads,
        "dim_head": 0,
        "cond_or_uncond": list(chunks),
        "sigmas": torch.tensor([sigma]),
        "original_shape": [len(chunks), 4, *latent_hw],
    }


def test_block_dataflow_matches_fact(tiny):
    """A real ComfyUI block with our middle patch = FACT's block (norm2 moved into the processor)."""
    import copy

    model = tiny.unet("sd15")
    info = host.cross_attention_layers(model)[0]
    block = copy.deepcopy(model.model.diffusion_model.get_submodule(info.module_path)).double()
    adapter = fact_adapter_for([(info.key, info.inner_dim)])
    tokens = tokens_pair()
    patch = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.9), adapter, tokens, [info.key])
    gen = torch.Generator().manual_seed(5)
    hw = (8, 8)
    x = torch.randn(1, hw[0] * hw[1], info.inner_dim, generator=gen, dtype=torch.float64)
    context = torch.randn(1, 77, 768, generator=gen, dtype=torch.float64)
    options = extra_options_for(info.key, block.n_heads, hw)
    options["patches"] = {"middle_patch": [patch]}
    with torch.no_grad():
        got = block(x.clone(), context=context, transformer_options=options)
        # FACT: x -> x + attn1; processor: x2 = GSA(x); out = x2 + CA(ln(x2)) with ln = the block's norm2
        h = x + block.attn1(block.norm1(x))
        x2 = reference_fact(h, tokens.cond, adapter.layer(info.key), block.n_heads, 0.9)
        h = x2 + block.attn2(block.norm2(x2), context=context)
        expected = h + block.ff(block.norm3(h))
    # the host's CPU attention (sub-quadratic) computes in float32 internally, even on float64 inputs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    without = options.copy()
    without["patches"] = {}
    with torch.no_grad():
        assert not torch.allclose(block(x.clone(), context=context, transformer_options=without), expected, atol=1e-3)


@pytest.fixture
def exact_attention(monkeypatch):
    """The host's attention replaced by the float64-exact reference (the CPU host's is float32 inside)."""
    import comfy.ldm.modules.attention as comfy_attention

    monkeypatch.setattr(comfy_attention, "optimized_attention", core.reference_attention)


def test_patch_cond_uncond_mask_and_window(exact_attention):
    key, C, heads, hw = ("input", 1, 0), 64, 2, (4, 6)
    adapter = fact_adapter_for([(key, C)], token_dim=48)
    tokens = tokens_pair(D=48)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, hw[0] * hw[1], C, generator=gen, dtype=torch.float64)  # chunks [uncond, cond], 2 rows each
    eo = extra_options_for(key, heads, hw, chunks=(1, 0))
    W = adapter.layer(key)

    both = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.7), adapter, tokens, [key])(x, eo)
    torch.testing.assert_close(both[:2], reference_fact(x[:2], tokens.uncond.expand(2, -1, -1), W, heads, 0.7), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(both[2:], reference_fact(x[2:], tokens.cond.expand(2, -1, -1), W, heads, 0.7), rtol=1e-10, atol=1e-10)

    cond_only = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.7, apply_to="cond"), adapter, tokens, [key])(x, eo)
    assert torch.equal(cond_only[:2], x[:2])
    torch.testing.assert_close(cond_only[2:], both[2:], rtol=0, atol=0)

    mask = torch.zeros(1, 8, 12)
    mask[:, :, :6] = 1.0  # left half of the image
    masked = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.7, mask=mask), adapter, tokens, [key])(x, eo)
    left = torch.zeros(hw, dtype=torch.bool)
    left[:, :3] = True
    left = left.flatten()
    assert torch.equal(masked[:, ~left], x[:, ~left])
    torch.testing.assert_close(masked[:, left], both[:, left], rtol=1e-12, atol=1e-12)

    window = patch_mod.FaceAdapterPatch(dispatcher.StageSchedule(weight=0.7, sigma_start=5.0, sigma_end=2.0), adapter, tokens, [key])
    assert window(x, eo) is x  # sigma 1.0 is after the window
    assert window(x, extra_options_for(key, heads, hw, chunks=(1, 0), sigma=3.0)) is not x
    other_layer = extra_options_for(("output", 3, 0), heads, hw, chunks=(1, 0))
    assert window(x, other_layer) is x  # no weights for this block


# --- whole UNets -------------------------------------------------------------------------------------


def sample(model, arch, steps=2, size=8, seed=0, cfg=5.0):
    from testkit.tiny_models import random_conditioning

    pos = random_conditioning(arch, 100)
    neg = random_conditioning(arch, 200)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)


def apply_node(model, adapter, identity, weight, **kw):
    args = dict(start_percent=0.0, end_percent=1.0, apply_to="both", references="per_reference")
    args.update(kw)
    return nodes_mod.ApplyFaceAdapter().apply(model, adapter, identity, weight, **args)[0]


def by_hand_dummy(model, kind, w):
    m = model.clone()
    for info in host.cross_attention_layers(m):

        def replace(q, k, v, eo):
            return contribution(kind, w, q, host.host_attention(q, k, v, eo["n_heads"], eo))

        m.set_model_attn2_replace(replace, *info.key)
    return m


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_weight_zero_exact_and_stacking(tiny, arch):
    model = tiny.unet(arch)
    layers = host.cross_attention_layers(model)
    base = host.base_model_of(model)
    adapter = synthetic_fact_adapter(layers, base, layers[0].context_dim, seed=1)
    identity = synthetic_identity(2, seed=4, clip=False, face_tokens=True)
    calls = []
    plain = sample(model, arch)

    zero = apply_node(model, adapter, identity, 0.0)
    assert torch.equal(sample(zero, arch), plain)

    patched = apply_node(model, adapter, identity, 0.6)
    patch = patched.model_options["transformer_options"]["patches"]["middle_patch"][-1]
    original = patch._apply
    patch._apply = lambda call, gate: calls.append(call.layer) or original(call, gate)
    got = sample(patched, arch)
    assert torch.isfinite(got).all() and not torch.allclose(got, plain, atol=1e-4)
    assert set(calls) == {info.key for info in layers}  # every block, middle included
    del patch._apply
    assert "middle_patch" not in model.model_options.get("transformer_options", {}).get("patches", {})  # upstream untouched

    if arch == "sd15":  # stacking with a dispatcher stage, in both orders, equals the hooks written by hand
        stage = dispatcher.StageSchedule(weight=0.5)
        from testkit import make_dummy_stage

        fact_then_dummy = dispatcher.apply_attention_stage(patched, make_dummy_stage("add_tanh_q", stage))
        dummy_then_fact = apply_node(dispatcher.apply_attention_stage(model, make_dummy_stage("add_tanh_q", stage)), adapter, identity, 0.6)
        expected = sample(apply_node(by_hand_dummy(model, "add_tanh_q", 0.5), adapter, identity, 0.6), arch)
        torch.testing.assert_close(sample(fact_then_dummy, arch), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sample(dummy_then_fact, arch), expected, rtol=1e-5, atol=1e-5)


def test_node_errors(tiny):
    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    adapter = synthetic_fact_adapter(layers, "sd15", 768)
    no_tokens = synthetic_identity(1, clip=False, face_tokens=False)
    with pytest.raises(errors.IdentityAttentionError, match="Encode face tokens"):
        apply_node(model, adapter, no_tokens, 0.5)
    ip = id_adapter.IdAdapter(format="ip_adapter", base="sd15", context_dim=768)
    with pytest.raises(errors.IdentityAttentionError, match="FaceChain-FACT"):
        apply_node(model, ip, synthetic_identity(1, face_tokens=True), 0.5)
    sdxl_adapter = id_adapter.IdAdapter(format="fact", base="sdxl", context_dim=2048, projector=adapter.projector)
    with pytest.raises(errors.IdentityAttentionError, match="made for sdxl"):
        apply_node(model, sdxl_adapter, synthetic_identity(1, face_tokens=True), 0.5)
