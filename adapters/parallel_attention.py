"""Parallel attention to identity tokens at one cross-attention layer: joint (PVA) and decoupled.

Notation: ``q`` ``[B, N, H*D]`` the layer's query, ``k_text`` / ``v_text`` ``[B, M, H*D]`` its
projected text context, ``k_id`` / ``v_id`` ``[B, T, H*D]`` projected identity tokens, H heads,
s = 1/sqrt(D). Every output is ``[B, N, H*D]``, before the layer's ``to_out``.

Decoupled (IP-Adapter, InstantID, PuLID; one softmax per token set, summed)::

    out = softmax(s q k_text^T) v_text + w * softmax(s q k_id^T) v_id

IP-Adapter ``ip_adapter/attention_processor.py`` (IPAttnProcessor): ``scale`` default 1.0 (its
README suggests ~0.5 when the prompt matters); InstantID README ``set_ip_adapter_scale(0.8)``;
PuLID ``app.py`` id_scale default 0.8. The node's default weight is 1.0 (the IP-Adapter code's).

PuLID extras (``pulid/attention_processor.py``, IDAttnProcessor2_0, read at commit 6bfef55):

- zero-token padding: ``num_zero_tokens`` zero embeddings are appended to the ID tokens before
  ``id_to_k`` / ``id_to_v``. Those projections have no bias, so the padding equals appending zero
  keys and zero values after projection (:func:`append_zero_tokens`): attention sinks that take
  mass ``Z / (Z + sum_j exp(s q k_j))`` away from the identity values. "fidelity" mode: 8,
  "extremely style": 16.
- ``ortho`` (style mode): ``id_out <- id_out - proj``, ``proj = (sum_N h*id_out / sum_N h*h) * h``
  per batch row and channel, sums over the N query tokens, ``h`` = the text attention output.
- ``ortho_v2`` (fidelity mode): ``a = sum_{j in first 5 ID tokens} mean_heads softmax(q k_id^T)``
  (no 1/sqrt(D) in that softmax, as in PuLID), ``id_out <- id_out + (a - 1) * proj``.
  Both projections are computed in float32 as PuLID does.
  PuLID's demo (``app.py``) defaults to "fidelity"; that is also our default for PuLID weights
  whose loader did not say (see ``nodes/identity_inputs.pulid_settings``). "The first 5" are the
  first 5 tokens of the whole sequence, literally as PuLID (``attn_mean[:, :, :5]``): with several
  references PuLID's demo concatenates the references' tokens (``app.py``, ID Mix) and still sums
  only the first 5, the main reference's ArcFace-body tokens; ``per_reference`` tokens do the same.
  Choices where PuLID is silent: ``h`` is the layer's *text* attention (what PuLID projects
  against), not the output of stages stacked before this one; a zero denominator (a channel that
  is exactly 0 at every pixel) gives ``proj = 0`` instead of PuLID's NaN.

Joint (PVA, ``AtlantixJJ/PVA-CelebAHQ-IDI`` ``lib/pva.py`` pva_forward; one softmax over both)::

    S   = [ s q k_text^T ,  s q_id k_id^T + log w ]      # [B, H, N, M + T]
    out = softmax(S) [v_text ; v_id]

``q_id`` is PVA's separate visual query ``to_visual_q(x)`` (``x`` the layer's input to
``to_q``); without one the layer's own ``q`` is used. PVA itself has no weight (w = 1): here
``weight`` is a log-prior on the identity columns, i.e. every identity key's unnormalised
attention mass is multiplied by ``w`` (w = 0 removes them; w = 1 is PVA exactly). With the
layer's own ``to_k`` / ``to_v`` projecting the identity tokens this is PVA at initialisation
(PVA initialises ``to_visual_*`` as copies of ``to_q / to_k / to_v``): identity tokens appended
to the text context.

How joint attention is computed, and how it stacks. The joint softmax splits exactly into the
text softmax and the identity softmax weighted by their shares of the attention mass::

    softmax(S) [v_text ; v_id] = (1 - a) * softmax(s q k_text^T) v_text  +  a * softmax(S_id) v_id
    a = sum_{j in id} exp(S_j) / sum_{all j} exp(S_j)              # per query and head

:func:`joint_identity_attention` gets ``a * softmax(S_id) v_id`` and ``a`` in ONE fused SDPA
call: keys ``[k_text ; k_id]``, values ``[0 ; v_id]`` with one extra value channel per head that is
1 on identity rows (its output is ``a``). :func:`mix_with_text` then forms
``(1 - a) * text_out + a * id_attention``. When ``text_out`` is the layer's plain text attention
this is PVA's output; when stages or another pack's patch changed the text attention before this
one, their result takes the text share (documented stacking rule: joint attention makes the
identity compete with whatever attention output the layers before it produced).

PVA's separate visual query in the same single call: queries ``[q | q_id]`` (head dim 2D) against
keys ``[k_text | 0]`` (text rows) and ``[0 | k_id]`` (identity rows), with the scale fixed at
``1/sqrt(D)``: the dot products are exactly ``q k_text`` and ``q_id k_id``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention_core import AttentionFn, biased_attention, log_prior, split_heads

ORTHO_MODES = ("none", "ortho", "ortho_v2")
PULID_BODY_TOKENS = 5
"""PuLID's ORTHO_v2 sums the attention on the first 5 ID tokens (its IDEncoder's ArcFace-body tokens)."""

VALUE_PAD = 8
"""Extra value channels per head in the fused joint call: channel D carries the identity share,
the rest are zeros that keep the value head dim a multiple of 8 (aligned for fused kernels)."""


# --- identity keys and values ------------------------------------------------------------------


def project_tokens(tokens: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``tokens [..., T, Dt] @ weight[C, Dt]^T -> [..., T, C]`` in float32 (bias-free, as every adapter's K/V)."""
    return F.linear(tokens.float(), weight.float())


