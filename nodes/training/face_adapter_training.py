"""Training target: FaceChain-FACT's face adapter (gated self-attention) with its FAIR loss.

FACT (arXiv 2410.12312; ``face_adapter/face_attention_processor_v1.py`` of github:modelscope/facechain)
adds to every cross-attention block, between the self-attention residual and the text
cross-attention (ComfyUI's ``middle_patch``), a GLIGEN-style gated self-attention over
``[latent; linear(face tokens)]``. Parameters: ``adapters/training/trainable_modules.py: GatedSelfAttention``
(the checkpoint's 17 names, ``alpha_attn`` / ``alpha_dense`` starting at 0 so the model starts
unchanged); forward: the face-adapter node's own arithmetic (``adapters/attention/gated_self_attention.py``,
with the gates ``tanh(alpha)`` kept as tensors so they train). FACT's training code is not
released; here:

- face tokens: the projector of an ID_ADAPTER (e.g. FACT's own resampler over TransFace tokens,
  or any projector giving tokens of the adapter's width) on each sample's features, frozen;
- FACT's condition pairings (``adapters/training/condition_dropout.py``): per sample the face condition is
  the photo's own features (paired) or another photo of the same person (shuffled, probability
  rising from ``shuffle_start`` to ``shuffle_end`` over the run), and dropped (zeros) with the
  trainer's identity dropout;
- loss: denoising + ``fair_weight * FAIR``, FAIR = the adapter's relative increment outside the
  face mask (``adapters/training/training_losses.py``; weight 0.01 read off the released checkpoint's
  name "reg001", unverified).

Export: a native adapter, ``mechanism="gated_self_attention"``, per layer the 17 FACT names, the
token projector it was trained with (what the face-adapter node reads).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from ...adapters.attention import gated_self_attention as gsa
from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.training.trainable_modules import FaceAdapterLayers, layer_name
from ...adapters.training.training_losses import fair_loss
from ..dispatch.dispatcher import AttentionCall
from ..common.host import attention_fn_for, cross_attention_layers, layer_key_of
from .training_targets import MODULE_LR, TrainingFeed, TrainingTarget, register_target


class TrainableFaceAdapterPatch:
    """The ``middle_patch``: ``x -> GSA(x, face tokens)`` at every layer with adapter weights."""

    def __init__(self, layers: FaceAdapterLayers, feed: TrainingFeed, name: str):
        self.layers = layers
        self.feed = feed
        self.name = name

    def __deepcopy__(self, memo):
        return self

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        key = layer_key_of(extra_options)
        if layer_name(key) not in self.layers.layers:
            return x
        tokens = self.feed.tokens_for(x.shape[0]).to(device=x.device, dtype=x.dtype).detach()
        layer = self.layers.of(key)
        w = layer.weights(x.dtype)
        gate_attn, gate_dense = torch.tanh(w["alpha_attn"]), torch.tanh(w["alpha_dense"])
        heads = int(extra_options.get("n_heads") or layer.attn.heads)
        new = gsa.gated_self_attention(x, gsa.face_keys_values(tokens, w), w, heads, gate_attn, gate_dense, attention_fn_for(extra_options))
        if self.feed.recording:
            call = AttentionCall(x, x, x, extra_options, key)
            fg = self.feed.mask_at(self.feed.foreground, call)
            self.feed.record(self.name, "delta", new - x)
            self.feed.record(self.name, "x", x)
            self.feed.record(self.name, "outside", (1.0 - fg) if fg is not None else torch.zeros_like(x[..., :1]))
        return new


class FaceAdapterTarget(TrainingTarget):
    name = "face_adapter"
    default_learning_rate = MODULE_LR

    def __init__(self, model_patcher, adapter: IdAdapter, fair_weight: float = 0.01, initial: Optional[Mapping] = None, seed: int = 0, shuffle=(0.0, 0.5)):
        if adapter is None or adapter.projector is None:
            raise ValueError("the face_adapter target needs an 'adapter' whose projector makes the face tokens (e.g. FACT's weights)")
        layers = cross_attention_layers(model_patcher)
        with torch.inference_mode(False):
            self.layers = FaceAdapterLayers({info.key: (info.inner_dim, info.heads) for info in layers}, adapter.projector.token_dim, seed=seed)
            for key, entries in (initial or {}).items():
                if "alpha_attn" in entries and layer_name(key) in self.layers.layers:
                    self.layers.of(key).load_state_dict({n: t.float() for n, t in entries.items() if not n.startswith("ln.")})
        self.module = self.layers
        self.adapter = adapter
        self.fair_weight = float(fair_weight)
        self.pairing = (float(shuffle[0]), float(shuffle[1]))  # the trainer's paired/shuffled curriculum (start, end)

    def install(self, model_patcher, feed: TrainingFeed):
        m = model_patcher.clone()
        m.set_model_patch(TrainableFaceAdapterPatch(self.layers, feed, self.name), "middle_patch")
        return m

    def regularizers(self, feed: TrainingFeed) -> Dict[str, torch.Tensor]:
        if self.fair_weight == 0.0:
            return {}
        return {"fair": self.fair_weight * fair_loss(feed.recorded(self.name, "delta"), feed.recorded(self.name, "x"), feed.recorded(self.name, "outside"))}

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        meta = {"trained": "FACT face adapter"}
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, projector=self.adapter.projector, layers=self.layers.export(), metadata=meta, mechanism="gated_self_attention")


@register_target("face_adapter")
def make_face_adapter_target(model_patcher, adapter: Optional[IdAdapter], settings: Mapping, init: Optional[IdAdapter] = None, seed: int = 0, **_):
    """Trainer factory: ``adapter`` (required: the face-token projector; FACT weights also give the start when no ``init``), ``fair_weight`` (0.01),
    ``shuffle_start`` / ``shuffle_end`` (0.0 / 0.5: FACT's curriculum, the share of samples whose face condition is another
    photo of the person instead of the photo itself, rising linearly over the run)."""
    initial = init.layers if init is not None else (adapter.layers if adapter is not None and adapter.mechanism == "gated_self_attention" else None)
    return FaceAdapterTarget(model_patcher, adapter, fair_weight=float(settings.get("fair_weight", 0.01)), initial=initial, seed=seed,
                             shuffle=(float(settings.get("shuffle_start", 0.0)), float(settings.get("shuffle_end", 0.5))))
