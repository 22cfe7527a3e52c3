"""The shared body of trainer targets that learn an identity encoder plus per-layer K/V projections.

Three targets have the same shape (``kv_mixed``, ``omni_id``, ``nested``): a fresh encoder
turns each sample's identity features into tokens ``[rows, T, D]``, and every cross-attention
layer gets a trainable ``to_k`` / ``to_v`` ``[C, D]`` that reads them; the UNet is frozen.
They differ only in the encoder (its class and settings), how the tokens enter attention
(the stage each installs) and what the exported adapter is called. :class:`EncoderTarget`
holds the rest once:

- initialisation: a fresh encoder from ``settings`` under ``seed`` (without touching the
  global RNG), or an earlier export (``init``) continued exactly: same encoder config and
  state, same projections;
- projections: copies of the layer's own ``to_k`` / ``to_v`` when the tokens are as wide as
  the text context (IP-Adapter's initialisation of ``to_k_ip`` / ``to_v_ip``), else
  ``N(0, 1/D)`` from ``seed``;
- learning rates: the projections at the target's rate (default 1e-5), the encoder at
  ``encoder_lr`` (default 1e-4: a fresh network, IP-Adapter's rate); the two groups are in
  that order (resume relies on it);
- export: a native ``ID_ADAPTER`` whose projector is a frozen copy of the encoder.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.faces.identity import IdentityFeatures
from ...adapters.projectors.projectors import build_projector, projector_name
from ...adapters.training.trainable_modules import KeyValueProjections
from ..common.host import cross_attention_layers
from .training_targets import MODULE_LR, PROJECTION_LR, TrainingFeed, TrainingTarget

PROJECTION_NAMES = ("to_k", "to_v")


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
                out[info.key] = {n: getattr(attn2, n).weight.detach().float().cpu().clone() for n in PROJECTION_NAMES}
            else:
                out[info.key] = {n: torch.randn(info.inner_dim, token_dim, generator=gen) / math.sqrt(token_dim) for n in PROJECTION_NAMES}
    return out


def fuse(features: IdentityFeatures) -> IdentityFeatures:
    """``IdentityFeatures`` of R references -> their mean (the pack's "fused" identity)."""

    def mean(t):
        return None if t is None else t.mean(dim=0, keepdim=True)

    return IdentityFeatures(**{k: mean(getattr(features, k)) for k in features.__dataclass_fields__})


def fused_tokens(encoder, feed: TrainingFeed) -> Optional[torch.Tensor]:
    """Each sample's tokens from its references' mean features, repeated for its noisy copies: ``[rows, tokens, D]``."""
    if feed.features is None:
        return None
    feats = feed.features if isinstance(feed.features, (list, tuple)) else [feed.features]
    tokens = torch.cat([encoder.project(fuse(f)) for f in feats], dim=0)
    return tokens.repeat_interleave(int(feed.extras.get("repeat", 1)), dim=0)


def frozen_copy(projector):
    """A frozen, separately stored copy of a trained projector (what the native file holds)."""
    with torch.inference_mode(False):
        state = {k: v.detach().float().cpu().clone() for k, v in projector.state_dict().items()}
    return build_projector(projector_name(projector), projector.config, state)


class EncoderTarget(TrainingTarget):
    """An encoder ``features -> [rows, T, D]`` and per-layer ``to_k`` / ``to_v``, trained together.

    Subclasses set ``name``, ``encoder_group`` (the encoder's param-group suffix),
    ``projection_prefix`` (key prefix of the exported layer weights), ``trained`` (the export's
    description), ``exported_mechanism``, and implement :meth:`check_init`, :meth:`new_encoder`
    and ``install`` / ``prepare``.
    """

    default_learning_rate = PROJECTION_LR
    needs_features = True
    encoder_group = "encoder"
    projection_prefix = ""
    trained = ""
    exported_mechanism = "decoupled"

    def __init__(self, model_patcher, settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0):
        context_dim = cross_attention_layers(model_patcher)[0].context_dim
        with torch.inference_mode(False):
            if init is not None:
                self.check_init(init)
                self.encoder = type(init.projector)(**init.projector.config)
                self.encoder.load_state_dict({k: v.detach().float().cpu().clone() for k, v in init.projector.state_dict().items()})
                initial = {k: {n: w[self.projection_prefix + n].float().clone() for n in PROJECTION_NAMES} for k, w in init.layers.items()}
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    self.encoder = self.new_encoder(settings, context_dim)
                initial = initial_projections(model_patcher, self.encoder.token_dim, seed)
            self.encoder.train().requires_grad_(True)
            self.projections = KeyValueProjections(initial, prefix=self.projection_prefix)
            self.module = torch.nn.ModuleDict({"encoder": self.encoder, "projections": self.projections})
        self.encoder_learning_rate = float(settings.get("encoder_lr", MODULE_LR))

    def check_init(self, init: IdAdapter) -> None:
        """Raise ``ValueError`` when ``init`` is not an adapter this target wrote."""
        raise NotImplementedError

    def new_encoder(self, settings: Mapping, context_dim: int) -> torch.nn.Module:
        """A fresh encoder from ``settings`` (called under the target's seed)."""
        raise NotImplementedError

    def param_groups(self, learning_rate: float, weight_decay: float) -> List[dict]:
        return [
            {"params": list(self.projections.parameters()), "lr": learning_rate, "weight_decay": weight_decay, "name": f"{self.name}.projections"},
            {"params": list(self.encoder.parameters()), "lr": self.encoder_learning_rate, "weight_decay": weight_decay, "name": f"{self.name}.{self.encoder_group}"},
        ]

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        meta = {"trained": self.trained, "source_format": "native"}
        meta.update(metadata or {})
        return IdAdapter(
            format="native", base=base, context_dim=context_dim, projector=frozen_copy(self.encoder),
            layers=self.projections.export(), metadata=meta, mechanism=self.exported_mechanism,
        )
