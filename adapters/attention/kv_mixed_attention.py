"""KV-mixed cross-attention: keys from one token source, values from another.

VisualComposer ("Object-level Visual Prompts for Compositional Image Generation", Parmar et al.,
arXiv 2501.01424; no public code or weights) derives the keys of a visual prompt from an
encoder with a small bottleneck (coarse: layout, pose freedom) and the values from one with a
large bottleneck (fine appearance)::

    out = softmax(s q (W_k E_key)^T) (W_v E_value)          # [B, N, H*D], s = 1/sqrt(D)

The paper's ``E_key`` / ``E_value`` are the two encoders of ``kv_mixed_encoders.py``, trained
together (the node's default pairing). This module is the shared arithmetic; it also serves the
node's experimental pairing, where ``E_key`` / ``E_value`` are identity tokens made by two
unrelated (IDENTITY, ID_ADAPTER) pairs (e.g. the ArcFace embedding through FaceID for the keys,
CLIP-vision tokens through IP-Adapter-Plus for the values, each projected by its own adapter's
``to_k`` / ``to_v``): token ``j`` of one has no trained relation to token ``j`` of the other. The keys/values then enter the layer exactly like any identity K/V of
:mod:`.parallel_attention` (decoupled: a separate softmax added with a weight; joint: one softmax
with the text), so KV-mixed attention with one source for both is plain decoupled (or joint)
attention.

Token counts. Key ``j`` must have value ``j``. When the two sources give different counts the
rule is chosen explicitly (never silent truncation):

- ``"error"``: refuse (:class:`TokenCountMismatch`).
- ``"resample_values"`` (parameter-free): the value tokens are average-pooled along the token
  order to the key count with adaptive average pooling (``F.adaptive_avg_pool1d``: output token
  ``i`` averages input tokens ``floor(i*Tv/Tk) .. ceil((i+1)*Tv/Tk) - 1``; when ``Tv < Tk`` each
  value token is repeated). Keys are left alone because they define the softmax columns (the
  layout signal the paper attributes to the key encoder); values are the appearance detail, for
  which averaging neighbouring tokens is the least destructive change. Pooling is linear, so it is
  done on the tokens before projection (identical to pooling projected values). With
  ``per_reference`` tokens (``R * t`` tokens on each side) the pooling bins never cross a
  reference boundary, because both counts are multiples of R.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .attention_core import AttentionFn

TOKEN_RULES = ("resample_values", "error")


class TokenCountMismatch(ValueError):
    """Key and value sources have different token counts and the rule is "error"."""

    def __init__(self, key_tokens: int, value_tokens: int):
        super().__init__(f"the key source gives {key_tokens} tokens but the value source gives {value_tokens}")
        self.key_tokens = key_tokens
        self.value_tokens = value_tokens


def resample_tokens(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """Adaptive average pooling along the token axis: ``[B, T, D] -> [B, count, D]``."""
    if tokens.shape[1] == count:
        return tokens
    pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2).float(), count)
    return pooled.transpose(1, 2).to(tokens.dtype)


def match_token_counts(key_tokens: torch.Tensor, value_tokens: torch.Tensor, rule: str = "resample_values") -> Tuple[torch.Tensor, torch.Tensor]:
    """Make ``value_tokens`` ``[B, Tv, Dv]`` line up with ``key_tokens`` ``[B, Tk, Dk]`` by ``rule``."""
    if rule not in TOKEN_RULES:
        raise ValueError(f"unknown token rule {rule!r}; known: {', '.join(TOKEN_RULES)}")
    tk, tv = key_tokens.shape[1], value_tokens.shape[1]
    if tk == tv:
        return key_tokens, value_tokens
    if rule == "error" or tk == 0 or tv == 0:
        raise TokenCountMismatch(tk, tv)
    return key_tokens, resample_tokens(value_tokens, tk)


def kv_mixed_keys_values(
    key_tokens: torch.Tensor,
    value_tokens: torch.Tensor,
    to_k: torch.Tensor,
    to_v: torch.Tensor,
    rule: str = "resample_values",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W_k E_key, W_v E_value)``: ``[B, T, C]`` each (float32), counts matched by ``rule``.

    ``to_k`` ``[C, Dk]`` from the key source's adapter, ``to_v`` ``[C, Dv]`` from the value source's.
    """
    key_tokens, value_tokens = match_token_counts(key_tokens, value_tokens, rule)
    return F.linear(key_tokens.float(), to_k.float()), F.linear(value_tokens.float(), to_v.float())


def kv_mixed_attention(q: torch.Tensor, k_mixed: torch.Tensor, v_mixed: torch.Tensor, heads: int, attention_fn: AttentionFn) -> torch.Tensor:
    """``softmax(s q k_mixed^T) v_mixed``: ``[B, N, H*D]`` (the separate-softmax branch)."""
    return attention_fn(q, k_mixed, v_mixed, heads)
