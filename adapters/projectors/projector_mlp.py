"""MLP token projectors of the IP-Adapter family.

Parameter names follow the released checkpoints (``image_proj.*`` with the
prefix removed), so their state dicts load unchanged.

- :class:`ImageProjection` (IP-Adapter base / light / vit-G): ``proj`` + ``norm``
  on CLIP image embeds ``[N, De]`` -> ``[N, T, C]`` (T = 4).
- :class:`FullFaceProjection` (ip-adapter-full-face): ``proj.{0,2,3}`` applied to
  every CLIP hidden token ``[N, 257, Dh]`` -> ``[N, 257, C]``.
- :class:`FaceIDProjection` (IP-Adapter-FaceID, -portrait): ``proj.{0,2}`` + ``norm``
  on the L2-normalised ArcFace embedding ``[N, 512]`` -> ``[N, T, C]``.
- :class:`FaceIDPlusProjection` (FaceID-Plus / PlusV2): the FaceID MLP makes T
  query tokens that a :class:`FacePerceiverResampler` refines with CLIP hidden
  states; PlusV2 adds the queries back (``shortcut``, scaled by ``s_scale``).

Which ArcFace field: IP-Adapter-FaceID's README and ``ip_adapter_faceid.py``
feed insightface's ``normed_embedding`` (unit length), so the FaceID projectors
read ``arcface_normed``; InstantID and PuLID feed the raw ``embedding`` (see
their modules). The negative (uncond) input is zeros for the ArcFace part
and, for the CLIP part, what the official pipelines use: zeros for image
embeds (``ImageProjection``), the CLIP states of a blank image for hidden
states (the IDENTITY's ``clip_hidden_uncond``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch
from torch import nn

from .id_adapter import IdAdapter, TokenProjector
from ..faces.identity import IdentityFeatures
from .projector_perceiver import FacePerceiverResampler, layer_shapes, read_input


class ImageProjection(TokenProjector):
    """``tokens = LayerNorm(reshape(proj(clip_embeds), [N, T, C]))``; input ``[N, De]``, output ``[N, T, C]``."""

    input_kind = "clip_embeds"

    def __init__(self, embed_dim: int = 1024, num_tokens: int = 4, token_dim: int = 768):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, num_tokens=num_tokens, token_dim=token_dim)
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj = nn.Linear(embed_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        token_dim = state["norm.weight"].shape[0]
        return dict(embed_dim=state["proj.weight"].shape[1], num_tokens=state["proj.weight"].shape[0] // token_dim, token_dim=token_dim)

    def negative_features(self, features: IdentityFeatures) -> IdentityFeatures:
        # IP-Adapter's get_image_embeds: uncond = image_proj(zeros_like(clip_image_embeds))
        embeds = read_input(features, "clip_embeds", "IP-Adapter image")
        zeros = torch.zeros_like(features.arcface[:1])
        return IdentityFeatures(arcface=zeros, arcface_normed=zeros, clip_embeds=torch.zeros_like(embeds[:1]))

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        x = self.proj(read_input(features, "clip_embeds", "IP-Adapter image"))
        return self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim))


class FullFaceProjection(TokenProjector):
    """Per token: ``LN(W2 gelu(W1 h + b1) + b2)``; input ``[N, M, Dh]`` (M = 257 for ViT-H), output ``[N, M, C]``."""

    input_kind = "clip_hidden"

    def __init__(self, hidden_dim: int = 1280, token_dim: int = 768, num_tokens: int = 257):
        super().__init__()
        self.config = dict(hidden_dim=hidden_dim, token_dim=token_dim, num_tokens=num_tokens)
        self.num_tokens, self.token_dim = num_tokens, token_dim  # num_tokens: that of ViT-H/14 at 224 px
        self.proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, token_dim), nn.LayerNorm(token_dim))

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        return dict(hidden_dim=state["proj.0.weight"].shape[1], token_dim=state["proj.3.weight"].shape[0])

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        return self.proj(read_input(features, "clip_hidden", "IP-Adapter full-face"))


def _faceid_mlp(id_dim: int, num_tokens: int, token_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(id_dim, id_dim * 2), nn.GELU(), nn.Linear(id_dim * 2, num_tokens * token_dim))


class FaceIDProjection(TokenProjector):
    """``tokens = LN(reshape(W2 gelu(W1 e + b1) + b2, [N, T, C]))``, e = ``arcface_normed`` ``[N, 512]``."""

    input_kind = "arcface_normed"

    def __init__(self, id_dim: int = 512, num_tokens: int = 4, token_dim: int = 768):
        super().__init__()
        self.config = dict(id_dim=id_dim, num_tokens=num_tokens, token_dim=token_dim)
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.proj = _faceid_mlp(id_dim, num_tokens, token_dim)
        self.norm = nn.LayerNorm(token_dim)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        token_dim = state["norm.weight"].shape[0]
        return dict(id_dim=state["proj.0.weight"].shape[1], num_tokens=state["proj.2.weight"].shape[0] // token_dim, token_dim=token_dim)

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        x = self.proj(features.arcface_normed)
        return self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim))


class FaceIDPlusProjection(TokenProjector):
    """FaceID-Plus (``shortcut=False``) / PlusV2 (``shortcut=True``).

    ``q = LN(reshape(MLP(arcface_normed), [N, T, C]))``;
    ``r = FacePerceiverResampler(q, clip_hidden)``; tokens = ``q + s_scale * r`` (PlusV2) or ``r``.
    Inputs ``[N, 512]`` and ``[N, 257, Dh]``; output ``[N, T, C]``.
    The two versions have identical parameters: which one a file is cannot be
    read from it (the loader decides from the released file sizes, see
    ``weight_formats``); ``s_scale`` is PlusV2's "face structure" weight (1.0 in the official examples):
    the weight of the CLIP-derived resampler output next to the ArcFace queries.
    """

    input_kind = "arcface_normed+clip_hidden"

    def __init__(
        self,
        id_dim: int = 512,
        clip_dim: int = 1280,
        num_tokens: int = 4,
        token_dim: int = 768,
        depth: int = 4,
        heads: int = 12,
        ff_mult: float = 4,
        shortcut: bool = True,
        s_scale: float = 1.0,
    ):
        super().__init__()
        self.config = dict(
            id_dim=id_dim, clip_dim=clip_dim, num_tokens=num_tokens, token_dim=token_dim, depth=depth, heads=heads,
            ff_mult=ff_mult, shortcut=shortcut, s_scale=s_scale,
        )
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.shortcut, self.s_scale = shortcut, s_scale
        self.proj = _faceid_mlp(id_dim, num_tokens, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=token_dim, depth=depth, heads=heads, embedding_dim=clip_dim, output_dim=token_dim, ff_mult=ff_mult
        )

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor], shortcut: bool = True) -> dict:
        token_dim = state["norm.weight"].shape[0]
        shapes = layer_shapes(state, "perceiver_resampler.")
        return dict(
            id_dim=state["proj.0.weight"].shape[1], clip_dim=state["perceiver_resampler.proj_in.weight"].shape[1],
            num_tokens=state["proj.2.weight"].shape[0] // token_dim, token_dim=token_dim, shortcut=shortcut, **shapes,
        )

    def with_s_scale(self, s_scale: float) -> "FaceIDPlusProjection":
        """The same projector (its tensors shared, not copied) with another face-structure weight."""
        with torch.device("meta"):
            other = type(self)(**dict(self.config, s_scale=float(s_scale)))
        other.load_state_dict(self.state_dict(), strict=True, assign=True)
        other.eval()
        other.requires_grad_(False)
        return other

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        clip = read_input(features, "clip_hidden", "FaceID-Plus")
        x = self.proj(features.arcface_normed)
        queries = self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim))
        out = self.perceiver_resampler(queries, clip.expand(queries.shape[0], -1, -1) if clip.shape[0] == 1 else clip)
        return queries + self.s_scale * out if self.shortcut else out


def with_face_structure(adapter: IdAdapter, s_scale: float) -> IdAdapter:
    """``adapter`` with FaceID-PlusV2's ``s_scale`` set (a new IdAdapter; the given one, often cached, is not changed).

    Adapters other than PlusV2 (no shortcut) have no such weight and come back as they are.
    """
    projector = adapter.projector
    if not (isinstance(projector, FaceIDPlusProjection) and projector.shortcut) or projector.s_scale == float(s_scale):
        return adapter
    metadata = dict(adapter.metadata, face_structure=f"{float(s_scale):g} (PlusV2 s_scale; 1 as published)")
    return dataclasses.replace(adapter, projector=projector.with_s_scale(s_scale), metadata=metadata)


def has_face_structure(adapter: IdAdapter) -> bool:
    """Whether the adapter has PlusV2's face-structure weight (a FaceID-Plus projector with the shortcut)."""
    projector = adapter.projector
    return isinstance(projector, FaceIDPlusProjection) and projector.shortcut
