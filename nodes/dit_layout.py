"""What the pack knows about DiT model families: blocks, token layout, identity key/value projection.

UNets (SD1.5, SD2, SDXL) attend to the text in separate cross-attention layers (``attn2``),
which nodes/dispatcher.py patches. A DiT has no such layer: text and image tokens attend
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

# Which nodes work on which model family (the README "Model families" table is checked against it).
# "yes": works; "unet-only": refuses a DiT MODEL with an error saying so.
DIT_NODES = {
    "IdentityAttentionApplyParallelAttention": {"unet": "yes", FLUX: "yes (joint mode, layer projections)"},
    "IdentityAttentionApplyFaceAdapter": {"unet": "yes", FLUX: "unet-only"},
}


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
