"""STFG (CA-Edit, AAAI 2025): skin transition frequency guidance, the sampler-side half.

Where CA² keeps skin detail in the main edit region, STFG smooths the
*boundary region*: pixels inside the edit mask the text barely touches. Each
step it pulls the low spatial frequencies of the predicted clean latent there
toward those of the original image's latent.

1. Boundary (Eq. 7, appendix Eq. 11-13). ``A`` = the mean text cross-attention
   map (over text tokens and the recorded layers -- every cross-attention layer
   as in the paper, or only the coarse ones, the node's choice -- each upsampled
   to the latent grid ``H x W``; see :mod:`.text_attention_mass` for which tokens). With
   ``M`` the edit mask at the latent grid (inside = ``M >= 0.5``)::

       Idx = { p in M : A(p) <= mu - sigma },   mu, sigma = mean and std of A over the pixels in M

   These are the main text's *masked* statistics (Eq. 7: "mu(A ∘ M) - sigma(A ∘ M)",
   the elements of A within M). The appendix's Eq. 13 divides sums of
   ``A ⊙ M`` by H·W instead, which mixes in the zeros outside the mask and
   moves the threshold with the mask's size; we follow the main text.
   sigma is the population standard deviation (divide by the count).

2. Low-pass (Eq. 15). ``LP(z) = Re(IFFT(FFT(z) ⊙ 1_box))`` per channel over
   the latent's spatial axes. The paper writes the box in the FFT-*shifted*
   spectrum as ``H/2 < i < 3H/4, W/2 < j < 3W/4``: with the zero frequency at
   ``(H/2, W/2)`` that is one quadrant of positive frequencies ``0 < f < H/4``
   (no DC, not symmetric, so the inverse is complex). We default to the
   centred symmetric box of the same reach, ``|f_y| < band * H/2`` and
   ``|f_x| < band * W/2`` with ``band = 0.5`` (shifted indices
   ``H/4 < i < 3H/4``): every frequency below a quarter of the sampling rate,
   DC included, a real filter. ``layout="quadrant"`` gives the literal
   reading (``0 < f_y < band * H/2``, same for x), real part taken.

3. Guidance (Eq. 9): ``g = 1/|Idx| * sum_{p in Idx} || LP(x0)(p) - LP(z0)(p) ||_2^2``
   (the norm over channels), per image; ``x0`` the model's clean estimate,
   ``z0`` the original image's latent.

4. Update (Eq. 10). The paper writes ``eps_hat = eps - lambda rho_t grad_{z_t} g``
   with ``rho_t = sqrt(1 - alpha_bar_t)``. With ``g`` a squared distance to
   be *reduced* (Fig. 7-8: the boundary approaches the original), the score
   convention of Song et al. (``log p(y | z) ∝ -lambda g``) gives
   ``eps_hat = eps + lambda rho_t grad_{z_t} g``; Eq. 10's minus would push the
   boundary away. We implement the stated goal: positive lambda pulls toward z0.

   ComfyUI samples in the k-diffusion scale ``x = z_t / sqrt(alpha_bar) = x0 + sigma eps``
   (``alpha_bar = 1 / (1 + sigma^2)``, the same for eps-, v-prediction and EDM
   models: ComfyUI's model_sampling returns x0 for all of them). The sampler
   steps from ``denoised = x - sigma eps``, and ``grad_{z_t} g = grad_x g / sqrt(alpha_bar)``,
   ``rho_t / sqrt(alpha_bar) = sigma``, so Eq. 10 becomes::

       denoised_hat = x - sigma eps_hat = denoised - lambda sigma^2 grad_x g

   ``exact``: ``grad_x g`` through the model (``x0 = D(x)``, one backward
   pass). ``fast``: eps held constant, so ``dx0/dx = I`` and
   ``grad_x g = grad_x0 g = 2/|Idx| * LP(1_Idx ⊙ (LP(x0) - LP(z0)))``
   (``LP`` is self-adjoint: a real 0/1 spectral mask), no backward pass.

   Two departures from the paper, each an option (``cap``, ``mask``):
   - step limit (``cap``, the node's default: on): the step ``lambda sigma^2``
     is capped at ``|Idx| / 2``. The paper has no cap. In ``fast`` mode the
     update removes ``2 lambda sigma^2 / |Idx|`` times the boundary's low-band
     residual; above 1 it overshoots, and early steps are far above it (at
     sigma = 14, sigma^2 = 200, the node's default lambda = 10 and a 40-pixel
     ring: 100 times), which blows the latent up. The cap makes the largest step
     remove the residual exactly once. Off = Eq. 10 as written.
   - masked update (``mask``, the node's default: off, as in the paper): the
     paper updates the latent unmasked (the gradient of Eq. 9 reaches a little
     beyond ``Idx`` through the low-pass); multiplying by the (soft) edit mask
     ``M`` leaves the latent outside the mask exactly as the unguided sampler
     made it. With a latent noise mask ComfyUI restores the original outside
     the mask each step anyway, so the two differ only without one.

Shapes: latents ``[B, C, H, W]``; attention maps, masks, boundaries ``[B, H, W]``;
sigma ``[B]`` or scalar.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

LAYOUTS = ("centred", "quadrant")


# --- the frequency box ---------------------------------------------------------------------------


def frequency_box(height: int, width: int, band: float = 0.5, layout: str = "centred", device=None) -> torch.Tensor:
    """The spectral mask ``1_box`` in unshifted FFT order: ``[H, W]`` float32 of 0/1.

    ``centred``: ``|f_y| < band * H/2`` and ``|f_x| < band * W/2`` (DC always kept);
    ``quadrant``: ``0 < f_y < band * H/2`` and ``0 < f_x < band * W/2``
    (the paper's literal shifted-index box for ``band = 0.5``).
    ``f`` are integer frequencies, ``torch.fft.fftfreq(n) * n``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fy = torch.fft.fftfreq(height, d=1.0 / height, device=device)
    fx = torch.fft.fftfreq(width, d=1.0 / width, device=device)
    ry, rx = band * height / 2.0, band * width / 2.0
    if layout == "centred":
        keep_y = (fy.abs() < ry) | (fy == 0)
        keep_x = (fx.abs() < rx) | (fx == 0)
    else:
        keep_y = (fy > 0) & (fy < ry)
        keep_x = (fx > 0) & (fx < rx)
    return (keep_y[:, None] & keep_x[None, :]).float()


def low_pass(z: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``Re(IFFT2(FFT2(z) ⊙ box))`` over the last two axes, in float32 (float64 stays): ``[..., H, W]``."""
    spectrum = torch.fft.fft2(z.to(torch.promote_types(z.dtype, torch.float32)), dim=(-2, -1))
    return torch.fft.ifft2(spectrum * box, dim=(-2, -1)).real


# --- the boundary region -------------------------------------------------------------------------


def boundary_region(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7: pixels inside the mask whose attention is at most mu - sigma of the masked pixels.

    ``attention``: ``[B, H, W]``; ``mask``: ``[B or 1, H, W]`` in [0, 1] (inside = >= 0.5).
    Returns ``[B, H, W]`` bool. An empty mask gives an empty region.
    """
    inside = (mask >= 0.5).expand_as(attention)
    weights = inside.to(attention.dtype)
    count = weights.sum(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    mu = (attention * weights).sum(dim=(-2, -1), keepdim=True) / count
    sigma = (((attention - mu) ** 2) * weights).sum(dim=(-2, -1), keepdim=True).div(count).sqrt()
    return inside & (attention <= mu - sigma)


def region_size(boundary: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``|Idx|`` per image: ``[B]``."""
    return boundary.to(dtype).sum(dim=(-2, -1))


# --- the guidance energy and its gradient ----------------------------------------------------------


def guidance_energy(x0: torch.Tensor, z0: torch.Tensor, boundary: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Eq. 9 per image: ``[B, C, H, W]`` x0, ``[B or 1, C, H, W]`` z0, ``[B, H, W]`` boundary -> ``[B]``."""
    diff = low_pass(x0, box) - low_pass(z0, box)
    per_pixel = diff.pow(2).sum(dim=1)  # squared 2-norm over channels, [B, H, W]
    inside = boundary.to(per_pixel.dtype)
    return (per_pixel * inside).sum(dim=(-2, -1)) / region_size(boundary, per_pixel.dtype).clamp_min(1.0)


def guidance_gradient(x0: torch.Tensor, z0: torch.Tensor, boundary: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Closed form of ``grad_x0 g``: ``2/|Idx| * LP(1_Idx ⊙ (LP(x0) - LP(z0)))``, ``[B, C, H, W]`` (float32 or float64)."""
    residual = low_pass(x0, box) - low_pass(z0, box)
    residual = residual * boundary.unsqueeze(1).to(residual.dtype)
    scale = 2.0 / region_size(boundary, residual.dtype).clamp_min(1.0)
    return low_pass(residual, box) * scale.reshape(-1, 1, 1, 1)


def step_size(sigma: torch.Tensor, strength: float, boundary: torch.Tensor, dtype: torch.dtype = torch.float32, cap: bool = True) -> torch.Tensor:
    """``min(lambda sigma^2, |Idx| / 2)`` per image (``cap=False``: ``lambda sigma^2``): ``[B, 1, 1, 1]``.

    An empty region has a zero gradient, so its update is 0 either way.
    """
    sigma = torch.as_tensor(sigma, device=boundary.device).to(dtype).reshape(-1)
    step = (strength * sigma.pow(2)).expand(boundary.shape[0])
    if cap:
        step = torch.minimum(step, region_size(boundary, dtype) / 2.0)
    return step.reshape(-1, 1, 1, 1)


def _masked_step(denoised: torch.Tensor, gradient: torch.Tensor, step: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    delta = gradient * step
    if mask is not None:
        delta = delta * mask.unsqueeze(1).to(delta.dtype)
    return denoised - delta.to(denoised.dtype)


def fast_update(
    denoised: torch.Tensor,
    z0: torch.Tensor,
    boundary: torch.Tensor,
    mask: Optional[torch.Tensor],
    sigma: torch.Tensor,
    strength: float,
    box: torch.Tensor,
    cap: bool = True,
) -> torch.Tensor:
    """``denoised - min(lambda sigma^2, |Idx|/2) * M ⊙ grad_x0 g`` (eps held constant; ``mask`` None: unmasked, ``cap`` False: no min)."""
    gradient = guidance_gradient(denoised, z0, boundary, box)
    return _masked_step(denoised, gradient, step_size(sigma, strength, boundary, gradient.dtype, cap), mask)


def exact_gradient(
    x: torch.Tensor,
    denoise_fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    boundary: torch.Tensor,
    box: torch.Tensor,
) -> torch.Tensor:
    """``grad_x g(D(x))`` by one backward pass through ``denoise_fn``: ``[B, C, H, W]`` (float32 or float64).

    The images of a batch are independent, so the gradient of the sum of their
    energies is each image's own gradient. Run it where autograd can record
    (the caller leaves inference mode and enables grad).
    """
    xg = x.detach().clone().requires_grad_(True)
    x0 = denoise_fn(xg)
    energy = guidance_energy(x0, _autograd_safe(z0), _autograd_safe(boundary), _autograd_safe(box)).sum()
    (gradient,) = torch.autograd.grad(energy, xg)
    return gradient.to(torch.promote_types(gradient.dtype, torch.float32))


def exact_update(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoise_fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    boundary: torch.Tensor,
    mask: Optional[torch.Tensor],
    sigma: torch.Tensor,
    strength: float,
    box: torch.Tensor,
    cap: bool = True,
) -> torch.Tensor:
    """``denoised - min(lambda sigma^2, |Idx|/2) * M ⊙ grad_x g(D(x))`` (Eq. 10 through the model; ``mask``/``cap`` as in :func:`fast_update`)."""
    with torch.enable_grad():
        gradient = exact_gradient(x, denoise_fn, z0, boundary, box)
    return _masked_step(denoised, gradient, step_size(sigma, strength, boundary, gradient.dtype, cap), mask)


def _autograd_safe(t: torch.Tensor) -> torch.Tensor:
    # tensors cached under torch.inference_mode() cannot be saved for backward
    return t.clone() if t.is_inference() else t


# --- the same, fused for the sampler hook (one call per step) --------------------------------------
# ``boundary_region`` and ``fast_update`` written for few launches: the mask's weights, the
# low-pass matrices and LP(z0) are made once (they depend only on the node's inputs and the
# latent's shape), so a step runs 6 launches for the boundary and 11 for the update.


def masked_mean_weights(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple:
    """Constants of Eq. 7's masked statistics for ``mask`` ``[Bm, H, W]`` (inside = ``>= 0.5``).

    Returns ``(inside [Bm, H, W] bool, weights [Bm, H*W, 1], root [Bm, H, W])``: ``1/count``
    on the inside pixels (0 outside) and its square root (count clamped to at least 1).
    """
    inside = mask >= 0.5
    weights = inside.to(dtype) / inside.to(dtype).sum(dim=(-2, -1), keepdim=True).clamp_min(1.0)
    return inside, weights.reshape(weights.shape[0], -1, 1), weights.sqrt()


def boundary_from_weights(attention: torch.Tensor, inside: torch.Tensor, weights: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    """:func:`boundary_region` from :func:`masked_mean_weights`'s constants: ``[B, H, W]`` bool.

    ``mu`` is one batched dot product, ``sigma`` the norm of ``root * (mu - A)``, and
    ``A <= mu - sigma`` is read as ``mu - A >= sigma``: six launches.
    """
    b = attention.shape[0]
    w = weights.expand(b, -1, -1) if weights.shape[0] != b else weights
    mu = torch.bmm(attention.reshape(b, 1, -1), w)  # [B, 1, 1]
    gap = mu - attention  # mu - A
    sigma = torch.linalg.vector_norm(gap * root, dim=(-2, -1), keepdim=True)  # population std over the inside
    return (gap >= sigma) & inside


def low_pass_matrices(height: int, width: int, band: float = 0.5, layout: str = "centred") -> Optional[tuple]:
    """``(P_y [H, H], P_x [W, W])`` float64 with ``low_pass(z) = P_y z P_x`` for the ``centred`` box, or None.

    The centred box is a product of 1-D masks symmetric in frequency, so the filter is real
    and separable: ``P = Re(F^-1 diag(keep) F)``, ``P[i, j] = 1/n sum_f keep_f cos(2 pi f (i - j) / n)``
    (symmetric). The ``quadrant`` box is not symmetric (a complex filter): None, use the FFT.
    """
    if layout != "centred":
        return None
    box = frequency_box(height, width, band, layout).double()

    def matrix(n: int, keep: torch.Tensor) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        f = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
        return torch.cos(2.0 * torch.pi * (i[:, None] - i[None, :])[..., None] * f / n) @ keep / n

    return matrix(height, box[:, 0]), matrix(width, box[0])  # the centred box keeps f = 0: its column and row are the 1-D masks


def fast_update_fused(
    denoised: torch.Tensor,
    low_z0: torch.Tensor,
    boundary: torch.Tensor,
    mask: Optional[torch.Tensor],
    sigma: torch.Tensor,
    strength: float,
    p_y: torch.Tensor,
    p_x: torch.Tensor,
    cap: bool = True,
) -> torch.Tensor:
    """:func:`fast_update` with the low-pass as the matrices of :func:`low_pass_matrices`.

    ``low_z0`` = ``P_y z0 P_x`` ``[B, C, H, W]`` (made once), ``p_y`` / ``p_x`` in ``denoised``'s
    dtype. The step ``min(lambda sigma^2, |Idx|/2) * 2/|Idx|`` is ``2 lambda min(sigma^2/|Idx|, 1/(2 lambda))``
    per image; its ``2 lambda`` rides on the last matmul. 11 launches (12 with ``mask``).
    """
    b, c, h, w = denoised.shape
    rows = b * c
    p_rows = p_y.expand(rows, h, h)
    # LP(x0) - LP(z0) = P_y (x0 P_x) - LP(z0)
    residual = torch.baddbmm(low_z0.reshape(rows, h, w), p_rows, torch.matmul(denoised, p_x).reshape(rows, h, w), beta=-1.0)
    size = boundary.sum(dim=(-2, -1), keepdim=True).clamp_min(1)  # |Idx| per image, [B, 1, 1]
    ratio = torch.square(sigma.to(denoised.dtype)).reshape(-1, 1, 1) / size
    if cap and strength > 0:  # (a negative lambda's lambda sigma^2 is always the smaller)
        ratio = ratio.clamp(max=1.0 / (2.0 * strength))
    scaled = residual.reshape(b, c, h, w) * (boundary * ratio).unsqueeze(1)  # 1_Idx ⊙ residual, the step per image
    low = torch.matmul(scaled, p_x).reshape(rows, h, w)
    if mask is None:
        return torch.baddbmm(denoised.reshape(rows, h, w), p_rows, low, alpha=-2.0 * strength).reshape(b, c, h, w)
    update = torch.bmm(p_rows, low).reshape(b, c, h, w)
    return torch.addcmul(denoised, update, mask.unsqueeze(1).to(update.dtype), value=-2.0 * strength)


# --- measuring it (Fig. 7) -------------------------------------------------------------------------


def cumulative_amplitude_difference(a: torch.Tensor, b: torch.Tensor, region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fig. 7's curve: cumulative |FFT(a)| - |FFT(b)| difference by radius from DC.

    ``a``, ``b``: ``[B, C, H, W]``; ``region`` ``[B or 1, H, W]`` selects the pixels
    compared (zeroed outside). Returns ``[R]`` float64: entry ``r`` is the mean
    over images and channels of ``sum_{|f| <= r} | |A(f)| - |B(f)| |``,
    ``R = floor(max radius) + 1``.
    """
    if region is not None:
        w = region.unsqueeze(1).to(torch.float64)
        a, b = a.double() * w, b.double() * w
    amp = (torch.fft.fft2(a.double(), dim=(-2, -1)).abs() - torch.fft.fft2(b.double(), dim=(-2, -1)).abs()).abs()
    h, w_ = a.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)
    fx = torch.fft.fftfreq(w_, d=1.0 / w_, dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    bins = radius.floor().long()
    per_bin = torch.zeros(int(bins.max()) + 1, dtype=torch.float64)
    per_bin.index_add_(0, bins.reshape(-1), amp.mean(dim=(0, 1)).reshape(-1))
    return per_bin.cumsum(0)
