"""XLabs' Flux IP-Adapter (XLabs-AI/flux-ip-adapter ``ip_adapter.safetensors``): the math, pure torch.

The release (x-flux ``IPDoubleStreamBlockProcessor``, ``ImageProjModel``):

- image projection ``ip_adapter_proj_model.{proj,norm}``: CLIP ViT-L/14's image embedding
  ``[B, 768]`` -> Linear -> ``[B, T, 4096]`` (T = 4 tokens) -> LayerNorm;
- per double block i ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj`` (Linear
  4096 -> 3072, with bias): keys and values of the image tokens, split into the block's heads;
- the image queries of that block (its own ``img_mod`` modulation, ``img_norm1``, ``img_attn.qkv``
  and query RMS-norm; *before* RoPE, as the official code takes ``img_q`` before ``attention``
  rotates it) attend to them: ``softmax(q K^T / sqrt(D)) V`` -> ``[B, N, H*D]``, no output projection;
- ``img = block(img, ...)["img"] + ip_scale * that``: added to the block's image output, after its
  MLP, ungated. Single blocks are untouched (the released file has no single-block keys).

The negative side of the official true-CFG sampler gets the projection of a black image's embedding
(``neg_image_prompt`` defaults to zeros) at ``neg_ip_scale`` (default 1, as ``ip_scale``).

InstantX's Flux IP-Adapter (``ip-adapter.bin``) is read by adapters/flux/instantx_flux_ip_adapter.py;
:func:`is_instantx_flux` lets the other loaders point to its nodes.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.weight_errors import WeightError

PROJ_PREFIX = "ip_adapter_proj_model."
BLOCK_KEY = re.compile(r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)$")
MAX_BLOCKS = 256  # bounded walk over a file's block numbers (Flux.1 has 19)
FIX_DOWNLOAD = "download ip_adapter.safetensors from XLabs-AI/flux-ip-adapter again; this one is damaged or another format"


def is_xlabs_flux(keys) -> bool:
    """XLabs' key layout: per-double-block ``ip_adapter_double_stream_k_proj`` and ``ip_adapter_proj_model.*``."""
    keys = list(keys)
    return any(BLOCK_KEY.match(k) for k in keys) and any(k.startswith(PROJ_PREFIX) for k in keys)


def is_instantx_flux(tensors: Mapping[str, torch.Tensor]) -> bool:
    """InstantX's Flux IP-Adapter (adapters/flux/instantx_flux_ip_adapter.py reads it)."""
    from .instantx_flux_ip_adapter import is_instantx_flux as detect

    return detect(tensors)


def instantx_refusal() -> WeightError:
    """The one error for InstantX's Flux IP-Adapter where another loader is given it."""
    return WeightError(
        "this is InstantX's Flux IP-Adapter (image_proj reading SigLIP features, ip_adapter.N.to_k_ip on every Flux block), "
        "not XLabs' or a UNet identity adapter",
        fix="load it with 'Load Flux IP-Adapter (InstantX)' (with the SigLIP file) and connect it to "
        "'Apply Flux IP-Adapter (InstantX)' with a Flux.1 model",
    )


class ImageProjection(nn.Module):
    """``forward(embeds [B, E]) -> [B, T, C]``: Linear to T*C, reshape, LayerNorm (IP-Adapter's ImageProjModel)."""

    def __init__(self, embed_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.context_dim, self.num_tokens = context_dim, num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.context_dim))


class ImageKeyValue(nn.Module):
    """One double block's ``k_proj`` / ``v_proj`` (Linear C -> hidden, with bias)."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.k_proj = nn.Linear(context_dim, hidden)
        self.v_proj = nn.Linear(context_dim, hidden)


def image_prompt_attention(kv: ImageKeyValue, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``q`` ``[B, H, N, D]`` (the block's image queries, QK-normed, no RoPE), ``tokens`` ``[B, T, C]`` ->
    ``[B, N, H*D]``: ``softmax(q K^T / sqrt(D)) V`` over the image-prompt tokens."""
    b, h, n, d = q.shape
    k = kv.k_proj(tokens).view(b, -1, h, d).transpose(1, 2)
    v = kv.v_proj(tokens).view(b, -1, h, d).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype)).transpose(1, 2).reshape(b, n, h * d)


