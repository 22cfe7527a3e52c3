"""Parallel visual attention (joint, PVA) and decoupled attention (IP-Adapter / PuLID) against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack
from layer_harness import (
    SD15_KEY,
    SDXL_KEY,
    adapter_for,
    assert_same_sampling,
    attention64,
    close,
    heads_of,
    layer_inputs,
    logits64,
    merge,
    rows_of,
    run_layer,
    sample,
    tokens_mask,
    unpatched,
)
from testkit.synthetic import synthetic_identity

pa = pack("adapters.attention.parallel_attention")
core = pack("adapters.attention.attention_core")
dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
errors = pack("nodes.common.errors")
stage_mod = pack("nodes.pva.parallel_attention_stage")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")
id_adapter_mod = pack("adapters.projectors.id_adapter")
sampling_scope = pack("nodes.common.sampling_scope")

NODE = pva_nodes.ApplyParallelAttention()


ZERO_ID, SAME_ID = "zero identity", "identity (PVA extra_feat_neg)"


def apply(model, adapter, identity, weight=1.0, mode="joint", projections="adapter", references="fused", apply_to="both", mask=None, start=0.0, end=1.0, negative=None, **options):
    extra = dict(options) if negative is None else {"negative_identity": negative, **options}
    return NODE.apply(model, adapter, identity, weight, start, end, apply_to, mode, projections, references, mask=mask, **extra)[0]


def joint64(q, q_id, k_text, v_text, k_id, v_id, heads, weight):
    """PVA: one softmax over [s q k_text ; s q_id k_id + log w], values [v_text ; v_id] (float64)."""
    text = logits64(q, k_text, heads)
    ident = logits64(q_id, k_id, heads) + math.log(weight)
    probs = torch.cat([text, ident], dim=-1).softmax(-1)
    values = torch.cat([heads_of(v_text, heads), heads_of(v_id, heads)], dim=2)
    return merge(probs @ values)


def id_kv64(inputs, tokens, to_k, to_v):
    """Per-row identity keys/values: tokens (cond/uncond) through bias-free projections, float64."""
    t = rows_of(inputs, {0: tokens.cond, 1: tokens.uncond})
    return t @ to_k.double().T, t @ to_v.double().T


# --- the adapter functions alone (no host) ----------------------------------------------------------


@pytest.mark.parametrize("weight", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("visual_query", [False, True])
@pytest.mark.parametrize("single_call", [True, False])
def test_joint_formula_pva_sd2_shapes(weight, visual_query, single_call):
    """PVA's own base: SD2 (heads 5 x 64), 77 text tokens, 10 identity tokens.

    single_call: one fused call over [text; identity] (PVA as the first stage); otherwise the
    identity part and share mixed with a given text attention (PVA after other stages).
    """
    gen = torch.Generator().manual_seed(1)
    B, N, M, T, H, D = 3, 12, 77, 10, 5, 64
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, q_id, k, v, ki, vi = r(B, N, H * D), r(B, N, H * D), r(B, M, H * D), r(B, M, H * D), r(B, T, H * D), r(B, T, H * D)
    text_out = None if single_call else attention64(q, k, v, H)
    got = pa.joint_attention(q, k, v, ki, vi, H, weight=weight, q_id=q_id if visual_query else None, text_out=text_out)
    expected = joint64(q, q_id if visual_query else q, k, v, ki, vi, H, weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dim_head,separate,value_dim,share,width", [
    (64, False, 64, False, 64),   # PVA single call, layer's own query: q, k, v as they are
    (64, True, 64, True, 128),    # separate query: 2D wide, the share channel is free
    (64, False, 64, True, 72),    # identity part + share: one more channel, rounded up to 8
    (40, False, 0, True, 40),     # share alone fits in the query width
    (4, False, 4, True, 8),       # micro models: rounded up to 8 as well
])
def test_fused_width_gives_one_head_width(dim_head, separate, value_dim, share, width):
    """SDPA's flash kernels need one head width for q, k and v: the fused joint call pads to it."""
    assert pa.fused_width(dim_head, separate, value_dim, share) == width
    x = torch.randn(2, 3, 5, dim_head)
    padded = pa.pad_heads(x, width, offset=width - dim_head)
    assert padded.shape == (2, 3, 5, width)
    assert torch.equal(padded[..., width - dim_head :], x)
    assert not padded[..., : width - dim_head].any()
    assert pa.pad_heads(x, dim_head) is x


