"""What a trainer trains: the pluggable *training target* interface.

A target is one mechanism's trainable part. It says

- **what parameters**: :attr:`module` (a ``torch.nn.Module`` from ``adapters/training/trainable_modules.py``
  holding them: checkpointed, wrapped by DDP, exported) and :meth:`param_groups` (learning rates;
  defaults by kind of parameter: :data:`TOKEN_LR` 1e-3 for learned words, :data:`PROJECTION_LR`
  1e-5 for attention projections, :data:`MODULE_LR` 1e-4 for small networks trained from scratch);
- **what forward hook**: :meth:`install` patches a training clone of the MODEL (dispatcher
  stages, attn2/middle patches) so the model's forward uses those parameters; per-step inputs
  (identity tokens, masks) come through the shared :class:`TrainingFeed`, which the loop fills
  before every forward;
- **what loss**: every target is trained with the denoising loss the loop computes; a target
  may add weighted regularisers (:meth:`regularizers`: MoA's router loss, SeFi-IDE's face-wise
  attention loss, FACT's FAIR) from what its hooks recorded during the forward;
- **what it produces**: :meth:`export` -> an ``IdAdapter`` in the native layout (written by
  ``adapters/formats/native_format.py``), or extra files (:meth:`extra_files`).

A target that needs the text encoder to run with gradients (a learned prompt token) returns the
vectors from :meth:`prompt_vectors`; the loop then encodes the prompt through a token CLIP
(``nodes/dispatch/prompt_token.py``) every micro-step.

Targets are built by name from :data:`TARGETS` (``register_target``): the trainer's config
lists them; the personalize node builds the PVA one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ...adapters.attention.spatial import mask_to_tokens

TOKEN_LR = 1e-3
"""Learned prompt words / token tables (PVA's modifier_vec lr; textual-inversion practice)."""
PROJECTION_LR = 1e-5
"""Attention projections (K/V/Q weights), fresh or copied from the layer (PVA's 40-step 1e-5 x batch)."""
MODULE_LR = 1e-4
"""Small networks trained from scratch: encoders, routers, score MLPs, gates (IP-Adapter's 1e-4)."""


@dataclass
class TrainingFeed:
    """Inputs of one micro-step, shared by the loop and the targets' hooks.

    tokens: identity tokens ``[1 or B, T, D]`` (a target may compute them from ``features``).
    features: the batch's identity features (``IdentityFeatures`` or a dict), for targets whose
        projector trains.
    foreground: the subject / face mask ``[B, H, W]`` in pixel space (1 = face), or None.
    edit_mask: the inpainting / edit mask ``[B, H, W]`` (CA²'s M), or None.
    recording: hooks record what their regularisers need only while this is True (the loop
        turns it off before backward, so recomputation by gradient checkpointing does not
        record twice).
    records: per target name, lists of tensors recorded during the forward.
    extras: anything else a target needs per step (e.g. the stage index of SeFi-IDE).
    """

    tokens: Optional[torch.Tensor] = None
    features: Any = None
    foreground: Optional[torch.Tensor] = None
    edit_mask: Optional[torch.Tensor] = None
    recording: bool = False
    records: Dict[str, Dict[str, List[torch.Tensor]]] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        """Before a forward: clear the records, start recording."""
        self.records = {}
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def record(self, target: str, name: str, value: torch.Tensor) -> None:
        if self.recording:
            self.records.setdefault(target, {}).setdefault(name, []).append(value)

    def recorded(self, target: str, name: str) -> List[torch.Tensor]:
        return self.records.get(target, {}).get(name, [])

    def rows(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """``[1 or batch, ...]`` -> ``[batch, ...]``."""
        if t.shape[0] == batch:
            return t
        if t.shape[0] == 1:
            return t.expand(batch, *t.shape[1:])
        raise ValueError(f"a per-step input has {t.shape[0]} rows for a batch of {batch}")

    def tokens_for(self, batch: int) -> torch.Tensor:
        if self.tokens is None:
            raise RuntimeError("the training feed has no identity tokens for this step")
        return self.rows(self.tokens, batch)

    def frozen_identity_kv(self, weights: Dict[str, torch.Tensor], call) -> Tuple[torch.Tensor, torch.Tensor]:
        """This step's identity tokens through a frozen adapter layer's ``to_k`` / ``to_v``: ``[b, T, C]`` each.

        The tokens are detached: targets that train something else around a fixed adapter
        (the MoA router, the CA² score) must not reach into the projector.
        """
        dt = call.q.dtype
        tokens = self.tokens_for(call.batch).to(device=call.q.device, dtype=dt).detach()
        k = F.linear(tokens, weights["to_k"].to(device=call.q.device, dtype=dt))
        v = F.linear(tokens, weights["to_v"].to(device=call.q.device, dtype=dt))
        return k, v

    def mask_at(self, mask: Optional[torch.Tensor], call) -> Optional[torch.Tensor]:
        """A pixel mask at an attention call's token grid: ``[b, N, 1]`` (None stays None)."""
        if mask is None:
            return None
        tokens = mask_to_tokens(mask, call.token_grid()).to(device=call.q.device, dtype=call.q.dtype)
        return self.rows(tokens, call.batch)


class TrainingTarget:
    """Base class (see the module docstring). Subclasses set :attr:`name` and :attr:`module`."""

    name = "target"
    module: torch.nn.Module
    default_learning_rate = PROJECTION_LR
    """Used when neither the target's settings nor ``train.learning_rate`` give one (see :data:`PROJECTION_LR`)."""

    def param_groups(self, learning_rate: float, weight_decay: float) -> List[dict]:
        """AdamW parameter groups (default: every parameter of :attr:`module` at ``learning_rate``)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [{"params": params, "lr": learning_rate, "weight_decay": weight_decay, "name": self.name}] if params else []

    def install(self, model_patcher, feed: TrainingFeed):
        """Return a patched clone of ``model_patcher`` whose forward uses this target's parameters."""
        raise NotImplementedError

    def prepare(self, feed: TrainingFeed) -> None:
        """Per micro-step, before the forward (e.g. tokens from a trainable projector)."""

    def models(self) -> List[tuple]:
        """Extra ``(ModelPatcher, weight root)`` pairs to load for training (e.g. a token text encoder)."""
        return []

    def prompt_vectors(self) -> Optional[Callable[[str], Optional[torch.Tensor]]]:
        """Learned prompt-token vectors per text encoder, or None (the prompt is fixed)."""
        return None

    def batch_inputs(self, batch: dict, repeat: int) -> Dict[str, torch.Tensor]:
        """Per micro-batch, on the collated batch before it is encoded: may rewrite it (e.g. captions ->
        a fixed prompt) and returns per-row tensors (``repeat`` rows per photo) for ``feed.extras``."""
        return {}

    def before_forward(self, feed: TrainingFeed, x_noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        """Just before the model call, with its inputs (e.g. run a ControlNet guide on them)."""

    def regularizers(self, feed: TrainingFeed) -> Dict[str, torch.Tensor]:
        """Weighted extra loss terms from what the hooks recorded (already multiplied by their weights)."""
        return {}

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None):
        """The trained weights as an ``IdAdapter`` (native layout)."""
        raise NotImplementedError

    def export_files(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> Optional[Dict[str, tuple]]:
        """Files that are not a native adapter: ``{suffix: (tensors, header)}``; None = write :meth:`export` natively."""
        return None


TARGETS: Dict[str, Callable[..., TrainingTarget]] = {}


def register_target(name: str):
    def register(factory):
        TARGETS[name] = factory
        return factory

    return register
