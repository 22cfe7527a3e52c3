"""STFG math (adapters/attention/stfg_guidance.py) against references written here (Eq. 7, 9, 10, 15)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from conftest import pack

stfg = pack("adapters.attention.stfg_guidance")

F64 = torch.float64


# --- references ----------------------------------------------------------------------------------


def shifted_box(h, w, layout="centred", band=0.5):
    """The box drawn in the fftshift-ed spectrum as the paper describes it, then unshifted (numpy)."""
    i = np.arange(h)[:, None]
    j = np.arange(w)[None, :]
    cy, cx = h // 2, w // 2  # DC after fftshift
    if layout == "quadrant":  # H/2 < i < 3H/4 and W/2 < j < 3W/4 for band 0.5
        box = (i > cy) & (i < cy + band * h / 2) & (j > cx) & (j < cx + band * w / 2)
    else:  # centred: |i - H/2| < band H/2, DC kept
        box = ((np.abs(i - cy) < band * h / 2) | (i == cy)) & ((np.abs(j - cx) < band * w / 2) | (j == cx))
    return np.fft.ifftshift(box.astype(np.float64))


def lp_ref(z, box):
    """Re(IFFT(FFT(z) ⊙ box)) in float64 with numpy."""
    return np.real(np.fft.ifft2(np.fft.fft2(z, axes=(-2, -1)) * box, axes=(-2, -1)))


def energy_ref(x0, z0, idx, box):
    d = lp_ref(x0, box) - lp_ref(z0, box)  # [B, C, H, W]
    per_pixel = (d**2).sum(axis=1)
    return np.array([per_pixel[b][idx[b]].sum() / max(idx[b].sum(), 1) for b in range(x0.shape[0])])


# --- the box ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (16, 12), (9, 7)])
@pytest.mark.parametrize("layout", ["centred", "quadrant"])
def test_frequency_box_matches_the_shifted_spectrum_box(size, layout):
    h, w = size
    got = stfg.frequency_box(h, w, 0.5, layout).numpy()
    assert np.array_equal(got, shifted_box(h, w, layout))
    if layout == "centred":
        assert got[0, 0] == 1  # DC kept
        assert np.array_equal(got, got[(-np.arange(h)) % h][:, (-np.arange(w)) % w])  # symmetric: a real filter


def test_low_pass_is_real_and_keeps_only_the_band():
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    box = stfg.frequency_box(16, 16, 0.5)
    got = stfg.low_pass(z, box)
    np.testing.assert_allclose(got.numpy(), lp_ref(z.numpy(), box.numpy()), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.fft.fft2(got.numpy()) * (1 - box.numpy())).max(), 0.0, atol=1e-4)
    full = stfg.frequency_box(16, 16, 1.01)
    torch.testing.assert_close(stfg.low_pass(z, full).double(), z, rtol=1e-5, atol=1e-5)


# --- Eq. 7 ---------------------------------------------------------------------------------------


def test_boundary_equals_eq7_on_a_hand_made_map():
    a = torch.tensor(
        [
            [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
            [0.9, 0.10, 0.20, 0.50, 0.60, 0.9],
            [0.9, 0.15, 0.70, 0.80, 0.55, 0.9],
            [0.9, 0.12, 0.75, 0.85, 0.50, 0.9],
            [0.9, 0.30, 0.40, 0.45, 0.35, 0.9],
            [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
        ],
        dtype=torch.float32,
    )
    mask = torch.zeros(6, 6)
    mask[1:5, 1:5] = 1.0
    inside = [(i, j) for i in range(6) for j in range(6) if mask[i, j] >= 0.5]
    values = [float(a[i, j]) for i, j in inside]
    mu, sigma = statistics.fmean(values), statistics.pstdev(values)  # masked statistics of the main text
    expected = {(i, j) for (i, j) in inside if float(a[i, j]) <= mu - sigma}
    assert expected == {(1, 1), (2, 1), (3, 1), (1, 2)}  # the low-attention ring on the left and top
    got = stfg.boundary_region(a[None], mask[None])[0]
    assert {(i, j) for i in range(6) for j in range(6) if got[i, j]} == expected
    # pixels outside the mask never count, however low; an empty mask gives no region
    a2 = a.clone()
    a2[0, 0] = -5.0
    assert not stfg.boundary_region(a2[None], mask[None])[0, 0, 0]
    assert not stfg.boundary_region(a[None], torch.zeros(1, 6, 6)).any()


# --- g and its gradient -----------------------------------------------------------------------------


def case(seed=0, b=2, c=4, h=16, w=16):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, c, h, w, generator=gen, dtype=F64)
    z0 = torch.randn(1, c, h, w, generator=gen, dtype=F64)
    attention = torch.rand(b, h, w, generator=gen, dtype=F64)
    mask = torch.zeros(b, h, w, dtype=F64)
    mask[:, 3:13, 4:12] = 1.0
    mask[:, 2, 4:12] = 0.4  # a feathered edge: counts for the update, not for the region
    return x0, z0, attention, mask


@pytest.mark.parametrize("layout", ["centred", "quadrant"])
def test_energy_and_closed_form_gradient_match_references_and_autograd(layout):
    x0, z0, attention, mask = case(1)
    box = stfg.frequency_box(16, 16, 0.5, layout)
    idx = stfg.boundary_region(attention, mask)
    assert idx.any()
    g = stfg.guidance_energy(x0, z0, idx, box)
    np.testing.assert_allclose(g.numpy(), energy_ref(x0.numpy(), z0.numpy(), idx.numpy(), box.numpy()), rtol=1e-5)
    xg = x0.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(stfg.guidance_energy(xg, z0, idx, box).sum(), xg)
    torch.testing.assert_close(stfg.guidance_gradient(x0, z0, idx, box).double(), auto.double(), rtol=1e-4, atol=1e-6)


def fast_reference(denoised, z0, idx, mask, sigma, lam, box):
    """Eq. 10 with eps held constant, in the k-diffusion scale (numpy float64)."""
    d, z, i, m, bx = denoised.numpy(), z0.numpy(), idx.numpy(), mask.numpy(), box.numpy()
    count = np.maximum(i.sum(axis=(-2, -1)), 1)
    residual = (lp_ref(d, bx) - lp_ref(z, bx)) * i[:, None]
    grad = lp_ref(residual, bx) * (2.0 / count)[:, None, None, None]
    step = np.minimum(lam * np.asarray(sigma) ** 2, i.sum(axis=(-2, -1)) / 2.0)[:, None, None, None]
    return d - step * m[:, None] * grad


@pytest.mark.parametrize("sigma", [0.3, 2.0, 14.0])
def test_fast_equals_closed_form(sigma):
    x0, z0, attention, mask = case(2)
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    sig = torch.full((2,), sigma, dtype=F64)
    got = stfg.fast_update(x0, z0, idx, mask, sig, 3.0, box)
    np.testing.assert_allclose(got.numpy(), fast_reference(x0, z0, idx, mask, [sigma] * 2, 3.0, box), rtol=1e-5, atol=1e-6)
    outside = (mask == 0)[:, None].expand_as(x0)
    assert torch.equal(got[outside], x0[outside])  # nothing moves outside the edit mask


@pytest.mark.parametrize("size,band", [((16, 16), 0.5), ((12, 20), 0.3), ((9, 7), 0.8)])
def test_low_pass_matrices_are_the_fft_low_pass(size, band):
    """The centred box is a real separable filter: P_y z P_x is the FFT low-pass (float64); the quadrant box has none."""
    h, w = size
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(4), dtype=F64)
    p_y, p_x = stfg.low_pass_matrices(h, w, band)
    box = stfg.frequency_box(h, w, band)
    np.testing.assert_allclose((p_y @ z @ p_x).numpy(), lp_ref(z.numpy(), box.numpy()), rtol=0, atol=1e-12)
    assert stfg.low_pass_matrices(h, w, band, "quadrant") is None


@pytest.mark.parametrize("frames", [1, 2])
def test_fused_boundary_is_eq7(frames):
    x0, z0, attention, mask = case(3)
    mask = mask[:frames]
    inside, weights, root = stfg.masked_mean_weights(mask, F64)
    got = stfg.boundary_from_weights(attention, inside, weights, root)
    assert got.any() and torch.equal(got, stfg.boundary_region(attention, mask))
    empty = torch.zeros_like(mask)
    assert not stfg.boundary_from_weights(attention, *stfg.masked_mean_weights(empty, F64)).any()


@pytest.mark.parametrize("cap", [True, False])
@pytest.mark.parametrize("lam,sigma", [(3.0, 14.0), (3.0, 0.3), (-2.0, 2.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_fast_update_equals_fast_update(cap, lam, sigma, masked):
    """The launch-lean update (low-pass matrices, LP(z0) made once, the step folded in) is Eq. 10's fast update."""
    x0, z0, attention, mask = case(2)
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    p_y, p_x = stfg.low_pass_matrices(16, 16)
    low_z0 = (p_y @ z0 @ p_x).expand(2, -1, -1, -1).contiguous()
    sig = torch.full((2,), sigma, dtype=F64)
    update_mask = mask if masked else None
    got = stfg.fast_update_fused(x0, low_z0, idx, update_mask, sig, lam, p_y, p_x, cap)
    torch.testing.assert_close(got, stfg.fast_update(x0, z0, idx, update_mask, sig, lam, box, cap), rtol=0, atol=1e-12)
    if cap and lam > 0:
        np.testing.assert_allclose(got.numpy(), fast_reference(x0, z0, idx, mask if masked else torch.ones_like(mask), [sigma] * 2, lam, box), rtol=1e-9, atol=1e-9)
    assert torch.equal(stfg.fast_update_fused(x0, low_z0, torch.zeros_like(idx), update_mask, sig, lam, p_y, p_x, cap), x0)