@pytest.mark.parametrize("ortho", ["none", "ortho", "ortho_v2"])
def test_pulid_decoupled_formula(ortho):
    """PuLID (IDAttnProcessor2_0): 8 zero tokens appended, ORTHO / ORTHO_v2 written out here."""
    gen = torch.Generator().manual_seed(2)
    B, N, T, Z, H, D = 2, 9, 10, 8, 4, 16
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, text, ki, vi = r(B, N, H * D), r(B, N, H * D), r(B, T, H * D), r(B, T, H * D)
    kz, vz = pa.append_zero_tokens(ki, Z), pa.append_zero_tokens(vi, Z)
    body = pa.body_token_mask(T, Z)
    id_out = pa.decoupled_attention(q, kz, vz, H, core.reference_attention)
    got = text + 0.8 * pa.orthogonalize(id_out, text, ortho, q=q, k_id=kz, heads=H, body=body).double()

    # reference: zero rows in K and V, separate softmax, PuLID's projections
    zeros = torch.zeros(B, Z, H * D, dtype=torch.float64)
    K, V = torch.cat([ki, zeros], 1), torch.cat([vi, zeros], 1)
    ref_id = attention64(q, K, V, H)
    proj = (text * ref_id).sum(1, keepdim=True) / (text * text).sum(1, keepdim=True) * text
    if ortho == "none":
        contribution = ref_id
    elif ortho == "ortho":
        contribution = ref_id - proj
    else:
        unscaled = heads_of(q, H) @ heads_of(K, H).transpose(-1, -2)  # no 1/sqrt(D), as PuLID
        a = unscaled.softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)
        contribution = ref_id + (a - 1) * proj
    torch.testing.assert_close(got, text + 0.8 * contribution, rtol=1e-5, atol=1e-5)  # ortho runs in float32


# --- the stage through the real dispatcher, one layer ------------------------------------------------


def test_joint_row_bias_formula():
    """0 on text columns; log w on identity columns of rows with the identity, -inf on the others'."""
    bias = pa.joint_row_bias(3, 2, 0.5, torch.tensor([True, False, True]))
    assert bias.shape == (3, 1, 1, 5) and bias.dtype == torch.float32
    assert torch.equal(bias[..., :3], torch.zeros(3, 1, 1, 3))
    assert torch.equal(bias[[0, 2], ..., 3:], torch.full((2, 1, 1, 2), math.log(0.5)))
    assert torch.equal(bias[1, ..., 3:], torch.full((1, 1, 2), float("-inf")))
    padded = pa.joint_row_bias(3, 2, 0.5, torch.tensor([True, False, True]), columns=16)
    assert padded.shape == (3, 1, 1, 16) and torch.equal(padded[..., :5], bias) and not padded[..., 5:].any()


