"""Training losses of the pack's trainable mechanisms (pure torch).

Denoising (every target; PVA's "DSM" loss, ``loss: {"ID": 0, "DSM": 1.0}``): the eps-MSE,
computed from the model's denoised prediction ``x0_hat`` as ComfyUI returns it (k-diffusion
scale, ``x = x0 + sigma * eps``)::

    eps_hat = (x - x0_hat) / sigma
    L       = sum(w * (eps_hat - eps)^2) / (sum(w) * C)         w: [B, 1, h, w] >= 0

For eps-prediction models ``eps_hat`` is the network output itself; v-prediction models get the
same eps weighting. Rectified-flow models (Flux: ComfyUI's CONST sampling) use
:func:`flow_matching_loss` instead: ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``. ``w`` is 1 everywhere for PVA's inpainting models (the mask is an input);
for models without an inpainting input, the random face mask gives weight 1 inside and
``background_weight`` outside (our choice: a purely masked loss leaves the identity tokens free
to repaint the background, an unmasked one spends the few steps on the scene).

MoA router (mechanisms.md §3, the loss form is unverified: no public code): background pixels
go to the prior branch, ``L_r = mean over layers and pixels of ((1 - M_fg) * R1)^2``.

Face-wise attention loss (SeFi-IDE §6.2): the identity token's cross-attention map should
match the class word's under the reference prompt, ``L_attn = mean over layers of
mean((A_t - A_r)^2)`` (the paper's weight 0.003).

FAIR (FaceChain-FACT §5.3): the face adapter's relative increment outside the face,
``||GSA(x) * (1 - M)|| / ||x * (1 - M)||`` per layer, averaged (weight 0.01, read off the
released checkpoint's name ``reg001``, unverified).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

EPS = 1e-6


def eps_prediction(x_noisy: torch.Tensor, x0_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(x - x0_hat) / sigma`` with ``sigma`` ``[B]``: ``[B, C, h, w]`` float32."""
    return (x_noisy.float() - x0_hat.float()) / sigma.float().reshape(-1, 1, 1, 1)


def denoising_loss(x0_hat: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted eps-MSE (module docstring): a scalar. ``weight`` ``[B, 1, h, w]`` or None (uniform)."""
    err = (eps_prediction(x_noisy, x0_hat, sigma) - eps.float()).pow(2)
    if weight is None:
        return err.mean()
    w = weight.float().to(err.device)
    return (err * w).sum() / (w.sum().clamp_min(EPS) * err.shape[1])


def flow_matching_loss(x0_hat: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rectified flow (Flux): weighted MSE of the model's velocity ``(x_t - x0_hat) / sigma`` against ``noise - x0``.

    ComfyUI's CONST sampling: ``x_t = (1 - sigma) x0 + sigma noise``, ``x0_hat = x_t - sigma v_hat``.
    Shapes as :func:`denoising_loss`; a scalar.
    """
    target = noise.float() - x0.float()
    err = (eps_prediction(x_noisy, x0_hat, sigma) - target).pow(2)
    if weight is None:
        return err.mean()
    w = weight.float().to(err.device)
    return (err * w).sum() / (w.sum().clamp_min(EPS) * err.shape[1])


def flow_noisy(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` with ``sigma`` ``[B]`` (CONST / rectified-flow noising)."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def loss_weight_map(mask: torch.Tensor, background_weight: float) -> torch.Tensor:
    """``mask`` ``[B, 1, h, w]`` in [0, 1] -> ``m + background_weight * (1 - m)``."""
    m = mask.float()
    return m + background_weight * (1.0 - m)


def router_loss(personal_shares: Iterable[torch.Tensor], foregrounds: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``mean(((1 - fg) * R1)^2)``; each ``R1`` / ``fg`` ``[b, N, 1]``."""
    terms = [((1.0 - fg.to(r1.dtype)) * r1).float().pow(2).mean() for r1, fg in zip(personal_shares, foregrounds)]
    if not terms:
        raise ValueError("the router recorded no layer")
    return torch.stack(terms).mean()


def face_attention_loss(target_maps: Iterable[torch.Tensor], reference_maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``mean((A_t - A_r)^2)`` (maps ``[b, H, N]``, any matching shape)."""
    terms = [(t.float() - r.float()).pow(2).mean() for t, r in zip(target_maps, reference_maps)]
    if not terms:
        raise ValueError("no attention map was recorded")
    return torch.stack(terms).mean()


def fair_loss(increments: Iterable[torch.Tensor], inputs: Iterable[torch.Tensor], outsides: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``||delta * out|| / ||x * out||`` (``delta``, ``x`` ``[b, N, C]``, ``out`` ``[b, N, 1]``)."""
    terms = []
    for delta, x, out in zip(increments, inputs, outsides):
        o = out.to(delta.dtype)
        num = (delta * o).float().flatten(1).norm(dim=1)
        den = (x * o).float().flatten(1).norm(dim=1).clamp_min(EPS)
        terms.append((num / den).mean())
    if not terms:
        raise ValueError("the face adapter recorded no layer")
    return torch.stack(terms).mean()
