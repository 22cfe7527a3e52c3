"""Apply CA² gate in-process on the tiny SD1.5 / SDXL models, against hand-written attn2 replaces."""

from __future__ import annotations

import math

import pytest
import torch

import comfy.sample
from conftest import pack
from testkit.synthetic import SyntheticClipVision, synthetic_adapter
from testkit.tiny_models import random_conditioning

host = pack("nodes.common.host")
ca2_nodes = pack("nodes.ca2.ca2_nodes")
errors = pack("nodes.common.errors")
spatial = pack("adapters.attention.spatial")
identity = pack("adapters.faces.identity")

TEXT = "text attention (training-free)"
NATIVE = "native score weights"


def conditioning(arch, seed):
    """Random text contexts whose start token stands out, as CLIP's does (it draws most attention)."""
    cond = random_conditioning(arch, seed)
    cond[0][0][:, 0] *= 8.0
    return cond


def sample(model, arch, steps=2, size=8, batch=1, cfg=5.0, seed=0):
    pos = conditioning(arch, 100)
    neg = conditioning(arch, 200)
    latent = torch.zeros(batch, 4, size, size)
    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)


def assert_close_to_scale(got, expected, rel=2e-5):
    """Elementwise closeness relative to the sample's scale (random tiny UNets reach |x| ~ 1e3; float32 noise)."""
    torch.testing.assert_close(got, expected, rtol=0.0, atol=rel * float(expected.abs().max()))


def image_adapter(model, seed=0, score_hidden=None):
    layers = host.cross_attention_layers(model)
    adapter = synthetic_adapter(layers, host.base_model_of(model), layers[0].context_dim, num_tokens=4, seed=seed, projector_input="clip_embeds")
    if score_hidden:
        gen = torch.Generator().manual_seed(seed + 50)
        for info in layers:
            adapter.layers[info.key].update(
                {
                    "score.0.weight": torch.randn(score_hidden, info.inner_dim + info.context_dim, generator=gen) / math.sqrt(info.inner_dim),
                    "score.0.bias": torch.randn(score_hidden, generator=gen) * 0.1,
                    "score.2.weight": torch.randn(2, score_hidden, generator=gen),
                    "score.2.bias": torch.randn(2, generator=gen) * 0.1,
                }
            )
    return adapter


def originals(count, seed=3):
    return torch.rand(count, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def edit_mask():
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 20:52] = 1.0
    return mask


def expected_tokens(adapter, encoder, images):
    """The projector's tokens for the images (cond) and for zero embeds (uncond), written out."""
    embeds = encoder.encode_image(images).image_embeds
    proj = adapter.projector
    with torch.no_grad():
        cond = proj.norm(proj.proj(embeds).reshape(images.shape[0], proj.num_tokens, proj.token_dim))
        uncond = proj.norm(proj.proj(torch.zeros_like(embeds[:1])).reshape(1, proj.num_tokens, proj.token_dim))
    return cond, uncond


def head_probs(q, k, heads):
    b, n, hd = q.shape
    d = hd // heads
    qh = q.double().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [B, H, N, M]


def hand_ca2(model, adapter, cond_tokens, uncond_tokens, mask, weight, native=False, scale="fixed"):
    """Eq. 3-6 as one plain attn2 replace per layer (no dispatcher, no pack stage)."""
    m = model.clone()
    stash_key = "test_hand_ca2_stash"

    def stash(n, context, value, eo):
        eo[stash_key] = (n, context)
        return n, context, value

    if native:
        m.set_model_attn2_patch(stash)
    for info in host.cross_attention_layers(m):

        def replace(q, k, v, eo, info=info):
            heads = eo["n_heads"]
            out = host.host_attention(q, k, v, heads, eo)
            chunks = eo["cond_or_uncond"]
            n = q.shape[0] // len(chunks)
            layer = adapter.layers[info.key]
            rows = [(cond_tokens if c == 0 else uncond_tokens).expand(n, -1, -1) if (cond_tokens if c == 0 else uncond_tokens).shape[0] == 1 else cond_tokens for c in chunks]
            tokens = torch.cat(rows)
            k_vis, v_vis = (tokens @ layer["to_k"].t()).to(q), (tokens @ layer["to_v"].t()).to(q)
            visual = host.host_attention(q, k_vis, v_vis, heads, eo)
            if native:
                hidden, context = eo[stash_key]
                pooled = context.double().mean(dim=1, keepdim=True).expand(-1, hidden.shape[1], -1)
                x = torch.cat([hidden.double(), pooled], dim=-1)
                h = torch.nn.functional.gelu(x @ layer["score.0.weight"].double().t() + layer["score.0.bias"].double())
                score = torch.softmax(h @ layer["score.2.weight"].double().t() + layer["score.2.bias"].double(), dim=-1)[..., 0]
            else:
                mass = 1.0 - head_probs(q, k, heads)[..., 0].mean(dim=1)  # not on the start token
                if scale == "fixed":
                    score = mass  # one 0..1 scale over the whole run
                else:
                    lo, hi = mass.min(dim=1, keepdim=True).values, mass.max(dim=1, keepdim=True).values
                    score = (mass - lo) / (hi - lo).clamp_min(0.05)  # flat maps are not stretched
            grid = spatial.token_grid(q.shape[1], eo["original_shape"][-2:])
            m_tok = spatial.mask_to_tokens(mask, grid).double().expand(q.shape[0], -1, -1)
            gate = 1.0 - score.unsqueeze(-1) * m_tok
            return (out.double() + weight * gate * visual.double()).to(q.dtype)

        m.set_model_attn2_replace(replace, *info.key)
    return m


