"""MoA's prior is the base model's attention: q/k/v as loaded, before a LoRA; and the training-free
router can say "no identity here" (a flat or weak identity map is not stretched to 0..1)."""

from __future__ import annotations

import pytest
import torch

import comfy.lora
from conftest import pack
from layer_harness import SD15_KEY, adapter_for, assert_same_sampling, attention64, close, layer_inputs, run_layer, sample, tokens_mask
from testkit.synthetic import synthetic_identity

routing = pack("adapters.attention.attention_routing")
dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")
errors = pack("nodes.common.errors")
moa_nodes = pack("nodes.moa.mixture_of_attention_nodes")
pva_nodes = pack("nodes.pva.parallel_attention_nodes")

MOA = moa_nodes.ApplyMixtureOfAttention()


def moa(model, prior, mask, router="mask"):
    return MOA.apply(model, router, 1.0, 0.0, 1.0, "both", 1.0, False, mask=mask, prior=prior)[0]


def pva(model, adapter, identity, weight=1.0):
    return pva_nodes.ApplyParallelAttention().apply(model, adapter, identity, weight, 0.0, 1.0, "both", "decoupled", "adapter", "fused")[0]


def attn2_lora(model, rank=2, seed=0, scale=0.5):
    """A kohya-style LoRA state dict on every cross-attention layer's to_q / to_k / to_v."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for info in host.cross_attention_layers(model):
        for name, fan_in in (("to_q", info.inner_dim), ("to_k", info.context_dim), ("to_v", info.context_dim)):
            base = "lora_unet_" + f"{info.module_path}.attn2.{name}".replace(".", "_")
            sd[base + ".lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) * scale
            sd[base + ".lora_up.weight"] = torch.randn(info.inner_dim, rank, generator=gen) * scale
            sd[base + ".alpha"] = torch.tensor(float(rank))
    return sd


def with_lora(model, lora_sd, strength=1.0):
    """What ComfyUI's LoRA loader does to the MODEL (clone + add_patches), on either host."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map)
    patched = model.clone()
    assert len(patched.add_patches(loaded, strength)) == len(loaded) > 0
    return patched


def attn2_weights64(model, key):
    info = {i.key: i for i in host.cross_attention_layers(model)}[key]
    attn2 = model.model.diffusion_model.get_submodule(info.module_path).attn2
    return {n: getattr(attn2, n).weight.detach().double().clone() for n in ("to_q", "to_k", "to_v")}


# --- the router's normalisation -----------------------------------------------------------------------


def test_flat_and_weak_identity_maps_are_not_stretched():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((2, 16, 1), 0.04, dtype=torch.float64)  # 4 % of the attention on the identity
    nearly_flat = flat + 1e-4 * torch.rand(2, 16, 1, generator=gen, dtype=torch.float64)
    for share in (flat, nearly_flat):
        _, r1 = routing.route_from_identity_share(share)
        m = share / share.amax(1, keepdim=True).clamp_min(0.2)  # float64 reference
        expected = 1 / (1 + torch.exp(-10 * (m - 0.5)))
        torch.testing.assert_close(r1, expected, rtol=1e-6, atol=1e-6)
        assert float(r1.amax() - r1.amin()) < 1e-3  # flat in, flat out
        assert float(r1.amax()) < 0.1  # a weak map says "no identity here"
    # a strong, localised map still spans the routing range
    strong = torch.zeros(1, 16, 1, dtype=torch.float64)
    strong[0, :4] = 0.6
    _, r1 = routing.route_from_identity_share(strong)
    assert float(r1.amax()) > 0.99 and float(r1.amin()) < 0.01
    # a flat map of a large share (the subject fills the picture): identity everywhere, flat
    _, r1 = routing.route_from_identity_share(torch.full((1, 16, 1), 0.5, dtype=torch.float64))
    assert float(r1.amin()) > 0.99 and float(r1.amax() - r1.amin()) == 0.0


# --- base prior at one layer -----------------------------------------------------------------------------


@pytest.mark.parametrize("separate_value", [False, True], ids=["to_k and to_v read one context", "an attn2_patch changed to_v's input"])
def test_base_prior_is_the_unpatched_attention_at_a_layer(tiny, separate_value):
    model = tiny.unet("sd15", seed=3)
    base64 = attn2_weights64(model, SD15_KEY)
    lora = with_lora(model, attn2_lora(model))
    adapter, identity = adapter_for(model), synthetic_identity(1, seed=2, clip=False)
    mask = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3))
    personalized = pva(lora, adapter, identity, weight=1.2)
    routed = {prior: moa(personalized, prior, mask) for prior in ("base", "current")}
    assert dispatcher.installed_dispatcher(routed["base"]).stages[-1].needs_hidden_states
    lora.patch_model()  # what sampling does: the LoRA goes into the weights, the loaded ones into backup
    try:
        patched64 = attn2_weights64(model, SD15_KEY)
        assert not torch.allclose(patched64["to_k"], base64["to_k"])
        inputs = layer_inputs(routed["base"], SD15_KEY, seed=5)  # q/k/v from the LoRA'd layer
        context = torch.randn(inputs.k.shape[0], inputs.k.shape[1], inputs.info.context_dim, generator=torch.Generator().manual_seed(6))
        # the stage projects k and v in one matmul where to_v reads to_k's context, else in two
        value = torch.randn(context.shape, generator=torch.Generator().manual_seed(7)) if separate_value else context
        with torch.no_grad():
            attn2 = model.model.diffusion_model.get_submodule(inputs.info.module_path).attn2
            inputs.k, inputs.v = attn2.to_k(context), attn2.to_v(value)
        inputs.extra_options[dispatcher.CONTEXT_KEY] = context
        if separate_value:
            inputs.extra_options[dispatcher.VALUE_KEY] = value
        H, x, c = inputs.info.heads, inputs.hidden.double(), context.double()
        base_prior = attention64(x @ base64["to_q"].T, c @ base64["to_k"].T, value.double() @ base64["to_v"].T, H)
        current_prior = attention64(inputs.q, inputs.k, inputs.v, H)
        torch.testing.assert_close(inputs.q.double(), x @ patched64["to_q"].T, rtol=1e-5, atol=1e-5)
        tokens = adapter.identity_tokens(identity)
        w = adapter.layers[SD15_KEY]
        t = torch.cat([tokens.uncond.double()] * 2 + [tokens.cond.double()] * 2)  # codes (1, 0), 2 rows each
        identity_part = 1.2 * attention64(inputs.q, t @ w["to_k"].double().T, t @ w["to_v"].double().T, H)
        r1 = tokens_mask(mask_at_grid(mask), inputs.q.shape[0])
        for prior, reference in (("base", base_prior), ("current", current_prior)):
            expected = (1 - r1) * reference + r1 * (current_prior + identity_part)
            close(run_layer(routed[prior], inputs), expected, tol=4e-5 if separate_value else 2e-5)  # a second random input: float32 noise of the current prior up to 4e-5
        assert (base_prior - current_prior).abs().max() > 1e-2  # the LoRA really moved the prior
    finally:
        lora.unpatch_model()
    assert torch.equal(attn2_weights64(model, SD15_KEY)["to_k"], base64["to_k"])


