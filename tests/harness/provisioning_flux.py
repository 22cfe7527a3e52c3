"""Tiny-Flux runs of Flux workflows: Flux's three loaders swapped for the test kit's.

A Flux workflow loads its parts separately: ``UNETLoader`` (the transformer),
``DualCLIPLoader`` with ``type = flux`` (CLIP-L + T5-XXL) and ``VAELoader`` (``ae.safetensors``).
ComfyUI's detector cannot read a tiny Flux file (testkit/tiny_flux.py says why), so instead
of provisioning files the loaders become the test kit's TinyFlux / TinyFluxClip / TinyFluxVae
nodes (testkit/flux_nodes.py). A ``UNETLoader`` whose file name says "schnell" gets the
variant without the guidance embedding. A ``VAELoader`` is swapped only for a Flux VAE name
(``ae.*``, or a name containing "flux" / "taef1"); other VAEs are left alone.

``IdentityAttentionLoadPuLIDFlux`` gets a PuLID-Flux file in the release's key layout
(``pulid_encoder.*`` IDFormer + ``pulid_ca.N``) sized for the tiny Flux (width ``HIDDEN``, one
module per scheduled block) and for the tiny EVA-CLIP of provisioning_pulid.py (width 32),
under the name the workflow asks for. ``IdentityAttentionLoadFluxIPAdapter`` gets an XLabs Flux IP-Adapter in the release's key layout
for the tiny Flux's double blocks, reading the 768-wide embedding of the tiny ViT-L/14 (the
``CLIPVisionLoader`` swap gives it for ``clip-vit-large-patch14`` names).
``IdentityAttentionLoadInstantXFluxIPAdapter`` gets an InstantX Flux IP-Adapter (the release's nested
``{"image_proj", "ip_adapter"}`` pickle, one projection pair per tiny-Flux block) reading SigLIP's 1152
width, and, when the SigLIP file is missing, one holding only SigLIP's attention-pooling head
(``vision_model.head.*``, 1152 wide): the ``CLIPVisionLoader`` swap gives the tiny SigLIP tower for
``sigclip`` / ``siglip`` names. ``EmptySD3LatentImage``
(Flux's latent) is shrunk like
``EmptyLatentImage``.

:func:`host_skip_reason` says why a Flux workflow cannot run on this host (the early-2024
ComfyUI has no Flux), for the tests and ``make demo`` to skip it with that reason.
"""

from __future__ import annotations

import zlib
from typing import Optional

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


@register("EmptySD3LatentImage")
def _small_latent(node: dict, instance: Instance, context: dict, max_side: int = 64) -> dict:
    for side in ("width", "height"):
        if isinstance(node["inputs"].get(side), int):
            node["inputs"][side] = min(node["inputs"][side], max_side)
    return node


def tiny_pulid_flux_state(seed: int = 0):
    """A PuLID-Flux file for the tiny Flux: the release's keys, IDFormer reading EVA width 32, 48-wide id tokens."""
    from weight_fixtures import prefixed, pulid_v11_layout, random_state

    from testkit import tiny_flux

    from .provisioning_pulid import EVA_WIDTH

    encoder = pulid_v11_layout(dim=64, depth=5, heads=1, num_queries=8, output_dim=48, eva=EVA_WIDTH, hidden=EVA_WIDTH)
    state = prefixed("pulid_encoder.", random_state(encoder, seed=seed))
    dim, kv, inner = tiny_flux.HIDDEN, 48, 32
    layout = {"norm1.weight": (kv,), "norm1.bias": (kv,), "norm2.weight": (dim,), "norm2.bias": (dim,),
              "to_q.weight": (inner, dim), "to_kv.weight": (2 * inner, kv), "to_out.weight": (dim, inner)}
    n_ca = -(-tiny_flux.DEPTH // 2) + -(-tiny_flux.DEPTH_SINGLE // 4)  # every 2nd double, every 4th single block
    for i in range(n_ca):
        state.update(prefixed(f"pulid_ca.{i}.", random_state(layout, seed=seed + 1 + i)))
    return state


@register("IdentityAttentionLoadPuLIDFlux")
def _pulid_flux(node: dict, instance: Instance, context: dict) -> dict:
    from safetensors.torch import save_file

    name = node["inputs"].get("pulid_file")
    if isinstance(name, str) and name:
        path = instance.models / "pulid" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tiny_pulid_flux_state(seed=zlib.crc32(name.encode()) & 0x7FFF), str(path))
    return node