def apply_gate(model, adapter, images, weight=1.0, source=TEXT, apply_to="both", mask=None, **kw):
    node = ca2_nodes.ApplyCA2Gate()
    encoder = kw.pop("encoder", SyntheticClipVision(0))
    (patched,) = node.apply(model, adapter, edit_mask() if mask is None else mask, source, 1.0, weight, 0.0, 1.0, apply_to, clip_vision=encoder, image=images, **kw)
    return patched


def captured_calls(model, arch, batch=2):
    """(layer key, q, k, v, extra_options) of every attn2 call of one CFG model call."""
    calls = []
    m = model.clone()
    for info in host.cross_attention_layers(m):

        def record(q, k, v, eo, info=info):
            calls.append((info.key, q.clone(), k.clone(), v.clone(), dict(eo)))
            return host.host_attention(q, k, v, eo["n_heads"], eo)

        m.set_model_attn2_replace(record, *info.key)
    sample(m, arch, steps=1, batch=batch)
    return calls


@pytest.mark.parametrize("arch,scale", [("sd15", "fixed"), ("sdxl", "fixed"), ("sd15", "per_step")])
def test_gate_equals_hand_written_eq5_6_at_every_layer_batch_and_cfg(tiny, arch, scale):
    model = tiny.unet(arch)
    adapter = image_adapter(model)
    encoder = SyntheticClipVision(0)
    images = originals(2)  # one original per image of a batch of 2; cond + uncond rows
    cond_tokens, uncond_tokens = expected_tokens(adapter, encoder, images)
    choice = {"fixed": "fixed (trend over steps)", "per_step": "per step (full contrast)"}[scale]
    gate = apply_gate(model, adapter, images, weight=0.8, encoder=encoder, score_scale=choice)
    hand = hand_ca2(model, adapter, cond_tokens, uncond_tokens, edit_mask(), 0.8, scale=scale)
    ours = gate.model_options["transformer_options"]["patches_replace"]["attn2"]
    theirs = hand.model_options["transformer_options"]["patches_replace"]["attn2"]
    calls = captured_calls(model, arch)
    assert len(calls) == len(host.cross_attention_layers(model)) and calls[0][4]["cond_or_uncond"] == [1, 0]
    for key, q, k, v, eo in calls:
        expected = theirs[key](q, k, v, dict(eo))
        got = ours[key](q, k, v, dict(eo))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        assert not torch.allclose(got, host.host_attention(q, k, v, eo["n_heads"], eo), rtol=1e-3, atol=1e-3)


def test_gate_sampling_equals_hand_written(tiny):
    """End to end through the sampler (SDXL's layers are covered call by call above)."""
    arch = "sd15"
    model = tiny.unet(arch)
    adapter = image_adapter(model)
    encoder = SyntheticClipVision(0)
    images = originals(2)
    cond_tokens, uncond_tokens = expected_tokens(adapter, encoder, images)
    got = sample(apply_gate(model, adapter, images, weight=0.8, encoder=encoder), arch, steps=1, batch=2)
    expected = sample(hand_ca2(model, adapter, cond_tokens, uncond_tokens, edit_mask(), 0.8), arch, steps=1, batch=2)
    assert_close_to_scale(got, expected)
    plain = sample(model, arch, steps=1, batch=2)
    assert float((got - plain).abs().max()) > 0.05 * float(plain.abs().max())


def test_native_score_sampling_equals_hand_written(tiny):
    model = tiny.unet("sd15")
    adapter = image_adapter(model, score_hidden=24)
    encoder = SyntheticClipVision(0)
    images = originals(1)
    cond_tokens, uncond_tokens = expected_tokens(adapter, encoder, images)
    got = sample(apply_gate(model, adapter, images, source=NATIVE, encoder=encoder), "sd15", steps=1)
    expected = sample(hand_ca2(model, adapter, cond_tokens, uncond_tokens, edit_mask(), 1.0, native=True), "sd15", steps=1)
    assert_close_to_scale(got, expected)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_weight_zero_is_bit_identical(tiny, arch):
    model = tiny.unet(arch)
    patched = apply_gate(model, image_adapter(model), originals(1), weight=0.0)
    assert torch.equal(sample(patched, arch, steps=1), sample(model, arch, steps=1))


