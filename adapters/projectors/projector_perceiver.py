"""Perceiver resamplers: a few learned queries attend to many input tokens.

Used, with different inputs, by IP-Adapter plus / plus-face (CLIP-vision hidden
states), InstantID (the ArcFace embedding as one token), FaceChain-FACT (the
144 TransFace patch tokens), IP-Adapter FaceID-Plus (queries made from the
ArcFace embedding, see ``projector_mlp.FaceIDPlusProjection``) and PuLID v1.1.

Parameter names follow the released checkpoints so their state dicts load
unchanged (``latents``, ``proj_in``, ``proj_out``, ``norm_out``,
``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}``, ``layers.<i>.1.{0,1,3}``).

One layer, for latents ``L`` ``[B, Q, dim]`` and inputs ``X`` ``[B, M, dim]``::

    q  = to_q(norm2(L))                         # [B, Q, H*dh]
    k, v = to_kv(cat([norm1(X), norm2(L)]))     # keys/values over inputs AND latents: [B, M+Q, H*dh]
    L  = L + to_out(softmax(q k^T / sqrt(dh)) v)
    L  = L + W2 gelu(W1 LN(L))                  # feed-forward, no biases

The head width ``dh`` is not stored in a checkpoint; every released resampler
uses 64, so ``heads = to_q.out_features / 64`` (``DIM_HEAD``).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
from einops import rearrange
from torch import nn

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures
from ..weights.weight_errors import ProjectorInputError, WeightError

DIM_HEAD = 64


def softmax_stable(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis in at least float32 (half precision overflows), back to the input dtype."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[inputs; latents]``. ``forward(x [B,M,dim], latents [B,Q,dim]) -> [B,Q,dim]``."""

    def __init__(self, dim: int, dim_head: int = DIM_HEAD, heads: int = 8):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        probs = softmax_stable(torch.einsum("bhqd,bhkd->bhqk", q, k) * self.dim_head**-0.5)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (indices 0, 1, 3)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


def perceiver_layers(dim: int, depth: int, heads: int, ff_mult: float, dim_head: int = DIM_HEAD) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
    )


def run_layers(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    for attention, ff in layers:
        latents = attention(x, latents) + latents
        latents = ff(latents) + latents
    return latents


def layer_shapes(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, int]:
    """depth, heads and ff_mult of the perceiver layers stored under ``prefix`` (e.g. "perceiver_resampler.")."""
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.0\.to_q\.weight$")
    indices = sorted(int(m.group(1)) for m in (pattern.match(k) for k in state) if m)
    if not indices or indices != list(range(len(indices))):
        raise WeightError(f"the resampler's layers under '{prefix}layers.' are missing or not numbered 0..N-1")
    to_q = state[f"{prefix}layers.0.0.to_q.weight"]
    ff_in = state[f"{prefix}layers.0.1.1.weight"]
    dim = to_q.shape[1]
    return {"depth": len(indices), "heads": to_q.shape[0] // DIM_HEAD, "ff_mult": ff_in.shape[0] / dim}


def read_input(features: IdentityFeatures, kind: str, projector: str) -> torch.Tensor:
    """The IdentityFeatures field ``kind``, or an error that says which encoder output is missing."""
    value = getattr(features, kind, None)
    if value is None:
        what = {
            "clip_hidden": "CLIP-vision hidden states (connect a CLIP_VISION model to the Encode identity node)",
            "clip_embeds": "CLIP-vision image embeds (connect a CLIP_VISION model to the Encode identity node)",
            "face_tokens": "TransFace patch tokens of the face crops (FACT's face encoder)",
        }.get(kind, kind)
        raise ProjectorInputError(
            f"the {projector} token projector needs {what}, and this IDENTITY has none",
            fix="encode the identity again with the missing input connected",
        )
    return value


class PerceiverResampler(TokenProjector):
    """Learned queries -> ``num_queries`` tokens of ``output_dim``.

    ``input_kind``: "clip_hidden" (IP-Adapter plus / plus-face: ``[N, 257, 1280]``
    penultimate CLIP ViT-H states), "arcface" (InstantID: the RAW ArcFace
    embedding ``[N, 512]``, used as one token, as InstantID's pipeline passes
    insightface's ``face_info['embedding']``), or "face_tokens" (FACT:
    ``[N, 144, 512]`` TransFace patch tokens).
    Output: ``[N, num_queries, output_dim]``.
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 4,
        heads: int = 12,
        num_queries: int = 16,
        embedding_dim: int = 1280,
        output_dim: int = 768,
        ff_mult: float = 4,
        input_kind: str = "clip_hidden",
    ):
        super().__init__()
        self.config = dict(
            dim=dim, depth=depth, heads=heads, num_queries=num_queries, embedding_dim=embedding_dim,
            output_dim=output_dim, ff_mult=ff_mult, input_kind=input_kind,
        )
        self.input_kind = input_kind
        self.num_tokens = num_queries
        self.token_dim = output_dim
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, heads, ff_mult)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], input_kind: str) -> dict:
        latents = state["latents"]
        return dict(
            dim=latents.shape[2], num_queries=latents.shape[1], embedding_dim=state["proj_in.weight"].shape[1],
            output_dim=state["proj_out.weight"].shape[0], input_kind=input_kind, **layer_shapes(state),
        )

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, M, embedding_dim]`` (or ``[N, embedding_dim]``, one token) -> ``[N, num_queries, output_dim]``."""
        if x.dim() == 2:
            x = x[:, None, :]
        x = self.proj_in(x)
        latents = run_layers(self.layers, x, self.latents.expand(x.shape[0], -1, -1))
        return self.norm_out(self.proj_out(latents))

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        return self.resample(read_input(features, self.input_kind, "Perceiver resampler"))


class FacePerceiverResampler(nn.Module):
    """FaceID-Plus's resampler: the queries come from outside (the ArcFace tokens).

    ``forward(latents [N, T, dim], x [N, M, embedding_dim]) -> [N, T, output_dim]``.
    """

    def __init__(self, dim: int = 768, depth: int = 4, heads: int = 12, embedding_dim: int = 1280, output_dim: int = 768, ff_mult: float = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = perceiver_layers(dim, depth, heads, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        latents = run_layers(self.layers, self.proj_in(x), latents)
        return self.norm_out(self.proj_out(latents))
