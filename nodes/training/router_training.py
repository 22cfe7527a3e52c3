"""Training target: MoA's per-layer routers (mixture of the prior attention and a personalized one).

The router of every cross-attention layer (``adapters/training/trainable_modules.py: RouterMLPs``, the
names "Apply mixture-of-attention" loads: ``router.0.*``, ``router.2.*``) sees the layer's hidden
states and mixes, per pixel, the layer's own text attention (prior) with the personalized
branch::

    R = softmax(router(X))                 # [b, N, 2]
    O = R0 * prior + R1 * personalized

exactly as ``nodes/moa/routing_stage.py`` does at inference (temperature 1). The personalized
branch is either the stages of the targets installed before this one (e.g. PVA trained jointly),
or a frozen identity attention made from an ID_ADAPTER (``personalized: "adapter"``): joint
(PVA) or decoupled (IP-Adapter family) per the adapter's mechanism, its tokens from the adapter's
projector on each sample's identity features.

Loss: the loop's denoising loss + ``weight * router_loss`` (``adapters/training/training_losses.py``:
background pixels, ``1 - foreground mask``, pushed to the prior; MoA's exact form is not public).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from ...adapters.attention.attention_routing import mixture_of_attention, route_from_logits
from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.attention.parallel_attention import joint_attention
from ...adapters.training.trainable_modules import RouterMLPs
from ...adapters.training.training_losses import router_loss
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from ..common.host import cross_attention_layers
from .training_targets import MODULE_LR, TrainingFeed, TrainingTarget, register_target


class FrozenIdentityStage(AttentionStage):
    """A fixed identity attention whose tokens follow the batch (the feed's ``tokens``)."""

    label = "frozen identity attention (training)"

    def __init__(self, adapter: IdAdapter, feed: TrainingFeed, joint: bool):
        super().__init__(StageSchedule())
        self.adapter = adapter
        self.feed = feed
        self.joint = joint
        self.needs_hidden_states = joint and any("to_q" in adapter.layer(k) for k in adapter.layers)

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        w = self.adapter.layer(call.layer)
        dt = call.q.dtype
        k_id, v_id = self.feed.frozen_identity_kv(w, call)
        if not self.joint:
            return out + call.attention(call.q, k_id, v_id)
        q_id = F.linear(call.hidden_states().to(dt), w["to_q"].to(device=call.q.device, dtype=dt)) if "to_q" in w else None
        return joint_attention(call.q, call.k, call.v, k_id, v_id, call.heads, q_id=q_id, text_out=out).to(out.dtype)


class TrainableRouterStage(AttentionStage):
    label = "MoA router (training)"
    needs_hidden_states = True

    def __init__(self, routers: RouterMLPs, feed: TrainingFeed, name: str):
        super().__init__(StageSchedule())
        self.routers = routers
        self.feed = feed
        self.name = name

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        logits = self.routers.logits(call.layer, call.hidden_states().to(call.q.dtype))
        r0, r1 = route_from_logits(logits)
        if self.feed.recording:
            fg = self.feed.mask_at(self.feed.foreground, call)
            self.feed.record(self.name, "r1", r1)
            self.feed.record(self.name, "foreground", fg if fg is not None else torch.ones_like(r1))
        return mixture_of_attention(call.text_attention(), out, r0, r1)


class RouterTarget(TrainingTarget):
    name = "router"
    default_learning_rate = MODULE_LR

    def __init__(self, model_patcher, hidden: int = 128, loss_weight: float = 1.0, adapter: Optional[IdAdapter] = None, initial: Optional[Mapping] = None, seed: int = 0):
        layers = cross_attention_layers(model_patcher)
        with torch.inference_mode(False):
            if initial:
                self.routers = RouterMLPs.from_weights(initial)
            else:
                self.routers = RouterMLPs({info.key: info.inner_dim for info in layers}, hidden=hidden, seed=seed)
        self.module = self.routers
        self.loss_weight = float(loss_weight)
        self.adapter = adapter

    def install(self, model_patcher, feed: TrainingFeed):
        if self.adapter is not None:
            model_patcher = apply_attention_stage(model_patcher, FrozenIdentityStage(self.adapter, feed, joint=self.adapter.mechanism == "joint"))
        return apply_attention_stage(model_patcher, TrainableRouterStage(self.routers, feed, self.name))

    def regularizers(self, feed: TrainingFeed) -> Dict[str, torch.Tensor]:
        if self.loss_weight == 0.0:
            return {}
        return {"router": self.loss_weight * router_loss(feed.recorded(self.name, "r1"), feed.recorded(self.name, "foreground"))}

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        meta = {"trained": "MoA router"}
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, layers=self.routers.export(), metadata=meta, mechanism="moa_router")


@register_target("router")
def make_router_target(model_patcher, adapter: Optional[IdAdapter], settings: Mapping, init: Optional[IdAdapter] = None, **_):
    """Trainer factory. ``adapter``: the personalized branch's weights (None: the targets before this
    one are the personalized branch); ``init``: router weights to continue from. ``settings``:
    ``hidden`` (128), ``loss_weight`` (1.0), ``seed``."""
    return RouterTarget(
        model_patcher,
        hidden=int(settings.get("hidden", 128)),
        loss_weight=float(settings.get("loss_weight", 1.0)),
        adapter=adapter,
        initial=init.layers if init is not None else None,
        seed=int(settings.get("seed", 0)),
    )