def append_zero_tokens(x: torch.Tensor, count: int) -> torch.Tensor:
    """PuLID's zero-token padding after projection: ``[..., T, C] -> [..., T + count, C]``."""
    if count <= 0:
        return x
    zeros = x.new_zeros(*x.shape[:-2], count, x.shape[-1])
    return torch.cat([x, zeros], dim=-2)


def body_token_mask(total_tokens: int, zero_tokens: int = 0, body: int = PULID_BODY_TOKENS) -> torch.Tensor:
    """Boolean ``[total_tokens + zero_tokens]``: True on the first ``body`` tokens (PuLID's ``[:5]``)."""
    return torch.arange(total_tokens + zero_tokens) < min(body, total_tokens)


# --- decoupled -----------------------------------------------------------------------------------


def decoupled_attention(q: torch.Tensor, k_id: torch.Tensor, v_id: torch.Tensor, heads: int, attention_fn: AttentionFn) -> torch.Tensor:
    """``softmax(s q k_id^T) v_id``: ``[B, N, H*D]``. ``attention_fn`` is the host's attention."""
    return attention_fn(q, k_id, v_id, heads)


def pulid_projection(text_out: torch.Tensor, id_out: torch.Tensor) -> torch.Tensor:
    """PuLID's projection of ``id_out`` on ``text_out``, per batch row and channel (float32).

    ``(sum_N h * id / sum_N h * h) * h`` with sums over the N query tokens: ``[B, N, C]``.
    """
    h, i = text_out.float(), id_out.float()
    numerator = (h * i).sum(dim=-2, keepdim=True)
    denominator = (h * h).sum(dim=-2, keepdim=True)
    # a channel that is 0 everywhere has numerator 0 too: project to 0 rather than NaN
    return numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny) * h