def mask_at_grid(mask):
    """The harness's 4x4 layer grid equals the mask's 4x4: no resize."""
    return mask[0]


# --- base prior through real sampling, with a LoRA, on either host ----------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_sampling_with_a_lora_base_prior_is_the_base_model(tiny, arch):
    """A LoRA on every attn2 q/k/v and an identity branch routed away everywhere (mask 0):
    prior=base samples exactly as the model without the LoRA, prior=current as the model with it."""
    model = tiny.unet(arch, seed=4)
    lora = with_lora(model, attn2_lora(model, seed=1))
    personalized = pva(lora, adapter_for(model, seed=7), synthetic_identity(1, seed=8, clip=False))
    zero = torch.zeros(1, 8, 8)
    plain, patched = sample(model, arch, steps=2), sample(lora, arch, steps=2)
    assert (plain - patched).abs().max() > 1e-3
    assert_same_sampling(sample(moa(personalized, "base", zero), arch, steps=2), plain)
    assert_same_sampling(sample(moa(personalized, "current", zero), arch, steps=2), patched)
    # and the model's weights are the loaded ones again afterwards
    assert_same_sampling(sample(model, arch, steps=2), plain)


def test_prior_input_errors(tiny):
    model = tiny.unet("sd15")
    personalized = pva(model, adapter_for(model), synthetic_identity(1, clip=False))
    with pytest.raises(errors.IdentityAttentionError) as info:
        moa(personalized, "frozen", torch.ones(1, 4, 4))
    assert "'prior'" in str(info.value) and "Fix:" in str(info.value)


def test_base_projections_find_the_loaded_weights_in_every_host_layout(tiny):
    """Each place ComfyUI keeps a loaded weight while a patch is in effect, as both hosts lay it out."""
    import collections

    base_mod = pack("nodes.dispatch.base_projections")
    model = tiny.unet("sd15", seed=5)
    layers = host.cross_attention_layers(model)
    info = {i.key: i for i in layers}[SD15_KEY]
    attn2 = model.model.diffusion_model.get_submodule(info.module_path).attn2
    key = f"diffusion_model.{info.module_path}.attn2.to_k.weight"
    loaded = attn2.to_k.weight.detach().clone()
    other = torch.randn_like(loaded)

    class Patcher:  # the attributes BaseProjections reads, nothing else
        def __init__(self, backup=None, hook_backup=None):
            self.model, self.backup = model.model, backup or {}
            if hook_backup is not None:
                self.hook_backup = hook_backup

    named = collections.namedtuple("Dimension", ["weight", "inplace_update"])
    layouts = {
        "nothing patched": (Patcher(), False, loaded),
        "in place, early-2024 backup (tensor)": (Patcher({key: loaded}), True, loaded),
        "in place, 0.3.x backup (named tuple)": (Patcher({key: named(loaded, False)}), True, loaded),
        "0.3.x hook backup": (Patcher(hook_backup={key: (loaded, torch.device("cpu"))}), True, loaded),
    }
    for name, (patcher, patched, expected) in layouts.items():
        base = base_mod.BaseProjections(patcher, layers)
        assert base.patched(SD15_KEY) is patched, name
        torch.testing.assert_close(base.weights(SD15_KEY)[1][0], expected, rtol=0, atol=0)
    # at cast time (low-VRAM loading, weight wrappers): the module keeps the loaded weight
    missing = object()
    original = getattr(attn2.to_k, "weight_function", missing)
    for function in ([lambda w: w + other], lambda w: w + other):  # 0.3.x list / early-2024 callable
        attn2.to_k.weight_function = function
        try:
            base = base_mod.BaseProjections(Patcher(), layers)
            assert base.patched(SD15_KEY)
            torch.testing.assert_close(base.weights(SD15_KEY)[1][0], loaded, rtol=0, atol=0)
        finally:
            if original is missing:
                del attn2.to_k.weight_function
            else:
                attn2.to_k.weight_function = original
    assert not base_mod.BaseProjections(Patcher(), layers).patched(SD15_KEY)
