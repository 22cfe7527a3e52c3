"""InstantX's Flux IP-Adapter: file layout, detection, the SigLIP pooling head, projection and per-block attention
against float64 references written here from the official code's behaviour (``infer_flux_ipa_siglip.py``:
``MLPProjModel``, ``IPAFluxAttnProcessor2_0``; transformers' ``SiglipMultiheadAttentionPoolingHead``):

- pooled = first row of ``h + fc2(gelu_tanh(fc1(LN(h))))``, ``h = out_proj(softmax(q k^T / sqrt(d)) v)`` with
  ``q = probe Wq + bq``, ``k = x Wk + bk``, ``v = x Wv + bv`` (``in_proj`` split in three), 16 heads;
- tokens = LayerNorm(W2 gelu(W0 pooled + b0) + b2) reshaped to ``[T, C]``;
- per block: ``softmax(q rms(K)^T / sqrt(D)) V``, ``K = tokens Wk``, ``V = tokens Wv`` (no bias), rms over the head dim
  (eps 1e-5, no weight).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pack

ix = pack("adapters.instantx_flux_ip_adapter")
weight_errors = pack("adapters.weight_errors")
formats = pack("adapters.weight_formats")


def instantx_state(n_blocks=3, hidden=64, context=32, embed=24, tokens=4, seed=0, dtype=torch.float32):
    """A random file in the published key layout (tiny widths; the release: 57 blocks, 3072, 4096, 1152, 128 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5).to(dtype)  # noqa: E731
    state = {
        "image_proj.proj.0.weight": r(2 * embed, embed), "image_proj.proj.0.bias": 0.1 * r(2 * embed),
        "image_proj.proj.2.weight": r(tokens * context, 2 * embed), "image_proj.proj.2.bias": 0.1 * r(tokens * context),
        "image_proj.norm.weight": 1 + 0.1 * r(context), "image_proj.norm.bias": 0.1 * r(context),
    }
    for j in range(n_blocks):
        state[f"ip_adapter.{j}.to_k_ip.weight"] = r(hidden, context)
        state[f"ip_adapter.{j}.to_v_ip.weight"] = r(hidden, context)
    return state


def siglip_head_state(width=32, inner=48, seed=3, prefix="vision_model.head."):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen) / max(1, shape[-1]) ** 0.5  # noqa: E731
    names = {"probe": (1, 1, width), "attention.in_proj_weight": (3 * width, width), "attention.in_proj_bias": (3 * width,),
             "attention.out_proj.weight": (width, width), "attention.out_proj.bias": (width,),
             "layernorm.weight": (width,), "layernorm.bias": (width,), "mlp.fc1.weight": (inner, width),
             "mlp.fc1.bias": (inner,), "mlp.fc2.weight": (width, inner), "mlp.fc2.bias": (width,)}
    return {prefix + k: r(*shape) + (1.0 if k == "layernorm.weight" else 0.0) for k, shape in names.items()}


