"""*Apply KV-mixed attention* on a Flux MODEL: identity keys from one token set, values from another.

VisualComposer's KV-mixed cross-attention (adapters/attention/kv_mixed_attention.py) takes the keys of
the visual prompt from one encoding (coarse: where it goes) and the values from another (fine:
what it looks like). In a Flux joint block the text side of the joint attention stands where
UNet cross-attention's context stood, so the identity keys and values are made as text tokens
of that block would get them (nodes/common/dit_layout.py ``identity_key_value``: ``txt_in``, the
block's text-side modulation, norm, ``qkv`` and key norm, position 0), but from two sources::

    K_id = text-side key(txt_in(E_key))       V_id = text-side value(txt_in(E_value))

and only the image queries ``q_img`` attend to them (text queries keep their unpatched output,
as in joint identity attention, nodes/pva/dit_joint_identity.py). The two modes of the UNet node:

- joint: ``out_img = softmax([q K_joint^T, q K_id^T + log w] / sqrt(D)) [V_joint; V_id]`` (one
  softmax with the joint tokens; w = 1 plain, w = 0 no identity);
- decoupled: ``out_img = out_img + w softmax(q K_id^T / sqrt(D)) V_id`` (a separate softmax
  added, IP-Adapter style).

With a MASK the image tokens take the patched output in proportion to the mask at their 2x2
patch (joint: lerp; decoupled: the added term scaled), as on UNets.

Choices the UNet node does not face (a Flux block has no layer for an adapter's ``to_k`` /
``to_v``, which are trained for UNet cross-attention widths):

- every pairing goes through the block's own text-side projections; the identity tokens must
  be as wide as the model's text context (4096 for Flux.1) so ``txt_in`` takes them;
- ``trained kv_mixed adapter``: the adapter's two encoders' tokens (key encoder -> keys, value
  encoder -> values), projected by the block: the encoders' split is kept, their UNet ``to_k`` /
  ``to_v`` are not used (there is nowhere to put them);
- ``two adapters``: keys from the key adapter's tokens, values from the value adapter's
  (``projections`` must be ``layer``; ``token_mismatch`` as on UNets);
- ``one token set`` is refused: its point is *adapter* values next to model keys, and with the
  block's projections on both sides it is exactly joint identity attention (Apply parallel
  visual attention, joint), so the node says to use that.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage
from ..common.dit_layout import FAMILY_NAMES, context_width, dit_family, identity_hidden, identity_key_value
from ..common.errors import IdentityAttentionError

JOINT, DECOUPLED = "joint", "decoupled"


class DitKVMixedStage(DitStage):
    """KV-mixed identity attention of the image queries inside Flux's joint attention.

    key_tokens / value_tokens: cond/uncond tokens ``[1, T, context]`` each (same T);
    hidden: ``tokens -> txt_in(tokens)``; mode: "joint" or "decoupled".
    """

    def __init__(self, schedule: StageSchedule, key_tokens: IdentityTokens, value_tokens: IdentityTokens, hidden, mode: str, label: str = "KV-mixed attention (Flux)"):
        super().__init__(schedule)
        if mode not in (JOINT, DECOUPLED):
            raise ValueError(f"unknown mode {mode!r}")
        if key_tokens.cond.shape[1] != value_tokens.cond.shape[1] or key_tokens.uncond.shape[1] != value_tokens.uncond.shape[1]:
            raise ValueError("key and value tokens must have the same count (match them first)")
        self.tokens = {"key": key_tokens, "value": value_tokens}
        self.hidden = hidden
        self.mode = mode
        self.label = label
        self._hidden_cache: Dict[tuple, torch.Tensor] = {}

    def _hidden(self, side: str, code: int, device, dtype) -> torch.Tensor:
        """``txt_in`` of one side's tokens ``[1, T, C]``, once per side, chunk, device and dtype."""
        key = (side, code, device, dtype)
        found = self._hidden_cache.get(key)
        if found is None:
            tokens = self.tokens[side].cond if code == 0 else self.tokens[side].uncond
            found = self.hidden(tokens).to(device=device, dtype=dtype)
            self._hidden_cache[key] = found
        return found

    def key_value(self, call: DitCall):
        """``K_id`` from the key tokens, ``V_id`` from the value tokens: ``[B, H, T, D]`` each."""
        codes = set(call.chunks)
        dtype = call.vec.dtype
        h_key = call.per_row({c: self._hidden("key", c, call.q.device, dtype) for c in codes})
        h_value = call.per_row({c: self._hidden("value", c, call.q.device, dtype) for c in codes})
        t = h_key.shape[1]
        # one projection over [key tokens; value tokens]: the block treats tokens independently
        # (per-token modulation, norm, qkv, key norm), so this is both projections at the cost of one
        k_all, v_all = identity_key_value(call.block, torch.cat([h_key, h_value], dim=1), call.vec, call.heads)
        return k_all[:, :, :t].to(call.k.dtype), v_all[:, :, t:].to(call.v.dtype)

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        q, m = call.q, call.text_tokens
        k_id, v_id = self.key_value(call)
        q_img = q[:, :, m:]
        w = self.schedule.weight
        image = out[:, m:]
        if self.mode == JOINT:
            keys = torch.cat([call.k, k_id], dim=2)
            values = torch.cat([call.v, v_id], dim=2)
            bias = None
            if w != 1.0:
                bias = torch.zeros(1, 1, 1, keys.shape[2], device=q.device, dtype=q.dtype)
                bias[..., call.k.shape[2]:] = math.log(w) if w > 0 else float("-inf")
            new = torch.nn.functional.scaled_dot_product_attention(q_img, keys, values, attn_mask=bias)
            new = new.transpose(1, 2).reshape(q.shape[0], q_img.shape[2], -1).to(out.dtype)
            if region is not None:
                new = torch.lerp(image, new, region.to(out.dtype))
        else:
            branch = torch.nn.functional.scaled_dot_product_attention(q_img, k_id, v_id)
            delta = branch.transpose(1, 2).reshape(q.shape[0], q_img.shape[2], -1).to(out.dtype) * w
            new = image + (delta if region is None else delta * region.to(out.dtype))
        return torch.cat([out[:, :m], new], dim=1)


