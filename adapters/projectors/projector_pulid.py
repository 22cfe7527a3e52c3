"""PuLID's ID encoders (github:ToTheBeginning/PuLID, pulid/encoders.py and
pulid/encoders_transformer.py; weights HF guozinan/PuLID, keys ``id_adapter.*``).

Both read two things per face:

- ``id_cond`` ``[N, 1280]`` = ``[arcface (raw antelopev2 embedding, 512) ; eva_cls (768)]``,
  ``eva_cls`` being the L2-normalised image embedding of EVA02-CLIP-L-14-336
  run on the aligned face with its background whitened and the face grey;
- ``eva_hidden`` ``[N, 5, 577, 1024]``: five intermediate hidden-state maps of
  that EVA02-CLIP-L (class token + 24x24 patches).

ComfyUI's CLIP_VISION loader does not run EVA02-CLIP; the pack's node
'Encode PuLID face features (EVA-CLIP)' computes these features
(:mod:`.eva_clip_vision`, :mod:`.face_parsing`, :mod:`.pulid_face_image`) and
stores them in the IDENTITY. The projectors read them from the IDENTITY's features as ``eva_clip_embeds`` ``[N, 768]`` and
``eva_clip_hidden`` ``[N, 5, 577, 1024]``; when they are missing they raise
:class:`ProjectorInputError` saying so (they never substitute other
features). The negative (uncond) input is zeros for both, as in PuLID's pipeline.

- :class:`PuLIDIDEncoder` (PuLID v1, ``pulid_v1.bin``): body MLP on ``id_cond``
  -> 5 tokens; per EVA layer i: ``mapping_i(cls_i) + mean(mapping_patch_i(patches_i))``
  -> 1 token each; output ``[N, 10, 2048]``.
- :class:`PuLIDIDFormer` (PuLID v1.1, ``pulid_v1.1.safetensors``): a perceiver:
  32 learned latents + 5 id tokens attend, two layers per EVA layer, to
  ``[id tokens ; mapping_i(eva_hidden_i)]``; the 32 latents times ``proj_out``
  ``[1024, 2048]`` give ``[N, 32, 2048]``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch
from torch import nn

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures
from .projector_perceiver import layer_shapes, perceiver_layers
from ..weights.weight_errors import ProjectorInputError

EVA_LAYERS = 5
EVA_WIDTH = 1024


def _mlp(width_in: int, hidden1: int, hidden2: int, width_out: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU-Linear-LN-LeakyReLU-Linear (indices 0, 1, 3, 4, 6)."""
    return nn.Sequential(
        nn.Linear(width_in, hidden1), nn.LayerNorm(hidden1), nn.LeakyReLU(),
        nn.Linear(hidden1, hidden2), nn.LayerNorm(hidden2), nn.LeakyReLU(),
        nn.Linear(hidden2, width_out),
    )


