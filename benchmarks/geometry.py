"""Where each cross-attention layer sits: its query-token count at a latent size.

``nodes.common.host.cross_attention_layers`` gives every attn2 layer's key, heads and
widths; this adds how many query tokens it sees, read analytically from the
UNet's module tree: each ``Downsample`` in ``input_blocks`` halves the grid
(stride-2 conv, padding 1: ``ceil(s / 2)``), the middle block runs at the
deepest grid, and each ``Upsample`` in ``output_blocks`` goes back up one level
(ComfyUI upsamples to the matching skip's size, so output levels equal input
levels). ``tests/test_benchmarks.py`` checks this against the ``q`` shapes a
real forward pass delivers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .host_setup import pack


@dataclass(frozen=True)
class LayerGeometry:
    """One attn2 layer at one latent size and batch.

    batch: B rows (cond + uncond = 2); tokens: N query tokens (grid h*w);
    grid: (h, w); latent: (h, w) of the latent; text_tokens: M keys of the text
    context (77); heads, dim_head, inner (= C = heads * dim_head), context_dim:
    the layer's widths.
    """

    key: Tuple[str, int, int]
    grid: Tuple[int, int]
    latent: Tuple[int, int]
    batch: int
    text_tokens: int
    heads: int
    dim_head: int
    inner: int
    context_dim: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def downscale(self) -> int:
        """How many times coarser than the latent (1, 2, 4, 8)."""
        return max(1, round(self.latent[0] / self.grid[0]))


def _has(block, class_name: str) -> bool:
    return any(type(m).__name__ == class_name for m in block.modules())


def block_grids(diffusion_model, latent_hw: Tuple[int, int]) -> Dict[Tuple[str, int], Tuple[int, int]]:
    """``(block name, block id) -> (h, w)`` of the activations each block's transformer sees."""
    size = tuple(latent_hw)
    levels = [size]
    grids: Dict[Tuple[str, int], Tuple[int, int]] = {}
    for i, block in enumerate(diffusion_model.input_blocks):
        grids[("input", i)] = levels[-1]
        if _has(block, "Downsample"):
            levels.append(tuple(math.ceil(s / 2) for s in levels[-1]))
    grids[("middle", 0)] = levels[-1]
    level = len(levels) - 1
    for i, block in enumerate(diffusion_model.output_blocks):
        grids[("output", i)] = levels[level]
        if _has(block, "Upsample"):
            level -= 1
    return grids


def layer_table(model_patcher, latent_hw: Tuple[int, int], batch: int = 2, text_tokens: int = 77) -> List[LayerGeometry]:
    """Every cross-attention layer of a MODEL with its token grid, in forward order."""
    layers = pack("nodes.common.host").cross_attention_layers(model_patcher)
    grids = block_grids(model_patcher.model.diffusion_model, latent_hw)
    return [
        LayerGeometry(
            key=info.key,
            grid=grids[info.key[:2]],
            latent=tuple(latent_hw),
            batch=batch,
            text_tokens=text_tokens,
            heads=info.heads,
            dim_head=info.dim_head,
            inner=info.inner_dim,
            context_dim=info.context_dim,
        )
        for info in layers
    ]


def coarse_layers(table: List[LayerGeometry], min_downscale: int = 4) -> List[LayerGeometry]:
    """The layers at least ``min_downscale`` times coarser than the latent (STFG's boundary layers)."""
    return [g for g in table if g.downscale >= min_downscale]
