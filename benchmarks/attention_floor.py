"""The arithmetic floor of each mechanism: extra FLOPs and bytes over the unpatched model.

Per cross-attention layer (``geometry.LayerGeometry``), with

    B  rows in the batch (2: cond + uncond)     N  query tokens of the layer
    M  text tokens (77)                         C  the layer's width (heads * dim_head)
    H  heads                                    T  identity tokens of the mechanism
    e  bytes per element (2 fp16, 4 fp32)

each function returns what the mechanism adds to one sampling step, summed over
every layer of the table. Counting rules (the same for every mechanism, so the
numbers compare):

- FLOPs: 2 per multiply-add of a matrix product, 5 per softmax element (max,
  subtract, exp, sum, divide), 1 per other elementwise operation.
- Projections the mechanism may cache once per sampling (identity K/V, the
  face-token linear) cost nothing per step; per-step projections of image
  tokens (PVA's visual query, FACT's self-attention) are counted.
- Bytes: what the extra work must move through device memory at least if it
  were one fused pass after the host's attention: read q and the current
  output, write the output, read the identity K/V (one set per cond/uncond
  chunk), plus any weights and maps the mechanism needs. Intermediates that a
  fused kernel keeps on chip (logits, probabilities) are free.

The floor time is ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` with the
ceilings measured on the machine (``device_ceilings.py``); printed next to the
measured overhead, its distance to the measurement is what launches, syncs and
unfused passes cost. Where a mechanism leaves a choice open (token counts,
router, score source), the assumption is written in its function's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional

from .geometry import LayerGeometry, coarse_layers

SOFTMAX = 5  # FLOPs per softmax element
CHUNKS = 2  # distinct identity K/V sets per step: cond and uncond


@dataclass(frozen=True)
class Floor:
    """Extra work of one step. ``bytes`` None: not modelled (see ``note``)."""

    flops: float
    bytes: Optional[float]
    note: str = ""

    def __add__(self, other: "Floor") -> "Floor":
        both = None if self.bytes is None or other.bytes is None else self.bytes + other.bytes
        return Floor(self.flops + other.flops, both, "; ".join(n for n in (self.note, other.note) if n))

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """The time no implementation beats on a machine with these ceilings."""
        compute = self.flops / peak_flops
        memory = (self.bytes or 0.0) / bandwidth
        return max(compute, memory)


@dataclass(frozen=True)
class FloorInputs:
    """What a scenario's floor is computed from."""

    table: List[LayerGeometry]
    elem_bytes: int
    unet_flops: Optional[float] = None  # one unpatched UNet call (batch B), counted; None if unknown
    latent_channels: int = 4


def _sum(table: Iterable[LayerGeometry], flops, nbytes) -> Floor:
    table = list(table)
    return Floor(float(sum(flops(g) for g in table)), float(sum(nbytes(g) for g in table)))


# --- reference -----------------------------------------------------------------------------------


def unpatched_attention(fi: FloorInputs) -> Floor:
    """The unpatched attn2 attention core over the text: softmax(q K^T) V, K/V read, q read, out written."""
    e = fi.elem_bytes
    return _sum(
        fi.table,
        lambda g: 4 * g.batch * g.tokens * g.text_tokens * g.inner + SOFTMAX * g.batch * g.heads * g.tokens * g.text_tokens,
        lambda g: e * (2 * g.batch * g.tokens * g.inner + 2 * g.batch * g.text_tokens * g.inner),
    )


def nothing(fi: FloorInputs) -> Floor:
    """No arithmetic: the dispatcher with a stage that returns ``out`` (or no patch at all)."""
    return Floor(0.0, 0.0)


# --- identity attention mechanisms ---------------------------------------------------------------


def decoupled(fi: FloorInputs, tokens: int) -> Floor:
    """IP-Adapter style: out + w * softmax(q K_id^T) V_id with cached K_id, V_id ``[T, C]``.

    FLOPs 4BNTC + 5BHNT + 2BNC; bytes e(3BNC + 2*2TC).
    """
    e, t = fi.elem_bytes, tokens
    return _sum(
        fi.table,
        lambda g: 4 * g.batch * g.tokens * t * g.inner + SOFTMAX * g.batch * g.heads * g.tokens * t + 2 * g.batch * g.tokens * g.inner,
        lambda g: e * (3 * g.batch * g.tokens * g.inner + CHUNKS * 2 * t * g.inner),
    )