@pytest.mark.parametrize("weight", [0.4, 1.0])
@pytest.mark.parametrize("codes,rows", [((1, 0), 2), ((0, 1), 1), ((0,), 2)])
def test_joint_negative_rows_share_the_one_call_float64(tiny, codes, rows, weight):
    """Default negative ("none (PVA)"): one joint call over the whole batch (any cond/uncond layout);
    in float64 the negative rows are the text-only formula to 1e-12, the positive rows PVA's; the mask
    is made once per sampling and layout (a second call makes nothing new)."""
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4), synthetic_identity(1, seed=9, clip=False)
    patched = apply(model, adapter, identity, weight=weight)
    inputs = layer_inputs(patched, SD15_KEY, codes=codes, rows=rows)
    q, k, v = inputs.q.double(), inputs.k.double(), inputs.v.double()
    slot = patched.model_options["transformer_options"]["patches_replace"]["attn2"][inputs.info.key]
    cache = sampling_scope.SamplingCache()
    options = dict(inputs.extra_options, **{dispatcher.HIDDEN_STATES_KEY: inputs.hidden.double(), sampling_scope.SAMPLING_CACHE_KEY: cache})
    with torch.inference_mode():
        got = slot(q, k, v, dict(options))
        made = len(cache)
        again = slot(q, k, v, dict(options))
    assert got.dtype == torch.float64 and made > 0 and len(cache) == made and torch.equal(again, got)
    w = adapter.layers[SD15_KEY]
    k_id, v_id = id_kv64(inputs, adapter.identity_tokens(identity), w["to_k"], w["to_v"])
    expected = joint64(q, q, k, v, k_id, v_id, inputs.info.heads, weight)
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(got.shape[0])])
    close(got[cond], expected[cond], tol=1e-5)  # the adapter projects the identity in float32
    if (~cond).any():
        torch.testing.assert_close(got[~cond], attention64(q, k, v, inputs.info.heads)[~cond], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("negative", [None, ZERO_ID, SAME_ID])
@pytest.mark.parametrize("arch,key", [("sd15", SD15_KEY), ("sdxl", SDXL_KEY)])
def test_joint_adapter_projections_visual_query(tiny, arch, key, negative):
    """Positive rows: PVA's joint softmax. Negative rows: by default (PVA's sampling) the text alone
    (the same single call with -inf identity columns: the text-only formula up to float32 rounding); with the option, the empty face's tokens (this node's old
    behaviour) or the person's own tokens (PVA's extra_feat_neg)."""
    model = tiny.unet(arch)
    adapter = adapter_for(model, num_tokens=4, visual_q=True)
    identity = synthetic_identity(2, seed=3, clip=False)
    patched = apply(model, adapter, identity, weight=0.7, references="per_reference", negative=negative)
    grid = (4, 4) if arch == "sd15" else (8, 8)
    inputs = layer_inputs(patched, key, grid=grid)
    got = run_layer(patched, inputs)

    tokens = adapter.identity_tokens(identity, per_reference=True)
    assert tokens.count == 8
    if negative == SAME_ID:
        tokens = id_adapter_mod.IdentityTokens(cond=tokens.cond, uncond=tokens.cond)
    w = adapter.layers[key]
    k_id, v_id = id_kv64(inputs, tokens, w["to_k"], w["to_v"])
    q_id = inputs.hidden.double() @ w["to_q"].double().T
    expected = joint64(inputs.q, q_id, inputs.k, inputs.v, k_id, v_id, inputs.info.heads, 0.7)
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(got.shape[0])])
    plain = unpatched(inputs)
    close(got[cond], expected[cond])
    assert not torch.allclose(got[cond], plain[cond], atol=1e-3)
    if negative is None:
        close(got[~cond], attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)[~cond], tol=1e-6)
    else:
        close(got[~cond], expected[~cond])
        assert not torch.allclose(got[~cond], plain[~cond], atol=1e-3)


def test_joint_layer_projections_is_context_append(tiny):
    """Training-free joint = PVA at initialisation: identity tokens appended to the text context."""
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=4, clip=False)
    patched = apply(model, adapter, identity, projections="layer", negative=ZERO_ID)
    inputs = layer_inputs(patched, SD15_KEY)
    got = run_layer(patched, inputs)

    attn2 = model.model.diffusion_model.get_submodule(inputs.info.module_path).attn2
    tokens = adapter.identity_tokens(identity)
    k_id, v_id = id_kv64(inputs, tokens, attn2.to_k.weight, attn2.to_v.weight)
    expected = attention64(inputs.q, torch.cat([inputs.k.double(), k_id], 1), torch.cat([inputs.v.double(), v_id], 1), inputs.info.heads)
    close(got, expected)


