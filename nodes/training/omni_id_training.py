"""Training target ``omni_id``: a set encoder from many photos, trained few-to-many through the diffusion loss.

The representation and its open choices are in ``adapters/projectors/set_encoder.py``. Each sample: the
trainer's references (1..``max_references`` *other* photos of the same person,
``adapters/training/training_data.py``) are encoded together by the set encoder (a
:class:`QueryFormer` with ``reads_set``: all photos' tokens in one set, ``T`` learned queries);
the photo being denoised is a different photo of that person (few-to-many). The tokens enter
every cross-attention as IP-Adapter-style decoupled attention with trained per-layer
``to_k`` / ``to_v`` (copies of the layer's own when the tokens are as wide as the text, else
``N(0, 1/D)``; learning rate 1e-5), the encoder at ``encoder_lr`` (1e-4). UNet frozen.

Export: a native ID_ADAPTER, ``mechanism = "decoupled"``, projector = the set encoder (every
identity node then feeds it all reference photos and gets ``T`` tokens), layers
``to_k`` / ``to_v`` — "Apply parallel visual attention" (decoupled), MoA, nested attention
("adapter K/V") and KV-mixed ("one token set") accept it like any adapter.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.attention.parallel_attention import decoupled_attention
from ...adapters.projectors.query_former import QueryFormer
from ...adapters.training.trainable_modules import KeyValueProjections
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from .encoder_target import EncoderTarget
from .training_targets import TrainingFeed, register_target


class TrainableDecoupledStage(AttentionStage):
    """``out + softmax(s q (W_k e)^T) (W_v e)`` with the feed's tokens ``e`` (IP-Adapter's form, weight 1)."""

    label = "Omni-ID tokens (training)"

    def __init__(self, projections: KeyValueProjections, feed: TrainingFeed):
        super().__init__(StageSchedule())
        self.projections = projections
        self.feed = feed

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.projections.has(call.layer):
            return out
        tokens = self.feed.tokens_for(call.batch).to(device=call.q.device, dtype=call.q.dtype)
        w_k, w_v = self.projections.weights(call.layer)
        k, v = F.linear(tokens, w_k.to(tokens.dtype)), F.linear(tokens, w_v.to(tokens.dtype))
        return out + decoupled_attention(call.q, k, v, call.heads, lambda q, k_, v_, heads: call.branch_attention(q, k_, v_))


class OmniIDTarget(EncoderTarget):
    name = "omni_id"
    trained = "Omni-ID-style set encoder (few-to-many)"
    exported_mechanism = "decoupled"

    def check_init(self, init: IdAdapter) -> None:
        if not isinstance(init.projector, QueryFormer) or not init.projector.reads_set:
            raise ValueError("the omni_id target's 'init' must be an adapter it wrote (a set-encoder projector)")

    def new_encoder(self, settings: Mapping, context_dim: int) -> QueryFormer:
        return QueryFormer(
            in_dim=int(settings.get("embedding_dim", 512)), dim=int(settings.get("dim", 256)), token_dim=int(settings.get("token_dim", context_dim)),
            tokens=int(settings.get("tokens", 8)), depth=int(settings.get("depth", 2)), heads=int(settings.get("heads", 4)),
            input_kind=str(settings.get("input", "arcface_normed")), reads_set=True,
        )

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainableDecoupledStage(self.projections, feed))

    def prepare(self, feed: TrainingFeed) -> None:
        """Each sample's references, all together, through the set encoder: ``[rows, T, D]``."""
        if feed.features is None:
            return
        feats = feed.features if isinstance(feed.features, (list, tuple)) else [feed.features]
        tokens = torch.cat([self.encoder.project(f) for f in feats], dim=0)
        feed.tokens = tokens.repeat_interleave(int(feed.extras.get("repeat", 1)), dim=0)


@register_target("omni_id")
def make_omni_id_target(model_patcher, adapter, settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0, **_):
    """Trainer factory. ``settings``: ``tokens`` (8), ``dim`` (256), ``depth`` (2), ``heads`` (4), ``input``
    (arcface_normed; clip_hidden with features from ``prepare --clip-vision``), ``embedding_dim`` (512),
    ``token_dim`` (the text width), ``encoder_lr`` (1e-4); ``init``: an omni_id adapter to continue."""
    if adapter is not None:
        raise ValueError("the omni_id target trains its own set encoder: give 'init' (an omni_id adapter) to continue one, not 'adapter'")
    return OmniIDTarget(model_patcher, settings, init=init, seed=seed)
