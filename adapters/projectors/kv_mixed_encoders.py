"""VisualComposer's two encoders: a key encoder with a small bottleneck, a value encoder with a large one.

VisualComposer (Parmar et al., arXiv 2501.01424, §3; no public code or weights) derives the keys
and values of a visual prompt from *different encoders of the same input*::

    E_key   = Enc_coarse(f)    small bottleneck  -> layout / pose stay free
    E_value = Enc_fine(f)      large bottleneck  -> appearance detail
    K = W_k E_key,  V = W_v E_value                              # per cross-attention layer
    out = text_out + w * softmax(s q K^T) V,   s = 1/sqrt(d)     # this pack: the decoupled branch

Token ``j`` of the keys and token ``j`` of the values come from the same features through two
encoders trained together, so their pairing is meaningful (unlike keys and values taken from
two unrelated adapters).

:class:`KVMixedEncoder` is a :class:`TokenProjector` whose tokens are ``[N, 2T, D]`` = the ``T``
key tokens followed by the ``T`` value tokens (:func:`split_key_value` separates them again);
``num_tokens`` is ``2T``. An adapter made of it has ``mechanism = "kv_mixed"`` and per layer
``to_k`` / ``to_v`` ``[C, D]`` (``nodes/training/kv_mixed_training.py`` trains both, "Apply KV-mixed
attention" reads them).

Choices the paper leaves open (or that could not be read from it), made here:

- input: one identity vector per photo (``input_kind``: ``arcface_normed`` by default, or
  ``arcface`` / ``clip_embeds``), the features the training folder caches; several reference
  photos are averaged first (the pack's "fused" identity);
- each encoder is ``Linear(E, b) -> GELU -> Linear(b, T*D) -> LayerNorm(D)``: the bottleneck
  ``b`` is the hidden width, small for keys (default 32) and large for values (default 1024),
  the paper's "small" / "large bottleneck" read as the width of the code every token is made
  from;
- the keys and values join the layer as a separate softmax added to the text attention
  (IP-Adapter's decoupled form, ``weight`` 1 in training), since whether the paper's tokens join
  the text context could not be read from it.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures

VECTOR_INPUTS = ("arcface_normed", "arcface", "clip_embeds")


def _vector_input(features: IdentityFeatures, kind: str) -> torch.Tensor:
    x = getattr(features, kind, None)
    if x is None:
        raise ValueError(f"the KV-mixed encoders read '{kind}' features, which this identity does not have")
    return x.reshape(x.shape[0], -1)


class BottleneckEncoder(nn.Module):
    """``[N, E] -> [N, T, D]``: ``LayerNorm(Linear(b, T*D)(GELU(Linear(E, b)(x))))`` (``b`` = the bottleneck)."""

    def __init__(self, in_dim: int, bottleneck: int, num_tokens: int, token_dim: int):
        super().__init__()
        self.num_tokens, self.token_dim = int(num_tokens), int(token_dim)
        self.down = nn.Linear(int(in_dim), int(bottleneck))
        self.up = nn.Linear(int(bottleneck), self.num_tokens * self.token_dim)
        self.norm = nn.LayerNorm(self.token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(F.gelu(self.down(x)))
        return self.norm(h.reshape(x.shape[0], self.num_tokens, self.token_dim))


class KVMixedEncoder(TokenProjector):
    """Key tokens (small bottleneck) then value tokens (large bottleneck): ``[N, 2T, D]`` (module docstring)."""

    def __init__(self, in_dim: int = 512, token_dim: int = 768, tokens: int = 4, key_bottleneck: int = 32, value_bottleneck: int = 1024, input_kind: str = "arcface_normed"):
        super().__init__()
        if input_kind not in VECTOR_INPUTS:
            raise ValueError(f"KV-mixed encoders read one of {', '.join(VECTOR_INPUTS)}, not {input_kind!r}")
        self.config = dict(in_dim=int(in_dim), token_dim=int(token_dim), tokens=int(tokens), key_bottleneck=int(key_bottleneck), value_bottleneck=int(value_bottleneck), input_kind=input_kind)
        self.input_kind = input_kind
        self.pair_tokens = int(tokens)
        self.num_tokens = 2 * self.pair_tokens
        self.token_dim = int(token_dim)
        self.key_encoder = BottleneckEncoder(in_dim, key_bottleneck, tokens, token_dim)
        self.value_encoder = BottleneckEncoder(in_dim, value_bottleneck, tokens, token_dim)

    def encode(self, features: IdentityFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(E_key, E_value)``, ``[N, T, D]`` each."""
        x = _vector_input(features, self.input_kind).to(self.key_encoder.down.weight.dtype)
        return self.key_encoder(x), self.value_encoder(x)

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        keys, values = self.encode(features)
        return torch.cat([keys, values], dim=1)


def split_key_value(tokens: torch.Tensor, pair_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, R*2T, D]`` (R reference sets of ``[keys; values]``) -> key and value tokens ``[B, R*T, D]`` each."""
    b, n, d = tokens.shape
    if pair_tokens <= 0 or n % (2 * pair_tokens):
        raise ValueError(f"{n} KV-mixed tokens are not whole sets of {pair_tokens} keys + {pair_tokens} values")
    sets = tokens.reshape(b, n // (2 * pair_tokens), 2 * pair_tokens, d)
    return sets[:, :, :pair_tokens].reshape(b, -1, d), sets[:, :, pair_tokens:].reshape(b, -1, d)
