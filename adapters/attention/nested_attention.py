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
one-hot one over the M text tokens, the nested one over the T subject tokens;
both fused SDPA calls in the stage) and two element-wise ops (the gap
``v*_q - V[s]``, then one ``addcmul``). The two softmaxes cannot share one call:
``a_s(q) v*_q`` weights each subject token by ``exp(q.K_s) / sum_t exp(q.Kn_t)``,
which depends on the query through the nested normaliser, so no fixed key bias
folds it into the outer attention. With ``weight`` ``w`` and an optional ``region``
``r`` (``[B, N, 1]``)::

    out' = out + w * r * a_S(q) * (v*_q - V[s])

Trained parts (``nodes/training/nested_training.py``, target ``nested``): the subject tokens ``e`` come
from a small query-former over the identity features (``adapters/projectors/query_former.py``), and
``Kn = W_Kn e``, ``Vn = W_Vn e`` per layer (native names ``nested.to_k`` / ``nested.to_v``).
The paper regularizes the nested values without a form that could be read from it; chosen
here (``value_reg``, weight 0.01)::

    L_value = mean over layers, rows with the subject, queries of  mean_c (v*_q - V[s])^2

which keeps every query's nested value near the value the text gives the subject word, so the
outer attention (whose keys are unchanged) still mixes a value of the scale it was trained on.
:func:`value_gap` computes the per-layer term.

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


def subject_values(hot: torch.Tensor, batch: int, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense one-hot values ``[batch, M, channels]`` for :func:`subject_probability` (build once per sampling).

    hot: :func:`one_hot` (``[1, M, 1]``). Dense because some attention backends need dense values.
    """
    return hot.to(dtype).expand(batch, -1, channels).contiguous()


def subject_probability(q: torch.Tensor, k: torch.Tensor, hot: torch.Tensor, heads: int, attention_fn: AttentionFn) -> torch.Tensor:
    """``a_S(q)`` per head, broadcast over the head's channels: ``[B, N, H*d]``.

    hot: :func:`one_hot` of the subject positions (``[1, M, 1]``), or its :func:`subject_values`.
    """
    values = hot if hot.shape[-1] == k.shape[-1] and hot.shape[0] == k.shape[0] else subject_values(hot, k.shape[0], k.shape[2], k.dtype)
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
    hot: optional cached :func:`one_hot` of ``positions``, or its :func:`subject_values`.

    Kernels per call when ``kn`` / ``vn`` / ``hot`` come dense and per row (the stage caches
    them once per sampling): the two attention calls, then :func:`add_subject_change` (two;
    three with a region).
    """
    if not positions:
        return out
    b = q.shape[0]
    nested = attention_fn(q, kn.expand(b, -1, -1).contiguous(), vn.expand(b, -1, -1).contiguous(), heads)  # v*_q
    if hot is None:
        hot = one_hot(k.shape[1], positions, device=k.device, dtype=k.dtype)
    a = subject_probability(q, k, hot, heads, attention_fn)
    return add_subject_change(out, a, nested, v[:, positions[0] : positions[0] + 1], weight, region)


def add_subject_change(
    out: torch.Tensor, a: torch.Tensor, nested: torch.Tensor, v_s: torch.Tensor, weight: float, region: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``out + w r a (v* - V[s])``, ``[B, N, H*d]``: the gap, then one ``addcmul`` (a region multiplies ``a`` first)."""
    if region is not None:
        a = a * region.to(a.dtype)
    return torch.addcmul(out, a, nested - v_s, value=weight)


def subject_rows(v: torch.Tensor, hot_rows: torch.Tensor) -> torch.Tensor:
    """``V[s_b]`` per row: ``[B, 1, H*d]`` (``hot_rows`` ``[B, M, 1]``, one 1 per row; a row of zeros gives 0)."""
    return (hot_rows.to(v.dtype) * v).sum(dim=1, keepdim=True)


def nested_attention_rows(
    out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kn: torch.Tensor, vn: torch.Tensor, hot_rows: torch.Tensor, heads: int, attention_fn: AttentionFn
):
    """The same correction with a subject position per row (training captions differ):
    ``(out + a_{s_b}(q) (v*_q - V_b[s_b]), v*_q, V_b[s_b])``.

    hot_rows: ``[B, M, 1]``, 1 at row ``b``'s subject position (all zeros: no subject, no change).
    """
    nested = attention_fn(q, kn.expand(q.shape[0], -1, -1).contiguous(), vn.expand(q.shape[0], -1, -1).contiguous(), heads)
    a = attention_fn(q, k, hot_rows.to(k.dtype).expand(-1, -1, k.shape[2]).contiguous(), heads)
    v_s = subject_rows(v, hot_rows)
    return out + a * (nested - v_s), nested, v_s


def value_gap(nested: torch.Tensor, v_s: torch.Tensor, has_subject: torch.Tensor) -> torch.Tensor:
    """The value regularizer of one layer: mean over rows with a subject, queries, channels of ``(v*_q - V[s])^2``."""
    gap = (nested.float() - v_s.float()).pow(2).mean(dim=(1, 2))  # [B]
    keep = has_subject.to(gap.dtype)
    return (gap * keep).sum() / keep.sum().clamp_min(1.0)
