"""Condition dropout for training (pure torch): which samples lose their identity, their caption, or both.

IP-Adapter (``tutorial_train.py``) and CA-Edit ("following IP-Adapter", mechanisms.md §2.2, §8)
draw one uniform number ``u`` per sample::

    u < p_identity                               -> identity condition dropped (image embeds = 0)
    p_identity <= u < p_identity + p_text        -> caption dropped ("")
    ... <= u < p_identity + p_text + p_both      -> both dropped

with 0.05 each, so the model also learns the unconditional predictions classifier-free guidance
subtracts. Dropping the identity means the projector sees **zeros** for every feature (what
IP-Adapter does to its image embeddings; an all-zero ArcFace vector is also this pack's negative
identity input), so tokens still flow and a target's own projector learns what "no identity" is.

FaceChain-FACT trains its face adapter under three pairings (mechanisms.md §5.4): *paired*
(the face condition comes from the photo being denoised), *unpaired identity* (condition dropped)
and *shuffled* (another photo of the same person), with a curriculum that raises the shuffle
probability over training. The probabilities are not published; chosen here: the drop is the
identity drop above (0.05), and the shuffle probability rises linearly from ``start`` (0.0) to
``end`` (0.5) over the run (:func:`shuffle_probability`), the rest being paired.

Every draw comes from a generator the trainer seeds with ``(seed, step, micro, rank)``, so a
resumed run drops exactly the same conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

IP_ADAPTER_RATE = 0.05


@dataclass(frozen=True)
class ConditionDropout:
    """Probabilities per sample of dropping the identity, the caption, or both (mutually exclusive)."""

    identity: float = IP_ADAPTER_RATE
    text: float = IP_ADAPTER_RATE
    both: float = IP_ADAPTER_RATE

    def __post_init__(self):
        for name in ("identity", "text", "both"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"condition_dropout.{name} is {value}; it must be between 0 and 1")
        if self.identity + self.text + self.both > 1.0 + 1e-9:
            raise ValueError("condition_dropout: identity + text + both must not exceed 1")

    @classmethod
    def from_config(cls, value: Optional[Mapping]) -> "ConditionDropout":
        """``None`` -> IP-Adapter's 0.05 / 0.05 / 0.05; a number -> that rate for each; a table -> its fields."""
        if value is None:
            return cls()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(float(value), float(value), float(value))
        if not isinstance(value, Mapping):
            raise ValueError("train.condition_dropout must be a number or a table {identity, text, both}")
        unknown = set(value) - {"identity", "text", "both"}
        if unknown:
            raise ValueError(f"train.condition_dropout has unknown fields {sorted(unknown)} (known: identity, text, both)")
        return cls(**{k: float(v) for k, v in value.items()})

    def draw(self, count: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(drop_identity, drop_text)``, bool ``[count]`` each, from one uniform draw per sample."""
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        a, b, c = self.identity, self.identity + self.text, self.identity + self.text + self.both
        only_identity = u < a
        only_text = (u >= a) & (u < b)
        both = (u >= b) & (u < c)
        return only_identity | both, only_text | both


def zero_features(features: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A sample's stacked reference features with every tensor zeroed (the dropped identity)."""
    return {name: torch.zeros_like(t) for name, t in features.items()}


def shuffle_probability(step: int, total: int, start: float = 0.0, end: float = 0.5) -> float:
    """FACT's shuffle curriculum: linear from ``start`` at step 0 to ``end`` at the last step."""
    if total <= 1:
        return float(end)
    f = min(max(step / (total - 1), 0.0), 1.0)
    return float(start + (end - start) * f)


def face_pairing(count: int, shuffle: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample: True = shuffled (another photo of the person), False = paired (the photo itself)."""
    return torch.rand(count, generator=generator, dtype=torch.float64) < shuffle
