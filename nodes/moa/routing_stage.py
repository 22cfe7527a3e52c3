"""The dispatcher stage of mixture-of-attention routing (math in ``adapters/attention/attention_routing.py``).

Per attn2 call: ``personalized`` = ``out``, the output of every stage applied before this one;
``prior`` = the layer's text attention, computed from

- ``prior="base"`` (default; MoA's "fixed attention layers in the prior branch"): the layer's
  q/k/v projections *as loaded*, before LoRAs and other weight patches
  (:mod:`.base_projections` finds them on either host), applied to the stashed inputs of
  ``to_q`` / ``to_k`` / ``to_v``. A layer no weight patch touches reuses ``call.text_attention()``
  (the same numbers, no extra cost); a patched one costs two projections (k and v in one matmul
  over their stacked weights) and one attention call.
- ``prior="current"``: ``call.text_attention()``, the model as it is (LoRAs included).

In both, an attention *replacement* another pack installed in the slot before ours still computes
the prior (it is fed the base projections under ``base``). The layer's output projection
``to_out`` is applied by the host after the mix, to both branches together, so a LoRA on
``to_out`` still reaches the prior: only q/k/v are held at the loaded weights.

The router gives ``(R0, R1)`` per query (``R0 = 1 - R1``)::

    routed = R0 * prior + R1 * personalized     # computed as lerp(prior, personalized, R1)
    result = routed                     if weight == 1
             lerp(out, routed, weight)  otherwise (0 = no routing, the personalized branch everywhere)

The optional router MASK confines the personalized branch (``R1 <- R1 * mask``, ``R0 = 1 - R1``;
for the "mask" router, ``R1 = mask``): outside it the result is the prior. That mask is the
stage's own (not the schedule's region), because outside it the stage does change ``out``.

Cost per attn2 call (issue #22; the fused forms in ``adapters/attention/attention_routing.py``), on top of
the stages it routes: the identity-attention router reads the share the identity stage's own
joint call produced on this call (PVA: a channel of its single SDPA over the whole batch, 0 on
the rows without identity; or of its call on some rows after other stages, see
``AttentionCall.chunk_scratch``; no second joint attention), then mean over heads (1), the prior
(the text attention: one SDPA, as PVA's single call does not leave it), amax, maximum, addcdiv,
sigmoid (4), one ``lerp`` for the mix and one in-place add for the router-map recorder: 8 launches. Learned router: linear, GELU, linear to
one logit difference, sigmoid. Constants (the floor and logit offset, the folded router weights, the
stacked base k/v weights) are made once per stage, layer and device. No host sync, no
host-to-device copy in the layer; the recorder's sigma is the step's, read once per step.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...adapters.attention.attention_routing import (
    ROUTER_WEIGHT_NAMES,
    RouterRecorder,
    identity_share_constants,
    identity_share_r1,
    learned_router_r1,
    learned_router_r1_weights,
    routed_mix,
)
from ...adapters.projectors.id_adapter import DeviceCache
from ..dispatch.base_projections import BaseProjections
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule
from ..common.host import LayerKey

ROUTERS = ("identity_attention", "mask", "learned")
PRIORS = ("base", "current")


class MixtureOfAttentionStage(AttentionStage):
    """Routes every pixel between the prior (text attention) and the stages before it.

    router: one of :data:`ROUTERS`. temperature: divides the router logits. router_mask:
    ``[Bm, H, W]`` (required by "mask"). router_weights: per layer the four
    :data:`ROUTER_WEIGHT_NAMES` tensors (required by "learned"). identity_stages: the stages
    before this one that expose ``identity_share(call)`` (required by "identity_attention").
    recorder: keeps R1 maps for the inspect node (None: no recording). prior: one of :data:`PRIORS`;
    "base" needs ``base`` (the MODEL's :class:`BaseProjections`).
    """

    label = "Apply mixture-of-attention"

    def __init__(
        self,
        schedule: StageSchedule,
        router: str,
        temperature: float = 1.0,
        router_mask: Optional[torch.Tensor] = None,
        router_weights: Optional[Dict[LayerKey, Dict[str, torch.Tensor]]] = None,
        identity_stages: Sequence[AttentionStage] = (),
        recorder: Optional[RouterRecorder] = None,
        prior: str = "current",
        base: Optional[BaseProjections] = None,
    ):
        super().__init__(schedule)
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; known: {', '.join(PRIORS)}")
        if prior == "base" and base is None:
            raise ValueError("the base prior needs the model's base projections")
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; known: {', '.join(ROUTERS)}")
        if router == "mask" and router_mask is None:
            raise ValueError("the mask router needs a mask")
        if router == "learned" and not router_weights:
            raise ValueError("the learned router needs router weights")
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        self.router = router
        self.temperature = float(temperature)
        self.router_mask = router_mask
        self.router_weights = router_weights
        self.identity_stages = tuple(identity_stages)
        self.recorder = recorder
        self.prior = prior
        self.base = base
        self.needs_hidden_states = prior == "base" or router == "learned" or any(s.needs_hidden_states for s in self.identity_stages)
        self._weights = DeviceCache()
        self._base_weights = DeviceCache()

    def route_r1(self, call: AttentionCall) -> torch.Tensor:
        """``R1`` for ``call``'s rows, ``[b, N, 1]`` (``R0 = 1 - R1`` is implied by the mix)."""
        if self.router == "mask":
            return self.mask_tokens(call, self.router_mask, "mask")
        if self.router == "learned":
            weights = self._weights.get(call.layer, call.q.device, call.q.dtype, lambda: learned_router_r1_weights(self.router_weights[call.layer], self.temperature))
            r1 = learned_router_r1(call.hidden_states().to(call.q.dtype), *weights)
        else:
            shares = [s for s in (stage.identity_share(call) for stage in self.identity_stages) if s is not None]
            if not shares:
                share = call.q.new_zeros(call.batch, call.q.shape[1], 1)
            elif len(shares) == 1:
                share = shares[0]  # one stage's mass lies in [0, 1] already: no clip
            else:
                share = torch.stack(shares).sum(dim=0).clamp_(0.0, 1.0)
            floor, offset = self._weights.get("share constants", call.q.device, torch.float32, lambda: identity_share_constants(self.temperature))
            r1 = identity_share_r1(share, floor, offset, self.temperature)
        if self.router_mask is not None:
            r1 = r1 * self.mask_tokens(call, self.router_mask, "mask")
        return r1

    def prior_attention(self, call: AttentionCall) -> torch.Tensor:
        """The prior branch ``[b, N, H*D]``: the layer's text attention with the loaded q/k/v
        weights (``prior="base"``, where a weight patch changed them) or the current ones."""
        if self.prior == "current" or not self.base.knows(call.layer) or not self.base.patched(call.layer):
            return call.text_attention()
        dtype = call.q.dtype
        wq, bq, wkv, bkv = self._base_weights.get(call.layer, call.q.device, dtype, lambda: self._flat_weights(call.layer))
        q = F.linear(call.hidden_states().to(dtype), wq, bq)
        inner = wkv.shape[0] // 2
        context, value = call.context(), call.value_input()
        if value is context:  # to_k and to_v read the same tokens: one matmul for both
            k, v = F.linear(context.to(dtype), wkv, bkv).split(inner, dim=-1)
        else:
            k = F.linear(context.to(dtype), wkv[:inner], bkv[:inner])
            v = F.linear(value.to(dtype), wkv[inner:], bkv[inner:])
        fallback = call.fallback
        return fallback(q, k, v, call.extra_options) if fallback is not None else call.attention(q, k, v)

    def _flat_weights(self, layer: LayerKey) -> Tuple:
        """The loaded weights as the flat tuple :class:`DeviceCache` moves: ``(Wq, bq, [Wk; Wv], [bk; bv])``
        (zeros for a missing bias; k and v stacked so that one matmul projects both)."""
        (wq, bq), (wk, bk), (wv, bv) = ((w, b if b is not None else w.new_zeros(w.shape[0])) for w, b in self.base.weights(layer))
        return wq, bq, torch.cat([wk, wv]), torch.cat([bk, bv])

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        r1 = self.route_r1(call)
        if self.recorder is not None:
            self.recorder.record(call.sigma, call.chunks, call.token_grid(), r1)
        routed = routed_mix(self.prior_attention(call), out, r1)
        w = self.schedule.weight
        return routed if w == 1.0 else torch.lerp(out, routed, w)