def tiny_xlabs_flux_state(seed: int = 0, embed: int = 768, context: int = 32, tokens: int = 4):
    """XLabs' Flux IP-Adapter keys for the tiny Flux: ``ip_adapter_proj_model.*`` + one k/v pair per double block."""
    import torch

    from testkit import tiny_flux

    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) / shape[-1] ** 0.5  # noqa: E731
    state = {"ip_adapter_proj_model.proj.weight": rand(tokens * context, embed), "ip_adapter_proj_model.proj.bias": 0.1 * rand(tokens * context),
             "ip_adapter_proj_model.norm.weight": 1 + 0.1 * rand(context), "ip_adapter_proj_model.norm.bias": 0.1 * rand(context)}
    for i in range(tiny_flux.DEPTH):
        for kv in ("k", "v"):
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = rand(tiny_flux.HIDDEN, context)
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = 0.1 * rand(tiny_flux.HIDDEN)
    return state


@register("IdentityAttentionLoadFluxIPAdapter")
def _xlabs_flux(node: dict, instance: Instance, context: dict) -> dict:
    from safetensors.torch import save_file

    name = node["inputs"].get("adapter_file")
    if isinstance(name, str) and name:
        path = instance.models / "ipadapter" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tiny_xlabs_flux_state(seed=zlib.crc32(name.encode()) & 0x7FFF), str(path))
    return node


def tiny_instantx_flux_state(seed: int = 0, embed: int = 1152, context: int = 32, tokens: int = 4) -> dict:
    """InstantX's Flux IP-Adapter for the tiny Flux, nested as the release's ``ip-adapter.bin``."""
    import torch

    from testkit import tiny_flux

    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) / shape[-1] ** 0.5  # noqa: E731
    proj = {"proj.0.weight": rand(2 * embed, embed), "proj.0.bias": 0.1 * rand(2 * embed),
            "proj.2.weight": rand(tokens * context, 2 * embed), "proj.2.bias": 0.1 * rand(tokens * context),
            "norm.weight": 1 + 0.1 * rand(context), "norm.bias": 0.1 * rand(context)}
    blocks = {}
    for j in range(tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE):
        blocks[f"{j}.to_k_ip.weight"] = rand(tiny_flux.HIDDEN, context)
        blocks[f"{j}.to_v_ip.weight"] = rand(tiny_flux.HIDDEN, context)
    return {"image_proj": proj, "ip_adapter": blocks}


def tiny_siglip_head_state(seed: int = 0, width: int = 1152, inner: int = 64) -> dict:
    """SigLIP's attention-pooling head (``vision_model.head.*``) at SigLIP's width, small MLP."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) / shape[-1] ** 0.5  # noqa: E731
    p = "vision_model.head."
    return {p + "probe": rand(1, 1, width), p + "attention.in_proj_weight": rand(3 * width, width),
            p + "attention.in_proj_bias": 0.02 * rand(3 * width), p + "attention.out_proj.weight": rand(width, width),
            p + "attention.out_proj.bias": 0.02 * rand(width), p + "layernorm.weight": 1 + 0.05 * rand(width),
            p + "layernorm.bias": 0.02 * rand(width), p + "mlp.fc1.weight": rand(inner, width), p + "mlp.fc1.bias": 0.02 * rand(inner),
            p + "mlp.fc2.weight": rand(width, inner), p + "mlp.fc2.bias": 0.02 * rand(width)}


@register("IdentityAttentionLoadInstantXFluxIPAdapter")
def _instantx_flux(node: dict, instance: Instance, context: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    name = node["inputs"].get("adapter_file")
    if isinstance(name, str) and name:
        path = instance.models / "ipadapter" / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(tiny_instantx_flux_state(seed=zlib.crc32(name.encode()) & 0x7FFF), str(path))
    siglip = node["inputs"].get("siglip_file")
    if isinstance(siglip, str) and siglip:
        path = instance.models / "clip_vision" / siglip
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tiny_siglip_head_state(seed=zlib.crc32(siglip.encode()) & 0x7FFF), str(path))
    return node


def is_flux_workflow(ui: dict) -> bool:
    """Whether a UI workflow needs Flux: a Flux node of ComfyUI or of this pack, or a DualCLIPLoader of type flux."""
    for node in ui.get("nodes", []):
        kind = str(node.get("type", ""))
        if "Flux" in kind or (kind == "DualCLIPLoader" and "flux" in (node.get("widgets_values") or [])):
            return True
    return False


def host_skip_reason(ui: dict) -> Optional[str]:
    """Why this workflow cannot run on the running host, or None (call after the host is importable)."""
    if not is_flux_workflow(ui):
        return None
    from testkit import tiny_flux

    return None if tiny_flux.flux_available() else tiny_flux.SKIP_REASON
