"""Blind-face-restoration degradations: clean photo -> the kind of damaged photo a restorer must undo (pure torch + Pillow).

Dual-Pivot Tuning (stage 2) trains the restoration guide on degraded -> clean pairs made on the
fly, as blind face restoration systems do. The model of degradation is GFPGAN's
(``options/train_gfpgan_v1.yml``: blur sigma 0.1-10, downsample 0.8-8, Gaussian noise 0-20 / 255,
JPEG quality 60-100, all on 512 px faces), which DiffBIR and the Dual-Pivot paper's restorer
reuse, with two changes taken from Real-ESRGAN's "random order" practice:

- **the ops run in a random order** (a permutation drawn per image), and each op is present with
  its own probability (:class:`DegradationSettings`);
- **blur is Gaussian or motion blur** (half and half): a straight streak of 1-21 px at a uniform
  angle, as a shaken hand-held camera makes (our choice; GFPGAN's anisotropic Gaussians model
  lens blur only, and old photos are often shaken).

Ops (each on ``[B, 3, H, W]`` floats in ``[0, 1]``, clamped after every op so the next one sees a
real image):

=============  ====================================================================  ==============
op             what                                                                  range (512 px)
=============  ====================================================================  ==============
gaussian blur  isotropic Gaussian kernel, radius ``ceil(3 sigma)`` (<= 20), reflect    sigma 0.1-10
motion blur    normalised line kernel, anti-aliased (bilinear splats), reflect pad    length 1-21
downscale      box average (``area``) to ``size / factor``; the end resizes back      factor 0.8-8
noise          ``x + sigma * N(0, 1)`` per pixel and channel                          sigma 0-20/255
jpeg           Pillow's encoder in memory (8-bit RGB, 4:2:0), decoded again           quality 60-100
=============  ====================================================================  ==============

Blur sizes are given for 512 px faces and scale with ``min(H, W) / 512`` (our choice), so a
preview at 256 px or a tiny test image degrades alike. A factor below 1 upsamples (GFPGAN's 0.8).
After the ops, the image is resized back to its input size (bilinear), as the restorer's input.

Randomness: every image draws from its own generator (:func:`degradation_generator`, seeded by
``(seed, index)``), so a batch is a pure function of its seed and each image's stream position:
the trainer's resumed run sees exactly the pairs the uninterrupted one saw.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .training_schedule import step_generator

REFERENCE_SIZE = 512
"""The face size the ranges are given for (GFPGAN / FFHQ 512)."""
MAX_BLUR_RADIUS = 20
"""GFPGAN's 41-tap kernels."""
OPS = ("blur", "downscale", "noise", "jpeg")
DEGRADATION_STREAM = 21
"""The ``stream`` of :func:`~.training_schedule.step_generator` that degradations draw from."""


