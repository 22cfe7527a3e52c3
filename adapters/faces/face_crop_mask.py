"""Bring a source-image mask into an aligned 112x112 face crop.

FACT masks its reference photos to face + hair before aligning them (a human
parsing model; github:modelscope/facechain ``face_adapter_v1.py``
``face_image_preprocess``). Our IDENTITY keeps only the aligned crops and the
5 landmarks they were aligned with, so a mask drawn or segmented on the source
photo is warped with the same similarity transform the crop was made with:
the ArcFace 5-point template (insightface ``arcface_dst``), least-squares
similarity (Umeyama 1991, no reflection), bilinear sampling with OpenCV's pixel
convention (integer coordinates are pixel centres), zeros outside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCFACE_TEMPLATE_112 = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float64,
)


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The ``[2, 3]`` similarity ``M`` minimising ``sum |M [src; 1] - dst|^2`` (points ``[K, 2]``)."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / src.shape[0]
    u, sing, vt = torch.linalg.svd(cov)
    sign = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ torch.diag(sign) @ vt
    scale = (sing * sign).sum() / s.pow(2).sum(dim=1).mean()
    m = torch.zeros(2, 3, dtype=torch.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_to_crop(image: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """``[C, H, W]`` source pixels -> ``[C, size, size]`` aligned like the face crop of ``landmarks`` ``[5, 2]``."""
    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    m = similarity_transform(landmarks, template)
    inv = torch.linalg.inv(torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))[:2]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ inv.T  # [size, size, 2] source (x, y)
    h, w = image.shape[-2:]
    grid = torch.stack([2.0 * src[..., 0] / max(w - 1, 1) - 1.0, 2.0 * src[..., 1] / max(h - 1, 1) - 1.0], dim=-1)
    out = F.grid_sample(image.float().unsqueeze(0), grid.float().unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0]
