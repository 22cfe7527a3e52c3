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


def _constant(cache, key: tuple, make):
    """``make()``, kept in ``cache`` (any object with ``get_or_make(key, make)``, e.g. the sampling's
    ``SamplingCache``: made on first use, released when the sampling ends) when one is given.

    Inference-mode tensors cannot be saved for backward: a gradient pass gets its own copy.
    """
    if cache is None:
        return make()
    return cache.get_or_make(key + (torch.is_inference_mode_enabled(),), make)


def content_indicator(tokens: int, device=None, dtype=torch.float32, cache=None) -> torch.Tensor:
    """``[M]``: 1 for content tokens, 0 for start tokens. Read-only (shared between calls).

    Built on the device from an ``arange`` (indexing with a Python list of positions
    would be a blocking host-to-device copy in every layer); with a ``cache`` (the
    sampling's), once per sampling, so a layer call launches nothing for it after the first.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")

    def make():
        pos = torch.arange(tokens, device=device)
        chunk = CLIP_CHUNK if tokens >= CLIP_CHUNK and tokens % CLIP_CHUNK == 0 else max(tokens, 1)
        return (pos % chunk != 0).to(dtype)  # same positions as start_token_positions

    return _constant(cache, ("content_indicator", tokens, str(device), dtype), make)


def indicator_channels(tokens: int, channels: int, device, dtype, cache=None) -> torch.Tensor:
    """``[1, 1, M, channels]``: the content indicator in channel 0, zeros after (read-only; once per sampling with a ``cache``).

    Appended to the values in one ``cat`` (instead of a ``cat`` and a ``pad`` per layer call).
    """
    device = torch.device(device)
    return _constant(
        cache,
        ("indicator_channels", tokens, channels, str(device), dtype),
        lambda: F.pad(content_indicator(tokens, device, dtype, cache).reshape(1, 1, tokens, 1), (0, channels - 1)),
    )


def indicator_values(tokens: int, width: int, device, dtype, cache=None) -> torch.Tensor:
    """``[1, 1, M, width]``: the content indicator in every channel (read-only; once per sampling with a ``cache``).

    The values of :func:`content_mass_per_head`'s attention call: as wide as q and k, since
    SDPA's fused kernels need one head width (a narrower value falls back to the unfused math).
    """
    device = torch.device(device)
    return _constant(
        cache,
        ("indicator_values", tokens, width, str(device), dtype),
        lambda: content_indicator(tokens, device, dtype, cache).reshape(1, 1, tokens, 1).repeat(1, 1, 1, width),
    )


def content_mass_per_head(q: torch.Tensor, k: torch.Tensor, heads: int, cache=None) -> torch.Tensor:
    """Per head and query pixel, the share of text attention on content tokens: ``[B, H, N]`` in q's dtype.

    ``q``: ``[B, N, H*D]``; ``k``: ``[B, M, H*D]`` (the layer's text keys). One fused
    attention call whose values are the content indicator (:func:`indicator_values`,
    broadcast over batch and heads), so the ``[B, H, N, M]`` probabilities are not
    materialised where the backend can avoid it. The result is channel 0 of that call's
    ``[B, H, N, D]`` output (a view: it keeps the output alive while it is held).
    """
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    b, h, _, d = qh.shape
    m = kh.shape[2]
    values = indicator_values(m, d, q.device, q.dtype, cache).expand(b, h, m, d)
    return F.scaled_dot_product_attention(qh, kh, values)[..., 0]


def content_attention_mass(q: torch.Tensor, k: torch.Tensor, heads: int, cache=None) -> torch.Tensor:
    """Per query pixel, the share of text attention on content tokens: ``[B, N]`` float32 in [0, 1].

    ``q``: ``[B, N, H*D]``; ``k``: ``[B, M, H*D]``; the heads' :func:`content_mass_per_head` averaged.
    """
    return mass_from_heads(content_mass_per_head(q, k, heads, cache))


def text_attention_with_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False, cache=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text attention and its content mass in ONE fused call: ``([B, N, H*D] in q's dtype, [B, N])``.

    Per head, queries and keys as they are (``D`` wide, so SDPA's default scale is ``1/sqrt(D)``)
    and values ``[v | content indicator | 0]``, ``round_up(D + 1, 8)`` wide. Output channels
    ``:D`` are ``softmax(q k^T / sqrt(D)) v``, channel ``D`` the per-head content mass.
    ``upcast``: compute in float32 (the host's ``attn_precision``); ``cache``: as for :func:`indicator_channels`.

    Why only the values are widened: SDPA takes a value head width different from q/k's (its
    math path on a CPU; on CUDA the memory-efficient kernel, which needs q and k of one width and
    every width a multiple of the GEMM alignment: 8 in half precision, hence the round-up; the
    flash kernel needs one width for all three and is skipped). Padding q and k to the value
    width instead cost two ``pad`` launches per layer call (issue #22: CA² over its budget).
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    d = q.shape[-1] // heads
    width = -(-(d + 1) // 8) * 8
    qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    b, h, m, _ = vh.shape
    values = torch.cat([vh, indicator_channels(m, width - d, v.device, v.dtype, cache).expand(b, h, m, width - d)], dim=-1)
    out = F.scaled_dot_product_attention(qh, kh, values)
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
