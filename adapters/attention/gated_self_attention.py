"""FACT's sequential face adapter: gated self-attention over [latent; face tokens].

FaceChain-FACT (Yu et al., arXiv 2410.12312; code github:modelscope/facechain,
``face_adapter/face_attention_processor_v1.py`` ``FaceAttnProcessor``) inserts,
in every SD1.5 cross-attention block, a GLIGEN-style gated self-attention
between the self-attention residual and the text cross-attention. Per block,
with ``x`` the residual stream after attn1 (``[B, N, C]``) and ``t`` the face
tokens (``[B, T, Dt]``, 16 per reference image from FACT's resampler)::

    f  = linear(t)                                           # [B, T, C]
    x1 = x  + g * tanh(alpha_attn)  * SA(norm1([x; f]))[:, :N]
    x2 = x1 + g * tanh(alpha_dense) * FF(norm2(x1))          # FF = GEGLU(C -> 4C) + Linear(4C -> C)

then the block's own text cross-attention runs on ``x2`` as usual. ``SA`` is a
plain multi-head self-attention (to_q/to_k/to_v without bias, to_out with
bias, heads = the block's heads, scale = (C/heads)^-1/2); only its first N
outputs (the latent tokens) are kept.

Where FACT's ``norm2`` went (checked against the official code, ``face_adapter_v1.py``
``FaceAdapter_v1.set_adapter`` / ``load_adapter``): FACT moves each adapted block's own
``norm2`` (the LayerNorm before the text cross-attention, attn2) into the processor as ``ln``
and puts an identity in its place, so the processor receives the raw residual ``x``, runs the
adapter, then the text cross-attention on ``ln(x2)`` and returns ``x2 + CA(ln(x2)) - x`` for
the block to add back. Loading the checkpoint (``unet.load_state_dict`` of every key holding
``processor``) then overwrites ``ln`` with the file's ``...attn2.processor.ln.weight/bias``
when the file has them. The official block is therefore::

    x  = x + attn1(norm1(x))
    x2 = GSA(x)                       # the two gated steps above
    x  = x2 + attn2(ln(x2), text)     # ln = the FILE's LayerNorm, not the base model's norm2
    x  = x + ff(norm3(x))

ComfyUI's ``middle_patch`` runs on the raw residual after attn1 and *before* the block's
``norm2``, which then feeds the text cross-attention: the same dataflow. The file's ``ln``
(:func:`block_norm`) is put into the block's ``norm2`` by the face-adapter node as a weight
patch of the patched MODEL clone (``nodes/fact/face_adapter_nodes.py``), never into the upstream
model. Choice: ``ln`` belongs to *loading* the adapter, as in the official inference, so it
replaces ``norm2`` in every step and for cond and uncond rows whenever the node's weight is not
0 (start/end, apply_to and mask schedule only the gated increment; FACT's own
``delayed_face_condition`` likewise zeroes only the gate); with weight 0 the node patches
nothing, so the model is the unpatched one bit for bit (the official code would still swap
``norm2``). Files without ``ln`` keep the base model's ``norm2``.

Choices the paper/code leave open, made here:

- ``region`` (an optional ``[B, N, 1]`` map in [0, 1], the inference-time
  counterpart of FACT's FAIR regulariser, which trains the adapter to leave
  non-face regions alone) scales *each* of the two residual increments, i.e.
  it acts as a spatial factor on the gate ``g``. With a 0/1 mask this equals
  blending the adapter's output with ``x``; outside the mask ``x`` is returned
  bit for bit.
- Only the N latent queries are computed (the face-token queries are thrown
  away by ``[:, :N]`` in FACT anyway); LayerNorm is per token, so
  ``norm1([x; f]) = [norm1(x); norm1(f)]`` and the face part (keys/values of
  ``f``) depends on nothing but the tokens: :func:`face_keys_values` computes
  it once per sampling run.

Weight names (per layer, as the FACT checkpoint's processor keys after the
``...attn2.processor.`` prefix): ``linear.weight`` ``[C, Dt]``, ``linear.bias``
``[C]``, ``attn.to_q/to_k/to_v.weight`` ``[C, C]``, ``attn.to_out.0.weight``
``[C, C]``, ``attn.to_out.0.bias`` ``[C]``, ``ff.net.0.proj.weight`` ``[8C, C]``,
``ff.net.0.proj.bias`` ``[8C]``, ``ff.net.2.weight`` ``[C, 4C]``,
``ff.net.2.bias`` ``[C]``, ``norm1.weight/bias``, ``norm2.weight/bias`` ``[C]``,
``alpha_attn``, ``alpha_dense`` (scalars); optionally ``ln.weight`` / ``ln.bias`` ``[C]``
(:data:`BLOCK_NORM_KEYS`, the block's moved ``norm2``).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .attention_core import AttentionFn

FACT_LAYER_KEYS = (
    "linear.weight",
    "linear.bias",
    "attn.to_q.weight",
    "attn.to_k.weight",
    "attn.to_v.weight",
    "attn.to_out.0.weight",
    "attn.to_out.0.bias",
    "ff.net.0.proj.weight",
    "ff.net.0.proj.bias",
    "ff.net.2.weight",
    "ff.net.2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "alpha_attn",
    "alpha_dense",
)

BLOCK_NORM_KEYS = ("ln.weight", "ln.bias")
"""The block's ``norm2`` as FACT's processor carries it (``ln``); optional in a layer."""

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which FACT's norm1/norm2 use


def expected_shapes(channels: int, token_dim: int) -> Dict[str, Tuple[int, ...]]:
    """The shape of every FACT tensor for a block of ``channels`` and tokens of ``token_dim``."""
    c = channels
    return {
        "linear.weight": (c, token_dim),
        "linear.bias": (c,),
        "attn.to_q.weight": (c, c),
        "attn.to_k.weight": (c, c),
        "attn.to_v.weight": (c, c),
        "attn.to_out.0.weight": (c, c),
        "attn.to_out.0.bias": (c,),
        "ff.net.0.proj.weight": (8 * c, c),
        "ff.net.0.proj.bias": (8 * c,),
        "ff.net.2.weight": (c, 4 * c),
        "ff.net.2.bias": (c,),
        "norm1.weight": (c,),
        "norm1.bias": (c,),
        "norm2.weight": (c,),
        "norm2.bias": (c,),
        "alpha_attn": (),
        "alpha_dense": (),
    }


def check_layer(weights: Mapping[str, torch.Tensor], channels: int, token_dim: int) -> Optional[str]:
    """``None`` when ``weights`` is a complete FACT layer for these sizes, else what is wrong."""
    shapes = expected_shapes(channels, token_dim)
    missing = [name for name in shapes if name not in weights]
    if missing:
        return f"missing {', '.join(missing)}"
    for name, shape in shapes.items():
        got = tuple(weights[name].shape)
        if got != shape and not (shape == () and got in ((1,),)):
            return f"{name} has shape {list(got)}, expected {list(shape)}"
    present = [name for name in BLOCK_NORM_KEYS if name in weights]
    if present and len(present) != len(BLOCK_NORM_KEYS):
        return f"has {present[0]} without {[n for n in BLOCK_NORM_KEYS if n not in weights][0]}"
    for name in present:
        if tuple(weights[name].shape) != (channels,):
            return f"{name} has shape {list(weights[name].shape)}, expected {[channels]}"
    return None


def block_norm(weights: Mapping[str, torch.Tensor]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The file's ``ln`` (weight, bias), ``[C]`` each, that replaces the block's ``norm2``; None without one."""
    if not all(name in weights for name in BLOCK_NORM_KEYS):
        return None
    return weights[BLOCK_NORM_KEYS[0]], weights[BLOCK_NORM_KEYS[1]]


