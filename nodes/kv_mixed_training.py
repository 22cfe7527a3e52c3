"""Training target ``kv_mixed``: VisualComposer's key and value encoders and per-layer K/V projections.

The mechanism and its open choices are in ``adapters/kv_mixed_encoders.py``. Trained jointly
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

import math
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from ..adapters.id_adapter import IdAdapter
from ..adapters.kv_mixed_encoders import KVMixedEncoder, split_key_value
from ..adapters.parallel_attention import decoupled_attention
from ..adapters.projectors import build_projector, projector_name
from ..adapters.trainable_modules import KeyValueProjections
from .dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from .host import cross_attention_layers
from .training_targets import MODULE_LR, PROJECTION_LR, TrainingFeed, TrainingTarget, register_target


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


def initial_projections(model_patcher, token_dim: int, seed: int) -> Dict:
    """Per layer ``{"to_k", "to_v"}``: copies of the layer's own (tokens as wide as the text) or ``N(0, 1/D)``."""
    layers = cross_attention_layers(model_patcher)
    diffusion = model_patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with torch.inference_mode(False):
        for info in layers:
            if token_dim == info.context_dim:
                attn2 = diffusion.get_submodule(info.module_path).attn2
                out[info.key] = {n: getattr(attn2, n).weight.detach().float().cpu().clone() for n in ("to_k", "to_v")}
            else:
                out[info.key] = {n: torch.randn(info.inner_dim, token_dim, generator=gen) / math.sqrt(token_dim) for n in ("to_k", "to_v")}
    return out


def fused_tokens(encoder, feed: TrainingFeed) -> Optional[torch.Tensor]:
    """Each sample's tokens from its references' mean features, repeated for its noisy copies: ``[rows, tokens, D]``."""
    if feed.features is None:
        return None
    feats = feed.features if isinstance(feed.features, (list, tuple)) else [feed.features]
    tokens = torch.cat([encoder.project(fuse(f)) for f in feats], dim=0)
    return tokens.repeat_interleave(int(feed.extras.get("repeat", 1)), dim=0)


def fuse(features):
    """``IdentityFeatures`` of R references -> their mean (the pack's "fused" identity)."""
    from ..adapters.identity import IdentityFeatures

    def mean(t):
        return None if t is None else t.mean(dim=0, keepdim=True)

    return IdentityFeatures(**{k: mean(getattr(features, k)) for k in features.__dataclass_fields__})


def frozen_copy(projector):
    """A frozen, separately stored copy of a trained projector (what the native file holds)."""
    with torch.inference_mode(False):
        state = {k: v.detach().float().cpu().clone() for k, v in projector.state_dict().items()}
    return build_projector(projector_name(projector), projector.config, state)


class KVMixedTarget(TrainingTarget):
    name = "kv_mixed"
    default_learning_rate = PROJECTION_LR
    needs_features = True

    def __init__(self, model_patcher, settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0):
        layers = cross_attention_layers(model_patcher)
        context_dim = layers[0].context_dim
        with torch.inference_mode(False):
            if init is not None:
                if init.mechanism != "kv_mixed" or not isinstance(init.projector, KVMixedEncoder):
                    raise ValueError(f"the kv_mixed target's 'init' must be a kv_mixed adapter (this one is {init.mechanism})")
                state = {k: v.detach().float().cpu().clone() for k, v in init.projector.state_dict().items()}
                self.encoder = KVMixedEncoder(**init.projector.config)
                self.encoder.load_state_dict(state)
                initial = {k: {n: w[n].float().clone() for n in ("to_k", "to_v")} for k, w in init.layers.items()}
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    self.encoder = KVMixedEncoder(
                        in_dim=int(settings.get("embedding_dim", 512)), token_dim=int(settings.get("token_dim", context_dim)), tokens=int(settings.get("tokens", 4)),
                        key_bottleneck=int(settings.get("key_bottleneck", 32)), value_bottleneck=int(settings.get("value_bottleneck", 1024)),
                        input_kind=str(settings.get("input", "arcface_normed")),
                    )
                initial = initial_projections(model_patcher, self.encoder.token_dim, seed)
            self.encoder.train().requires_grad_(True)
            self.projections = KeyValueProjections(initial)
            self.module = torch.nn.ModuleDict({"encoder": self.encoder, "projections": self.projections})
        self.encoder_learning_rate = float(settings.get("encoder_lr", MODULE_LR))

    def param_groups(self, learning_rate: float, weight_decay: float) -> List[dict]:
        return [
            {"params": list(self.projections.parameters()), "lr": learning_rate, "weight_decay": weight_decay, "name": "kv_mixed.projections"},
            {"params": list(self.encoder.parameters()), "lr": self.encoder_learning_rate, "weight_decay": weight_decay, "name": "kv_mixed.encoders"},
        ]

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainableKVMixedStage(self.projections, feed, self.encoder.pair_tokens))

    def prepare(self, feed: TrainingFeed) -> None:
        feed.tokens = fused_tokens(self.encoder, feed)

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        meta = {"trained": "VisualComposer KV-mixed encoders", "source_format": "native"}
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, projector=frozen_copy(self.encoder), layers=self.projections.export(), metadata=meta, mechanism="kv_mixed")


@register_target("kv_mixed")
def make_kv_mixed_target(model_patcher, adapter, settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0, **_):
    """Trainer factory. ``settings``: ``tokens`` (4 key + 4 value tokens), ``key_bottleneck`` (32),
    ``value_bottleneck`` (1024), ``token_dim`` (the text context width), ``input`` (arcface_normed),
    ``embedding_dim`` (512), ``encoder_lr`` (1e-4); ``init``: a kv_mixed adapter to continue."""
    if adapter is not None:
        raise ValueError("the kv_mixed target trains its own encoders: give 'init' (a kv_mixed adapter) to continue one, not 'adapter'")
    return KVMixedTarget(model_patcher, settings, init=init, seed=seed)
