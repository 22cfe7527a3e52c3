"""Recorded maps -> ComfyUI IMAGE / MASK tensors (for inspect nodes after the sampler).

IMAGE is ``[N, H, W, 3]`` float in [0, 1]; MASK is ``[N, H, W]``. Maps are
resized with bilinear interpolation; the pixel size of a latent is 8x its grid.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence, Tuple

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


def one_scale(maps: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` >= 0 divided by their common maximum (one colour scale for every frame; all-zero stays zero)."""
    return maps / maps.amax().clamp_min(1e-12)


def curve_image(series: Sequence[Sequence[float]], colours: Sequence[Tuple[float, float, float]], size: Tuple[int, int] = (160, 320), pad: int = 8) -> torch.Tensor:
    """Line plot of per-step values in [0, 1] on a fixed 0..1 axis: IMAGE ``[1, H, W, 3]``.

    ``series``: one list of values per line (x = step index, first step left); ``colours``: RGB
    per line (the first on top). A dark background with faint grid lines at 0, 0.25, 0.5, 0.75, 1.
    """
    h, w = size
    img = torch.full((h, w, 3), 0.08)
    top, bottom, left, right = pad, h - 1 - pad, pad, w - 1 - pad

    def y_of(v: float) -> float:
        return bottom - min(max(v, 0.0), 1.0) * (bottom - top)

    for level in (0.0, 0.25, 0.5, 0.75, 1.0):
        img[int(round(y_of(level))), left : right + 1] = 0.25
    for values, colour in reversed(list(zip(series, colours))):  # the first series drawn last, on top
        values = list(values)
        if not values:
            continue
        xs = [left + (right - left) * (i / max(len(values) - 1, 1)) for i in range(len(values))]
        points: List[Tuple[float, float]] = [(x, y_of(v)) for x, v in zip(xs, values)]
        if len(points) == 1:
            points = points * 2
        for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
            for t in torch.linspace(0.0, 1.0, n).tolist():
                x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
                img[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = torch.tensor(colour)
    return img.unsqueeze(0)