def test_layer_projections_follow_a_replaced_layer_weight(tiny):
    """A LoRA applied after the node (or removed again) swaps the layer's weight tensors: the identity K/V follow."""
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=4, clip=False)
    patched = apply(model, adapter, identity, projections="layer", negative=ZERO_ID)
    inputs = layer_inputs(patched, SD15_KEY)
    attn2 = model.model.diffusion_model.get_submodule(inputs.info.module_path).attn2
    tokens = adapter.identity_tokens(identity)

    def expected():
        k_id, v_id = id_kv64(inputs, tokens, attn2.to_k.weight, attn2.to_v.weight)
        return attention64(inputs.q, torch.cat([inputs.k.double(), k_id], 1), torch.cat([inputs.v.double(), v_id], 1), inputs.info.heads)

    close(run_layer(patched, inputs), expected())
    original_k, original_v = attn2.to_k.weight, attn2.to_v.weight
    try:  # what ComfyUI's weight patching does: a new Parameter object in the module
        attn2.to_k.weight = torch.nn.Parameter(original_k.detach() * 1.5, requires_grad=False)
        attn2.to_v.weight = torch.nn.Parameter(original_v.detach() - 0.1, requires_grad=False)
        close(run_layer(patched, inputs), expected())
    finally:
        attn2.to_k.weight, attn2.to_v.weight = original_k, original_v
    close(run_layer(patched, inputs), expected())


def test_decoupled_mask_and_cond_only(tiny):
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=5, clip=False)
    mask = torch.zeros(1, 4, 4)
    mask[:, 1:3, 0:3] = 1.0
    mask[:, 3, 3] = 0.5
    patched = apply(model, adapter, identity, weight=1.3, mode="decoupled", apply_to="cond", mask=mask)
    inputs = layer_inputs(patched, SD15_KEY, codes=(1, 0), rows=2)
    got = run_layer(patched, inputs)

    text = attention64(inputs.q, inputs.k, inputs.v, inputs.info.heads)
    w = adapter.layers[SD15_KEY]
    k_id, v_id = id_kv64(inputs, adapter.identity_tokens(identity), w["to_k"], w["to_v"])
    ident = attention64(inputs.q, k_id, v_id, inputs.info.heads)
    region = tokens_mask(mask[0], 4)
    cond_rows = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(4)], dtype=torch.float64).reshape(4, 1, 1)
    expected = text + 1.3 * ident * region * cond_rows
    close(got, expected)
    # the uncond rows are exactly the unpatched layer
    assert torch.equal(got[:2], unpatched(inputs)[:2])


@pytest.mark.parametrize("method,references", [("style", 1), ("fidelity", 2), (None, 1), ("neutral", 1)])
def test_pulid_stage(tiny, method, references):
    """PuLID's methods as the official code defines them (app.py modes; attention_processor.py NUM_ZERO / ORTHO / ORTHO_v2):
    fidelity = 8 zero tokens + ORTHO_v2, style ('extremely style') = 16 + ORTHO, neutral = 0 + none; None: the node's default."""
    model = tiny.unet("sdxl")
    adapter = adapter_for(model, num_tokens=10, fmt="pulid")
    zero, ortho = {"style": (16, "ortho"), "fidelity": (8, "ortho_v2"), None: (8, "ortho_v2"), "neutral": (0, "none")}[method]
    identity = synthetic_identity(references, seed=6, clip=False)
    per_reference = "per_reference" if references > 1 else "fused"
    options = {} if method is None else {"pulid_method": method}
    patched = apply(model, adapter, identity, weight=0.8, mode="decoupled", references=per_reference, **options)
    inputs = layer_inputs(patched, SDXL_KEY, grid=(8, 8), rows=1)
    got = run_layer(patched, inputs)

    H = inputs.info.heads
    text = attention64(inputs.q, inputs.k, inputs.v, H)
    w = adapter.layers[SDXL_KEY]
    k_id, v_id = id_kv64(inputs, adapter.identity_tokens(identity, per_reference=references > 1), w["to_k"], w["to_v"])
    assert k_id.shape[1] == 10 * references
    zeros = torch.zeros(k_id.shape[0], zero, k_id.shape[-1], dtype=torch.float64)
    K, V = torch.cat([k_id, zeros], 1), torch.cat([v_id, zeros], 1)
    ident = attention64(inputs.q, K, V, H)
    proj = (text * ident).sum(1, keepdim=True) / (text * text).sum(1, keepdim=True) * text
    if ortho == "ortho":
        contribution = ident - proj
    elif ortho == "ortho_v2":  # PuLID: attn_mean[:, :, :5], the first 5 tokens of the whole sequence
        a = (heads_of(inputs.q, H) @ heads_of(K, H).transpose(-1, -2)).softmax(-1).mean(1)[:, :, :5].sum(-1, keepdim=True)
        contribution = ident + (a - 1) * proj
    else:
        contribution = ident
    close(got, text + 0.8 * contribution, tol=1e-4)