def test_fast_step_reduces_the_energy_and_lambda_zero_is_identity():
    x0, z0, attention, mask = case(3)
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    sig = torch.tensor([1.5, 1.5], dtype=F64)
    before = stfg.guidance_energy(x0, z0, idx, box)
    after = stfg.guidance_energy(stfg.fast_update(x0, z0, idx, mask, sig, 2.0, box), z0, idx, box)
    assert (after < before * 0.999).all()
    assert torch.equal(stfg.fast_update(x0, z0, idx, mask, sig, 0.0, box), x0)
    # the cap: an enormous strength removes the boundary's low-band residual at most once, never overshoots
    huge = stfg.guidance_energy(stfg.fast_update(x0, z0, idx, mask, sig, 1e9, box), z0, idx, box)
    assert (huge < before).all()


class TinyDenoiser(torch.nn.Module):
    """A differentiable stand-in for the UNet's x -> x0 (float64): x0 = x - sigma * eps(x)."""

    def __init__(self, sigma, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.sigma = sigma
        self.w1 = torch.nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen, dtype=F64) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(4, 8, 3, 3, generator=gen, dtype=F64) * 0.3)

    def forward(self, x):
        h = torch.nn.functional.conv2d(x, self.w1, padding=1)
        eps = torch.nn.functional.conv2d(torch.tanh(h), self.w2, padding=1)
        return x - self.sigma * eps