def apply_kv_mixed_dit(
    model, key_adapter, key_identity, value_adapter, value_identity, weight, start_percent, end_percent, apply_to, mode,
    token_mismatch, projections, references, mask, pairing, node: str,
):
    """The node's Flux path (the node has checked pairing and input types); returns the patched clone."""
    from ..pva.identity_inputs import as_float_tokens, check_finite, identity_tokens
    from .kv_mixed_nodes import SHARED, TRAINED, matched_tokens, trained_tokens
    from ..dispatch.stage_inputs import build_schedule

    family = FAMILY_NAMES[dit_family(model)]
    if pairing == SHARED:
        raise IdentityAttentionError(
            f"pairing '{SHARED}' puts the adapter's value projection next to the model's keys, and {family} has no layer for an adapter's projections; "
            "with the model's projections on both sides it is plain joint identity attention",
            node=node, input_name="pairing", fix=f"use Apply parallel visual attention (mode joint) for that, or pairing '{TRAINED}' / two adapters",
        )
    if mode not in (JOINT, DECOUPLED):
        raise IdentityAttentionError(f"unknown mode {mode!r}", node=node, input_name="mode", fix="choose joint or decoupled")
    if mode == JOINT and weight < 0:
        raise IdentityAttentionError(
            f"joint mode multiplies the identity's share of attention, so it cannot be negative (got {weight})",
            node=node, input_name="weight", fix="use a weight of 0 or more, or switch mode to decoupled",
        )
    per_reference = references == "per_reference"
    if pairing == TRAINED:
        key_tokens, value_tokens = trained_tokens(key_adapter, key_identity, per_reference, node)
        names = ("key_adapter", "key_adapter")
    else:
        if projections != "layer":
            raise IdentityAttentionError(
                f"adapter projections are trained for UNet cross-attention layers; {family} has none to load them into",
                node=node, input_name="projections", fix="set projections to layer (keys and values through the model's own text projections)",
            )
        key_tokens = as_float_tokens(identity_tokens(key_adapter, key_identity, per_reference, node, "key_adapter", "key_identity"))
        value_tokens = as_float_tokens(identity_tokens(value_adapter, value_identity, per_reference, node, "value_adapter", "value_identity"))
        check_finite(key_tokens, node, "key_identity")
        check_finite(value_tokens, node, "value_identity")
        value_tokens = matched_tokens(key_tokens, value_tokens, token_mismatch, node)
        names = ("key_adapter", "value_adapter")
    width = context_width(model)
    for tokens, name in zip((key_tokens, value_tokens), names):
        if tokens.dim != width:
            raise IdentityAttentionError(
                f"the adapter gives identity tokens {tokens.dim} wide, but this {family} model's text context is {width} wide",
                node=node, input_name=name, fix=f"use an adapter whose tokens are {width} wide (made for {family}'s text encoder)",
            )
    schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
    stage = DitKVMixedStage(schedule, key_tokens, value_tokens, lambda t: identity_hidden(model, t), mode, label=f"{node} ({mode}, {pairing}, {family}, layer projections)")
    return apply_dit_stage(model, stage, node=node)
