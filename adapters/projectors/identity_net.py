"""InstantID's IdentityNet context: the identity tokens its ControlNet attends to instead of the prompt.

InstantID's ControlNet ("IdentityNet") reads the face-keypoints image as its hint
and, as cross-attention context, the 16 tokens InstantID's resampler makes from
the raw ArcFace embedding (``encoder_hidden_states=prompt_image_emb`` in the
official pipeline), never the text. The same resampler gives the negative
(classifier-free guidance) tokens from a negative embedding:

- ``noise = 0``: an all-zero embedding, as the official pipeline does
  (``torch.zeros_like(prompt_image_emb)`` before the projection);
- ``noise > 0``: ``noise * U[0, 1)^512``, what ComfyUI_InstantID does by default
  (0.35 there); the popular pack seeds it from the embedding's sum, this pack
  from an explicit ``seed`` (a CPU generator, so the tokens are the same on every
  device and run).

:func:`identity_net_tokens` returns both as :class:`IdentityTokens` ``[1, 16, 2048]``;
the attention nodes' decoupled identity attention keeps the official zero negative.
"""

from __future__ import annotations

import torch

from .id_adapter import IdAdapter, IdentityTokens, _features_to
from ..faces.identity import Identity, IdentityFeatures

INSTANTID_FORMAT = "instantid"


class IdentityNetError(ValueError):
    """An adapter that does not make InstantID's tokens, or an out-of-range setting."""


def is_instantid(adapter: IdAdapter) -> bool:
    """InstantID's ip-adapter file, or this pack's native file converted from it."""
    if adapter.format == INSTANTID_FORMAT:
        return True
    return adapter.format == "native" and adapter.metadata.get("source_format") == INSTANTID_FORMAT


def negative_embedding(like: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """``[1, E]``: zeros (``noise == 0``) or ``noise * U[0, 1)`` from a CPU generator seeded with ``seed``."""
    if not noise >= 0:
        raise IdentityNetError(f"the negative noise must be 0 or more, got {noise}")
    shape = (1, like.shape[-1])
    if noise == 0:
        return torch.zeros(shape, dtype=torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return noise * torch.rand(shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def identity_net_tokens(adapter: IdAdapter, identity: Identity, noise: float = 0.0, seed: int = 0) -> IdentityTokens:
    """InstantID tokens for the ControlNet: cond from the identity (references fused), uncond from :func:`negative_embedding`.

    Output: cond and uncond ``[1, T, D]`` float32 (T = 16, D = 2048 for the released file).
    """
    if not is_instantid(adapter):
        raise IdentityNetError(f"this is a {adapter.format} adapter; IdentityNet was trained on InstantID's tokens")
    projector = adapter.projector
    if projector is None:
        raise IdentityNetError("this InstantID adapter has no token projector (image_proj)")
    features = identity.features(per_reference=False)
    param = next(iter(projector.parameters()), torch.empty(0))
    raw = features.arcface
    negative = negative_embedding(raw, noise, seed)
    # the projector reads the raw ArcFace embedding (input_kind "arcface"); normed is carried for completeness
    neg_features = IdentityFeatures(arcface=negative, arcface_normed=negative)
    cond = projector.project(_features_to(features, param.device, param.dtype))
    uncond = projector.project(_features_to(neg_features, param.device, param.dtype))
    return IdentityTokens(cond=cond.reshape(1, -1, cond.shape[-1]).float(), uncond=uncond.reshape(1, -1, uncond.shape[-1]).float())
