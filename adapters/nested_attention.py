"""Nested attention: a query-dependent value for the subject token.

Nested Attention (Patashnik et al., arXiv 2501.01407; equations from the
paper's Eq. 1-3, no public code). In a cross-attention layer with query
``q`` (per image token), text keys ``K`` and values ``V`` (``M`` tokens) and a
subject token ``s`` (e.g. "person"), the subject's value is replaced, per
query, by a nested attention over subject features::

    v*_q   = softmax(q Kn^T / sqrt(d)) Vn            # Kn, Vn: [T, H*d] from the subject's features
    V_q[s] = v*_q,  V_q[j] = V[j] for j != s
    out_q  = softmax(q K^T / sqrt(d)) V_q            # keys unchanged: K[s] still comes from the text

Because only one value changes, the outer attention need not be recomputed::

    out_q = out_std + a_s(q) * (v*_q - V[s]),    a_s(q) = softmax(q K^T / sqrt(d))[s]

per head. ``a_s`` is found without materialising the attention map: one
attention call with a one-hot value (``E[j, :] = [j in S]``) returns ``a_s`` in
every channel of every head. So a layer costs two extra attention calls (the
one-hot one over the M text tokens, the nested one over the T subject tokens)
and a few element-wise ops. With ``weight`` ``w`` and an optional ``region``
``r`` (``[B, N, 1]``)::

    out' = out + w * r * a_S(q) * (v*_q - V[s])

Choices made here (the paper leaves them to its trained encoder):

- ``S`` may hold several positions of the *same* token (ComfyUI repeats a
  77-token context to match a longer negative prompt; every copy of the
  subject token has the same K and V, so their probabilities add).
- ``out`` is whatever the previous stages produced (the text attention when
  nested attention is the first stage); the formula adds the change of the
  subject's value on top, so it stacks with other dispatcher stages.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention_core import AttentionFn


def subject_positions(index: int, prompt_length: int, context_length: int) -> list:
    """Positions of the subject token in a context of ``context_length`` tokens.

    The prompt's context (``prompt_length`` tokens, a multiple of 77) appears
    ``context_length / prompt_length`` times when ComfyUI repeated it to batch
    it with a longer prompt; otherwise only ``index`` itself.
    """
    if prompt_length > 0 and context_length % prompt_length == 0 and index < prompt_length:
        return [index + j * prompt_length for j in range(context_length // prompt_length)]
    return [index] if index < context_length else []


def one_hot(length: int, positions: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``[1, M, 1]``: 1 on the rows of ``positions``, 0 elsewhere (build once per layer and cache)."""
    e = torch.zeros(length, dtype=dtype)
    e[list(positions)] = 1.0
    return e.view(1, -1, 1).to(device)


def subject_probability(q: torch.Tensor, k: torch.Tensor, hot: torch.Tensor, heads: int, attention_fn: AttentionFn) -> torch.Tensor:
    """``a_S(q)`` per head, broadcast over the head's channels: ``[B, N, H*d]``.

    hot: :func:`one_hot` of the subject positions (``[1, M, 1]``).
    """
    values = hot.to(k.dtype).expand(k.shape[0], -1, k.shape[2]).contiguous()  # some backends need dense values
    return attention_fn(q, k, values, heads)


def nested_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kn: torch.Tensor,
    vn: torch.Tensor,
    positions: Sequence[int],
    heads: int,
    attention_fn: AttentionFn,
    weight: float = 1.0,
    region: Optional[torch.Tensor] = None,
    hot: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out + w r a_S(q) (v*_q - V[s])``: ``[B, N, H*d]``.

    q: ``[B, N, H*d]``; k, v: ``[B, M, H*d]`` (the layer's text keys/values);
    kn, vn: ``[B or 1, T, H*d]`` the subject features through the nested
    projections; positions: the subject token's positions in the M tokens
    (all holding the same token); out: the attention output to correct;
    hot: optional cached :func:`one_hot` of ``positions``.
    """
    if not positions:
        return out
    kn = kn.expand(q.shape[0], -1, -1).contiguous()
    vn = vn.expand(q.shape[0], -1, -1).contiguous()
    nested = attention_fn(q, kn, vn, heads)  # v*_q
    if hot is None:
        hot = one_hot(k.shape[1], positions, device=k.device, dtype=k.dtype)
    a = subject_probability(q, k, hot, heads, attention_fn)
    delta = a * (nested - v[:, positions[0] : positions[0] + 1])
    scale = weight if region is None else region.to(delta.dtype) * weight
    return out + delta * scale