def test_inspect_returns_score_maps_per_step(tiny):
    model = tiny.unet("sd15")
    patched = apply_gate(model, image_adapter(model), originals(1))
    out = sample(patched, "sd15", steps=2, batch=2)
    frames, mean, curve = ca2_nodes.InspectCA2Scores().inspect(patched, {"samples": out}, "mean of all layers")
    assert frames.shape == (2 * 2, 64, 64, 3) and mean.shape == (2, 64, 64) and curve.shape[0] == 1 and curve.shape[-1] == 3
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0 and float(frames.std()) > 0.01
    low, _, _ = ca2_nodes.InspectCA2Scores().inspect(patched, {"samples": out}, "lowest resolution layers")
    assert low.shape == frames.shape and not torch.equal(low, frames)
    recorder = ca2_nodes.ca2_stages(patched)[-1].recorder
    assert len(recorder.steps) == 2 and len(recorder.steps[0][1]) == 16  # every layer, every step
    sample(patched, "sd15", steps=1, batch=2)  # a new run replaces the old one's maps
    assert len(recorder.steps) == 1


def test_errors_name_the_input_and_the_fix(tiny):
    model = tiny.unet("sd15")
    layers = host.cross_attention_layers(model)
    face = synthetic_adapter(layers, "sd15", 768, projector_input="arcface_normed")
    with pytest.raises(errors.IdentityAttentionError, match="face embedding.*Fix: use an image adapter"):
        apply_gate(model, face, originals(1))
    xl_model = tiny.unet("sdxl")
    with pytest.raises(errors.IdentityAttentionError, match="made for sdxl"):
        apply_gate(model, image_adapter(xl_model), originals(1))
    with pytest.raises(errors.IdentityAttentionError, match="no usable CA² score predictor.*text attention"):
        apply_gate(model, image_adapter(model), originals(1), source=NATIVE)
    with pytest.raises(errors.IdentityAttentionError, match="clip_vision_output"):
        ca2_nodes.ApplyCA2Gate().apply(model, image_adapter(model), edit_mask(), TEXT, 1.0, 1.0, 0.0, 1.0, "both")
    with pytest.raises(errors.IdentityAttentionError, match="no CA² gate"):
        ca2_nodes.InspectCA2Scores().inspect(model, {"samples": torch.zeros(1, 4, 16, 16)}, "mean of all layers")
    patched = apply_gate(model, image_adapter(model), originals(3))
    with pytest.raises(errors.IdentityAttentionError, match="3 original images were given for a batch of 2"):
        sample(patched, "sd15", batch=2)


def test_clip_vision_output_input_equals_clip_vision_plus_image(tiny):
    model = tiny.unet("sd15")
    adapter = image_adapter(model)
    encoder = SyntheticClipVision(0)
    images = originals(1)
    a = sample(apply_gate(model, adapter, images, encoder=encoder), "sd15", steps=1)
    node = ca2_nodes.ApplyCA2Gate()
    (patched,) = node.apply(model, adapter, edit_mask(), TEXT, 1.0, 1.0, 0.0, 1.0, "both", clip_vision_output=encoder.encode_image(images))
    assert_close_to_scale(sample(patched, "sd15", steps=1), a)  # the uncond of an embeds projector is zeros either way


def test_device_constants_live_for_one_sampling(tiny, monkeypatch):
    """CA²'s visual K/V and score weights on the device, and the text-mass indicator, are made on
    first use in a sampling, kept in that sampling's cache and released when it ends: the next
    sampling (another prompt, another image) makes them again and nothing of the last one is left."""
    ca2_stage = pack("nodes.ca2.ca2_stage")
    sampling_scope = pack("nodes.common.sampling_scope")
    model = tiny.unet("sd15")
    adapter = image_adapter(model)
    made, caches = [], []
    make_kv = ca2_stage.visual_keys_values
    monkeypatch.setattr(ca2_stage, "visual_keys_values", lambda *a: made.append(1) or make_kv(*a))
    constant = ca2_stage.device_constant

    def recording(options, *args):
        caches.append(sampling_scope.sampling_cache(options))
        schedule_published.append(options.get("sample_sigmas") is not None)
        return constant(options, *args)

    schedule_published = []  # the 2025 host publishes the sampling's sigmas: its end is known
    monkeypatch.setattr(ca2_stage, "device_constant", recording)
    for source in (TEXT, NATIVE):
        patched = apply_gate(model, image_adapter(model, score_hidden=8) if source == NATIVE else adapter, originals(1), source=source)
        first = sample(patched, "sd15", steps=2)
        per_sampling, seen = len(made), {id(c): c for c in caches}
        assert per_sampling > 0 and all(c is not None for c in caches)  # kept in the sampling's cache
        if all(schedule_published):  # released when the sampling ended (early 2024: when the next begins)
            assert all(len(c) == 0 for c in seen.values())
        assert torch.equal(sample(patched, "sd15", steps=2), first)
        assert len(made) == 2 * per_sampling  # the second sampling made them again: released in between
        made.clear(), caches.clear()
    # another image through the same node: its own constants, not the last sampling's
    got = sample(apply_gate(model, adapter, originals(1, seed=9)), "sd15", steps=1)
    assert not torch.equal(got, sample(apply_gate(model, adapter, originals(1)), "sd15", steps=1))