def test_exact_equals_autograd_through_a_tiny_model():
    _, z0, attention, mask = case(4)
    sigma = 1.7
    net = TinyDenoiser(sigma).requires_grad_(False)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9), dtype=F64) * 2.0
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    denoised = net(x)
    got = stfg.exact_update(x, denoised, net, z0, idx, mask, torch.full((2,), sigma, dtype=F64), 4.0, box)

    # reference: torch.autograd of g written with numpy-equivalent torch ops, Eq. 10 in the k-diffusion scale
    bx = torch.from_numpy(shifted_box(16, 16))
    xg = x.clone().requires_grad_(True)
    lp = lambda z: torch.fft.ifft2(torch.fft.fft2(z) * bx).real
    d = lp(net(xg)) - lp(z0)
    g = ((d**2).sum(dim=1) * idx).sum(dim=(-2, -1)) / idx.sum(dim=(-2, -1))
    (grad,) = torch.autograd.grad(g.sum(), xg)
    step = torch.minimum(torch.tensor(4.0 * sigma**2, dtype=F64), idx.sum(dim=(-2, -1)) / 2.0).reshape(-1, 1, 1, 1)
    expected = denoised - step * mask[:, None] * grad
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    assert (got - denoised).abs().amax() > 1e-3  # it did something


def test_exact_with_a_constant_eps_equals_fast():
    """When eps does not depend on x, dx0/dx = I and Eq. 10 through the model is the fast closed form."""
    x0, z0, attention, mask = case(5)
    sigma = torch.full((2,), 0.8, dtype=F64)
    eps = torch.randn_like(x0)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    box = stfg.frequency_box(16, 16)
    idx = stfg.boundary_region(attention, mask)
    exact = stfg.exact_update(x, x0, lambda xx: xx - sigma.reshape(-1, 1, 1, 1) * eps, z0, idx, mask, sigma, 5.0, box)
    torch.testing.assert_close(exact, stfg.fast_update(x0, z0, idx, mask, sigma, 5.0, box), rtol=1e-9, atol=1e-9)


def test_exact_accepts_inference_tensors_from_a_prompt():
    """Caches made under torch.inference_mode() (as every prompt runs) must not break the backward pass."""
    with torch.inference_mode():
        _, z0, attention, mask = case(6)
        box = stfg.frequency_box(16, 16)
        idx = stfg.boundary_region(attention, mask)
        x = torch.randn(2, 4, 16, 16, dtype=F64)
    net = TinyDenoiser(1.0).requires_grad_(False)
    with torch.inference_mode(False):
        out = stfg.exact_update(x, x, net, z0, idx, mask, torch.ones(2, dtype=F64), 1.0, box)
    assert torch.isfinite(out).all()


def test_cumulative_amplitude_difference():
    a = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7), dtype=F64)
    cad = stfg.cumulative_amplitude_difference(a, a)
    assert torch.equal(cad, torch.zeros_like(cad))
    b = a + 0.5  # a DC offset: the whole difference sits at radius 0
    cad = stfg.cumulative_amplitude_difference(a, b)
    assert cad[0] > 0 and torch.allclose(cad, cad[0].expand_as(cad))
