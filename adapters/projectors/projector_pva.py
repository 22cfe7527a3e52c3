"""PVA's identity transformer (Xu et al., "Personalized Face Inpainting with Diffusion
Models by Parallel Visual Attention", WACV 2024; ``TransformNetwork`` in lib/pva.py
of github:AtlantixJJ/PVA-CelebAHQ-IDI).

All references of one person and 10 learned query tokens form ONE sequence::

    s   = [e_1, ..., e_R, q_1, ..., q_10]          # [1, R+10, 512]; e_r raw ArcFace embeddings
    h   = Encoder(Linear_512->1024(s))             # 4 post-norm layers, d 1024, 8 heads, ff 2048, ReLU
    out = LayerNorm(h)[:, -10:] + pos_enc          # [1, 10, 1024]

so the output is 10 tokens whatever the number of references. Parameter names
match PVA's checkpoint (``transform_network.*``): ``0.*`` the input Linear,
``1.layers.<i>.*`` and ``1.norm.*`` the ``nn.TransformerEncoder``, ``q_tokens``
``[10, 512]``, ``pos_enc`` ``[10, 1024]``.

Input: ``arcface`` (the raw embedding: PVA's FaceNet returns the unnormalised
IResNet-50 output). PVA used ms1mv3 ArcFace r50; insightface's recognizers
(antelopev2 glintr100, buffalo_l w600k_r50) give embeddings of the same width
but a different space, so PVA's released transformer expects its own
recognizer; a transformer trained with this pack's recognizer has none of
that mismatch. Dropout is 0 here (inference).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures


class PVATransformNetwork(TokenProjector):
    """``project(features)``: ``arcface`` ``[R, 512]`` (R references of one person) -> ``[1, 10, 1024]``."""

    input_kind = "arcface"

    def __init__(self, in_dim: int = 512, out_dim: int = 1024, num_q_token: int = 10, num_layer: int = 4, heads: int = 8, ff_dim: int = 2048):
        super().__init__()
        self.config = dict(in_dim=in_dim, out_dim=out_dim, num_q_token=num_q_token, num_layer=num_layer, heads=heads, ff_dim=ff_dim)
        self.num_tokens, self.token_dim = num_q_token, out_dim
        layer = nn.TransformerEncoderLayer(out_dim, heads, dim_feedforward=ff_dim, dropout=0.0, batch_first=True)
        self.add_module("0", nn.Linear(in_dim, out_dim))
        self.add_module("1", nn.TransformerEncoder(layer, num_layer, norm=nn.LayerNorm(out_dim), enable_nested_tensor=False))
        self.q_tokens = nn.Parameter(torch.zeros(num_q_token, in_dim))
        self.pos_enc = nn.Parameter(torch.zeros(num_q_token, out_dim))

    @classmethod
    def config_from_state(cls, state: Mapping[str, torch.Tensor]) -> dict:
        layers = {int(k.split(".")[2]) for k in state if k.startswith("1.layers.")}
        return dict(
            in_dim=state["0.weight"].shape[1], out_dim=state["0.weight"].shape[0], num_q_token=state["q_tokens"].shape[0],
            num_layer=len(layers), ff_dim=state["1.layers.0.linear1.weight"].shape[0],
        )

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, R, in_dim]`` -> ``[B, num_q_token, out_dim]``."""
        queries = self.q_tokens.expand(embeddings.shape[0], -1, -1)
        x = torch.cat([embeddings, queries.to(embeddings.dtype)], dim=1)
        x = self._modules["1"](self._modules["0"](x))
        return x[:, -self.num_tokens :] + self.pos_enc

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        return self.encode(features.arcface[None])