@pytest.mark.parametrize("method", ["fidelity", "style", "neutral"])
def test_pulid_weight_zero_is_unpatched(tiny, method):
    """weight 0 with any PuLID method: the layer's output is the unpatched one, bit for bit."""
    model = tiny.unet("sdxl")
    adapter = adapter_for(model, num_tokens=10, fmt="pulid")
    identity = synthetic_identity(1, seed=6, clip=False)
    patched = apply(model, adapter, identity, weight=0.0, mode="decoupled", pulid_method=method)
    inputs = layer_inputs(patched, SDXL_KEY, grid=(8, 8), rows=1)
    assert torch.equal(run_layer(patched, inputs), unpatched(inputs))


def test_pulid_method_ignored_by_other_adapters(tiny):
    """pulid_method changes nothing for a non-PuLID adapter (no zero tokens, no projection)."""
    model = tiny.unet("sdxl")
    adapter = adapter_for(model, num_tokens=4, fmt="instantid")
    identity = synthetic_identity(1, seed=6, clip=False)
    outs = []
    for method in ("fidelity", "style", "neutral"):
        patched = apply(model, adapter, identity, weight=0.8, mode="decoupled", pulid_method=method)
        outs.append(run_layer(patched, layer_inputs(patched, SDXL_KEY, grid=(8, 8), rows=1)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_pva_on_sd2_layer_shapes():
    """A stage at an SD2-inpainting layer (C 320, 5 heads x 64, context 1024, 10 tokens of 1024), no model needed."""
    gen = torch.Generator().manual_seed(7)
    key, C, H, ctx, T = ("input", 1, 0), 320, 5, 1024, 10
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    tokens = id_adapter_mod.IdentityTokens(cond=r(1, T, ctx), uncond=r(1, T, ctx) * 0.1)
    wk, wv, wq = r(C, ctx) / 32, r(C, ctx) / 32, r(C, C) / 18
    source = stage_mod.IdentitySource(tokens, tokens, {key: stage_mod.WeightProjection(wk)}, {key: stage_mod.WeightProjection(wv)}, {key: wq})
    stage = stage_mod.ParallelAttentionStage(dispatcher.StageSchedule(weight=1.0), source, "joint")
    info = host.LayerInfo(key, "input_blocks.1.1.transformer_blocks.0", H, 64, C, ctx)
    slot = dispatcher.AttentionDispatcher((stage,), {}, {key: info})
    B, N = 4, 16
    hidden, q, k, v = r(B, N, C), r(B, N, C), r(B, 77, C), r(B, 77, C)
    eo = {"n_heads": H, "dim_head": 64, "block": key[:2], "block_index": 0, "cond_or_uncond": [1, 0], "original_shape": [B, 9, 4, 4], dispatcher.HIDDEN_STATES_KEY: hidden}
    got = slot(q, k, v, eo)
    codes = [1, 1, 0, 0]
    t = torch.cat([(tokens.cond if c == 0 else tokens.uncond).double() for c in codes])
    expected = joint64(q, hidden.double() @ wq.double().T, k, v, t @ wk.double().T, t @ wv.double().T, H, 1.0)
    close(got, expected)


# --- exactness ----------------------------------------------------------------------------------------


def test_joint_with_zero_identity_tokens_is_exactly_unpatched(tiny):
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=0)
    patched = apply(model, adapter, synthetic_identity(1, clip=False), weight=1.0)
    inputs = layer_inputs(patched, SD15_KEY)
    assert torch.equal(run_layer(patched, inputs), unpatched(inputs))


@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_weight_zero_is_exactly_unpatched(tiny, mode):
    model = tiny.unet("sd15")
    adapter = adapter_for(model)
    patched = apply(model, adapter, synthetic_identity(1, clip=False), weight=0.0, mode=mode)
    inputs = layer_inputs(patched, SD15_KEY)
    assert torch.equal(run_layer(patched, inputs), unpatched(inputs))


# --- input checks ---------------------------------------------------------------------------------------


def _error(fn) -> str:
    with pytest.raises(errors.IdentityAttentionError) as info:
        fn()
    return str(info.value)


def test_errors_name_node_input_and_fix(tiny):
    sd15, sdxl = tiny.unet("sd15"), tiny.unet("sdxl")
    identity = synthetic_identity(1, clip=False)
    xl_adapter = adapter_for(sdxl)
    text = _error(lambda: apply(sd15, xl_adapter, identity))
    assert "Apply parallel visual attention" in text and "'id_adapter'" in text and "sdxl" in text and "Fix:" in text

    partial = adapter_for(sd15)
    partial.layers.pop(("middle", 0, 0))
    assert "no 'to_k' projection for 1 of the model's 16" in _error(lambda: apply(sd15, partial, identity))

    narrow = adapter_for(sd15, token_dim=512)
    assert "512 channels" in _error(lambda: apply(sd15, narrow, identity, projections="layer"))
    assert "'weight'" in _error(lambda: apply(sd15, adapter_for(sd15), identity, weight=-0.5, mode="joint"))
    text = _error(lambda: apply(sd15, adapter_for(sd15), identity, mode="joint", apply_to="uncond"))
    assert "'apply_to'" in text and "zero identity" in text
    apply(sd15, adapter_for(sd15), identity, mode="joint", apply_to="uncond", negative=ZERO_ID)  # the old behaviour: allowed
    apply(sd15, adapter_for(sd15), identity, mode="decoupled", apply_to="uncond")  # decoupled: the option does not apply
    assert "'negative_identity'" in _error(lambda: apply(sd15, adapter_for(sd15), identity, negative="text"))

    patched = apply(sd15, adapter_for(sd15), identity, mask=torch.ones(3, 4, 4))
    inputs = layer_inputs(patched, SD15_KEY, rows=2)
    assert "'mask'" in _error(lambda: run_layer(patched, inputs))


def test_input_model_unchanged(tiny):
    import copy

    model = tiny.unet("sd15")
    before = copy.deepcopy(model.model_options)
    apply(model, adapter_for(model, visual_q=True), synthetic_identity(1, clip=False))
    assert model.model_options == before


# --- sampling in-process ----------------------------------------------------------------------------------


def context_append_patch(model, tokens):
    """PVA at initialisation by hand: an attn2_patch appending the identity tokens to context and value."""
    m = model.clone()

    def patch(n, context, value, eo):
        rows = n.shape[0] // len(eo["cond_or_uncond"])
        extra = torch.cat([(tokens.cond if c == 0 else tokens.uncond).to(context).expand(rows, -1, -1) for c in eo["cond_or_uncond"]])
        return n, torch.cat([context, extra], 1), torch.cat([value, extra], 1)

    m.set_model_attn2_patch(patch)
    return m


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_joint_layer_equals_appending_tokens(tiny, arch):
    model = tiny.unet(arch)
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=8, clip=False)
    ours = sample(apply(model, adapter, identity, projections="layer", negative=ZERO_ID), arch)
    by_hand = sample(context_append_patch(model, adapter.identity_tokens(identity)), arch)
    assert torch.isfinite(ours).all()
    assert_same_sampling(ours, by_hand)


