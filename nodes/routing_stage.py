"""The dispatcher stage of mixture-of-attention routing (math in ``adapters/attention_routing.py``).

Per attn2 call: ``prior`` = the layer's text attention (``call.text_attention()``: what the
unpatched model, or another pack's patch underneath ours, computes); ``personalized`` = ``out``,
the output of every stage applied before this one. The router gives ``(R0, R1)`` per query::

    routed = R0 * prior + R1 * personalized
    result = routed                     if weight == 1
             lerp(out, routed, weight)  otherwise (0 = no routing, the personalized branch everywhere)

The optional router MASK confines the personalized branch (``R1 <- R1 * mask``, ``R0 = 1 - R1``;
for the "mask" router, ``R1 = mask``): outside it the result is the prior. That mask is the
stage's own (not the schedule's region), because outside it the stage does change ``out``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..adapters.attention_routing import (
    ROUTER_WEIGHT_NAMES,
    RouterRecorder,
    learned_router_logits,
    mixture_of_attention,
    route_from_identity_share,
    route_from_logits,
    route_from_mask,
)
from ..adapters.id_adapter import DeviceCache
from .dispatcher import AttentionCall, AttentionStage, StageSchedule
from .host import LayerKey

ROUTERS = ("identity_attention", "mask", "learned")


class MixtureOfAttentionStage(AttentionStage):
    """Routes every pixel between the prior (text attention) and the stages before it.

    router: one of :data:`ROUTERS`. temperature: divides the router logits. router_mask:
    ``[Bm, H, W]`` (required by "mask"). router_weights: per layer the four
    :data:`ROUTER_WEIGHT_NAMES` tensors (required by "learned"). identity_stages: the stages
    before this one that expose ``identity_share(call)`` (required by "identity_attention").
    recorder: keeps R1 maps for the inspect node (None: no recording).
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
    ):
        super().__init__(schedule)
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
        self.needs_hidden_states = router == "learned" or any(s.needs_hidden_states for s in self.identity_stages)
        self._weights = DeviceCache()

    def route(self, call: AttentionCall) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(R0, R1)`` for ``call``'s rows, ``[b, N, 1]`` each."""
        if self.router == "mask":
            r0, r1 = route_from_mask(self.mask_tokens(call, self.router_mask, "mask"))
            return r0, r1
        if self.router == "learned":
            weights = self._weights.get(call.layer, call.q.device, call.q.dtype, lambda: tuple(self.router_weights[call.layer][n] for n in ROUTER_WEIGHT_NAMES))
            logits = learned_router_logits(call.hidden_states().to(call.q.dtype), dict(zip(ROUTER_WEIGHT_NAMES, weights)))
            r0, r1 = route_from_logits(logits, self.temperature)
        else:
            share = None
            for stage in self.identity_stages:
                s = stage.identity_share(call)
                if s is not None:
                    share = s if share is None else share + s
            if share is None:
                share = call.q.new_zeros(call.batch, call.q.shape[1], 1)
            r0, r1 = route_from_identity_share(share.clamp(0.0, 1.0), self.temperature)
        if self.router_mask is not None:
            r1 = r1 * self.mask_tokens(call, self.router_mask, "mask")
            r0 = 1.0 - r1
        return r0, r1

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        r0, r1 = self.route(call)
        if self.recorder is not None:
            self.recorder.record(call.sigma, call.chunks, call.token_grid(), r1)
        routed = mixture_of_attention(call.text_attention(), out, r0, r1)
        w = self.schedule.weight
        return routed if w == 1.0 else torch.lerp(out, routed, w)
