"""Training target: CA²'s score predictor (CA-Edit, AAAI 2025; mechanisms.md §2).

Per cross-attention layer, the visual branch (decoupled, IP-Adapter style) is gated per pixel::

    Z = F_txt + (1 - Score * M) * softmax(Q K_vis^T / sqrt(d)) V_vis
    Score = softmax(MLP(concat(Z_hidden, mean of the text context)))[0]

Trainable: the score MLPs (``adapters/training/trainable_modules.py: ScorePredictors``, names
``score.0.*`` / ``score.2.*`` as the CA² node reads them). The forward is the CA² node's own
arithmetic (``adapters/attention/ca2_gate.py``: ``native_score`` with GELU, ``pooled_text_token`` of the
context the dispatcher stashes, ``visual_gate``, ``gated_visual_attention``), so what is trained
is what the node computes. Frozen: the visual ``to_k`` / ``to_v`` and token projector of an ID_ADAPTER
(any decoupled image adapter) whose tokens come from each sample's identity / image features.
``M``: the sample's mask (white = the region being edited). Loss: the denoising loss (the paper
trains with eps-MSE on ``{f_vis, f_txt, M}``).

Export: a native adapter, ``mechanism="ca2"``, with per layer ``score.*`` plus the visual
``to_k`` / ``to_v`` it was trained with and the same projector, so the file is self-contained.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ...adapters.attention.ca2_gate import gated_visual_attention, native_score, pooled_text_token, visual_gate
from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.training.trainable_modules import ScorePredictors
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from ..common.host import cross_attention_layers
from .training_targets import MODULE_LR, TrainingFeed, TrainingTarget, register_target

class TrainableCA2Stage(AttentionStage):
    label = "CA² score (training)"
    needs_hidden_states = True

    def __init__(self, scores: ScorePredictors, adapter: IdAdapter, feed: TrainingFeed):
        super().__init__(StageSchedule())
        self.scores = scores
        self.adapter = adapter
        self.feed = feed

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        w = self.adapter.layer(call.layer)
        dt = call.q.dtype
        k_vis, v_vis = self.feed.frozen_identity_kv(w, call)
        hidden = call.hidden_states().to(dt)
        score = native_score(hidden, pooled_text_token(call.context().to(dt)), self.scores.weights(call.layer, dt), "gelu")  # [b, N]
        mask = self.feed.mask_at(self.feed.edit_mask if self.feed.edit_mask is not None else self.feed.foreground, call)
        gate = visual_gate(score, None if mask is None else mask.float())
        return gated_visual_attention(out, call.q, k_vis, v_vis, call.heads, gate, 1.0, lambda q, k, v, heads: call.attention(q, k, v))


class CA2ScoreTarget(TrainingTarget):
    name = "ca2_score"
    default_learning_rate = MODULE_LR

    def __init__(self, model_patcher, adapter: IdAdapter, hidden: int = 128, initial: Optional[Mapping] = None, seed: int = 0):
        if adapter is None or adapter.projector is None:
            raise ValueError("the ca2_score target needs an 'adapter' with visual to_k / to_v and a token projector (any decoupled image adapter)")
        layers = cross_attention_layers(model_patcher)
        missing = [info.key for info in layers if "to_k" not in adapter.layer(info.key)]
        if missing:
            raise ValueError(f"the CA² adapter has no visual to_k / to_v for layer {missing[0]}")
        with torch.inference_mode(False):
            self.scores = ScorePredictors({info.key: info.inner_dim for info in layers}, layers[0].context_dim, hidden=hidden, seed=seed)
            if initial:
                for key, entries in initial.items():
                    if "score.0.weight" in entries:
                        self.scores.of(key).load_state_dict({n[len("score."):]: t.float() for n, t in entries.items() if n.startswith("score.")})
        self.module = self.scores
        self.adapter = adapter

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainableCA2Stage(self.scores, self.adapter, feed))

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        layers = self.scores.export()
        for key, entries in layers.items():
            for name in ("to_k", "to_v"):
                entries[name] = self.adapter.layer(key)[name].detach().float().cpu().clone()
        meta = {"trained": "CA2 score predictor"}
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, projector=self.adapter.projector, layers=layers, extras={"ca2_score_activation": "gelu"}, metadata=meta, mechanism="ca2")


@register_target("ca2_score")
def make_ca2_target(model_patcher, adapter: Optional[IdAdapter], settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0, **_):
    """Trainer factory: ``adapter`` (required: the frozen visual branch), ``init`` (score weights to continue), ``hidden`` (128)."""
    return CA2ScoreTarget(model_patcher, adapter, hidden=int(settings.get("hidden", 128)), initial=init.layers if init is not None else None, seed=seed)