def gates(weights: Mapping[str, torch.Tensor], weight: float) -> Tuple[float, float]:
    """``(g * tanh(alpha_attn), g * tanh(alpha_dense))`` as Python floats (weights live on the CPU)."""
    a = float(weights["alpha_attn"].detach().double().reshape(-1)[0])
    d = float(weights["alpha_dense"].detach().double().reshape(-1)[0])
    return weight * math.tanh(a), weight * math.tanh(d)


def face_keys_values(face_tokens: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Keys and values of the face tokens for one layer: ``[b, T, Dt] -> [b, T, 2C]`` (k then v).

    ``norm1(linear(t))`` projected by to_k and to_v: constant during sampling.
    """
    f = F.linear(face_tokens, weights["linear.weight"], weights["linear.bias"])
    f = F.layer_norm(f, f.shape[-1:], weights["norm1.weight"], weights["norm1.bias"], LAYER_NORM_EPS)
    kv_weight = torch.cat([weights["attn.to_k.weight"], weights["attn.to_v.weight"]], dim=0)
    return F.linear(f, kv_weight)


def fused_qkv_weight(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[3C, C]``: to_q, to_k, to_v stacked, so the latent part is one matmul."""
    return torch.cat([weights["attn.to_q.weight"], weights["attn.to_k.weight"], weights["attn.to_v.weight"]], dim=0)


def geglu_feed_forward(x: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """FACT's ``FeedForward(C, glu=True)``: ``Linear(4C -> C)(a * gelu(b))`` with ``[a, b] = Linear(C -> 8C)(x)``."""
    a, b = F.linear(x, weights["ff.net.0.proj.weight"], weights["ff.net.0.proj.bias"]).chunk(2, dim=-1)
    return F.linear(a * F.gelu(b), weights["ff.net.2.weight"], weights["ff.net.2.bias"])


def gated_self_attention(
    x: torch.Tensor,
    face_kv: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    heads: int,
    gate_attn: Union[float, torch.Tensor],
    gate_dense: Union[float, torch.Tensor],
    attention_fn: AttentionFn,
    region: Optional[torch.Tensor] = None,
    qkv_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One FACT adapter step on the residual stream: ``[B, N, C] -> [B, N, C]``.

    x:          the block's residual stream after self-attention.
    face_kv:    ``[B, T, 2C]`` from :func:`face_keys_values` (rows matching ``x``'s rows).
    weights:    the layer's FACT tensors in ``x``'s dtype/device.
    gate_attn / gate_dense: ``g * tanh(alpha)`` (see :func:`gates`; scalar tensors while training).
    attention_fn: ``fn(q, k, v, heads)``; the node passes one fused SDPA call.
    region:     optional ``[B, N, 1]`` in [0, 1]; 0 leaves ``x`` unchanged there.
    qkv_weight: optional cached :func:`fused_qkv_weight`.

    Kernels per call (issue #22's budget, 12): two LayerNorms, four matmuls (q/k/v as one
    over the stacked weights, to_out, the two feed-forward ones), one concatenation (the
    latent keys and values joined to the face tokens' in one ``cat``: k and v are views of
    it), the attention, gelu and its product, and each gated residual as one op
    (``x + g * delta`` as ``add(alpha=g)``, with a region ``addcmul``).
    """
    c = x.shape[-1]
    if qkv_weight is None:
        qkv_weight = fused_qkv_weight(weights)
    h = F.layer_norm(x, (c,), weights["norm1.weight"], weights["norm1.bias"], LAYER_NORM_EPS)
    qkv = F.linear(h, qkv_weight)  # [B, N, 3C]
    kv = torch.cat([qkv[..., c:], face_kv], dim=1)  # [B, N + T, 2C]: latent then face tokens
    k, v = kv.split(c, dim=-1)
    attended = attention_fn(qkv[..., :c], k, v, heads)
    delta = F.linear(attended, weights["attn.to_out.0.weight"], weights["attn.to_out.0.bias"])
    x1 = gated_residual(x, delta, gate_attn, region)
    h = F.layer_norm(x1, (c,), weights["norm2.weight"], weights["norm2.bias"], LAYER_NORM_EPS)
    return gated_residual(x1, geglu_feed_forward(h, weights), gate_dense, region)


def gated_residual(x: torch.Tensor, delta: torch.Tensor, gate: Union[float, torch.Tensor], region: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + gate * region * delta``: ``[B, N, C]`` (region ``[B, N, 1]`` or None = 1).

    A float gate (sampling) is one kernel; a tensor gate (training, where ``alpha`` learns) the
    plain product, which autograd differentiates with respect to the gate.
    """
    if isinstance(gate, torch.Tensor):
        return x + delta * (gate if region is None else region.to(delta.dtype) * gate)
    if region is None:
        return torch.add(x, delta, alpha=gate)
    return torch.addcmul(x, delta, region.to(delta.dtype), value=gate)
