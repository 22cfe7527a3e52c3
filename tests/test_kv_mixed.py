"""KV-mixed cross-attention: keys from one (IDENTITY, ID_ADAPTER) pair, values from another."""

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

kv = pack("adapters.attention.kv_mixed_attention")
errors = pack("nodes.common.errors")
kv_nodes = pack("nodes.kv_mixed.kv_mixed_nodes")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")

NODE = kv_nodes.ApplyKVMixedAttention()


def apply_pva(model, adapter, identity, weight=1.0, mode="decoupled", references="fused"):
    # KV-mixed joint gives the negative the empty face's tokens: PVA's node does that with "zero identity"
    node = pva_nodes.ApplyParallelAttention()
    return node.apply(model, adapter, identity, weight, 0.0, 1.0, "both", mode, "adapter", references, negative_identity="zero identity")[0]


def apply(model, key_adapter, key_identity, value_adapter, value_identity, weight=1.0, mode="decoupled", rule="resample_values", projections="adapter", references="fused", apply_to="both", mask=None):
    return NODE.apply(model, key_adapter, key_identity, weight, 0.0, 1.0, apply_to, mode, rule, projections, references, mask=mask,
                      value_adapter=value_adapter, value_identity=value_identity, pairing=kv_nodes.TWO_ADAPTERS)[0]