class XLabsFluxIPAdapter(nn.Module):
    """A loaded XLabs Flux IP-Adapter: ``image_proj`` and ``blocks[i]`` for double block i."""

    def __init__(self, image_proj: ImageProjection, blocks: nn.ModuleList):
        super().__init__()
        self.image_proj, self.blocks = image_proj, blocks

    @property
    def embed_dim(self) -> int:
        return self.image_proj.proj.in_features

    @property
    def hidden(self) -> int:
        return self.blocks[0].k_proj.out_features

    def check_model(self, n_double: int, hidden_size: int, heads: int) -> None:
        """Raise :class:`WeightError` when this file does not fit a Flux with these double blocks, width and heads."""
        if len(self.blocks) != n_double or self.hidden != hidden_size or hidden_size % heads:
            raise WeightError(
                f"this Flux IP-Adapter has {len(self.blocks)} double-block projections of width {self.hidden}; the model has "
                f"{n_double} double blocks of width {hidden_size}",
                fix="use it with FLUX.1-dev (or a fine-tune of it): XLabs' file is made for Flux.1's 19 double blocks of width 3072",
            )

    def tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` CLIP image embeddings -> ``[B, T, C]`` image-prompt tokens."""
        if image_embeds.dim() != 2 or image_embeds.shape[1] != self.embed_dim:
            raise WeightError(
                f"the image embedding is {tuple(image_embeds.shape)}, the adapter reads [batch, {self.embed_dim}]",
                fix="load CLIP ViT-L/14 (openai/clip-vit-large-patch14) in 'Load CLIP Vision': XLabs' adapter reads its 768-wide embedding",
            )
        p = self.image_proj.proj.weight
        return self.image_proj(image_embeds.to(p.device, p.dtype))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "XLabsFluxIPAdapter":
        if not is_xlabs_flux(state):
            if is_instantx_flux(state):
                raise instantx_refusal()
            raise WeightError("this file has no 'double_blocks.N.processor.ip_adapter_double_stream_*' and "
                              "'ip_adapter_proj_model.*' tensors, so it is not XLabs' Flux IP-Adapter",
                              fix="pick ip_adapter.safetensors from XLabs-AI/flux-ip-adapter (models/ipadapter)")
        need = [PROJ_PREFIX + k for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")]
        missing = [k for k in need if k not in state]
        if missing:
            raise WeightError(f"XLabs' Flux IP-Adapter file lacks {missing}", fix=FIX_DOWNLOAD)
        proj_w, norm_w = state[PROJ_PREFIX + "proj.weight"], state[PROJ_PREFIX + "norm.weight"]
        context = int(norm_w.shape[0])
        if proj_w.dim() != 2 or context == 0 or proj_w.shape[0] % context:
            raise WeightError(f"the image projection {tuple(proj_w.shape)} does not make tokens of width {context}", fix=FIX_DOWNLOAD)
        image_proj = ImageProjection(int(proj_w.shape[1]), context, int(proj_w.shape[0]) // context)
        image_proj.load_state_dict({k[len(PROJ_PREFIX):]: state[k] for k in need})
        found = {}
        for key in state:
            m = BLOCK_KEY.match(key)
            if m:
                found.setdefault(int(m.group(1)), {})[f"{m.group(2)}_proj.{m.group(3)}"] = state[key]
        indices = sorted(found)
        if indices != list(range(len(indices))) or len(indices) > MAX_BLOCKS:
            raise WeightError("the double-block projections are not numbered 0..N-1", fix=FIX_DOWNLOAD)
        blocks = []
        for i in indices:
            part = found[i]
            if len(part) != 4 or part["k_proj.weight"].shape != part["v_proj.weight"].shape or part["k_proj.weight"].shape[1] != context:
                raise WeightError(f"double block {i}'s k/v projections are incomplete or do not read width {context}", fix=FIX_DOWNLOAD)
            kv = ImageKeyValue(context, int(part["k_proj.weight"].shape[0]))
            kv.load_state_dict(part)
            blocks.append(kv)
        return cls(image_proj, nn.ModuleList(blocks)).to(proj_w.dtype)
