"""CA² (CA-Edit, AAAI 2025): decoupled visual cross-attention gated per pixel by text importance.

Per query pixel (Eq. 3-6), with Q the layer's query and the text/visual keys
and values projected separately::

    F_txt   = softmax(Q K_txt^T / sqrt(d)) V_txt                  (the layer's own text attention)
    A_vis   = softmax(Q K_vis^T / sqrt(d))
    Z       = F_txt + w * (1 - Score ⊙ M) * (A_vis V_vis)          (Eq. 5-6; w = 1 in the paper)

``(1 - Score ⊙ M)`` scales each query row of ``A_vis`` (Eq. 5), which is the
same as scaling that row of ``A_vis V_vis``, so the visual branch runs through
the host's fused attention and the gate is one multiply-add. ``M`` is the edit
mask at the layer's grid: outside it (M = 0) the visual condition acts at full
strength (plain decoupled attention, IP-Adapter style); inside it, it is
suppressed where the text dominates. ``w`` is the node's weight (w = 0: the
dispatcher skips the stage, the model is unpatched).

Visual condition: the original image's CLIP-vision features through an
adapter's token projector, then the adapter's per-layer ``to_k`` / ``to_v``
(``[C, token_dim]``): any decoupled image adapter, or native CA² weights.

Score sources
-------------
``native``: the paper's score predictor, a 2-layer MLP per layer on
``concat(Z, f_txt^pool)`` (Z = the layer's latent features = the hidden
states ``to_q`` receives, ``[B, N, C]``; ``f_txt^pool`` replicated over the
pixels). Per-layer tensor names in ``IdAdapter.layers[key]`` (what the native
format and the trainer store; ``torch.nn.Sequential(Linear, act, Linear)``
numbering)::

    score.0.weight  [hidden, C + Ct]   columns 0..C-1 read Z, C..C+Ct-1 read the pooled text token
    score.0.bias    [hidden]
    score.2.weight  [2, hidden]        (or [1, hidden], see below)
    score.2.bias    [2]

  The activation between the layers is GELU (exact, erf form) unless the
  adapter's ``extras["ca2_score_activation"]`` says "silu" or "relu".

  *How "softmax" is read.* The paper calls S "a simple two-layer MLP with a
  softmax activation function" giving ``Score ∈ R^{n_z}``. A softmax over the
  n_z pixels would make every score about 1/n_z (no suppression anywhere),
  contradicting Fig. 5 (scores near 1 where the text edits). We read it as a
  per-pixel softmax over two logits, (text importance, image importance), and
  take the text channel: ``Score = softmax(l)[0] = sigmoid(l0 - l1)`` in
  [0, 1]. A one-logit last layer (``score.2.weight`` ``[1, hidden]``) is read
  as the sigmoid it is equivalent to.

  *The pooled text token.* Inside attn2 the pack sees the context the layer's
  ``to_k`` receives (``[B, M, Ct]``, stashed by an attn2_patch), not CLIP's
  pooled output (SD1.5 never passes it to the UNet; SDXL mixes it into the
  class embedding) nor the token ids that would locate the end token. So
  ``f_txt^pool`` = the mean of the context tokens (:func:`pooled_text_token`),
  per row, so cond and uncond each use their own prompt. The trainer must use
  the same function.

``text_attention`` (training-free; the paper's score comes from a predictor
trained with its Reference Net, which the pack does not have): the layer's
content attention mass per pixel (:mod:`.text_attention_mass`: the share of
the pixel's text attention not on CLIP's start tokens, heads averaged), read
on one of two scales (``SCORE_SCALES``):

- ``fixed`` (default): ``Score = mass`` itself, a probability in [0, 1], the
  same scale at every step, layer and image. The paper's Fig. 5 shows the
  score *rising* over denoising (early steps lean on the original image, later
  ones on the text); only a scale that is fixed over the run keeps that trend.
  Our choice over the alternatives: a running normalisation over the run would
  stretch the first step (the only one seen yet) to full range, i.e. invert the
  trend's start, and needs state across calls; any other constant would be a
  guess about a model's attention sink. The start token takes most of the
  mass, so these scores are lower than per-step ones (a gentler gate);
  ``sharpness`` < 1 raises them.
- ``per_step``: min-max normalised over each image's pixels at that layer and
  step (the pack's earlier behaviour), so the most text-driven pixel scores 1
  and the least 0 at every step: the spatial pattern at full contrast, the
  trend over steps erased. A layer whose mass varies by less than 0.05 over
  the image is not stretched to full range
  (``text_attention_mass.minmax_per_image``): it carries no spatial signal.

Both sources are then raised to ``sharpness`` (1 = as computed; > 1 keeps
suppression only where the text dominates most; < 1 spreads it).

Shapes: ``q`` ``[B, N, H*D]``; text output ``[B, N, H*D]``; visual ``k``/``v``
``[B, T, H*D]``; scores ``[B, N]``; masks/gates ``[B, N, 1]``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .attention_core import AttentionFn
from .text_attention_mass import content_attention_mass, minmax_per_image

SCORE_SOURCES = ("text_attention", "native")
SCORE_SCALES = ("fixed", "per_step")
"""How the training-free score is scaled (see the module docstring)."""

SCORE_KEYS = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
"""Per-layer tensor names of the native score predictor (see module docstring)."""

ACTIVATION_EXTRA = "ca2_score_activation"
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


# --- visual condition ---------------------------------------------------------------------------


def visual_keys_values(tokens: torch.Tensor, to_k: torch.Tensor, to_v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[R, T, D]`` tokens, ``[C, D]`` projections -> K, V ``[R, T, C]``."""
    return tokens @ to_k.t(), tokens @ to_v.t()