def text_only_negative_by_hand(model, tokens):
    """PVA's sampling by hand: positive rows attend to [text ; identity] with the layer's own K/V, negative rows to the text."""
    m = model.clone()
    for info in host.cross_attention_layers(m):
        attn2 = m.model.diffusion_model.get_submodule(info.module_path).attn2

        def replace(q, k, v, eo, attn2=attn2):
            rows = q.shape[0] // len(eo["cond_or_uncond"])
            t = tokens.cond.to(q)
            ki, vi = attn2.to_k(t).expand(rows, -1, -1), attn2.to_v(t).expand(rows, -1, -1)
            parts = []
            for i, code in enumerate(eo["cond_or_uncond"]):
                r = slice(i * rows, (i + 1) * rows)
                if code == 0:
                    parts.append(host.host_attention(q[r], torch.cat([k[r], ki], 1), torch.cat([v[r], vi], 1), eo["n_heads"], eo))
                else:
                    parts.append(host.host_attention(q[r], k[r], v[r], eo["n_heads"], eo))
            return torch.cat(parts)

        m.set_model_attn2_replace(replace, *info.key)
    return m


def follow_the_negative(model):
    """A clone whose CFG step returns the negative prediction: the whole trajectory is the negative pass's."""
    m = model.clone()
    m.set_model_sampler_cfg_function(lambda args: args["uncond"])
    return m


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_joint_negative_is_text_only_by_default(tiny, arch):
    """Default joint mode = PVA's sampling: the negative pass is the unpatched model's every step (up to
    float32 rounding: one joint call over the whole batch gives the negative rows -inf identity columns)."""
    model = tiny.unet(arch)
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=8, clip=False)
    ours = apply(model, adapter, identity, projections="layer")
    plain_negative = sample(follow_the_negative(model), arch)
    assert_same_sampling(sample(follow_the_negative(ours), arch), plain_negative)
    old = apply(model, adapter, identity, projections="layer", negative=ZERO_ID)
    assert not torch.allclose(sample(follow_the_negative(old), arch), plain_negative, atol=1e-4)
    got = sample(ours, arch)
    assert_same_sampling(got, sample(text_only_negative_by_hand(model, adapter.identity_tokens(identity)), arch))
    assert not torch.allclose(got, sample(model, arch), atol=1e-4)


