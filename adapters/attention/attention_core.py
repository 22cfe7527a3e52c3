"""Shared attention arithmetic for every mechanism.

Layout convention (the one ComfyUI's attn2 replace receives): ``q`` is
``[B, N, H*D]`` (N image tokens), ``k`` / ``v`` are ``[B, M, H*D]`` (M context
tokens), ``heads`` is H. Outputs are ``[B, N, H*D]`` before the layer's
``to_out``.

``AttentionFn`` is the signature of ComfyUI's ``optimized_attention``:
``fn(q, k, v, heads) -> out``; ``nodes/`` injects the host's function (SDPA,
xformers, sub-quadratic...), tests inject :func:`reference_attention`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


# The per-call reshapes below run at every attn2 call of every step: plain torch views, with the
# einops pattern they implement in the docstring (einops' own per-call dispatch costs ~15 us,
# as much as a small layer's arithmetic on a CPU).


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``b n (h d) -> b h n d``: ``[B, N, H*D] -> [B, H, N, D]`` (a view)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``b h n d -> b n (h d)``: ``[B, H, N, D] -> [B, N, H*D]``."""
    return x.transpose(1, 2).flatten(-2)


def token_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``b n (h d) -> b n h d``: ``[B, N, H*D] -> [B, N, H, D]`` (a view)."""
    return x.unflatten(-1, (heads, -1))


def sdpa_token_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """SDPA on token-major heads: ``[B, N, H, Dq], [B, M, H, Dq], [B, M, H, Dv] -> [B, N, H, Dv]``.

    ``bias`` broadcasts to ``[B, H, N, M]``; ``scale`` defaults to ``1/sqrt(Dq)``. Inputs and
    output are views of ``b h n d`` tensors, which is what SDPA's kernels take.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale)
    return out.transpose(1, 2)


def attention_logits(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled logits ``Q K^T / sqrt(D)``: ``[B, N, H*D], [B, M, H*D] -> [B, H, N, M]``."""
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    return torch.einsum("bhnd,bhmd->bhnm", qh, kh) * (qh.shape[-1] ** -0.5)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(D))`` per head: ``[B, H, N, M]``.

    Materialises the full map: use it only where a mechanism needs the
    probabilities themselves (maps, routers, boundary detection), at the
    low-resolution layers.
    """
    logits = attention_logits(q, k, heads)
    return logits.float().softmax(dim=-1).to(q.dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain ``softmax(Q K^T / sqrt(D)) V`` in the input dtype: ``[B, N, H*D]``.

    The readable definition every optimised path is tested against.
    """
    probs = attention_logits(q, k, heads).softmax(dim=-1)
    return merge_heads(torch.einsum("bhnm,bhmd->bhnd", probs, split_heads(v, heads)))


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """One fused SDPA call with an additive logit bias: ``[B, N, H*Dv]``.

    ``q``/``k`` may have a head dim different from ``v`` (``[B, N, H*Dq]``,
    ``[B, M, H*Dq]``, ``[B, M, H*Dv]``); ``bias`` broadcasts to ``[B, H, N, M]``
    (typically ``[1, 1, 1, M]``: a log-prior per key column). ``scale``
    defaults to ``1/sqrt(Dq)``.
    """
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if bias is not None:
        bias = bias.to(dtype=qh.dtype, device=qh.device)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
    return merge_heads(out)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(D)) V`` through torch's fused SDPA kernels: ``[B, N, H*D]`` in q's dtype.

    What the mechanisms' own attention branches run (identity, visual condition): the same
    formula as the host's ``optimized_attention``, without the host's chunking (its CPU
    fallback, sub-quadratic attention, takes about twice as long at these key counts).
    ``upcast`` computes in float32, as the host does for models whose attention overflows
    in fp16 (``attn_precision``).
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    return biased_attention(q, k, v, heads).to(dtype)


def log_prior(weight: float) -> float:
    """The additive logit that multiplies a column's attention mass by ``weight``.

    ``softmax(l + log w)`` gives key columns ``w`` times their unnormalised mass;
    ``w = 0`` maps to ``-inf`` (the columns vanish).
    """
    if weight <= 0.0:
        return float("-inf")
    return math.log(weight)
