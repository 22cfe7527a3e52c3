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
attention mass is multiplied by ``w`` (w = 0 removes them; w = 1 is PVA exactly). So ``w``
multiplies the identity's odds: with ``E_t``, ``E_i`` the text and identity sums of ``exp(S)`` at
w = 1 and ``s = E_i / (E_t + E_i)`` the identity's share, the share at ``w`` is
``w E_i / (E_t + w E_i) = w s / (w s + 1 - s)`` (per query and head); w = 2 turns 0.5 into 2/3,
not 1. PVA's sampling gives the negative prompt no identity tokens (text only); the node's
``negative_identity`` input chooses that (default) or the empty face's / the person's tokens
(``nodes/pva/parallel_attention_nodes.py``). With the
layer's own ``to_k`` / ``to_v`` projecting the identity tokens this is PVA at initialisation
(PVA initialises ``to_visual_*`` as copies of ``to_q / to_k / to_v``): identity tokens appended
to the text context.

How joint attention is computed, and how it stacks. Where joint attention is the first
mechanism to act at a layer (no other stage before it, no other pack's patch in the slot, no
mask), it is ONE fused SDPA call, PVA as written: keys ``[k_text ; k_id]``, values
``[v_text ; v_id]``; the layer's separate text attention is not computed at all. Otherwise the
joint softmax is split exactly into the text softmax and the identity softmax weighted by their
shares of the attention mass::

    softmax(S) [v_text ; v_id] = (1 - a) * softmax(s q k_text^T) v_text  +  a * softmax(S_id) v_id
    a = sum_{j in id} exp(S_j) / sum_{all j} exp(S_j)              # per query and head

and one fused call gets ``a * softmax(S_id) v_id`` and ``a`` (values ``[0 ; v_id]`` with one more
value channel per head that is 1 on identity rows: its output is ``a``); :func:`mix_with_text`
forms ``(1 - a) * text_out + a * id_attention``. When ``text_out`` is the layer's plain text
attention this equals the single call; when stages or another pack's patch changed the text
attention before this one, their result takes the text share (documented stacking rule: joint
attention makes the identity compete with whatever attention output the layers before it
produced).

PVA's separate visual query in the same single call: queries ``[q | q_id]`` (head dim 2D) against
keys ``[k_text | 0]`` (text rows) and ``[0 | k_id]`` (identity rows), with the scale fixed at
``1/sqrt(D)``: the dot products are exactly ``q k_text`` and ``q_id k_id``. Every operand of the
call has one head width (:func:`fused_width`, zero channels where needed), so SDPA runs its fused
flash kernels; the 2D-wide values of the separate-query layout leave room for the share channel,
which a mixture-of-attention router then reads without a second pass.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .attention_core import AttentionFn, biased_attention, log_prior, sdpa_token_heads, split_heads, token_heads

ORTHO_MODES = ("none", "ortho", "ortho_v2")
PULID_BODY_TOKENS = 5
"""PuLID's ORTHO_v2 sums the attention on the first 5 ID tokens (its IDEncoder's ArcFace-body tokens)."""


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
# Operands of the fused call are token-major heads, ``[B, tokens, H, width]`` (views of the
# layer's ``[B, tokens, H*D]`` tensors where nothing is padded).


