"""A Flux graph with joint identity attention through /prompt (the tiny Flux, newer host only)."""

from __future__ import annotations

import pytest
import torch

from harness.prompts import Graph, run_for_latent
from testkit import tiny_flux

pytestmark = [pytest.mark.host, pytest.mark.skipif(not tiny_flux.flux_available(), reason=tiny_flux.SKIP_REASON)]


def flux_graph(weight=None, prefix="flux"):
    g = Graph()
    model = g.out(g.add("IdentityAttentionTestKit_TinyFlux", variant="dev", seed=0))
    clip = g.out(g.add("IdentityAttentionTestKit_TinyFluxClip", seed=1))
    vae = g.out(g.add("IdentityAttentionTestKit_TinyFluxVae", seed=2))
    pos = g.out(g.add("FluxGuidance", conditioning=g.out(g.add("CLIPTextEncode", clip=clip, text="a portrait photo of a person")), guidance=3.5))
    neg = g.out(g.add("CLIPTextEncode", clip=clip, text=""))
    if weight is not None:
        adapter = g.out(g.add("IdentityAttentionTestKit_SyntheticAdapter", model=model, num_tokens=4, seed=0, visual_q=False))
        identity = g.out(g.add("IdentityAttentionTestKit_SyntheticIdentity", references=1, seed=0, with_clip=True, with_face_tokens=False))
        model = g.out(g.add(
            "IdentityAttentionApplyParallelAttention", model=model, id_adapter=adapter, identity=identity, weight=weight,
            start_percent=0.0, end_percent=1.0, apply_to="both", mode="auto", projections="layer", references="fused",
        ))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    samples = g.out(g.add("KSampler", model=model, seed=1, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple",
                          positive=pos, negative=neg, latent_image=latent, denoise=1.0))
    g.add("SaveLatent", samples=samples, filename_prefix=f"latents/{prefix}")
    g.add("SaveImage", images=g.out(g.add("VAEDecode", samples=samples, vae=vae)), filename_prefix=prefix)
    return g


def test_flux_with_joint_identity_runs_through_prompt(server):
    plain = run_for_latent(server, flux_graph(None, "flux_plain"))
    zero = run_for_latent(server, flux_graph(0.0, "flux_zero"))
    identity = run_for_latent(server, flux_graph(1.5, "flux_identity"))
    assert plain.shape[1] == tiny_flux.LATENT_CHANNELS
    assert torch.equal(zero, plain)  # weight 0: the unpatched Flux, bit for bit
    assert torch.isfinite(identity).all() and not torch.equal(identity, plain)