def joint(fi: FloorInputs, tokens: int, visual_q: bool) -> Floor:
    """PVA: one softmax over [text; identity] keys, i.e. the host attention with T more key columns.

    FLOPs 4BNTC + 5BHNT (+ 2BNC^2 for PVA's own visual query projection of the
    hidden states); bytes e(2*2TC) (+ e(2BNC + C^2): read hidden states and
    W_q, write the visual query). Assumes the joint softmax replaces the text
    attention in one kernel (no text-only attention computed besides).
    """
    e, t = fi.elem_bytes, tokens

    def flops(g):
        f = 4 * g.batch * g.tokens * t * g.inner + SOFTMAX * g.batch * g.heads * g.tokens * t
        return f + (2 * g.batch * g.tokens * g.inner * g.inner if visual_q else 0)

    def nbytes(g):
        b = e * CHUNKS * 2 * t * g.inner
        return b + (e * (2 * g.batch * g.tokens * g.inner + g.inner * g.inner) if visual_q else 0)

    return _sum(fi.table, flops, nbytes)


def routing(fi: FloorInputs, tokens: int) -> Floor:
    """MoA's router and blend on top of a personalized branch already applied (PVA joint over T tokens).

    The training-free router reads the attention mass on the T identity columns,
    which the branch's joint softmax already holds: summing it over the columns
    and averaging over heads (BHNT + BHN), a two-way softmax with temperature
    (~10BN), then ``R0 * prior + R1 * personalized`` (3BNC; the prior is the
    layer's text attention, computed once per call anyway). Bytes: read prior
    and branch, write the result, e(3BNC), plus the router map e(BN).
    The branch itself is its own scenario's floor (``joint``).
    """
    e, t = fi.elem_bytes, tokens
    return _sum(
        fi.table,
        lambda g: g.batch * g.heads * g.tokens * (t + 1) + 10 * g.batch * g.tokens + 3 * g.batch * g.tokens * g.inner,
        lambda g: e * (3 * g.batch * g.tokens * g.inner + g.batch * g.tokens),
    )


def ca2_gate(fi: FloorInputs, tokens: int) -> Floor:
    """CA²: decoupled attention scaled per query by (1 - Score * Mask).

    Assumes the training-free score (normalised text-attention mass per pixel):
    the text logits are recomputed (2BNMC + 5BHNM + BHNM reduce) unless the
    attention kernel exposes them, then the gate multiplies (BNC + 2BN).
    Bytes: decoupled + e(BMC + 2BN) (text K again, mask and score).
    """
    e = fi.elem_bytes
    score = _sum(
        fi.table,
        lambda g: 2 * g.batch * g.tokens * g.text_tokens * g.inner + (SOFTMAX + 1) * g.batch * g.heads * g.tokens * g.text_tokens + g.batch * g.tokens * g.inner + 2 * g.batch * g.tokens,
        lambda g: e * (g.batch * g.text_tokens * g.inner + 2 * g.batch * g.tokens),
    )
    return decoupled(fi, tokens) + score


