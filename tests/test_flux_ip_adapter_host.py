"""XLabs' Flux IP-Adapter through /prompt on the tiny Flux (newer host only): the loader reads a file in the published
key layout from models/ipadapter, the apply node encodes a picture with a CLIP vision model; weight 0 is the plain
Flux bit for bit, weight 1 changes it."""

from __future__ import annotations

import pytest
import torch

from harness.prompts import Graph, run_for_latent
from test_flux_ip_adapter import xlabs_state
from testkit import tiny_flux

pytestmark = [pytest.mark.host, pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)]

FILE = "ip_adapter_tiny_flux.safetensors"


def graph(weight=None, prefix="xlabs"):
    g = Graph()
    model = g.out(g.add("IdentityAttentionTestKit_TinyFlux", variant="dev", seed=0))
    clip = g.out(g.add("IdentityAttentionTestKit_TinyFluxClip", seed=1))
    pos = g.out(g.add("FluxGuidance", conditioning=g.out(g.add("CLIPTextEncode", clip=clip, text="a portrait photo")), guidance=3.5))
    neg = g.out(g.add("CLIPTextEncode", clip=clip, text=""))
    if weight is not None:
        adapter = g.out(g.add("IdentityAttentionLoadFluxIPAdapter", adapter_file=FILE))
        vision = g.out(g.add("IdentityAttentionTestKit_TinyClipVision", kind="vit-h", seed=0))
        image = g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=0xC08040))
        model = g.out(g.add("IdentityAttentionApplyFluxIPAdapter", model=model, flux_ip_adapter=adapter, clip_vision=vision, image=image,
                            weight=weight, start_percent=0.0, end_percent=1.0, apply_to="both"))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    samples = g.out(g.add("KSampler", model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                          positive=pos, negative=neg, latent_image=latent, denoise=1.0))
    g.add("SaveLatent", samples=samples, filename_prefix=f"latents/{prefix}")
    return g


def test_flux_ip_adapter_runs_through_prompt(server):
    from safetensors.torch import save_file

    target = server.instance.models / "ipadapter" / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(xlabs_state(n_double=tiny_flux.DEPTH, hidden=tiny_flux.HIDDEN, embed=1024), str(target))  # the tiny ViT-H: 1024 embeds
    plain = run_for_latent(server, graph(None, "xlabs_plain"))
    zero = run_for_latent(server, graph(0.0, "xlabs_zero"))
    prompted = run_for_latent(server, graph(1.0, "xlabs_on"))
    assert torch.equal(zero, plain)  # weight 0: the unpatched Flux, bit for bit
    assert torch.isfinite(prompted).all() and not torch.equal(prompted, plain)
