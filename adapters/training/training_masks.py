"""Inpainting-style random masks over the face, and masks at latent resolution (pure torch).

PVA trains inpainting: the face region is the hole, the rest of the photo is given. Its data
ships "wholeface" masks from face parsing; the per-identity fine-tune uses those. Here the
artist gives an optional MASK per reference (white = face); each training step uses one mask
from a pool of random variants of it, so the tokens do not learn one hole shape:

- the mask grown by a random radius (up to 8 % of the image side),
- its bounding box, scaled by 1.0-1.3 and shifted by up to 10 % of the box size,
- the ellipse inscribed in such a box.

Without a MASK the face is assumed central: boxes / ellipses covering 40-90 % of each side,
shifted by up to 10 % of the image. All shapes are drawn from a ``torch.Generator`` (so a seed
gives the same pool) and are ``[H, W]`` float in {0, 1}.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

GROW_MAX = 0.08
BOX_SCALE = (1.0, 1.3)
BOX_SHIFT = 0.10
DEFAULT_SPAN = (0.4, 0.9)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def mask_box(mask: torch.Tensor, threshold: float = 0.5) -> Optional[Tuple[float, float, float, float]]:
    """``(y0, x0, y1, x1)`` (pixels, end exclusive) of the pixels above ``threshold``; None if empty."""
    on = mask > threshold
    if not bool(on.any()):
        return None
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    return float(rows[0]), float(cols[0]), float(rows[-1] + 1), float(cols[-1] + 1)


def box_mask(h: int, w: int, box: Tuple[float, float, float, float], ellipse: bool = False) -> torch.Tensor:
    """A filled box (or the ellipse inscribed in it) ``[h, w]``; the box may leave the image."""
    y0, x0, y1, x1 = box
    ys = torch.arange(h, dtype=torch.float32).reshape(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).reshape(1, -1) + 0.5
    if not ellipse:
        return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).float()
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = max((y1 - y0) / 2, 0.5), max((x1 - x0) / 2, 0.5)
    return ((((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2) <= 1.0).float()


def grow(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a square of half-size ``radius`` pixels: ``[H, W]``."""
    m = (mask > 0.5).float()
    if radius <= 0:
        return m
    return F.max_pool2d(m[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)[0, 0]


def _jittered_box(box, gen: torch.Generator):
    y0, x0, y1, x1 = box
    h, w = y1 - y0, x1 - x0
    s = _uniform(gen, *BOX_SCALE)
    cy = (y0 + y1) / 2 + _uniform(gen, -BOX_SHIFT, BOX_SHIFT) * h
    cx = (x0 + x1) / 2 + _uniform(gen, -BOX_SHIFT, BOX_SHIFT) * w
    return cy - s * h / 2, cx - s * w / 2, cy + s * h / 2, cx + s * w / 2


def random_face_mask(base: Optional[torch.Tensor], size: Tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """One random mask ``[H, W]`` (see module docstring). ``base``: the artist's face mask or None."""
    h, w = size
    kind = int(torch.randint(0, 3, (), generator=gen))
    box = mask_box(base) if base is not None else None
    if box is None:
        sy, sx = _uniform(gen, *DEFAULT_SPAN) * h, _uniform(gen, *DEFAULT_SPAN) * w
        cy = h / 2 + _uniform(gen, -BOX_SHIFT, BOX_SHIFT) * h
        cx = w / 2 + _uniform(gen, -BOX_SHIFT, BOX_SHIFT) * w
        return box_mask(h, w, (cy - sy / 2, cx - sx / 2, cy + sy / 2, cx + sx / 2), ellipse=kind == 2)
    if kind == 0:
        return grow(base, int(round(_uniform(gen, 0.0, GROW_MAX) * max(h, w))))
    return box_mask(h, w, _jittered_box(box, gen), ellipse=kind == 2)


def mask_pool(base: Optional[torch.Tensor], size: Tuple[int, int], count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random masks ``[count, H, W]``."""
    return torch.stack([random_face_mask(base, size, gen) for _ in range(count)])


def to_latent(mask: torch.Tensor, latent_hw: Tuple[int, int]) -> torch.Tensor:
    """Pixel masks ``[B, H, W]`` -> ``[B, 1, h, w]`` area-averaged (soft edges kept)."""
    return F.interpolate(mask.float()[:, None], size=tuple(latent_hw), mode="area").clamp(0.0, 1.0)


def inpaint_mask(mask: torch.Tensor, latent_hw: Tuple[int, int]) -> torch.Tensor:
    """The hole channel of an inpainting model's input: ``[B, 1, h, w]`` in {0, 1} (1 = hole).

    Bilinear resize then rounding, as ComfyUI prepares ``denoise_mask`` for inpainting models.
    """
    m = F.interpolate(mask.float()[:, None], size=tuple(latent_hw), mode="bilinear", align_corners=False)
    return m.round().clamp(0.0, 1.0)


def masked_pixels(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Images ``[B, H, W, 3]`` in [0, 1] with the hole (``mask`` ``[B, H, W]`` = 1) filled grey 0.5."""
    m = (mask > 0.5).float()[..., None]
    return images * (1.0 - m) + 0.5 * m


def mask_centre(mask: Optional[torch.Tensor]) -> Optional[Tuple[float, float]]:
    """``(y, x)`` pixel centre of a mask's box ``[H, W]`` (see :func:`mask_box`); None for no mask or an empty one."""
    box = mask_box(mask) if mask is not None else None
    if box is None:
        return None
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def square_crop_resize(images: torch.Tensor, side: int, centres: Optional[Sequence[Optional[Tuple[float, float]]]] = None) -> torch.Tensor:
    """``[B, H, W, C]`` -> a square crop of side ``min(H, W)`` resized to ``side`` (area down, bilinear up).

    ``centres``: per image the ``(y, x)`` pixel to centre the square on (e.g. the face, so a face
    off the middle of a wide photo is not cut off), moved to keep the square inside the image;
    None (for all, or for one image) crops the middle.
    """
    b, h, w, c = images.shape
    s = min(h, w)
    crops = []
    for i in range(b):
        centre = centres[i] if centres is not None else None
        if centre is None:
            y0, x0 = (h - s) // 2, (w - s) // 2
        else:
            y0 = int(min(max(round(centre[0] - s / 2), 0), h - s))
            x0 = int(min(max(round(centre[1] - s / 2), 0), w - s))
        crops.append(images[i : i + 1, y0 : y0 + s, x0 : x0 + s])
    x = torch.cat(crops).permute(0, 3, 1, 2).float()
    if s != side:
        x = F.interpolate(x, size=(side, side), mode="area" if s > side else "bilinear", **({} if s > side else {"align_corners": False}))
    return x.permute(0, 2, 3, 1).clamp(0.0, 1.0)


def list_of_masks(masks: Optional[torch.Tensor], count: int) -> List[Optional[torch.Tensor]]:
    """Per reference image its base mask (``masks`` ``[R or 1, H, W]``) or None."""
    if masks is None:
        return [None] * count
    if masks.shape[0] == 1:
        return [masks[0]] * count
    return [masks[i] for i in range(count)]