def pooled_reference(head, x, heads):
    """transformers' SigLIP attention-pooling head, float64."""
    p = {k.split("head.", 1)[1]: v.double() for k, v in head.items()}
    x = x.double()
    b, n, c = x.shape
    d = c // heads
    wq, wk, wv = p["attention.in_proj_weight"].chunk(3)
    bq, bk, bv = p["attention.in_proj_bias"].chunk(3)
    q = (p["probe"].expand(b, 1, c) @ wq.T + bq).view(b, 1, heads, d).transpose(1, 2)
    k = (x @ wk.T + bk).view(b, n, heads, d).transpose(1, 2)
    v = (x @ wv.T + bv).view(b, n, heads, d).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    h = a.transpose(1, 2).reshape(b, 1, c) @ p["attention.out_proj.weight"].T + p["attention.out_proj.bias"]
    ln = torch.nn.functional.layer_norm(h, (c,), p["layernorm.weight"], p["layernorm.bias"], eps=1e-6)
    mid = ln @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    mid = 0.5 * mid * (1 + torch.tanh(math.sqrt(2 / math.pi) * (mid + 0.044715 * mid ** 3)))
    return (h + mid @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"])[:, 0]


def tokens_reference(state, pooled):
    p = {k: v.double() for k, v in state.items()}
    context = p["image_proj.norm.weight"].shape[0]
    h = pooled.double() @ p["image_proj.proj.0.weight"].T + p["image_proj.proj.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = (h @ p["image_proj.proj.2.weight"].T + p["image_proj.proj.2.bias"]).view(pooled.shape[0], -1, context)
    return torch.nn.functional.layer_norm(h, (context,), p["image_proj.norm.weight"], p["image_proj.norm.bias"], eps=1e-5)


def residual_reference(state, j, q, toks):
    """``q`` ``[B, H, L, D]`` pre-RoPE queries; -> ``[B, L, H*D]``."""
    b, h, n, d = q.shape
    k = (toks.double() @ state[f"ip_adapter.{j}.to_k_ip.weight"].double().T).view(b, -1, h, d).transpose(1, 2)
    v = (toks.double() @ state[f"ip_adapter.{j}.to_v_ip.weight"].double().T).view(b, -1, h, d).transpose(1, 2)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    a = torch.softmax(q.double() @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    return a.transpose(1, 2).reshape(b, n, h * d)


def test_pooling_head_projection_and_block_attention_match_float64_references():
    gen = torch.Generator().manual_seed(7)
    head_state = siglip_head_state(width=24, inner=40)
    head = ix.SiglipPoolingHead.from_state(head_state, heads=4)
    state = instantx_state(embed=24)
    model = ix.InstantXFluxIPAdapter.from_state(state, head)
    assert (model.embed_dim, model.hidden, len(model.blocks), model.image_proj.num_tokens) == (24, 64, 3, 4)
    hidden = torch.randn(2, 9, 24, generator=gen)
    with torch.no_grad():
        pooled = model.pooled(hidden)
        torch.testing.assert_close(pooled.double(), pooled_reference(head_state, hidden, 4), rtol=1e-4, atol=1e-5)
        toks = model.tokens(pooled)
        torch.testing.assert_close(toks.double(), tokens_reference(state, pooled), rtol=1e-4, atol=1e-5)
        q = torch.randn(2, 4, 5, 16, generator=gen)
        got = ix.image_prompt_attention(model.blocks[2], q, toks)
    torch.testing.assert_close(got.double(), residual_reference(state, 2, q, toks), rtol=1e-4, atol=1e-5)
    assert ix.SiglipPoolingHead.from_state(siglip_head_state(prefix="head."), heads=4) is not None  # bare SigLIP key layout


def test_detection_and_bad_files():
    state = instantx_state()
    assert ix.is_instantx_flux(state)
    unet_like = {k.replace("ip_adapter.0.", "ip_adapter.1."): v for k, v in state.items()}  # UNet IP-Adapters start at 1
    assert not ix.is_instantx_flux(unet_like)
    with pytest.raises(weight_errors.WeightError, match="InstantX"):
        formats.detect_format(state)  # 'Load identity adapter' points to the InstantX nodes
    with pytest.raises(weight_errors.WeightError, match="lacks"):
        ix.InstantXFluxIPAdapter.from_state({k: v for k, v in state.items() if "norm.bias" not in k})
    with pytest.raises(weight_errors.WeightError, match="numbered"):
        ix.InstantXFluxIPAdapter.from_state({k: v for k, v in state.items() if not k.startswith("ip_adapter.1.")})
    with pytest.raises(weight_errors.WeightError, match="pooling head"):
        ix.SiglipPoolingHead.from_state({"vision_model.post_layernorm.weight": torch.ones(4)})
    model = ix.InstantXFluxIPAdapter.from_state(state)
    with pytest.raises(weight_errors.WeightError, match="19 \\+ 38"):
        model.check_model(2, 2, 64, 4)
    model.check_model(1, 2, 64, 4)
    assert model.block_index("single_block", 1, 1) == 2
