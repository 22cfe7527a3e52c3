"""A small query-former: ``T`` learned queries attend over identity features -> ``[1 or N, T, D]`` tokens.

Used by two mechanisms whose encoders have no public weights (both trained by this pack's trainer):

- **Nested Attention** (Patashnik et al., arXiv 2501.01407): "a Q-Former over CLIP image features"
  makes the subject tokens ``e`` the per-layer nested projections read (``Kn = W_Kn e``,
  ``Vn = W_Vn e``; ``nodes/training/nested_training.py``).
- **Omni-ID** (Qian et al., CVPR 2025, arXiv 2412.09694): a *set encoder*: each of ``M`` photos
  gives tokens ``l_i`` ``[L, E]``; all are concatenated, ``z = [l_1; ...; l_M]`` ``[M*L, E]``, and
  learned queries cross-attend to ``z``, giving a fixed-size structured representation
  ``[T, D]`` whatever ``M`` is (``reads_set = True``; ``nodes/training/omni_id_training.py``).

Architecture (the papers give none; chosen here, a Perceiver-resampler-style block as
IP-Adapter Plus uses, small by default)::

    x  = proj_in(features)                          # [B, L, dim]; a vector feature is one token
    q  = queries                                     # [T, dim], learned
    for each of depth blocks:
        kv = [norm_x(x) ; norm_q(q)]                 # queries also see each other (Q-Former's self-attention)
        q  = q + to_out(MHA(to_q(norm_q(q)), to_k(kv), to_v(kv)))    # heads of dim/heads, scale 1/sqrt(dim/heads)
        q  = q + ff2(gelu(ff1(norm_ff(q))))          # ff width 4*dim
    out = norm_out(proj_out(q))                      # [B, T, token_dim]

Inputs (``input_kind``): ``arcface_normed`` / ``arcface`` / ``clip_embeds`` (one vector per photo,
one token), ``clip_hidden`` (CLIP-vision hidden states, ``[L, Dh]`` per photo), ``face_tokens``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures

INPUT_KINDS = ("arcface_normed", "arcface", "clip_embeds", "clip_hidden", "face_tokens")


def feature_tokens(features: IdentityFeatures, kind: str) -> torch.Tensor:
    """``[N, L, E]`` tokens of one feature kind (a vector feature ``[N, E]`` becomes ``[N, 1, E]``)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"unknown input kind {kind!r}; known: {', '.join(INPUT_KINDS)}")
    x = getattr(features, kind, None)
    if x is None:
        raise ValueError(f"this encoder reads '{kind}' features, which this identity does not have")
    return x[:, None] if x.dim() == 2 else x


class QueryBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = int(heads)
        self.norm_x = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b, t, dim = q.shape
        qn = self.norm_q(q)
        kv = torch.cat([self.norm_x(x), qn], dim=1)
        h, d = self.heads, dim // self.heads

        def split(y):
            return y.reshape(b, y.shape[1], h, d).transpose(1, 2)

        scores = split(self.to_q(qn)) @ split(self.to_k(kv)).transpose(-1, -2) / math.sqrt(d)
        att = (scores.softmax(dim=-1) @ split(self.to_v(kv))).transpose(1, 2).reshape(b, t, dim)
        q = q + self.to_out(att)
        return q + self.ff2(F.gelu(self.ff1(self.norm_ff(q))))


class QueryFormer(TokenProjector):
    """``T`` learned queries over identity features (module docstring). ``reads_set``: all photos as one set."""

    def __init__(self, in_dim: int = 512, dim: int = 256, token_dim: int = 768, tokens: int = 4, depth: int = 2, heads: int = 4, input_kind: str = "arcface_normed", reads_set: bool = False):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"unknown input kind {input_kind!r}; known: {', '.join(INPUT_KINDS)}")
        if int(dim) % int(heads):
            raise ValueError(f"the query-former width {dim} is not a multiple of its {heads} heads")
        self.config = dict(in_dim=int(in_dim), dim=int(dim), token_dim=int(token_dim), tokens=int(tokens), depth=int(depth), heads=int(heads), input_kind=input_kind, reads_set=bool(reads_set))
        self.input_kind = input_kind
        self.reads_set = bool(reads_set)
        self.num_tokens, self.token_dim = int(tokens), int(token_dim)
        self.proj_in = nn.Linear(int(in_dim), int(dim))
        self.queries = nn.Parameter(torch.randn(int(tokens), int(dim)) / math.sqrt(int(dim)))
        self.blocks = nn.ModuleList([QueryBlock(int(dim), int(heads)) for _ in range(int(depth))])
        self.proj_out = nn.Linear(int(dim), int(token_dim))
        self.norm_out = nn.LayerNorm(int(token_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, in_dim]`` -> ``[B, T, token_dim]``."""
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(x, q)
        return self.norm_out(self.proj_out(q))

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        """Per item ``[N, T, D]``; with ``reads_set`` every item's tokens form one set: ``[1, T, D]``."""
        x = feature_tokens(features, self.input_kind)
        if self.reads_set:
            x = x.reshape(1, -1, x.shape[-1])
        return self.encode(x)