def boundary_guidance(fi: FloorInputs, min_downscale: int = 1) -> Floor:
    """STFG fast: the mean text cross-attention map over the boundary layers, then an FFT low-pass of x0.

    Boundary layers: every layer (``min_downscale`` 1, the node's default, as in the paper) or the
    coarse ones (4: >= 4x coarser than the latent, ``boundary_layers: low resolution layers``).
    Per boundary layer: text probabilities
    recomputed and averaged over heads and tokens, 2BNMC + 6BHNM; bytes
    e(BNC + BMC + BN). Per image (B/2) of c latent channels, h*w pixels: FFT and
    inverse FFT, 2 * 5 c hw log2(hw), plus the closed-form update (~10 c hw);
    bytes e * 4 c hw.
    """
    e = fi.elem_bytes
    maps = _sum(
        coarse_layers(fi.table, min_downscale),
        lambda g: 2 * g.batch * g.tokens * g.text_tokens * g.inner + (SOFTMAX + 1) * g.batch * g.heads * g.tokens * g.text_tokens,
        lambda g: e * (g.batch * g.tokens * g.inner + g.batch * g.text_tokens * g.inner + g.batch * g.tokens),
    )
    h, w = fi.table[0].latent if fi.table else (0, 0)
    images, c, hw = (fi.table[0].batch // 2 if fi.table else 0), fi.latent_channels, h * w
    fft = Floor(images * (2 * 5 * c * hw * math.log2(max(hw, 2)) + 10 * c * hw), float(e * 4 * c * hw * images))
    return maps + fft


def boundary_guidance_exact(fi: FloorInputs) -> Floor:
    """STFG exact: STFG fast plus a backward pass through the UNet (about 2x its forward FLOPs).

    The least it can cost: the step's own forward keeps its activations and one
    backward follows. The node re-runs the CFG forward with autograd on instead
    (``gradient_support.cfg_denoiser``: +1x forward), so expect ~3x on top of
    the step at best. Bytes not modelled (the stored activations dominate and
    depend on checkpointing). Needs the counted UNet FLOPs; without them only
    the fast part.
    """
    backward = Floor(2.0 * fi.unet_flops, None, "backward ~ 2x UNet forward") if fi.unet_flops else Floor(0.0, None, "UNet FLOPs unknown")
    return boundary_guidance(fi) + backward


def gated_self_attention(fi: FloorInputs, tokens: int) -> Floor:
    """FACT: x += g tanh(a) SA(LN([x; f]))[:N]; x += g tanh(b) FF(LN(x)) at every attn2 block.

    T face tokens, L = N + T. Only the N image rows' outputs are kept, so the
    floor computes queries for N rows: q 2BNC^2, k/v 4BLC^2, attention
    4BNLC + 5BHNL, to_out 2BNC^2, GEGLU feed-forward (C -> 8C, 4C -> C)
    24BNC^2 + 12BNC, norms and gates 20BNC. Bytes: the block's weights
    e*16C^2 (q, k, v, out 4C^2; feed-forward 12C^2) and two passes over x,
    e(4BNC + 2*TC).
    """
    e, t = fi.elem_bytes, tokens

    def flops(g):
        b, n, c = g.batch, g.tokens, g.inner
        length = n + t
        attention = 2 * b * n * c * c + 4 * b * length * c * c + 4 * b * n * length * c + SOFTMAX * b * g.heads * n * length + 2 * b * n * c * c
        feed_forward = 24 * b * n * c * c + 12 * b * n * c
        return attention + feed_forward + 20 * b * n * c

    return _sum(fi.table, flops, lambda g: e * (16 * g.inner * g.inner + 4 * g.batch * g.tokens * g.inner + CHUNKS * t * g.inner))


def split_key_value_context(fi: FloorInputs) -> Floor:
    """Per-stage K/V tokens: keys from one encoded prompt, values from another (same token count).

    Nothing extra per step: to_v projects the value context instead of the text
    context (same FLOPs, same bytes), the pair is chosen by sigma (on the device,
    one index), and the prompt encodings happen once, in the encode node. The
    node's attn2_patch does move memory: it returns new context and value
    tensors for the batch (4eBMC_t per layer, C_t the context width), which
    ComfyUI's patch interface forces and a kernel reading the stage context
    in place would not; not counted here.
    """
    return Floor(0.0, 0.0)


def nested(fi: FloorInputs, tokens: int) -> Floor:
    """Nested attention: out + a_s(q) (v*_q - V[s]), v*_q = softmax(q Kn^T) Vn over T subject tokens.

    FLOPs 4BNTC + 5BHNT for v*_q, the subject token's probability a_s(q) needs
    the text softmax normaliser: logits recomputed 2BNMC + 5BHNM, the update
    3BNC. Bytes e(3BNC + 2*2TC + BMC).
    """
    e, t = fi.elem_bytes, tokens
    return _sum(
        fi.table,
        lambda g: 4 * g.batch * g.tokens * t * g.inner
        + SOFTMAX * g.batch * g.heads * g.tokens * t
        + 2 * g.batch * g.tokens * g.text_tokens * g.inner
        + SOFTMAX * g.batch * g.heads * g.tokens * g.text_tokens
        + 3 * g.batch * g.tokens * g.inner,
        lambda g: e * (3 * g.batch * g.tokens * g.inner + CHUNKS * 2 * t * g.inner + g.batch * g.text_tokens * g.inner),
    )


def total(floors: Iterable[Floor]) -> Floor:
    result = Floor(0.0, 0.0)
    for f in floors:
        result = result + f
    return result
