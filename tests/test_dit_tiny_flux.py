"""The tiny Flux test kit: ComfyUI's own Flux classes, real block structure, deterministic weights."""

from __future__ import annotations

import pytest
import torch

from testkit import tiny_flux

pytestmark = pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux.build_flux(0)


def test_built_through_comfy_flux_classes(flux):
    import comfy.ldm.flux.layers as layers
    import comfy.ldm.flux.model
    import comfy.model_base

    assert isinstance(flux.model, comfy.model_base.Flux)
    net = flux.model.diffusion_model
    assert isinstance(net, comfy.ldm.flux.model.Flux)
    assert [type(b) for b in net.double_blocks] == [layers.DoubleStreamBlock] * tiny_flux.DEPTH
    assert [type(b) for b in net.single_blocks] == [layers.SingleStreamBlock] * tiny_flux.DEPTH_SINGLE
    assert isinstance(net.guidance_in, layers.MLPEmbedder)  # dev: guidance embedding
    assert isinstance(net.pe_embedder, layers.EmbedND) and sum(net.pe_embedder.axes_dim) == tiny_flux.HIDDEN // tiny_flux.HEADS
    assert net.num_heads == tiny_flux.HEADS and net.hidden_size == tiny_flux.HIDDEN


def test_schnell_has_no_guidance_embedding():
    import comfy.model_base

    schnell = tiny_flux.build_flux(0, guidance=False)
    assert isinstance(schnell.model.diffusion_model.guidance_in, torch.nn.Identity)
    assert schnell.model.model_type == comfy.model_base.ModelType.FLOW


def test_weights_are_deterministic_and_in_the_published_layout(flux):
    sd = tiny_flux.flux_state_dict(0)
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight", "vector_in.in_layer.weight", "txt_in.weight", "img_in.weight"):
        assert key in sd, key
    again = flux.model.diffusion_model.state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["img_in.weight"], tiny_flux.flux_state_dict(1)["img_in.weight"])


def test_apply_model_uses_guidance_and_context(flux):
    x, t, c, y, g = tiny_flux.flux_inputs(0)
    with torch.no_grad():
        base = flux.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g)
        other_guidance = flux.model.apply_model(x, t, c_crossattn=c, y=y, guidance=g * 2)
        other_text = flux.model.apply_model(x, t, c_crossattn=c.flip(1), y=y, guidance=g)
    assert base.shape == x.shape and torch.isfinite(base).all()
    assert not torch.equal(base, other_guidance)
    assert not torch.equal(base, other_text)


def test_samples_and_decodes_through_comfy(flux):
    import comfy.sample

    clip = tiny_flux.build_flux_clip()
    vae = tiny_flux.build_flux_vae()
    tokens = clip.tokenize("a portrait photo")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape[-1] == tiny_flux.CONTEXT and pooled.shape == (1, tiny_flux.POOLED)
    positive = [[cond, {"pooled_output": pooled, "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample(flux, noise, 2, 1.0, "euler", "simple", positive, positive, latent, seed=0, disable_pbar=True)
    image = vae.decode(samples)
    assert samples.shape == latent.shape and image.shape == (1, 64, 64, 3)


def test_provisioning_swaps_flux_loaders():
    from harness import provisioning  # noqa: F401  (registers every provisioner)
    from harness.provisioning_flux import is_flux_vae_name
    from harness.tiny_swap import PROVISIONERS

    context = {}
    unet = PROVISIONERS["UNETLoader"]({"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-schnell.safetensors"}}, None, context)
    assert unet == {"class_type": "IdentityAttentionTestKit_TinyFlux", "inputs": {"variant": "schnell", "seed": 0}}
    assert context["arch"] == "flux"
    clip = PROVISIONERS["DualCLIPLoader"]({"class_type": "DualCLIPLoader", "inputs": {"type": "flux"}}, None, {})
    assert clip["class_type"] == "IdentityAttentionTestKit_TinyFluxClip"
    sd3 = {"class_type": "DualCLIPLoader", "inputs": {"type": "sd3"}}
    assert PROVISIONERS["DualCLIPLoader"](sd3, None, {}) is sd3
    assert is_flux_vae_name("ae.safetensors") and is_flux_vae_name("FLUX1/ae.sft") and not is_flux_vae_name("sdxl_vae.safetensors")


def test_testkit_loader_nodes_hand_out_clones():
    from testkit.flux_nodes import TinyFlux

    a, = TinyFlux().load("dev", 0)
    b, = TinyFlux().load("dev", 0)
    assert a is not b and a.model is b.model  # clones of one cached build: nobody mutates the cache
