"""Recorded maps -> ComfyUI IMAGE / MASK tensors (for inspect nodes after the sampler).

IMAGE is ``[N, H, W, 3]`` float in [0, 1]; MASK is ``[N, H, W]``. Maps are
resized with bilinear interpolation; the pixel size of a latent is 8x its grid.
"""

from __future__ import annotations

from typing import Dict, Hashable, Sequence, Tuple

import torch
import torch.nn.functional as F

LAYER_SELECTIONS = ("mean of all layers", "lowest resolution layers", "highest resolution layers")
LATENT_TO_PIXELS = 8


def resize_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, H, W]`` float32 (bilinear; identity when the size matches)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def select_layers(per_layer: Dict[Hashable, torch.Tensor], selection: str) -> Sequence[torch.Tensor]:
    """The maps of ``per_layer`` (``key -> [B, h, w]``) that ``selection`` names."""
    maps = list(per_layer.values())
    if not maps or selection == LAYER_SELECTIONS[0]:
        return maps
    areas = [m.shape[-2] * m.shape[-1] for m in maps]
    target = min(areas) if selection == LAYER_SELECTIONS[1] else max(areas)
    return [m for m, a in zip(maps, areas) if a == target]


def layer_mean(per_layer: Dict[Hashable, torch.Tensor], selection: str, size: Tuple[int, int]) -> torch.Tensor:
    """Mean of the selected layers' maps, each resized to ``size``: ``[B, H, W]`` float32."""
    chosen = select_layers(per_layer, selection)
    return torch.stack([resize_maps(m, size) for m in chosen]).mean(dim=0)


def gray_image(maps: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` in [0, 1] -> IMAGE ``[N, H, W, 3]`` (light = high)."""
    return maps.clamp(0.0, 1.0).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous().cpu()


def pixel_size(samples: torch.Tensor) -> Tuple[int, int]:
    """The image size of a LATENT's ``samples`` ``[B, C, h, w]``."""
    return int(samples.shape[-2]) * LATENT_TO_PIXELS, int(samples.shape[-1]) * LATENT_TO_PIXELS