def pooled64(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The documented rule, by hand: output i averages inputs floor(i*T/count) .. ceil((i+1)*T/count) - 1."""
    t = tokens.shape[1]
    rows = [tokens[:, math.floor(i * t / count) : math.ceil((i + 1) * t / count)].double().mean(dim=1) for i in range(count)]
    return torch.stack(rows, dim=1)


# --- token counts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_tokens", [16, 6, 3])
def test_resample_values_rule(value_tokens):
    keys = torch.randn(1, 4, 8)
    values = torch.randn(1, value_tokens, 5)
    k, v = kv.match_token_counts(keys, values, "resample_values")
    assert k is keys
    torch.testing.assert_close(v.double(), pooled64(values, 4))


def test_resampling_keeps_references_apart():
    """Two references of 6 value tokens pooled to 2 x 4: no output token mixes the two references."""
    values = torch.cat([torch.zeros(1, 6, 3), torch.ones(1, 6, 3)], dim=1)
    _, v = kv.match_token_counts(torch.zeros(1, 8, 3), values, "resample_values")
    assert torch.equal(v[0, :4], torch.zeros(4, 3)) and torch.equal(v[0, 4:], torch.ones(4, 3))


def test_error_rule_and_never_truncates():
    with pytest.raises(kv.TokenCountMismatch):
        kv.match_token_counts(torch.zeros(1, 4, 2), torch.zeros(1, 16, 2), "error")
    same = torch.randn(1, 4, 2)
    assert kv.match_token_counts(torch.zeros(1, 4, 2), same, "error")[1] is same


# --- one layer through the dispatcher -------------------------------------------------------------------


def sources(model):
    key_adapter = adapter_for(model, num_tokens=4, seed=11)
    value_adapter = adapter_for(model, num_tokens=6, seed=12)
    return key_adapter, synthetic_identity(1, seed=13, clip=False), value_adapter, synthetic_identity(1, seed=14, clip=False)


def mixed_kv64(inputs, key_adapter, key_identity, value_adapter, value_identity, key):
    kt, vt = key_adapter.identity_tokens(key_identity), value_adapter.identity_tokens(value_identity)
    k_rows = rows_of(inputs, {0: kt.cond, 1: kt.uncond})
    v_rows = rows_of(inputs, {0: pooled64(vt.cond, kt.count), 1: pooled64(vt.uncond, kt.count)})
    return k_rows @ key_adapter.layers[key]["to_k"].double().T, v_rows @ value_adapter.layers[key]["to_v"].double().T


def test_decoupled_formula_with_mask(tiny):
    model = tiny.unet("sd15")
    ka, ki, va, vi = sources(model)
    mask = torch.zeros(1, 4, 4)
    mask[:, :, 2:] = 1.0
    patched = apply(model, ka, ki, va, vi, weight=0.9, mask=mask)
    inputs = layer_inputs(patched, SD15_KEY, codes=(1, 0), rows=2)
    got = run_layer(patched, inputs)
    k_id, v_id = mixed_kv64(inputs, ka, ki, va, vi, SD15_KEY)
    H = inputs.info.heads
    expected = attention64(inputs.q, inputs.k, inputs.v, H) + 0.9 * tokens_mask(mask[0], 4) * attention64(inputs.q, k_id, v_id, H)
    close(got, expected)


def test_joint_formula(tiny):
    model = tiny.unet("sdxl")
    ka, ki, va, vi = sources(model)
    patched = apply(model, ka, ki, va, vi, weight=1.7, mode="joint")
    inputs = layer_inputs(patched, SDXL_KEY, grid=(8, 8), codes=(0,), rows=2)
    got = run_layer(patched, inputs)
    k_id, v_id = mixed_kv64(inputs, ka, ki, va, vi, SDXL_KEY)
    H = inputs.info.heads
    probs = torch.cat([logits64(inputs.q, inputs.k, H), logits64(inputs.q, k_id, H) + math.log(1.7)], -1).softmax(-1)
    expected = merge(probs @ torch.cat([heads_of(inputs.v, H), heads_of(v_id, H)], 2))
    close(got, expected)


def test_layer_projections_formula(tiny):
    model = tiny.unet("sd15")
    ka, ki, va, vi = sources(model)
    patched = apply(model, ka, ki, va, vi, weight=0.5, projections="layer")
    inputs = layer_inputs(patched, SD15_KEY)
    attn2 = model.model.diffusion_model.get_submodule(inputs.info.module_path).attn2
    kt, vt = ka.identity_tokens(ki), va.identity_tokens(vi)
    k_id = rows_of(inputs, {0: kt.cond, 1: kt.uncond}) @ attn2.to_k.weight.double().T
    v_id = rows_of(inputs, {0: pooled64(vt.cond, 4), 1: pooled64(vt.uncond, 4)}) @ attn2.to_v.weight.double().T
    H = inputs.info.heads
    close(run_layer(patched, inputs), attention64(inputs.q, inputs.k, inputs.v, H) + 0.5 * attention64(inputs.q, k_id, v_id, H))


@pytest.mark.parametrize("mode", ["decoupled", "joint"])
def test_same_source_equals_parallel_attention(tiny, mode):
    model = tiny.unet("sd15")
    adapter, identity = adapter_for(model, num_tokens=4), synthetic_identity(2, seed=15, clip=False)
    mixed = apply(model, adapter, identity, adapter, identity, weight=0.7, mode=mode, references="per_reference")
    plain = apply_pva(model, adapter, identity, weight=0.7, mode=mode, references="per_reference")
    inputs = layer_inputs(mixed, SD15_KEY)
    assert torch.equal(run_layer(mixed, inputs), run_layer(plain, inputs))
    assert not torch.equal(run_layer(mixed, inputs), unpatched(inputs))
    if mode == "decoupled":  # and through a whole sampling run
        assert_same_sampling(sample(mixed, "sd15"), sample(plain, "sd15"))


def test_errors(tiny):
    sd15, sdxl = tiny.unet("sd15"), tiny.unet("sdxl")
    ka, ki, va, vi = sources(sd15)
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply(sd15, ka, ki, va, vi, rule="error")
    text = str(info.value)
    assert "'token_mismatch'" in text and "4 tokens" in text and "6" in text and "Fix:" in text
    with pytest.raises(errors.IdentityAttentionError) as info:
        apply(sd15, ka, ki, adapter_for(sdxl), vi)
    assert "'value_adapter'" in str(info.value)


# --- through a real server ------------------------------------------------------------------------------


@pytest.mark.host
def test_host_kv_mixed(server):
    prompt = {
        "1": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": "sd15", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "IdentityAttentionTestKit_SyntheticIdentity", "inputs": {"references": 1, "seed": 1, "with_clip": False, "with_face_tokens": False}},
        "5": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["1", 0], "num_tokens": 4, "seed": 2, "visual_q": False}},
        "6": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["1", 0], "num_tokens": 16, "seed": 3, "visual_q": False}},
        "7": {
            "class_type": "IdentityAttentionApplyKVMixedAttention",
            "inputs": {
                "model": ["1", 0], "key_adapter": ["5", 0], "key_identity": ["4", 0], "value_adapter": ["6", 0], "value_identity": ["4", 0],
                "weight": 0.8, "start_percent": 0.0, "end_percent": 1.0, "apply_to": "both", "mode": "decoupled",
                "token_mismatch": "resample_values", "projections": "adapter", "references": "fused", "pairing": "two adapters (unrelated tokens, experimental)",
            },
        },
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {
            "class_type": "KSampler",
            "inputs": {"model": ["7", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["8", 0], "seed": 1, "steps": 2, "cfg": 4.0,
                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
        },
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "kv_mixed"}},
    }
    entry = server.run(prompt)
    assert [p for p in server.output_files(entry) if p.exists()]
