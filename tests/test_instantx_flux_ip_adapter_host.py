"""InstantX's Flux IP-Adapter through /prompt on the tiny Flux (newer host only): the loader reads a file in the published
key layout from models/ipadapter and the SigLIP pooling head from models/clip_vision, the apply node encodes a picture
with the host's own SigLIP CLIP vision (the test kit's tiny "siglip" kind); weight 0 is the plain Flux bit for bit,
weight 1 changes it."""

from __future__ import annotations

import pytest
import torch

from harness.prompts import Graph, run_for_latent
from test_instantx_flux_ip_adapter import instantx_state, siglip_head_state
from testkit import tiny_flux

pytestmark = [pytest.mark.host, pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)]

FILE = "instantx_ip_adapter_tiny_flux.safetensors"
SIGLIP = "siglip_head_tiny.safetensors"


def graph(weight=None, prefix="instantx"):
    g = Graph()
    model = g.out(g.add("IdentityAttentionTestKit_TinyFlux", variant="dev", seed=0))
    clip = g.out(g.add("IdentityAttentionTestKit_TinyFluxClip", seed=1))
    pos = g.out(g.add("FluxGuidance", conditioning=g.out(g.add("CLIPTextEncode", clip=clip, text="a portrait photo")), guidance=3.5))
    neg = g.out(g.add("CLIPTextEncode", clip=clip, text=""))
    if weight is not None:
        adapter = g.out(g.add("IdentityAttentionLoadInstantXFluxIPAdapter", adapter_file=FILE, siglip_file=SIGLIP))
        vision = g.out(g.add("IdentityAttentionTestKit_TinyClipVision", kind="siglip", seed=0))
        image = g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=0xC08040))
        model = g.out(g.add("IdentityAttentionApplyInstantXFluxIPAdapter", model=model, flux_ip_adapter=adapter, clip_vision=vision,
                            image=image, weight=weight, start_percent=0.0, end_percent=1.0, apply_to="both"))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    samples = g.out(g.add("KSampler", model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                          positive=pos, negative=neg, latent_image=latent, denoise=1.0))
    g.add("SaveLatent", samples=samples, filename_prefix=f"latents/{prefix}")
    return g


def test_instantx_flux_ip_adapter_runs_through_prompt(server):
    from safetensors.torch import save_file

    models = server.instance.models
    for folder in ("ipadapter", "clip_vision"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    n_blocks = tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    save_file(instantx_state(n_blocks=n_blocks, hidden=tiny_flux.HIDDEN, context=48, embed=1152, tokens=6),
              str(models / "ipadapter" / FILE))
    save_file(siglip_head_state(width=1152, inner=64), str(models / "clip_vision" / SIGLIP))  # the tiny SigLIP is 1152 wide
    plain = run_for_latent(server, graph(None, "instantx_plain"))
    zero = run_for_latent(server, graph(0.0, "instantx_zero"))
    prompted = run_for_latent(server, graph(1.0, "instantx_on"))
    assert torch.equal(zero, plain)  # weight 0: the unpatched Flux, bit for bit
    assert torch.isfinite(prompted).all() and not torch.equal(prompted, plain)