def fused_width(dim_head: int, separate_query: bool, value_dim: int, share: bool) -> int:
    """Head width of every operand of one fused joint call.

    SDPA's fused kernels (flash, on the CPU and on GPUs) need q, k and v of one head width; a
    width the query/key layout does not already give is rounded up to a multiple of 8 (GPU
    alignment). Query/key width: ``D``, or ``2D`` with a separate identity query; value width:
    ``value_dim`` value channels plus one share channel when ``share``.
    """
    qk = 2 * dim_head if separate_query else dim_head
    needed = value_dim + int(share)
    return qk if needed <= qk else -(-needed // 8) * 8


def pad_heads(x: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """Per head, ``x``'s channels at ``offset`` in a zero block of ``width``: ``[B, N, H, d] -> [B, N, H, width]``.

    Returns ``x`` itself when nothing moves (``offset == 0``, ``d == width``).
    """
    d = x.shape[-1]
    if offset == 0 and d == width:
        return x
    return F.pad(x, (offset, width - offset - d))


def joint_query(q: torch.Tensor, q_id: Optional[torch.Tensor], heads: int, width: int) -> torch.Tensor:
    """Queries of a fused joint call: per head ``[q | 0]`` or ``[q | q_id | 0]``: ``[B, N, H, width]``."""
    if q_id is None:
        return pad_heads(token_heads(q, heads), width)
    return pad_heads(torch.cat([token_heads(q, heads), token_heads(q_id, heads)], dim=-1), width)


def identity_key_block(k_id: torch.Tensor, heads: int, width: int, separate_query: bool) -> torch.Tensor:
    """Identity rows of the fused keys: per head ``[k_id | 0]``, or ``[0 | k_id | 0]`` facing ``q_id``.

    ``[B, T, H*D] -> [B, T, H, width]``. The text rows are ``pad_heads(token_heads(k_text), width)``:
    ``[k_text | 0]``, which ``q`` meets and ``q_id`` does not.
    """
    kh = token_heads(k_id, heads)
    return pad_heads(kh, width, offset=kh.shape[-1] if separate_query else 0)


def identity_value_block(v_id: Optional[torch.Tensor], heads: int, width: int, share: bool, like: torch.Tensor) -> torch.Tensor:
    """Identity rows of the fused values: per head ``[v_id | 1 | 0]`` (``[v_id | 0]`` without ``share``).

    ``v_id`` ``[B, T, H*D] -> [B, T, H, width]``; ``None`` gives the share-only rows ``[1 | 0]`` (no
    value channels). ``like`` ``[B, T, ...]`` gives batch, token count, device and dtype.
    """
    d = 0 if v_id is None else v_id.shape[-1] // heads
    ident = like.new_zeros(like.shape[0], like.shape[1], heads, width)
    if v_id is not None:
        ident[..., :d] = token_heads(v_id, heads)
    if share:
        ident[..., d] = 1.0
    return ident


def joint_bias(text_tokens: int, id_tokens: int, weight: float, device, dtype) -> Optional[torch.Tensor]:
    """Additive logits ``[1, 1, 1, M + T]``: 0 on text columns, ``log w`` on identity ones (None for w = 1)."""
    if weight == 1.0:
        return None
    bias = torch.zeros(1, 1, 1, text_tokens + id_tokens, device=device, dtype=dtype)
    bias[..., text_tokens:] = log_prior(weight)
    return bias


def joint_row_bias(text_tokens: int, id_tokens: int, weight: float, identity_rows: torch.Tensor, columns: Optional[int] = None) -> torch.Tensor:
    """Additive logits ``[B, 1, 1, columns]`` (CPU float32) for one joint call over a whole batch whose
    rows do not all get the identity: 0 on text columns; on the ``T`` identity columns ``log w`` in
    rows where ``identity_rows`` ``[B]`` (bool) is True and ``-inf`` elsewhere; 0 on any columns
    past ``M + T`` (``columns``, default ``M + T``).

    A row with ``-inf`` identity columns gives those keys zero mass, so its output is its text
    attention, ``softmax(s q k_text^T) v_text``: exactly in exact arithmetic, up to float rounding
    in a kernel (the sums run over M + T columns instead of M). Extra ``columns`` let the caller
    slice ``[..., :M + T]`` with row strides a multiple of 16 (SDPA's memory-efficient GPU kernel
    copies a mask whose strides are not into a padded one on every call).
    """
    total = text_tokens + id_tokens
    bias = torch.zeros(identity_rows.shape[0], 1, 1, max(columns or total, total))
    bias[..., text_tokens:total] = torch.where(identity_rows.reshape(-1, 1, 1, 1), log_prior(weight), float("-inf"))
    return bias


def fused_joint_call(
    q_joint: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    dim_head: int,
    value_dim: int,
    share: bool,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One fused SDPA call over ``[text ; identity]`` keys, scale ``1/sqrt(D)``.

    Operands ``[B, tokens, H, width]`` (:func:`joint_query`, the key and value blocks).
    Returns ``(values [B, N, H*value_dim], share [B, N, H, 1] or None)``: the first ``value_dim``
    output channels of every head and, with ``share``, the next one (the identity share ``a``).
    """
    out = sdpa_token_heads(q_joint, keys, values, bias=bias, scale=dim_head**-0.5)  # [B, N, H, width]
    part = out[..., :value_dim].flatten(-2)
    return part, (out[..., value_dim : value_dim + 1] if share else None)


def mix_with_text(text_out: torch.Tensor, id_part: torch.Tensor, share: torch.Tensor, heads: int) -> torch.Tensor:
    """``(1 - a) * text_out + id_part`` per head: ``[B, N, H*D]`` (``share`` ``[B, N, H, 1]``)."""
    th, ih = token_heads(text_out, heads), token_heads(id_part, heads)
    return torch.addcmul(ih.to(th.dtype), th, 1.0 - share.to(th.dtype)).flatten(-2)


def joint_attention(
    q: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    k_id: torch.Tensor,
    v_id: torch.Tensor,
    heads: int,
    weight: float = 1.0,
    q_id: Optional[torch.Tensor] = None,
    text_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PVA's joint attention at one layer: ``[B, N, H*D]`` (see the module docstring).

    Without ``text_out``: one fused call over ``[text ; identity]`` with values ``[v_text ; v_id]``
    (PVA as written). With ``text_out`` (the layer's text attention, or what earlier stages made of
    it): the identity part and share in one call, mixed as ``(1 - a) text_out + a id_attention``.
    Zero identity tokens return ``text_out`` (or the plain text attention) itself.
    """
    dim_head = q.shape[-1] // heads
    separate = q_id is not None
    if k_id.shape[1] == 0:
        if text_out is not None:
            return text_out
        return biased_attention(q, k_text, v_text, heads)
    fused = text_out is None
    width = fused_width(dim_head, separate, dim_head, share=not fused)
    keys = torch.cat([pad_heads(token_heads(k_text, heads), width), identity_key_block(k_id, heads, width, separate)], dim=1)
    if fused:
        text_values = pad_heads(token_heads(v_text, heads), width)
    else:
        text_values = v_id.new_zeros(v_id.shape[0], k_text.shape[1], heads, width)
    values = torch.cat([text_values.to(v_id.dtype), identity_value_block(v_id, heads, width, share=not fused, like=v_id)], dim=1)
    bias = joint_bias(k_text.shape[1], k_id.shape[1], weight, q.device, q.dtype)
    part, share = fused_joint_call(joint_query(q, q_id, heads, width), keys, values, dim_head, dim_head, not fused, bias)
    return part if fused else mix_with_text(text_out, part, share, heads)
