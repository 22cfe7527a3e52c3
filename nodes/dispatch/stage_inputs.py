"""The inputs every attention node shares: weight, start/end, cond/uncond, mask.

Each mechanism node merges :func:`schedule_inputs` into its INPUT_TYPES and
turns the values into a :class:`StageSchedule` with :func:`build_schedule`,
so the same words and defaults appear on every node.
"""

from __future__ import annotations

from typing import Optional

import torch

from .dispatcher import APPLY_TO_CHOICES, StageSchedule
from ..common.errors import IdentityAttentionError
from ..common.host import percent_to_sigma

CATEGORY = "identity_attention"


def weight_input(default: float = 1.0, minimum: float = -1.0, maximum: float = 3.0, tooltip: Optional[str] = None):
    return (
        "FLOAT",
        {
            "default": default,
            "min": minimum,
            "max": maximum,
            "step": 0.01,
            "tooltip": tooltip or "How strongly the identity is applied. 0 turns this node off (the image is exactly as without it).",
        },
    )


def schedule_inputs(weight_default: float = 1.0, weight_tooltip: Optional[str] = None) -> dict:
    """``required`` entries: weight, start_percent, end_percent, apply_to."""
    return {
        "weight": weight_input(weight_default, tooltip=weight_tooltip),
        "start_percent": (
            "FLOAT",
            {
                "default": 0.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.001,
                "tooltip": "When the effect starts, as a fraction of sampling: 0 = from the first step. Starting later keeps the prompt's composition and adds identity to the details.",
            },
        ),
        "end_percent": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.001,
                "tooltip": "When the effect stops, as a fraction of sampling: 1 = until the last step.",
            },
        ),
        "apply_to": (
            list(APPLY_TO_CHOICES),
            {
                "default": "both",
                "tooltip": "Which half of classifier-free guidance is patched: both, only the positive prompt (cond) or only the negative (uncond).",
            },
        ),
    }


def mask_input() -> dict:
    """``optional`` entry: a MASK confining the effect to a region."""
    return {
        "mask": (
            "MASK",
            {
                "tooltip": "Optional: where in the image the effect applies (white = full effect). Any size: it is resized to every layer. Use one mask per person to place two identities.",
            },
        )
    }


def build_schedule(
    model,
    weight: float,
    start_percent: float,
    end_percent: float,
    apply_to: str = "both",
    mask: Optional[torch.Tensor] = None,
    node: str = "",
) -> StageSchedule:
    """Validate the shared inputs and resolve percents to sigmas for ``model``."""
    if not (0.0 <= start_percent <= end_percent <= 1.0):
        raise IdentityAttentionError(
            f"start_percent ({start_percent}) must not be after end_percent ({end_percent})",
            node=node,
            input_name="start_percent",
            fix="set start_percent lower than end_percent",
        )
    if mask is not None:
        mask = validate_mask(mask, node)
    return StageSchedule(
        weight=float(weight),
        sigma_start=percent_to_sigma(model, start_percent),
        sigma_end=percent_to_sigma(model, end_percent),
        apply_to=apply_to,
        mask=mask,
    )


def validate_mask(mask: torch.Tensor, node: str = "", input_name: str = "mask") -> torch.Tensor:
    """A MASK as ``[Bm, H, W]`` float32 on the CPU, finite, in [0, 1]."""
    if not torch.is_tensor(mask) or mask.dim() not in (2, 3) or mask.numel() == 0:
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise IdentityAttentionError(
            f"expected a MASK of shape [H, W] or [batch, H, W], got {shape}",
            node=node,
            input_name=input_name,
            fix="connect a MASK output (e.g. from Load Image's mask or a mask editor)",
        )
    mask = mask.detach().float().cpu()
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if not torch.isfinite(mask).all():
        raise IdentityAttentionError("the mask contains NaN or infinite values", node=node, input_name=input_name, fix="regenerate the mask")
    return mask.clamp(0.0, 1.0)
