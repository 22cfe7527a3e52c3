"""What the pack knows about DiT model families: blocks, token layout, identity key/value projection.

UNets (SD1.5, SD2, SDXL) attend to the text in separate cross-attention layers (``attn2``),
which nodes/dispatch/dispatcher.py patches. A DiT has no such layer: text and image tokens attend
jointly. Per family:

**Flux.1** (dev / schnell and fine-tunes; ``comfy.ldm.flux.model.Flux``, 19 double + 38
single blocks at full size):

- *double blocks* ``("double_block", i)``: txt ``[B, M, C]`` and img ``[B, N, C]`` streams,
  each with its own modulation (from ``vec`` = timestep + guidance + pooled CLIP), LayerNorm,
  ``qkv`` Linear and RMS QK-norm; one joint attention over ``[txt; img]`` (queries, keys and
  values concatenated in that order, heads ``[B, H, M+N, D]``); each stream keeps its own
  output projection and MLP.
- *single blocks* ``("single_block", i)``: one stream ``[txt; img]`` ``[B, M+N, C]``, one
  modulation, ``linear1`` = qkv and MLP-in side by side, the same joint attention.
- RoPE: 3 axes (index, row, column) over ``txt_ids`` (all zeros) and ``img_ids`` (0, row,
  col of each 2x2 patch, row-major over the padded latent ``ceil(h/2) x ceil(w/2)``); RoPE is
  applied to q and k before the host's ``optimized_attention``. Reference latents (Kontext)
  follow the image tokens.

Identity tokens on Flux (PVA's idea, :func:`identity_key_value`): the tokens live in the text
context's space (T5 width, 4096), enter through the model's ``txt_in`` and are projected by
each block's *text-side* modulation, norm, ``qkv`` and key norm (double blocks: the ``txt_*``
modules; single blocks: ``pre_norm``, ``modulation``, the qkv part of ``linear1``, ``norm``),
exactly as a prompt token of that block would be. Choices the paper leaves open:

- positions: the text tokens' position (all zeros, as Flux gives every text token); RoPE at
  position 0 is the identity rotation, so the keys need no rotation;
- the tokens are key/value-only: they are not queries and not updated from block to block
  (each block projects ``txt_in(tokens)``), as on UNets where every layer projects the same
  identity tokens;
- only image queries attend to them; text queries keep their unpatched attention, so the
  prompt tokens themselves are not rewritten by the identity (on UNets text is never a query).

Which stage acts where: every stage written for the DiT path acts in every double and single
block (its ``schedule.layers`` filter takes these block keys). Families not listed here
(SD3.5 MMDiT, HiDream, Qwen-Image, Chroma, Flux.2) are refused with a clear error until a
layout is written for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

FLUX = "flux"

DitBlockKey = Tuple[str, int]  # ("double_block", i) / ("single_block", i): ComfyUI's patches_replace["dit"] keys

FAMILY_NAMES = {"sd15": "SD1.5", "sd2": "SD2", "sdxl": "SDXL", FLUX: "Flux.1"}

# Which nodes that patch a MODEL work on which family (the README "Model families" table is checked
# against it, tests/test_dit_families.py). "yes" works; anything else is the reason the node refuses a
# Flux MODEL (input_guard runs :func:`check_model_family` before the node's code).
YES = "yes"
UNET_ONLY = "UNet-only: "
NOT_YET = "not yet on DiT: "
DIT_NODES = {
    "IdentityAttentionApplyParallelAttention": {"unet": YES, FLUX: YES},
    "IdentityAttentionApplyFaceAdapter": {"unet": YES, FLUX: UNET_ONLY + "FACT's gated self-attention sits between a UNet block's self- and cross-attention; a joint DiT block has no such place"},
    "IdentityAttentionApplyStageTokens": {"unet": YES, FLUX: UNET_ONLY + "the token sets are per UNet resolution stage (down / middle / up); a DiT has one resolution"},
    "IdentityAttentionApplyInstantIDIdentityNet": {"unet": YES, FLUX: UNET_ONLY + "IdentityNet is a ControlNet of the SDXL UNet"},
    "IdentityAttentionApplySTFG": {"unet": YES, FLUX: NOT_YET + "its guidance reads UNet cross-attention maps"},
    "IdentityAttentionInspectSTFGBoundary": {"unet": YES, FLUX: NOT_YET + "its guidance reads UNet cross-attention maps"},
    "IdentityAttentionApplyKVMixedAttention": {"unet": YES, FLUX: YES},
    "IdentityAttentionApplyNestedAttention": {"unet": YES, FLUX: YES},
    "IdentityAttentionApplyMixtureOfAttention": {"unet": YES, FLUX: YES},
    "IdentityAttentionInspectRouter": {"unet": YES, FLUX: YES},
    "IdentityAttentionApplyCA2Gate": {"unet": YES, FLUX: YES},
    "IdentityAttentionInspectCA2Scores": {"unet": YES, FLUX: YES},
    "IdentityAttentionPersonalizeIdentity": {"unet": YES, FLUX: NOT_YET + "it fine-tunes PVA's visual projections of UNet cross-attention layers, which Flux has none of; on Flux the command-line trainer's pva target trains the identity transformer (nodes/training/flux_training.py)"},
    "IdentityAttentionApplyPuLIDFlux": {"unet": "no: PuLID-Flux's modules are made for Flux.1's blocks (the node refuses UNets)", FLUX: YES},
    "IdentityAttentionApplyFluxIPAdapter": {"unet": "no: XLabs' projections are made for Flux.1's double blocks (the node refuses UNets)", FLUX: YES},
    "IdentityAttentionApplyInstantXFluxIPAdapter": {"unet": "no: InstantX's projections are made for Flux.1's 19 + 38 blocks (the node refuses UNets)", FLUX: YES},
}

# README "Model families" rows -> the nodes each row stands for
README_ROWS = {
    "Apply parallel visual attention": ("IdentityAttentionApplyParallelAttention",),
    "Apply face adapter (FACT)": ("IdentityAttentionApplyFaceAdapter",),
    "Apply per-stage identity tokens": ("IdentityAttentionApplyStageTokens",),
    "Apply InstantID IdentityNet": ("IdentityAttentionApplyInstantIDIdentityNet",),
    "Apply STFG guidance / Inspect STFG boundary": ("IdentityAttentionApplySTFG", "IdentityAttentionInspectSTFGBoundary"),
    "Apply KV-mixed attention": ("IdentityAttentionApplyKVMixedAttention",),
    "Apply nested attention": ("IdentityAttentionApplyNestedAttention",),
    "Apply mixture-of-attention / Inspect router": ("IdentityAttentionApplyMixtureOfAttention", "IdentityAttentionInspectRouter"),
    "Apply CA\u00b2 gate / Inspect CA\u00b2 scores": ("IdentityAttentionApplyCA2Gate", "IdentityAttentionInspectCA2Scores"),
    "Personalize identity": ("IdentityAttentionPersonalizeIdentity",),
    "Apply PuLID-Flux": ("IdentityAttentionApplyPuLIDFlux",),
    "Apply Flux IP-Adapter (XLabs)": ("IdentityAttentionApplyFluxIPAdapter",),
    "Apply Flux IP-Adapter (InstantX)": ("IdentityAttentionApplyInstantXFluxIPAdapter",),
}


def require_flux(model, node: str, made_for: str, fix: str) -> None:
    """Refuse a MODEL that is not Flux.1 for a Flux-only node: "<made_for>; this MODEL is not a Flux.1 model"."""
    from .errors import IdentityAttentionError

    if dit_family(model) != FLUX:
        raise IdentityAttentionError(f"{made_for}; this MODEL is not a Flux.1 model", node=node, input_name="model", fix=fix)


def check_model_family(node_id: str, model, node: str, input_name: str = "model") -> None:
    """Refuse a DiT MODEL for a node :data:`DIT_NODES` does not mark as working on it (one clear error)."""
    from .errors import IdentityAttentionError

    entry = DIT_NODES.get(node_id)
    if entry is None:
        return  # nodes that only read a MODEL (model info, token tools) take any model
    family = dit_family(model)
    if family is None:
        if is_unknown_dit(model):
            raise IdentityAttentionError(
                "this MODEL is a transformer (DiT) this pack has no layout for (only Flux.1 among DiTs so far)",
                node=node, input_name=input_name, fix="use an SD1.5, SD2, SDXL or Flux.1 model",
            )
        return
    status = entry.get(family, NOT_YET)
    if status != YES:
        raise IdentityAttentionError(
            f"this node does not work on {FAMILY_NAMES[family]}: {status}",
            node=node, input_name=input_name, fix="use an SD1.5, SD2 or SDXL model, or on Flux use Apply parallel visual attention (joint)",
        )


@dataclass(frozen=True)
class DitBlock:
    """One block of a DiT: its ComfyUI replace key and module."""

    key: DitBlockKey
    module: torch.nn.Module

    @property
    def kind(self) -> str:
        return self.key[0]


def _flux_model(model_patcher):
    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        return None
    cls = type(diffusion_model)
    if cls.__name__ != "Flux" or not cls.__module__.startswith("comfy.ldm.flux"):
        return None
    if not (hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")):
        return None
    if getattr(getattr(diffusion_model, "params", None), "global_modulation", False):
        return None  # Flux.2: shared modulation, another layout
    return diffusion_model


def dit_family(model_patcher) -> Optional[str]:
    """"flux" for a Flux.1-family MODEL, None for UNets and DiTs without a layout here."""
    return FLUX if _flux_model(model_patcher) is not None else None


def is_unknown_dit(model_patcher) -> bool:
    """A transformer model the pack has no layout for (no UNet cross-attention, not Flux.1)."""
    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if diffusion_model is None or dit_family(model_patcher) is not None:
        return False
    return not any(type(m).__name__ == "BasicTransformerBlock" for m in diffusion_model.modules())


def dit_blocks(model_patcher) -> List[DitBlock]:
    """Every joint-attention block in forward order: double blocks, then single blocks."""
    net = _flux_model(model_patcher)
    if net is None:
        return []
    return [DitBlock(("double_block", i), b) for i, b in enumerate(net.double_blocks)] + [
        DitBlock(("single_block", i), b) for i, b in enumerate(net.single_blocks)
    ]


def context_width(model_patcher) -> int:
    """The text context width the model's ``txt_in`` takes (4096 for Flux.1's T5-XXL)."""
    return int(_flux_model(model_patcher).txt_in.weight.shape[1])


def identity_hidden(model_patcher, tokens: torch.Tensor) -> torch.Tensor:
    """``txt_in(tokens)``: ``[n, T, context] -> [n, T, hidden]`` on the model's device and dtype."""
    txt_in = _flux_model(model_patcher).txt_in
    return txt_in(tokens.to(device=txt_in.weight.device, dtype=txt_in.weight.dtype))


def identity_key_value(block: DitBlock, hidden: torch.Tensor, vec: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Identity keys and values of one block, as a text token of that block would get them.

    ``hidden`` ``[B, T, C]`` (``txt_in`` output, one row per batch row); ``vec`` ``[B, C]`` (the
    block's modulation input). Returns ``k, v`` ``[B, H, T, D]`` (keys after the block's key
    norm; position 0, so no rotation).
    """
    m = block.module
    hidden = hidden.to(vec.dtype)
    if block.kind == "double_block":
        mod, _ = m.txt_mod(vec)
        x = torch.addcmul(mod.shift, m.txt_norm1(hidden), 1 + mod.scale)
        qkv = m.txt_attn.qkv(x)
        key_norm = m.txt_attn.norm.key_norm
    else:
        mod, _ = m.modulation(vec)
        x = torch.addcmul(mod.shift, m.pre_norm(hidden), 1 + mod.scale)
        qkv = m.linear1(x)[..., : 3 * m.hidden_size]
        key_norm = m.norm.key_norm
    b, t = qkv.shape[:2]
    _, k, v = qkv.view(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return key_norm(k).to(v), v
