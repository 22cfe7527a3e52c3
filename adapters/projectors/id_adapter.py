"""ID_ADAPTER: identity-adapter weights in one internal layout, whatever file they came from.

The weight loader (``adapters/formats/weight_formats.py`` and friends) detects a file's
format from its keys and shapes and converts it to an :class:`IdAdapter`:

- ``projector``: a :class:`TokenProjector` turning :class:`IdentityFeatures`
  into cross-attention tokens ``[N, T, token_dim]`` (FaceID MLP, Perceiver
  Resampler, PVA's transformer...);
- ``layers``: per cross-attention layer key (ComfyUI's ``(block, id, index)``,
  e.g. ``("input", 1, 0)``) a dict of tensors. Names used by the mechanisms:

  ``to_k`` / ``to_v``   ``[C, token_dim]``  identity K/V projections (IP-Adapter's to_k_ip / to_v_ip,
                                           PuLID's id_to_k / id_to_v, PVA's to_visual_k / to_visual_v)
  ``to_q``              ``[C, C]``         PVA's to_visual_q (a separate query for identity keys)

  and mechanism-specific ones documented by the module that reads them;
- ``extras``: format-specific tensors and settings (PVA ``modifier_vec``,
  PuLID's zero-token count, FaceID LoRA key names...);
- ``metadata``: strings for people (source file, license note...).

Weights stay on the CPU in their file dtype; mechanisms cache device copies
(see :class:`DeviceCache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from ..faces.identity import Identity, IdentityFeatures

LayerKey = Tuple[str, int, int]

FORMATS = (
    "ip_adapter",  # IP-Adapter base / light / vit-G: ImageProj on CLIP image embeds, 4 tokens
    "ip_adapter_plus",  # plus / plus-face: Resampler on CLIP hidden states, 16 tokens
    "ip_adapter_full_face",  # full-face: MLP per CLIP hidden token, 257 tokens
    "faceid",  # IP-Adapter-FaceID: MLP on the ArcFace embedding, 4 tokens
    "faceid_plus",  # FaceID-Plus / PlusV2: ArcFace MLP + resampler over CLIP hidden states
    "instantid",  # InstantID ip-adapter: Resampler on the ArcFace embedding, 16 tokens
    "pulid",  # PuLID: IDEncoder, id_to_k / id_to_v
    "fact",  # FaceChain-FACT gated self-attention adapter
    "pva",  # PVA's checkpoint: to_visual_q/k/v, transform_network, modifier_vec
    "native",  # this pack's own safetensors (metadata header says which mechanism)
)

BASES = ("sd15", "sd2", "sdxl", "flux")  # flux: identity transformers trained on Flux.1 (nodes/training/flux_training.py)


class TokenProjector(torch.nn.Module):
    """Base class of the modules that make identity tokens.

    Subclasses set ``input_kind`` (which :class:`IdentityFeatures` fields they
    read: "arcface", "arcface_normed", "clip_embeds", "clip_hidden",
    "arcface+clip_hidden"...), ``num_tokens`` and ``token_dim``, and implement
    :meth:`project`. :meth:`forward` returns ``(cond, uncond)`` tokens, each
    ``[N, T, token_dim]`` (uncond ``[1, T, token_dim]``), uncond being the
    projection of the negative inputs (IP-Adapter's convention).
    """

    input_kind: str = "arcface"
    num_tokens: int = 0
    token_dim: int = 0

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        raise NotImplementedError

    def negative_features(self, features: IdentityFeatures) -> IdentityFeatures:
        """Negative inputs: zero embeddings, the black image's CLIP features (or zeros)."""

        def black(cond: Optional[torch.Tensor], uncond: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if cond is None:
                return None
            return uncond.to(cond) if uncond is not None else torch.zeros_like(cond[:1])

        return IdentityFeatures(
            arcface=torch.zeros_like(features.arcface[:1]),
            arcface_normed=torch.zeros_like(features.arcface_normed[:1]),
            clip_embeds=black(features.clip_embeds, features.clip_embeds_uncond),
            clip_hidden=black(features.clip_hidden, features.clip_hidden_uncond),
            face_tokens=None if features.face_tokens is None else torch.zeros_like(features.face_tokens[:1]),
            eva_clip_embeds=None if features.eva_clip_embeds is None else torch.zeros_like(features.eva_clip_embeds[:1]),
            eva_clip_hidden=None if features.eva_clip_hidden is None else torch.zeros_like(features.eva_clip_hidden[:1]),
        )

    def forward(self, features: IdentityFeatures) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.project(features), self.project(self.negative_features(features))


@dataclass(frozen=True)
class IdentityTokens:
    """Tokens a mechanism attends to. cond: ``[1, T, D]``; uncond: ``[1, T, D]``."""

    cond: torch.Tensor
    uncond: torch.Tensor

    @property
    def count(self) -> int:
        return self.cond.shape[1]

    @property
    def dim(self) -> int:
        return self.cond.shape[-1]


@dataclass
class IdAdapter:
    """The ID_ADAPTER socket type (see module docstring)."""

    format: str
    base: str
    context_dim: int  # width of the model's text context this adapter was made for
    projector: Optional[TokenProjector] = None
    layers: Dict[LayerKey, Dict[str, torch.Tensor]] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    mechanism: str = "decoupled"  # what the weights were trained for: decoupled, joint, gated_self_attention...

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown adapter format {self.format!r}; known: {', '.join(FORMATS)}")
        if self.base not in BASES:
            raise ValueError(f"unknown base model {self.base!r}; known: {', '.join(BASES)}")

    # ComfyUI deep-copies node outputs into model_options on clone; weights are immutable, share them.
    def __deepcopy__(self, memo):
        return self

    @property
    def token_dim(self) -> int:
        return self.projector.token_dim if self.projector is not None else self.context_dim

    def layer(self, key: LayerKey) -> Dict[str, torch.Tensor]:
        """The tensors of one layer (empty dict when the adapter has none there)."""
        return self.layers.get(key, {})

    @torch.no_grad()
    def identity_tokens(self, identity: Identity, per_reference: bool = False) -> IdentityTokens:
        """Cond/uncond tokens for an IDENTITY: ``[1, T, D]`` each.

        ``per_reference``: one token set per reference image, concatenated
        (``T = R * num_tokens``); otherwise the references' features are
        averaged first (``T = num_tokens``). A set encoder (``projector.reads_set``,
        Omni-ID) always reads every reference and makes ``num_tokens`` tokens.
        """
        if self.projector is None:
            raise ValueError(f"this {self.format} adapter has no token projector")
        if getattr(self.projector, "reads_set", False):
            per_reference = True
        features = identity.features(per_reference=per_reference)
        device = next(iter(self.projector.parameters()), torch.empty(0)).device
        dtype = next(iter(self.projector.parameters()), torch.empty(0, dtype=torch.float32)).dtype
        features = _features_to(features, device, dtype)
        cond, uncond = self.projector(features)
        return IdentityTokens(
            cond=cond.reshape(1, -1, cond.shape[-1]).float(),
            uncond=uncond.expand(cond.shape[0], -1, -1).reshape(1, -1, uncond.shape[-1]).float(),
        )


def _features_to(features: IdentityFeatures, device, dtype) -> IdentityFeatures:
    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return IdentityFeatures(
        arcface=move(features.arcface),
        arcface_normed=move(features.arcface_normed),
        clip_embeds=move(features.clip_embeds),
        clip_hidden=move(features.clip_hidden),
        clip_embeds_uncond=move(features.clip_embeds_uncond),
        clip_hidden_uncond=move(features.clip_hidden_uncond),
        face_tokens=move(features.face_tokens),
        eva_clip_embeds=move(features.eva_clip_embeds),
        eva_clip_hidden=move(features.eva_clip_hidden),
    )


class DeviceCache:
    """Device/dtype copies of CPU tensors, made once and reused every step.

    ``get(key, device, dtype, make)``: ``make()`` builds the CPU tensor (or a
    tuple of them) the first time; later calls return the cached copy for
    that (key, device, dtype).
    """

    def __init__(self):
        self._store: Dict[tuple, Any] = {}

    def get(self, key, device, dtype, make):
        full = (key, str(device), dtype)
        hit = self._store.get(full)
        if hit is None:
            value = make()
            if isinstance(value, tuple):
                hit = tuple(v.to(device=device, dtype=dtype) for v in value)
            else:
                hit = value.to(device=device, dtype=dtype)
            self._store[full] = hit
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            # a gradient pass (STFG exact) cannot save the inference tensors a prompt cached
            hit = tuple(_normal(v) for v in hit) if isinstance(hit, tuple) else _normal(hit)
        return hit

    def clear(self) -> None:
        self._store.clear()


def _normal(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t