def test_joint_weight_multiplies_the_identity_odds(tiny):
    """weight w in joint mode: identity share s (at w = 1) becomes w s / (w s + 1 - s), i.e. odds x w.

    From the joint softmax: with E_t, E_i the text and identity sums of exp(logits), the identity
    column bias log w gives share w E_i / (E_t + w E_i); dividing by E_t + E_i gives the form above.
    Checked on the joint output: out = (1 - a) text_attention + a id_attention (float64 reference).
    """
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4, visual_q=True)
    identity = synthetic_identity(1, seed=3, clip=False)
    inputs = layer_inputs(model, SD15_KEY)
    H = inputs.info.heads
    w = adapter.layers[SD15_KEY]
    tokens = adapter.identity_tokens(identity)
    k_id, v_id = id_kv64(inputs, tokens, w["to_k"], w["to_v"])
    q_id = inputs.hidden.double() @ w["to_q"].double().T
    text_logits, id_logits = logits64(inputs.q, inputs.k, H), logits64(q_id, k_id, H)
    e_text, e_id = text_logits.exp().sum(-1, keepdim=True), id_logits.exp().sum(-1, keepdim=True)
    s = e_id / (e_text + e_id)  # [B, H, N, 1]: the identity's share at weight 1
    text_part = text_logits.softmax(-1) @ heads_of(inputs.v, H)
    id_part = id_logits.softmax(-1) @ heads_of(v_id, H)
    cond = torch.tensor([inputs.chunk_of_row(r) == 0 for r in range(inputs.q.shape[0])])
    for weight in (0.5, 2.0, 3.0):  # 3 is the node's maximum
        a = weight * s / (weight * s + 1 - s)
        expected = merge((1 - a) * text_part + a * id_part)
        got = run_layer(apply(model, adapter, identity, weight=weight), inputs)
        close(got[cond], expected[cond])
        odds = (a / (1 - a)) / (s / (1 - s))
        torch.testing.assert_close(odds, torch.full_like(odds, weight), rtol=1e-9, atol=0)
    # where the share is already large, w = 2 does not double it
    a2 = 2 * s / (2 * s + 1 - s)
    assert s.max() > 0.3 and bool(((a2 / s)[s > 0.3] < 1.75).all())