def eva_inputs(features: IdentityFeatures, dtype: torch.dtype, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``id_cond`` ``[N, 1280]`` and ``eva_hidden`` ``[N, 5, 577, 1024]`` or a clear error."""
    embeds: Optional[torch.Tensor] = getattr(features, "eva_clip_embeds", None)
    hidden: Optional[torch.Tensor] = getattr(features, "eva_clip_hidden", None)
    if embeds is None or hidden is None:
        raise ProjectorInputError(
            "PuLID's ID encoder needs EVA02-CLIP-L-14-336 features of the face (an image embedding and five hidden-layer "
            "maps); ComfyUI's CLIP_VISION models are different networks and this IDENTITY has no EVA02-CLIP features",
            fix="run the identity through 'Encode PuLID face features (EVA-CLIP)' (with 'Load EVA-CLIP (PuLID)' reading "
            "EVA02_CLIP_L_336_psz14_s6B.pt from models/clip_vision) before this node",
        )
    id_cond = torch.cat([features.arcface.to(device, dtype), embeds.to(device, dtype)], dim=-1)
    return id_cond, hidden.to(device, dtype)


class _PuLIDBase(TokenProjector):
    input_kind = "arcface+eva_clip"

    def forward(self, features: IdentityFeatures):
        p = next(self.parameters())
        id_cond, hidden = eva_inputs(features, p.dtype, p.device)
        return self.encode(id_cond, hidden), self.encode(torch.zeros_like(id_cond[:1]), torch.zeros_like(hidden[:1]))

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        p = next(self.parameters())
        return self.encode(*eva_inputs(features, p.dtype, p.device))

    def encode(self, id_cond: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PuLIDIDEncoder(_PuLIDBase):
    """PuLID v1 ``IDEncoder``: ``encode(id_cond [N,1280], eva_hidden [N,5,577,1024]) -> [N, num_token+5, context_dim]``."""

    def __init__(self, width: int = 1280, context_dim: int = 2048, num_token: int = 5, eva_width: int = EVA_WIDTH, mapping_hidden: int = 1024):
        super().__init__()
        self.config = dict(width=width, context_dim=context_dim, num_token=num_token, eva_width=eva_width, mapping_hidden=mapping_hidden)
        self.num_id = num_token
        self.num_tokens, self.token_dim = num_token + EVA_LAYERS, context_dim
        h1 = min(context_dim * num_token // 4, 1024)
        h2 = min(context_dim * num_token // 2, 1024)
        self.body = _mlp(width, h1, h2, context_dim * num_token)
        for i in range(EVA_LAYERS):
            setattr(self, f"mapping_{i}", _mlp(eva_width, mapping_hidden, mapping_hidden, context_dim))
            setattr(self, f"mapping_patch_{i}", _mlp(eva_width, mapping_hidden, mapping_hidden, context_dim))

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        context_dim = state["mapping_0.6.weight"].shape[0]
        mapping = state["mapping_0.0.weight"]
        return dict(
            width=state["body.0.weight"].shape[1], context_dim=context_dim, num_token=state["body.6.weight"].shape[0] // context_dim,
            eva_width=mapping.shape[1], mapping_hidden=mapping.shape[0],
        )

    def encode(self, id_cond: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        tokens = self.body(id_cond).reshape(id_cond.shape[0], self.num_id, self.token_dim)
        per_layer = [
            getattr(self, f"mapping_{i}")(hidden[:, i, :1]) + getattr(self, f"mapping_patch_{i}")(hidden[:, i, 1:]).mean(dim=1, keepdim=True)
            for i in range(EVA_LAYERS)
        ]
        return torch.cat([tokens, *per_layer], dim=1)


class PuLIDIDFormer(_PuLIDBase):
    """PuLID v1.1 ``IDFormer``: ``encode(id_cond [N,1280], eva_hidden [N,5,577,1024]) -> [N, num_queries, output_dim]``."""

    def __init__(
        self, dim: int = 1024, depth: int = 10, heads: int = 16, num_id_token: int = 5, num_queries: int = 32, output_dim: int = 2048,
        ff_mult: float = 4, id_width: int = 1280, eva_width: int = EVA_WIDTH, mapping_hidden: int = 1024,
    ):
        super().__init__()
        self.config = dict(
            dim=dim, depth=depth, heads=heads, num_id_token=num_id_token, num_queries=num_queries, output_dim=output_dim,
            ff_mult=ff_mult, id_width=id_width, eva_width=eva_width, mapping_hidden=mapping_hidden,
        )
        self.dim, self.num_id = dim, num_id_token
        self.num_tokens, self.token_dim = num_queries, output_dim
        self.per_eva_layer = depth // EVA_LAYERS
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = perceiver_layers(dim, depth, heads, ff_mult)
        for i in range(EVA_LAYERS):
            setattr(self, f"mapping_{i}", _mlp(eva_width, mapping_hidden, mapping_hidden, dim))
        self.id_embedding_mapping = _mlp(id_width, mapping_hidden, mapping_hidden, dim * num_id_token)

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        latents = state["latents"]
        dim = latents.shape[2]
        return dict(
            dim=dim, num_queries=latents.shape[1], output_dim=state["proj_out"].shape[1],
            num_id_token=state["id_embedding_mapping.6.weight"].shape[0] // dim, id_width=state["id_embedding_mapping.0.weight"].shape[1],
            eva_width=state["mapping_0.0.weight"].shape[1], mapping_hidden=state["mapping_0.0.weight"].shape[0], **layer_shapes(state),
        )

    def encode(self, id_cond: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        n = id_cond.shape[0]
        ids = self.id_embedding_mapping(id_cond).reshape(n, self.num_id, self.dim)
        latents = torch.cat([self.latents.expand(n, -1, -1), ids], dim=1)
        for i in range(EVA_LAYERS):
            context = torch.cat([ids, getattr(self, f"mapping_{i}")(hidden[:, i])], dim=1)
            for attention, ff in self.layers[i * self.per_eva_layer : (i + 1) * self.per_eva_layer]:
                latents = attention(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_tokens] @ self.proj_out


def require_eva_note() -> str:
    return (
        "PuLID needs EVA02-CLIP-L-14-336 face features (eva_clip_embeds, eva_clip_hidden): run the IDENTITY through "
        "'Encode PuLID face features (EVA-CLIP)' (EVA02_CLIP_L_336_psz14_s6B.pt + facexlib's parsing_bisenet.pth)"
    )