def pulid_body_attention(q: torch.Tensor, k_id: torch.Tensor, heads: int, body: torch.Tensor) -> torch.Tensor:
    """ORTHO_v2's ``a``: unscaled ``softmax(q k_id^T)`` mean over heads, summed on ``body`` columns.

    q ``[B, N, H*D]``, k_id ``[B, T, H*D]``, body ``[T]`` (bool or 0/1, on q's device) -> ``[B, N, 1]`` float32.
    """
    logits = torch.einsum("bhnd,bhtd->bhnt", split_heads(q.float(), heads), split_heads(k_id.float(), heads))
    probs = logits.softmax(dim=-1).mean(dim=1)  # [B, N, T]
    return (probs * body.to(dtype=probs.dtype)).sum(dim=-1, keepdim=True)


def orthogonalize(
    id_out: torch.Tensor,
    text_out: torch.Tensor,
    mode: str,
    q: Optional[torch.Tensor] = None,
    k_id: Optional[torch.Tensor] = None,
    heads: Optional[int] = None,
    body: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PuLID's identity contribution for ``mode`` in :data:`ORTHO_MODES`, in ``id_out``'s dtype.

    "none": ``id_out``; "ortho": ``id_out - proj``; "ortho_v2": ``id_out + (a - 1) proj``
    (needs ``q``, ``k_id``, ``heads``, ``body``).
    """
    if mode == "none":
        return id_out
    proj = pulid_projection(text_out, id_out)
    if mode == "ortho":
        return (id_out.float() - proj).to(id_out.dtype)
    if mode == "ortho_v2":
        a = pulid_body_attention(q, k_id, heads, body)
        return (id_out.float() + (a - 1.0) * proj).to(id_out.dtype)
    raise ValueError(f"unknown orthogonal projection {mode!r}; known: {', '.join(ORTHO_MODES)}")


# --- joint ------------------------------------------------------------------------------------------


def joint_query(q: torch.Tensor, q_id: Optional[torch.Tensor], heads: int) -> torch.Tensor:
    """Queries of the fused joint call: ``q`` itself, or per head ``[q | q_id]`` (``[B, N, H*2D]``)."""
    if q_id is None:
        return q
    both = torch.cat([split_heads(q, heads), split_heads(q_id, heads)], dim=-1)
    return rearrange(both, "b h n e -> b n (h e)")


def text_key_block(k_text: torch.Tensor, heads: int, separate_query: bool) -> torch.Tensor:
    """Text rows of the fused keys: ``k_text`` or per head ``[k_text | 0]``."""
    if not separate_query:
        return k_text
    kh = rearrange(k_text, "b m (h d) -> b m h d", h=heads)
    return rearrange(torch.cat([kh, torch.zeros_like(kh)], dim=-1), "b m h e -> b m (h e)")


def identity_key_block(k_id: torch.Tensor, heads: int, separate_query: bool) -> torch.Tensor:
    """Identity rows of the fused keys: ``k_id`` or per head ``[0 | k_id]``."""
    if not separate_query:
        return k_id
    kh = rearrange(k_id, "b t (h d) -> b t h d", h=heads)
    return rearrange(torch.cat([torch.zeros_like(kh), kh], dim=-1), "b t h e -> b t (h e)")


def joint_value_block(v_id: Optional[torch.Tensor], text_tokens: int, heads: int, dim_head: int, like: torch.Tensor) -> torch.Tensor:
    """Values of the fused joint call: ``[B, M + T, H*(D + VALUE_PAD)]``.

    Text rows are all zero; identity rows hold ``v_id`` in channels ``:D`` and 1 in channel ``D``
    of every head. ``v_id`` ``[B, T, H*D]``; ``None`` builds the share-only block (``D = 0``:
    channel 0 is the indicator), used by routers that need the identity share alone.
    ``like`` gives batch, device and dtype (for ``v_id=None``: ``[B, T, ...]``).
    """
    d = 0 if v_id is None else dim_head
    b, t = like.shape[0], like.shape[1]
    width = d + VALUE_PAD
    ident = like.new_zeros(b, t, heads, width)
    if v_id is not None:
        ident[..., :d] = rearrange(v_id, "b t (h d) -> b t h d", h=heads)
    ident[..., d] = 1.0
    text = like.new_zeros(b, text_tokens, heads, width)
    return rearrange(torch.cat([text, ident], dim=1), "b m h e -> b m (h e)")


def joint_bias(text_tokens: int, id_tokens: int, weight: float, device, dtype) -> Optional[torch.Tensor]:
    """Additive logits ``[1, 1, 1, M + T]``: 0 on text columns, ``log w`` on identity ones (None for w = 1)."""
    if weight == 1.0:
        return None
    bias = torch.zeros(1, 1, 1, text_tokens + id_tokens, device=device, dtype=dtype)
    bias[..., text_tokens:] = log_prior(weight)
    return bias


def joint_identity_attention(
    q_joint: torch.Tensor,
    k_joint: torch.Tensor,
    v_joint: torch.Tensor,
    heads: int,
    dim_head: int,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused SDPA call over ``[text ; identity]`` keys.

    Inputs from :func:`joint_query`, the key blocks and :func:`joint_value_block` (value head
    width ``w_v``: ``dim_head + VALUE_PAD``, or ``VALUE_PAD`` for the share-only block).
    Returns ``(id_part [B, N, H*D'], share [B, N, H, 1])``: ``a * softmax(S_id) v_id`` (``D' = 0``
    for the share-only block) and the identity share ``a`` per query and head.
    """
    out = biased_attention(q_joint, k_joint, v_joint, heads, bias=bias, scale=dim_head**-0.5)
    oh = rearrange(out, "b n (h e) -> b n h e", h=heads)
    d = oh.shape[-1] - VALUE_PAD
    return rearrange(oh[..., :d], "b n h d -> b n (h d)"), oh[..., d : d + 1]


def mix_with_text(text_out: torch.Tensor, id_part: torch.Tensor, share: torch.Tensor, heads: int) -> torch.Tensor:
    """``(1 - a) * text_out + id_part`` per head: ``[B, N, H*D]`` (``share`` ``[B, N, H, 1]``)."""
    th = rearrange(text_out, "b n (h d) -> b n h d", h=heads)
    ih = rearrange(id_part, "b n (h d) -> b n h d", h=heads)
    return rearrange(torch.addcmul(ih.to(th.dtype), th, 1.0 - share.to(th.dtype)), "b n h d -> b n (h d)")


def joint_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_id: torch.Tensor,
    v_id: torch.Tensor,
    heads: int,
    weight: float = 1.0,
    q_id: Optional[torch.Tensor] = None,
    attention_fn: Optional[AttentionFn] = None,
    text_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PVA's joint attention at one layer: ``[B, N, H*D]`` (see the module docstring).

    ``text_out`` (the layer's text attention, or what earlier stages made of it) defaults to
    ``attention_fn(q, k_text, v_text, heads)``. Zero identity tokens return ``text_out`` itself.
    """
    if text_out is None:
        if attention_fn is None:
            raise ValueError("joint_attention needs text_out or an attention_fn")
        text_out = attention_fn(q, k_text, v_text, heads)
    if k_id.shape[1] == 0:
        return text_out
    dim_head = q.shape[-1] // heads
    separate = q_id is not None
    keys = torch.cat([text_key_block(k_text, heads, separate), identity_key_block(k_id, heads, separate)], dim=1)
    values = joint_value_block(v_id, k_text.shape[1], heads, dim_head, like=v_id)
    bias = joint_bias(k_text.shape[1], k_id.shape[1], weight, q.device, q.dtype)
    id_part, share = joint_identity_attention(joint_query(q, q_id, heads), keys, values, heads, dim_head, bias)
    return mix_with_text(text_out, id_part, share, heads)