@dataclass(frozen=True)
class DegradationSettings:
    """Ranges (for 512 px faces) and probabilities of each op; ``strength`` scales every range's top.

    ``strength`` 1 is GFPGAN's ranges, 0 the mildest end of each range (still not the clean photo:
    ops at their range's bottom), values in between interpolate the top of each range.
    """

    blur_sigma: Tuple[float, float] = (0.1, 10.0)
    motion_length: Tuple[float, float] = (1.0, 21.0)
    motion_probability: float = 0.5
    downscale: Tuple[float, float] = (0.8, 8.0)
    noise_sigma: Tuple[float, float] = (0.0, 20.0 / 255.0)
    jpeg_quality: Tuple[int, int] = (60, 100)
    probability: Tuple[Tuple[str, float], ...] = (("blur", 1.0), ("downscale", 1.0), ("noise", 1.0), ("jpeg", 1.0))
    strength: float = 1.0

    def with_strength(self, strength: float) -> "DegradationSettings":
        return replace(self, strength=float(strength))

    def top(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * min(max(self.strength, 0.0), 1.0)


@dataclass(frozen=True)
class DegradationStep:
    """One drawn op: its name and parameter (sigma, length + angle, factor, quality)."""

    op: str
    value: float
    angle: float = 0.0


def degradation_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index`` (a stream position, or the batch index in the node)."""
    return step_generator(int(seed), int(index), stream=DEGRADATION_STREAM)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


def draw_steps(settings: DegradationSettings, g: torch.Generator) -> List[DegradationStep]:
    """The ops of one image, in their drawn order, with drawn strengths (sizes for 512 px)."""
    probability = dict(settings.probability)
    order = [OPS[i] for i in torch.randperm(len(OPS), generator=g).tolist()]
    steps = []
    for op in order:
        # every op draws its numbers whether or not it is kept: the others' draws do not depend on the probabilities
        keep = float(torch.rand((), generator=g)) < probability.get(op, 0.0)
        if op == "blur":
            motion = float(torch.rand((), generator=g)) < settings.motion_probability
            lo, hi = settings.motion_length if motion else settings.blur_sigma
            value, angle = _uniform(g, lo, settings.top(lo, hi)), _uniform(g, 0.0, 180.0)
            step = DegradationStep("motion_blur" if motion else "gaussian_blur", value, angle if motion else 0.0)
        elif op == "downscale":
            lo, hi = settings.downscale
            step = DegradationStep(op, _uniform(g, lo, settings.top(lo, hi)))
        elif op == "noise":
            lo, hi = settings.noise_sigma
            step = DegradationStep(op, _uniform(g, lo, settings.top(lo, hi)))
        else:
            lo, hi = settings.jpeg_quality  # strength lowers the worst quality allowed
            worst = hi - (hi - lo) * min(max(settings.strength, 0.0), 1.0)
            step = DegradationStep(op, float(round(_uniform(g, worst, hi))))
        if keep:
            steps.append(step)
    return steps


# --- the ops (each [B, 3, H, W] in [0, 1] -> same) ------------------------------------------------------


def gaussian_kernel(sigma: float, radius: Optional[int] = None) -> torch.Tensor:
    """Normalised 2-D Gaussian ``[2r+1, 2r+1]`` (float64), ``r = ceil(3 sigma)`` unless given."""
    r = int(math.ceil(3.0 * sigma)) if radius is None else int(radius)
    r = max(r, 1)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2.0 * max(sigma, 1e-6) ** 2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def motion_kernel(length: float, angle_degrees: float, radius: Optional[int] = None) -> torch.Tensor:
    """Normalised line kernel ``[2r+1, 2r+1]`` (float64): a streak of ``length`` px through the centre.

    Points every 1/4 px along the streak are splatted bilinearly (anti-aliased at any angle);
    a length below 1 px is the identity (one tap).
    """
    r = int(math.ceil(length / 2.0)) + 1 if radius is None else int(radius)
    size = 2 * r + 1
    k = torch.zeros(size, size, dtype=torch.float64)
    n = max(int(math.ceil(length * 4)), 1)
    t = torch.linspace(-(length - 1) / 2.0, (length - 1) / 2.0, n, dtype=torch.float64) if length > 1 else torch.zeros(1, dtype=torch.float64)
    a = math.radians(angle_degrees)
    xs, ys = r + t * math.cos(a), r - t * math.sin(a)
    for x, y in zip(xs.tolist(), ys.tolist()):
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < size and 0 <= xx < size and w > 0:
                k[yy, xx] += w
    return k / k.sum()


def _fit(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop a centred kernel so reflect padding fits the image (radius < min(H, W)), renormalised."""
    r = (kernel.shape[-1] - 1) // 2
    cap = max(min(height, width) - 1, 0)
    if r <= cap:
        return kernel
    k = kernel[r - cap : r + cap + 1, r - cap : r + cap + 1]
    return k / k.sum()


def filter2d(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel convolution (correlation) with reflect padding: ``[B, C, H, W]`` -> same."""
    b, c, h, w = images.shape
    kernel = _fit(kernel, h, w)
    r = (kernel.shape[-1] - 1) // 2
    if r == 0:
        return images * kernel.reshape(()).to(images.dtype)
    padded = F.pad(images, (r, r, r, r), mode="reflect")
    weight = kernel.to(images.dtype)[None, None].expand(c, 1, -1, -1)
    return F.conv2d(padded, weight, groups=c)


def scale_for(images: torch.Tensor) -> float:
    """Blur sizes are for 512 px faces: the factor for this image (``min(H, W) / 512``)."""
    return min(images.shape[-2:]) / REFERENCE_SIZE


def gaussian_blur(images: torch.Tensor, sigma_512: float) -> torch.Tensor:
    sigma = sigma_512 * scale_for(images)
    radius = min(int(math.ceil(3.0 * sigma)), MAX_BLUR_RADIUS)
    return filter2d(images, gaussian_kernel(sigma, max(radius, 1)))


def motion_blur(images: torch.Tensor, length_512: float, angle: float) -> torch.Tensor:
    return filter2d(images, motion_kernel(length_512 * scale_for(images), angle))


def downscale(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Box-average to ``round(size / factor)`` (at least 1 px); a factor below 1 enlarges (bilinear)."""
    h, w = images.shape[-2:]
    size = (max(1, int(round(h / factor))), max(1, int(round(w / factor))))
    if size[0] <= h and size[1] <= w:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def add_noise(images: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=g, dtype=torch.float32)
    return images + sigma * noise.to(images.dtype)


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Through Pillow's JPEG encoder and decoder, in memory (8-bit, rounded)."""
    from PIL import Image

    out = []
    for img in images:
        pixels = (img.clamp(0, 1).permute(1, 2, 0) * 255.0).round().to(torch.uint8).cpu().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            back = torch.frombuffer(bytearray(decoded.convert("RGB").tobytes()), dtype=torch.uint8)
        out.append(back.reshape(pixels.shape).permute(2, 0, 1).to(images.dtype) / 255.0)
    return torch.stack(out).to(images.device)


def apply_steps(images: torch.Tensor, steps: Sequence[DegradationStep], g: torch.Generator) -> torch.Tensor:
    """Run drawn ops on ``[B, 3, H, W]`` (one image's ops on every row) and resize back to ``H x W``."""
    h, w = images.shape[-2:]
    x = images.float()
    for s in steps:
        if s.op == "gaussian_blur":
            x = gaussian_blur(x, s.value)
        elif s.op == "motion_blur":
            x = motion_blur(x, s.value, s.angle)
        elif s.op == "downscale":
            x = downscale(x, s.value)
        elif s.op == "noise":
            x = add_noise(x, s.value, g)
        elif s.op == "jpeg":
            x = jpeg(x, int(s.value))
        else:
            raise ValueError(f"unknown degradation op {s.op!r}")
        x = x.clamp(0.0, 1.0)
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    return x


def degrade(images: torch.Tensor, seed: int, indices: Optional[Sequence[int]] = None, settings: Optional[DegradationSettings] = None) -> Tuple[torch.Tensor, List[List[DegradationStep]]]:
    """Degrade ComfyUI images ``[B, H, W, 3]`` in ``[0, 1]``; image ``i`` draws from ``(seed, indices[i])``.

    Returns the degraded images ``[B, H, W, 3]`` (float32, same size) and each image's drawn ops.
    """
    settings = settings or DegradationSettings()
    indices = list(range(images.shape[0])) if indices is None else list(indices)
    if len(indices) != images.shape[0]:
        raise ValueError(f"{len(indices)} indices for {images.shape[0]} images")
    out, drawn = [], []
    for img, index in zip(images, indices):
        g = degradation_generator(seed, index)
        steps = draw_steps(settings, g)
        out.append(apply_steps(img.permute(2, 0, 1)[None].float().cpu(), steps, g)[0].permute(1, 2, 0))
        drawn.append(steps)
    return torch.stack(out), drawn


def describe(steps: Sequence[DegradationStep]) -> str:
    """``blur 3.2 -> noise 0.04 -> jpeg 72`` (sizes for 512 px)."""
    names: Dict[str, str] = {"gaussian_blur": "blur sigma {:.2f}", "motion_blur": "motion {:.1f} px", "downscale": "downscale x{:.2f}", "noise": "noise {:.3f}", "jpeg": "jpeg q{:.0f}"}
    parts = []
    for s in steps:
        text = names[s.op].format(s.value)
        parts.append(text + (f" at {s.angle:.0f} deg" if s.op == "motion_blur" else ""))
    return " -> ".join(parts) if parts else "(none)"
