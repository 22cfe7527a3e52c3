"""How much of a pixel's text cross-attention goes to the prompt: the map CA² and STFG read.

Both CA-Edit mechanisms read the text cross-attention maps: CA²'s training-free
score (how strongly the text drives a pixel) and STFG's boundary region (pixels
inside the mask the text barely touches). Inside attn2 the pack sees the
context tokens after the layer's ``to_k``, not the token ids, so it cannot tell
the prompt's words from CLIP's end and padding tokens. It can tell the *start*
token: position 0 of every 77-token CLIP chunk (ComfyUI concatenates chunks
along the tokens for long prompts). The start token is a prompt-independent
attention sink that takes most of every pixel's mass, so:

    content tokens  = every context token except the start tokens
    content mass    = mean over heads of  sum_{j content} softmax(q k^T / sqrt(d))_j
                    = 1 - mean_h P_h[start tokens]                          in [0, 1]

End and padding tokens stay in: CLIP's encoder is causal, so they summarise
the whole prompt and carry its meaning. The mean over *all* tokens of a
softmax would be the constant 1/M (it sums to 1), so the paper's "mean over
the text tokens" is only informative over a subset; this is that subset, read
without token ids. It is 1/(M - starts) times the mean over content tokens, a
constant factor the normalisations downstream (min-max, μ - σ) ignore.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention_core import split_heads

CLIP_CHUNK = 77
"""Tokens per CLIP chunk; ComfyUI concatenates chunks for prompts longer than 75 words-pieces."""


def start_token_positions(tokens: int) -> List[int]:
    """Positions of CLIP's start token in a context of ``tokens`` tokens."""
    if tokens >= CLIP_CHUNK and tokens % CLIP_CHUNK == 0:
        return list(range(0, tokens, CLIP_CHUNK))
    return [0]


_INDICATORS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_INDICATOR_CACHE_SIZE = 16
"""Bounded: a sampling sees a handful of (tokens, device, dtype) keys; the tensors are ``M`` floats each."""


def content_indicator(tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[M]``: 1 for content tokens, 0 for start tokens. Read-only (shared between calls).

    Built on the device from an ``arange`` (indexing with a Python list of positions
    would be a blocking host-to-device copy in every layer) and kept in a small
    bounded cache, so a layer call launches nothing for it after the first.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    # inference-mode tensors cannot be saved for backward: a training step gets its own copy
    key = (tokens, device, dtype, torch.is_inference_mode_enabled())
    ind = _INDICATORS.get(key)
    if ind is None:
        pos = torch.arange(tokens, device=device)
        chunk = CLIP_CHUNK if tokens >= CLIP_CHUNK and tokens % CLIP_CHUNK == 0 else max(tokens, 1)
        ind = (pos % chunk != 0).to(dtype)  # same positions as start_token_positions
        _INDICATORS[key] = ind
        while len(_INDICATORS) > _INDICATOR_CACHE_SIZE:
            _INDICATORS.popitem(last=False)
    else:
        _INDICATORS.move_to_end(key)
    return ind


def indicator_channels(tokens: int, channels: int, device, dtype) -> torch.Tensor:
    """``[1, 1, M, channels]``: the content indicator in channel 0, zeros after (cached, read-only).

    Appended to the values in one ``cat`` (instead of a ``cat`` and a ``pad`` per layer call).
    """
    key = ("channels", tokens, channels, torch.device(device), dtype, torch.is_inference_mode_enabled())
    block = _INDICATORS.get(key)
    if block is None:
        block = F.pad(content_indicator(tokens, device, dtype).reshape(1, 1, tokens, 1), (0, channels - 1))
        _INDICATORS[key] = block
        while len(_INDICATORS) > _INDICATOR_CACHE_SIZE:
            _INDICATORS.popitem(last=False)
    return block


def content_attention_mass(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Per query pixel, the share of text attention on content tokens: ``[B, N]`` float32 in [0, 1].

    ``q``: ``[B, N, H*D]``; ``k``: ``[B, M, H*D]`` (the layer's text keys).
    One fused attention call whose values are the content indicator, so the
    ``[B, H, N, M]`` probabilities are not materialised where the backend
    can avoid it.
    """
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    b, h, _, d = qh.shape
    m = kh.shape[2]
    # as many identical value columns as q/k have (SDPA's flash kernels need one head width and a
    # unit channel stride: broadcast over batch and heads only)
    values = content_indicator(m, device=q.device, dtype=q.dtype).reshape(1, 1, m, 1).repeat(1, 1, 1, d).expand(b, h, m, d)
    per_head = F.scaled_dot_product_attention(qh, kh, values)[..., 0]  # [B, H, N]
    return mass_from_heads(per_head)


def text_attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text attention and its content mass in ONE fused call: ``([B, N, H*D] in q's dtype, [B, N])``.

    Per head, values ``[v | content indicator | 0]`` and queries / keys ``[q | 0]`` / ``[k | 0]``,
    all ``round_up(D + 1, 8)`` wide (SDPA's flash kernels need one head width); the zero channels
    leave every dot product as it is and the scale is fixed at ``1/sqrt(D)``. Output channels
    ``:D`` are ``softmax(q k^T / sqrt(D)) v``, channel ``D`` the per-head content mass.
    ``upcast``: compute in float32 (the host's ``attn_precision``).
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    d = q.shape[-1] // heads
    width = -(-(d + 1) // 8) * 8
    pad = (0, width - d)
    qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    b, h, m, _ = vh.shape
    values = torch.cat([vh, indicator_channels(m, width - d, v.device, v.dtype).expand(b, h, m, width - d)], dim=-1)
    out = F.scaled_dot_product_attention(F.pad(qh, pad), F.pad(kh, pad), values, scale=d**-0.5)
    text = rearrange(out[..., :d], "b h n d -> b n (h d)").to(dtype)
    return text, mass_from_heads(out[..., d])


def mass_from_heads(per_head: torch.Tensor) -> torch.Tensor:
    """``[B, H, N]`` per-head content mass -> ``[B, N]`` float32, heads averaged, in [0, 1]."""
    return per_head.float().mean(dim=1).clamp(0.0, 1.0)


MIN_RANGE = 0.05
"""The smallest spread of a mass map that min-max stretches to [0, 1]."""


def minmax_per_image(values: torch.Tensor, min_range: float = MIN_RANGE) -> torch.Tensor:
    """``[B, N]`` masses in [0, 1] -> ``(v - min) / max(max - min, min_range)`` per image.

    A map whose spread is at least ``min_range`` spans [0, 1] exactly; a flatter
    one (no spatial signal, e.g. the 1x1 / 2x2 layers of a small latent) keeps
    its small spread instead of stretching rounding noise to full range.
    """
    lo = values.amin(dim=-1, keepdim=True)
    hi = values.amax(dim=-1, keepdim=True)
    return ((values - lo) / (hi - lo).clamp_min(min_range)).clamp(0.0, 1.0)
