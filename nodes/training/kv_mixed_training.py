"""Training target ``kv_mixed``: VisualComposer's key and value encoders and per-layer K/V projections.

The mechanism and its open choices are in ``adapters/projectors/kv_mixed_encoders.py``. Trained jointly
with the denoising loss (UNet frozen):

- the key encoder (small bottleneck) and the value encoder (large bottleneck), one
  :class:`KVMixedEncoder` over each sample's fused identity features (``encoder_lr``, default
  1e-4: fresh networks, IP-Adapter's rate);
- per cross-attention layer ``to_k`` / ``to_v`` ``[C, D]`` (learning rate: the target's, default
  1e-5), initialised as copies of the layer's own ``to_k`` / ``to_v`` when the tokens are as wide
  as the text context (IP-Adapter's initialisation of ``to_k_ip`` / ``to_v_ip``), else randomly
  (``N(0, 1/D)``).

Forward: every cross-attention adds ``softmax(s q (W_k E_key)^T) (W_v E_value)`` to the text
attention (``call.branch_attention`` and ``decoupled_attention``, the very calls "Apply KV-mixed
attention" makes in decoupled mode at weight 1).

Export: a native ID_ADAPTER, ``mechanism = "kv_mixed"``, projector = the encoders, layers
``to_k`` / ``to_v`` ("Load identity adapter" reads it; "Apply KV-mixed attention" with pairing
"trained kv_mixed adapter" applies it).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.projectors.kv_mixed_encoders import KVMixedEncoder, split_key_value
from ...adapters.attention.parallel_attention import decoupled_attention
from ...adapters.training.trainable_modules import KeyValueProjections
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from .encoder_target import EncoderTarget, fused_tokens
from .training_targets import TrainingFeed, register_target


class TrainableKVMixedStage(AttentionStage):
    """``out + softmax(s q K^T) V`` with ``K = to_k(E_key)``, ``V = to_v(E_value)`` from the feed."""

    label = "KV-mixed attention (training)"

    def __init__(self, projections: KeyValueProjections, feed: TrainingFeed, pair_tokens: int):
        super().__init__(StageSchedule())
        self.projections = projections
        self.feed = feed
        self.pair_tokens = pair_tokens

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.projections.has(call.layer):
            return out
        tokens = self.feed.tokens_for(call.batch).to(device=call.q.device, dtype=call.q.dtype)
        key_tokens, value_tokens = split_key_value(tokens, self.pair_tokens)
        w_k, w_v = self.projections.weights(call.layer)
        k = F.linear(key_tokens, w_k.to(call.q.dtype))
        v = F.linear(value_tokens, w_v.to(call.q.dtype))
        return out + decoupled_attention(call.q, k, v, call.heads, lambda q, k_, v_, heads: call.branch_attention(q, k_, v_))


class KVMixedTarget(EncoderTarget):
    name = "kv_mixed"
    encoder_group = "encoders"
    trained = "VisualComposer KV-mixed encoders"
    exported_mechanism = "kv_mixed"

    def check_init(self, init: IdAdapter) -> None:
        if init.mechanism != "kv_mixed" or not isinstance(init.projector, KVMixedEncoder):
            raise ValueError(f"the kv_mixed target's 'init' must be a kv_mixed adapter (this one is {init.mechanism})")

    def new_encoder(self, settings: Mapping, context_dim: int) -> KVMixedEncoder:
        return KVMixedEncoder(
            in_dim=int(settings.get("embedding_dim", 512)), token_dim=int(settings.get("token_dim", context_dim)), tokens=int(settings.get("tokens", 4)),
            key_bottleneck=int(settings.get("key_bottleneck", 32)), value_bottleneck=int(settings.get("value_bottleneck", 1024)),
            input_kind=str(settings.get("input", "arcface_normed")),
        )

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainableKVMixedStage(self.projections, feed, self.encoder.pair_tokens))

    def prepare(self, feed: TrainingFeed) -> None:
        feed.tokens = fused_tokens(self.encoder, feed)


@register_target("kv_mixed")
def make_kv_mixed_target(model_patcher, adapter, settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0, **_):
    """Trainer factory. ``settings``: ``tokens`` (4 key + 4 value tokens), ``key_bottleneck`` (32),
    ``value_bottleneck`` (1024), ``token_dim`` (the text context width), ``input`` (arcface_normed),
    ``embedding_dim`` (512), ``encoder_lr`` (1e-4); ``init``: a kv_mixed adapter to continue."""
    if adapter is not None:
        raise ValueError("the kv_mixed target trains its own encoders: give 'init' (a kv_mixed adapter) to continue one, not 'adapter'")
    return KVMixedTarget(model_patcher, settings, init=init, seed=seed)
