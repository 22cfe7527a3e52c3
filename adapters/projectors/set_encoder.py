"""Identity from many photos: a fixed-size token set whatever the number of photos (Omni-ID style).

Omni-ID (Qian et al., CVPR 2025, arXiv 2412.09694; no public code or weights) encodes ``M``
photos of a person into one structured representation: per-photo tokens ``l_i`` ``[L, E]`` are
concatenated, ``z = [l_1; ...; l_M]``, and learned queries cross-attend to ``z``::

    rep = Encoder(queries, z)                  # [T, D], T fixed, any M

trained "few-to-many": a few photos are encoded and *other* photos of the same person are
reconstructed. The trained encoder is :class:`~.query_former.QueryFormer` with ``reads_set``
(``nodes/training/omni_id_training.py``: the few = 1..``max_references`` other photos of the person, the
many = the photo being denoised, a different one each step, through the diffusion loss; the
paper's two decoders are replaced by the frozen diffusion model with trained decoupled K/V, the
IP-Adapter-style use the paper names for its representation).

Training-free fallback (:class:`AttentionPooledProjector`): any adapter's tokens, made per photo
``[M, T, D]``, pooled over the photos by attention instead of averaged; a photo's score is how
much its token agrees with the other photos' (cosine, so a large token cannot outvote)::

    g_{i,t}  = mean_{j != i} cos(tok_{i,t}, tok_{j,t})            # agreement of photo i, token t
    w_{i,t}  = softmax_i( g_{i,t} / tau ),  tau = 0.1
    pooled_t = sum_i w_{i,t} tok_{i,t}                            # [T, D]

A photo whose token disagrees with the others (a bad angle, a wrong face) gets little weight,
where the plain mean gives it ``1/M`` (and a consensus taken from the mean itself would be pulled
toward it); one photo gives that photo's tokens, two photos their mean. ``tau`` = 0.1 (chosen:
an agreement gap of 0.3 is a weight ratio of 20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .id_adapter import TokenProjector
from ..faces.identity import IdentityFeatures


TAU = 0.1


def attention_pool(tokens: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """``[M, T, D]`` per-photo tokens -> ``[1, T, D]`` (module docstring)."""
    m = tokens.shape[0]
    if m == 1:
        return tokens
    unit = F.normalize(tokens.float(), dim=-1)
    cos = torch.einsum("itd,jtd->tij", unit, unit)  # [T, M, M]
    agreement = (cos.sum(dim=-1) - cos.diagonal(dim1=1, dim2=2)) / (m - 1)  # [T, M], self excluded
    w = (agreement / tau).softmax(dim=-1).transpose(0, 1)[..., None]  # [M, T, 1]
    return (w.to(tokens.dtype) * tokens).sum(dim=0, keepdim=True)


class AttentionPooledProjector(TokenProjector):
    """Wraps an adapter's projector: tokens of every photo, pooled by :func:`attention_pool` (a set reader)."""

    reads_set = True

    def __init__(self, inner: TokenProjector):
        super().__init__()
        if getattr(inner, "reads_set", False):
            raise ValueError("this adapter's projector already reads all photos as one set")
        self.inner = inner
        self.input_kind = inner.input_kind
        self.num_tokens, self.token_dim = inner.num_tokens, inner.token_dim

    def project(self, features: IdentityFeatures) -> torch.Tensor:
        return attention_pool(self.inner.project(features))
