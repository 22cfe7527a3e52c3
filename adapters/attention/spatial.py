"""Spatial bookkeeping: which pixel a query token is, and masks at a layer's grid.

A UNet layer sees the latent ``[B, C, h, w]`` downsampled by a power of two
(each SD downsample is a stride-2 conv with padding 1, so a side of ``s``
becomes ``ceil(s / 2)``); its attention tokens are that grid flattened
row-major: token ``i`` is pixel ``(i // W, i % W)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange


def _ceil_half(s: int, times: int) -> int:
    for _ in range(times):
        s = (s + 1) // 2
    return s


def token_grid(n_tokens: int, latent_hw: Sequence[int], activations_hw: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """The ``(H, W)`` grid of a layer with ``n_tokens`` query tokens.

    ``activations_hw`` (newer hosts report it) wins when it is consistent;
    otherwise the grid is found as the latent ``(h, w)`` halved 0..7 times.
    Raises ``ValueError`` when no such grid has ``n_tokens`` cells.
    """
    if activations_hw is not None:
        h, w = int(activations_hw[0]), int(activations_hw[1])
        if h * w == n_tokens:
            return h, w
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for times in range(8):
        gh, gw = _ceil_half(h, times), _ceil_half(w, times)
        if gh * gw == n_tokens:
            return gh, gw
    raise ValueError(f"cannot place {n_tokens} tokens on a grid derived from a {h}x{w} latent")


def mask_to_tokens(mask: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Resize a pixel-space mask to a layer's grid, flattened to tokens.

    ``mask``: ``[Bm, H, W]`` or ``[H, W]`` with values in [0, 1].
    Returns ``[Bm, N, 1]`` (N = grid H*W), float32, values in [0, 1].
    Area-averaging when shrinking keeps soft (feathered) edges soft;
    bilinear when growing.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    m = mask.float().unsqueeze(1)  # [Bm, 1, H, W]
    gh, gw = grid
    if m.shape[-2] >= gh and m.shape[-1] >= gw:
        m = F.interpolate(m, size=(gh, gw), mode="area")
    else:
        m = F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False)
    return rearrange(m.clamp(0.0, 1.0), "b 1 h w -> b (h w) 1")


def tokens_to_map(values: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``[B, N]`` or ``[B, N, 1]`` per-token values -> ``[B, H, W]`` map."""
    if values.dim() == 3:
        values = values[..., 0]
    return rearrange(values, "b (h w) -> b h w", h=grid[0], w=grid[1])
