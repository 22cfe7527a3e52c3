"""The models and inputs a benchmark configuration samples.

UNets of the real SD1.5 / SDXL architectures through ComfyUI's own model
classes with random weights (``tests/testkit/tiny_models.py``): full size in
fp16 on a GPU, the micro variants (real layout, few channels) in fp32 on the
CPU. The ModelPatcher's offload device is its load device, so ComfyUI never
moves the weights between rounds. Conditioning: random 77-token contexts
(plus SDXL's pooled vector), positive and negative; the latent is random noise
at a mid-schedule sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .step_timer import StepInputs


@dataclass(frozen=True)
class Config:
    """One row group of the table: an architecture at a latent size."""

    arch: str  # "sd15" | "sdxl"
    latent_hw: Tuple[int, int]

    @property
    def label(self) -> str:
        h, w = self.latent_hw
        return f"{self.arch} {h * 8}×{w * 8} px (latent {h}×{w})"


def parse_configs(text: str) -> list:
    """``"sd15:64,sdxl:128x96"`` -> Configs (latent side, or HxW)."""
    configs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        arch, _, size = part.partition(":")
        if arch not in ("sd15", "sdxl") or not size:
            raise SystemExit(f"bad config {part!r}: write arch:latent, e.g. sd15:64 or sdxl:128x96")
        h, _, w = size.partition("x")
        configs.append(Config(arch, (int(h), int(w or h))))
    return configs


def build_model(arch: str, size: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ModelPatcher of a random-weight UNet, weights resident on ``device``."""
    from testkit.tiny_models import build_unet

    init = device if device.type == "cuda" else None  # draw full-size weights on the GPU: seconds, not minutes
    return build_unet(arch, seed=seed, size=size, device=device, dtype=dtype, offload_device=device, init_device=init)


def step_inputs(model, config: Config, seed: int = 0, text_tokens: int = 77) -> StepInputs:
    """Random cond/uncond contexts and noise for ``config``, at the schedule's middle sigma."""
    from testkit.tiny_models import random_conditioning

    h, w = config.latent_hw
    gen = torch.Generator().manual_seed(seed)
    sampling = model.model.model_sampling
    sigma = float(sampling.sigmas[len(sampling.sigmas) // 2])
    return StepInputs(
        latent=torch.zeros(1, 4, h, w),  # an empty latent, as txt2img starts; the noise makes x random
        noise=torch.randn(1, 4, h, w, generator=gen),
        positive=random_conditioning(config.arch, seed + 1, tokens=text_tokens),
        negative=random_conditioning(config.arch, seed + 2, tokens=text_tokens),
        sigma=sigma,
    )