# --- scores --------------------------------------------------------------------------------------


def pooled_text_token(context: torch.Tensor) -> torch.Tensor:
    """``[B, M, Ct]`` raw text context -> ``[B, 1, Ct]``: the mean over its tokens."""
    return context.mean(dim=1, keepdim=True)


def has_native_score(layer: Dict[str, torch.Tensor]) -> bool:
    return all(name in layer for name in SCORE_KEYS)


def check_native_score(layer: Dict[str, torch.Tensor], channels: int, context_dim: int) -> None:
    """Raise ``ValueError`` (with the shapes) unless a layer's score tensors fit ``C``/``Ct``."""
    missing = [name for name in SCORE_KEYS if name not in layer]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    w0, b0, w2, b2 = (layer[name] for name in SCORE_KEYS)
    hidden = w0.shape[0]
    if w0.dim() != 2 or w0.shape[1] != channels + context_dim:
        raise ValueError(f"score.0.weight is {tuple(w0.shape)}, expected [hidden, {channels} + {context_dim}]")
    if tuple(b0.shape) != (hidden,) or w2.dim() != 2 or w2.shape[1] != hidden or w2.shape[0] not in (1, 2):
        raise ValueError(f"score layer shapes {tuple(b0.shape)}, {tuple(w2.shape)} do not fit hidden size {hidden} with 1 or 2 outputs")
    if tuple(b2.shape) != (w2.shape[0],):
        raise ValueError(f"score.2.bias is {tuple(b2.shape)}, expected [{w2.shape[0]}]")


def native_score(
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    weights: Dict[str, torch.Tensor],
    activation: str = "gelu",
) -> torch.Tensor:
    """The paper's score predictor: ``[B, N, C]`` hidden, ``[B, 1, Ct]`` pooled -> ``[B, N]`` in [0, 1].

    ``Linear(concat(Z, pooled))`` is computed as ``Z W_z^T + (pooled W_t^T + b)``:
    the pooled half once per row instead of once per pixel.
    """
    w0, b0, w2, b2 = (weights[name] for name in SCORE_KEYS)
    c = hidden.shape[-1]
    per_row = pooled @ w0[:, c:].t() + b0  # [B, 1, hidden]
    h = ACTIVATIONS[activation](F.linear(hidden, w0[:, :c]) + per_row)
    logits = (h @ w2.t() + b2).float()  # [B, N, 2] or [B, N, 1]
    if logits.shape[-1] == 2:
        return logits.softmax(dim=-1)[..., 0]
    return torch.sigmoid(logits[..., 0])


def scaled_mass(mass: torch.Tensor, scale: str = "fixed") -> torch.Tensor:
    """``[B, N]`` content mass -> training-free score in [0, 1]: the mass itself (``fixed``) or min-max per image (``per_step``)."""
    if scale == "fixed":
        return mass
    if scale == "per_step":
        return minmax_per_image(mass)
    raise ValueError(f"score scale must be one of {SCORE_SCALES}, got {scale!r}")


def text_attention_score(q: torch.Tensor, k_text: torch.Tensor, heads: int, scale: str = "fixed", cache=None) -> torch.Tensor:
    """Training-free score from the content attention mass, ``[B, N]`` in [0, 1] (``scale``: :data:`SCORE_SCALES`;
    ``cache``: where the token indicator is kept, see ``text_attention_mass.content_indicator``)."""
    return scaled_mass(content_attention_mass(q, k_text, heads, cache), scale)


def sharpen(score: torch.Tensor, sharpness: float) -> torch.Tensor:
    """``score ** sharpness`` (``sharpness = 1`` returns ``score`` itself)."""
    if sharpness == 1.0:
        return score
    return score.clamp_min(0.0).pow(sharpness)


# --- the gate ------------------------------------------------------------------------------------


def visual_gate(score: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``1 - Score ⊙ M``: ``[B, N]`` score, ``[B, N, 1]`` mask (None = no mask, M = 0) -> ``[B, N, 1]``."""
    if mask is None:
        return torch.ones_like(score).unsqueeze(-1)
    # one addcmul on a cached 0-dim one (broadcast) instead of a mul and an rsub per layer call
    return torch.addcmul(_one(score.device, score.dtype), score.unsqueeze(-1), mask.to(score.dtype), value=-1.0)


_ONES: Dict[tuple, torch.Tensor] = {}


def _one(device, dtype) -> torch.Tensor:
    """A 0-dim ``1`` on ``device`` (read-only; one per device/dtype/inference mode, so a handful at most)."""
    key = (device, dtype, torch.is_inference_mode_enabled())
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), device=device, dtype=dtype)
    return one


def gated_visual_attention(
    text_out: torch.Tensor,
    q: torch.Tensor,
    k_vis: torch.Tensor,
    v_vis: torch.Tensor,
    heads: int,
    gate: torch.Tensor,
    weight: float,
    attention_fn: AttentionFn,
) -> torch.Tensor:
    """``Z = F_txt + weight * gate * softmax(Q K_vis^T / sqrt(d)) V_vis``: ``[B, N, H*D]``.

    ``text_out`` is ``F_txt`` (or whatever earlier stages made of it);
    ``gate`` ``[B, N, 1]`` is :func:`visual_gate`. Where ``gate`` is 0 the
    result equals ``text_out`` exactly.
    """
    visual = attention_fn(q, k_vis, v_vis, heads)
    # the weight rides in addcmul's scalar: one launch fewer than scaling the gate first
    return torch.addcmul(text_out, gate.to(visual.dtype), visual, value=weight)
