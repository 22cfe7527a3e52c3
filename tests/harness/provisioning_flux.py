"""Tiny-Flux runs of Flux workflows: Flux's three loaders swapped for the test kit's.

A Flux workflow loads its parts separately: ``UNETLoader`` (the transformer),
``DualCLIPLoader`` with ``type = flux`` (CLIP-L + T5-XXL) and ``VAELoader`` (``ae.safetensors``).
ComfyUI's detector cannot read a tiny Flux file (testkit/tiny_flux.py says why), so instead
of provisioning files the loaders become the test kit's TinyFlux / TinyFluxClip / TinyFluxVae
nodes (testkit/flux_nodes.py). A ``UNETLoader`` whose file name says "schnell" gets the
variant without the guidance embedding. A ``VAELoader`` is swapped only for a Flux VAE name
(``ae.*``, or a name containing "flux" / "taef1"); other VAEs are left alone.
"""

from __future__ import annotations

from .host import Instance
from .tiny_swap import register

FLUX_VAE_HINTS = ("flux", "taef1")


def is_flux_vae_name(name: str) -> bool:
    lowered = name.lower().rsplit("/", 1)[-1]
    return lowered.startswith("ae.") or any(h in lowered for h in FLUX_VAE_HINTS)


@register("UNETLoader")
def _swap_unet(node: dict, instance: Instance, context: dict) -> dict:
    name = str(node["inputs"].get("unet_name", "")).lower()
    context.setdefault("arch", "flux")
    variant = "schnell" if "schnell" in name else "dev"
    return {"class_type": "IdentityAttentionTestKit_TinyFlux", "inputs": {"variant": variant, "seed": 0}}


@register("DualCLIPLoader")
def _swap_clip(node: dict, instance: Instance, context: dict) -> dict:
    if str(node["inputs"].get("type", "flux")) != "flux":
        return node
    return {"class_type": "IdentityAttentionTestKit_TinyFluxClip", "inputs": {"seed": 1}}


@register("VAELoader")
def _swap_vae(node: dict, instance: Instance, context: dict) -> dict:
    if not is_flux_vae_name(str(node["inputs"].get("vae_name", ""))):
        return node
    return {"class_type": "IdentityAttentionTestKit_TinyFluxVae", "inputs": {"seed": 2}}
