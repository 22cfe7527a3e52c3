"""Training recipes, stratified timesteps and per-step random generators (pure torch).

PVA's per-identity fine-tune (``config/SDI2_PVA_FT40.json`` of github:AtlantixJJ/PVA-CelebAHQ-IDI,
mechanisms.md §1.5): 40 optimizer steps, batch 1, gradient accumulation 2,
``num_time_resample`` 2, AdamW with lr 1e-5 multiplied by the total batch (1 x 1 GPU x 2
accumulation = 2e-5), weight decay 0.01, constant schedule, the ``<new1>`` modifier token at
lr 1e-3; trainable: ``to_visual_{q,k,v}`` of every cross-attention layer and the token.

Timesteps are *stratified*: of the ``n`` timesteps drawn for one image, the ``k``-th is uniform
in ``[k T / n, (k + 1) T / n)`` (PVA's ``num_time_resample``), so every micro-batch covers the
whole noise range.

Randomness: every micro-step draws from its own generator seeded by ``(seed, step, micro, rank)``
(:func:`step_generator`). A run is then a pure function of its seed and its step counter, which
is what makes a resumed run repeat the uninterrupted one exactly (the trainer still saves the
global RNG states, for anything outside the pack that draws from them).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Optional

import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class PersonalizeRecipe:
    """PVA's FT40 recipe (defaults) for the per-identity personalization.

    learning_rate: of the visual projections, already multiplied by the total batch
    (PVA: 1e-5 x (1 image x 2 accumulation steps)). token_learning_rate: the modifier token's.
    background_weight: loss weight outside the face mask for models without an inpainting
    input (our choice, see ``training_losses``); inpainting models use PVA's unmasked loss.
    mask_pool: random face masks prepared per reference image (drawn from each step).
    """

    steps: int = 40
    learning_rate: float = 2e-5
    token_learning_rate: float = 1e-3
    weight_decay: float = 0.01
    grad_accum: int = 2
    time_resample: int = 2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    background_weight: float = 0.1
    mask_pool: int = 8
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def stratified_timesteps(count: int, generator: torch.Generator, total: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``count`` integer timesteps, the ``k``-th uniform in ``[k*total/count, (k+1)*total/count)``: ``[count]`` long."""
    if count < 1:
        raise ValueError("need at least one timestep")
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    lo = torch.arange(count, dtype=torch.float64) * total / count
    t = torch.floor(lo + u * (total / count)).long()
    return t.clamp(0, total - 1)


def _seed_of(*parts: int) -> int:
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator for one micro-step, a function of ``(seed, step, micro, rank, stream)`` only."""
    return torch.Generator().manual_seed(_seed_of(seed, step, micro, rank, stream))


def sigmas_for(timesteps: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """Discrete timesteps -> sigmas of a model's schedule (``sigma_table`` ``[T]``, ComfyUI's ``model_sampling.sigmas``)."""
    return sigma_table.detach().float().cpu()[timesteps.cpu()]


def total_micro_steps(steps: int, grad_accum: int) -> int:
    return int(steps) * int(grad_accum)


def lr_scale_for(step: int, warmup: int = 0) -> float:
    """Linear warm-up then constant (PVA uses a constant schedule, warm-up 0)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / float(warmup))


def check_recipe(recipe: PersonalizeRecipe) -> Optional[str]:
    """A problem with a recipe, in words, or None."""
    if recipe.steps < 1:
        return "steps must be at least 1"
    if recipe.grad_accum < 1 or recipe.time_resample < 1:
        return "gradient accumulation and timestep resampling must be at least 1"
    if recipe.learning_rate < 0 or recipe.token_learning_rate < 0:
        return "learning rates cannot be negative"
    if not 0.0 <= recipe.background_weight <= 1.0:
        return "the background loss weight must be between 0 and 1"
    return None