def test_sampling_decoupled_equals_hand_written_ip_adapter(tiny):
    model = tiny.unet("sd15")
    adapter = adapter_for(model, num_tokens=4)
    identity = synthetic_identity(1, seed=9, clip=False)
    tokens = adapter.identity_tokens(identity)
    hand = model.clone()
    for info in host.cross_attention_layers(hand):
        w = adapter.layers[info.key]

        def replace(q, k, v, eo, w=w):
            rows = q.shape[0] // len(eo["cond_or_uncond"])
            t = torch.cat([(tokens.cond if c == 0 else tokens.uncond).expand(rows, -1, -1) for c in eo["cond_or_uncond"]]).to(q)
            ki, vi = t @ w["to_k"].to(q).T, t @ w["to_v"].to(q).T
            return host.host_attention(q, k, v, eo["n_heads"], eo) + 0.6 * host.host_attention(q, ki, vi, eo["n_heads"], eo)

        hand.set_model_attn2_replace(replace, *info.key)
    ours = sample(apply(model, adapter, identity, weight=0.6, mode="decoupled"), "sd15")
    assert_same_sampling(ours, sample(hand, "sd15"))
    plain = sample(model, "sd15")
    assert (ours - plain).abs().max() > 100 * 1e-5 * float(plain.abs().max())  # the identity does change the image


# --- through a real server ----------------------------------------------------------------------------------


def pva_prompt(adapter_arch="sd15", mode="joint", weight=0.8):
    return {
        "1": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "IdentityAttentionTestKit_SyntheticIdentity", "inputs": {"references": 2, "seed": 1, "with_clip": False, "with_face_tokens": False}},
        "5": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": adapter_arch, "seed": 0}},
        "6": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["5", 0], "num_tokens": 4, "seed": 2, "visual_q": True}},
        "7": {
            "class_type": "IdentityAttentionApplyParallelAttention",
            "inputs": {
                "model": ["1", 0], "id_adapter": ["6", 0], "identity": ["4", 0], "weight": weight, "start_percent": 0.0, "end_percent": 1.0,
                "apply_to": "both", "mode": mode, "projections": "adapter", "references": "per_reference",
            },
        },
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {
            "class_type": "KSampler",
            "inputs": {"model": ["7", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["8", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
        },
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": f"pva_{mode}"}},
    }


@pytest.mark.host
def test_host_parallel_attention(server):
    info = server.object_info()["IdentityAttentionApplyParallelAttention"]
    assert info["category"] == "identity_attention/attention"
    for section in info["input"].values():
        for name, spec in section.items():
            assert spec[1].get("tooltip"), name
    for mode in ("joint", "decoupled"):
        entry = server.run(pva_prompt(mode=mode))
        assert [p for p in server.output_files(entry) if p.exists()]


@pytest.mark.host
def test_host_bad_input_is_explained(server):
    from harness.server import PromptFailed

    with pytest.raises(PromptFailed) as info:
        server.run(pva_prompt(mode="joint", weight=-0.5))
    message = info.value.exception_message()
    assert "Apply parallel visual attention" in message and "'weight'" in message and "Fix:" in message


def test_joint_honours_the_hosts_fp32_attention_precision(tiny):
    """Where the host upcasts attention (attn_precision float32, SD2.x), the fused joint call runs in float32."""
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, visual_q=True), synthetic_identity(1, seed=10, clip=False)
    patched = apply(model, adapter, identity, weight=1.0)
    inputs = layer_inputs(patched, SD15_KEY)
    expected = run_layer(patched, inputs)
    half = layer_inputs(patched, SD15_KEY)
    for name in ("q", "k", "v", "hidden"):
        setattr(half, name, getattr(half, name).to(torch.bfloat16))
    half.extra_options[dispatcher.HIDDEN_STATES_KEY] = half.hidden
    half.extra_options["attn_precision"] = torch.float32
    got = run_layer(patched, half)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)
