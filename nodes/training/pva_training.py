"""Training target: PVA's parallel visual attention (to_visual_q/k/v, identity transformer, prompt token).

PVA (Xu et al., WACV 2024; ``lib/pva.py`` of github:AtlantixJJ/PVA-CelebAHQ-IDI) adds to every
cross-attention layer its own visual query / key / value projections and attends to
``[text ; identity tokens]`` in one softmax (the math and its fused implementation are
``adapters/attention/parallel_attention.py``, shared with the inference node, so what is trained is
exactly what "Apply parallel visual attention" (mode joint, adapter projections) computes).

Trainable here (all optional but the projections):

- ``to_visual_{q,k,v}`` of every layer, float32 master copies initialised from the ID_ADAPTER's
  ``to_q / to_k / to_v`` or, where the adapter has none, as *copies of the layer's own*
  ``to_q / to_k / to_v`` (PVA's initialisation; the identity tokens must then live in the text
  context's width);
- the identity transformer (the adapter's token projector), for dataset-scale stage-1 training;
  PVA's 40-step fine-tune keeps it frozen;
- the ``<new1>`` prompt token (``modifier_vec``), one vector per text encoder.

Export: an ID_ADAPTER ``format="native"``, ``mechanism="joint"``, layers ``to_q / to_k / to_v``,
the (trained or original) projector, and extras ``modifier_vec.<encoder>`` plus the JSON extra
``prompt_token`` (placeholder, template, marker-free) so the token can be reused.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.attention.parallel_attention import joint_attention
from ...adapters.projectors.projectors import build_projector, projector_name
from ...adapters.training.trainable_modules import PromptTokenVectors, VisualProjections, copy_layer_weights
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage, blend_in_region
from ..common.errors import IdentityAttentionError
from ..common.host import LayerInfo, cross_attention_layers
from ..dispatch.prompt_token import ENCODER_BY_WIDTH, PLACEHOLDER, encoder_name
from .training_targets import TrainingFeed, TrainingTarget, register_target

MODIFIER_PREFIX = "modifier_vec."
PROJECTOR_LR = 3.2e-5
"""PVA stage 1: the identity transformer's learning rate (absolute, not scaled by the batch)."""


class TrainablePVAStage(AttentionStage):
    """Joint attention to the feed's identity tokens with trainable visual projections."""

    label = "PVA training"
    needs_hidden_states = True

    def __init__(self, projections: VisualProjections, feed: TrainingFeed):
        super().__init__(StageSchedule())
        self.projections = projections
        self.feed = feed

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        w_q, w_k, w_v = self.projections.weights(call.layer)
        q, k_text, v_text, text_out = call.q, call.k, call.v, out
        if call.upcast and q.dtype != torch.float32:
            q, k_text, v_text, text_out = q.float(), k_text.float(), v_text.float(), out.float()
        dt = q.dtype
        tokens = self.feed.tokens_for(call.batch).to(device=q.device, dtype=dt)
        k_id = F.linear(tokens, w_k.to(dt))
        v_id = F.linear(tokens, w_v.to(dt))
        q_id = F.linear(call.hidden_states().to(dt), w_q.to(dt))
        mixed = joint_attention(q, k_text, v_text, k_id, v_id, call.heads, weight=1.0, q_id=q_id, text_out=text_out)
        return blend_in_region(out, mixed.to(out.dtype), region)


def layer_weights(model_patcher, info: LayerInfo) -> Dict[str, torch.Tensor]:
    """Float32 copies of a layer's own ``to_q / to_k / to_v`` weights (PVA's initialisation)."""
    attn2 = model_patcher.model.diffusion_model.get_submodule(info.module_path).attn2
    with torch.inference_mode(False):
        return {name: getattr(attn2, name).weight.detach().float().cpu().clone() for name in ("to_q", "to_k", "to_v")}


def stored_vectors(adapter: IdAdapter) -> Dict[str, torch.Tensor]:
    """An adapter's prompt-token vectors per encoder (``modifier_vec.<encoder>``, or PVA's single ``modifier_vec``)."""
    out = {}
    for name, value in adapter.extras.items():
        if not isinstance(value, torch.Tensor):
            continue
        if name.startswith(MODIFIER_PREFIX):
            out[name[len(MODIFIER_PREFIX):]] = value
        elif name == "modifier_vec":
            out[ENCODER_BY_WIDTH.get(value.numel(), encoder_name(value.numel(), []))] = value
    return out


class PVATarget(TrainingTarget):
    """PVA's trainable parts for one MODEL (see the module docstring)."""

    name = "pva"

    def __init__(
        self,
        model_patcher,
        adapter: IdAdapter,
        train_projector: bool = False,
        token_vectors: Optional[Mapping[str, torch.Tensor]] = None,
        token_learning_rate: float = 1e-3,
        projector_learning_rate: Optional[float] = None,
        node: str = "",
    ):
        self.adapter = adapter
        self.layers: List[LayerInfo] = cross_attention_layers(model_patcher)
        token_dim = adapter.token_dim
        initial = {}
        copied = 0
        for info in self.layers:
            own = adapter.layer(info.key)
            needs_copy = any(own.get(n) is None for n in ("to_q", "to_k", "to_v"))
            fallback = layer_weights(model_patcher, info) if needs_copy else {}
            if needs_copy and any(own.get(n) is None for n in ("to_k", "to_v")) and token_dim != info.context_dim:
                raise IdentityAttentionError(
                    f"the adapter has no identity key/value projections and its tokens are {token_dim} wide, so they cannot be "
                    f"initialised as copies of the layer's ({info.context_dim}-wide) text projections",
                    node=node,
                    input_name="id_adapter",
                    fix="use a PVA adapter (with to_visual_k / to_visual_v), or one whose tokens live in this model's text space",
                )
            copied += int(needs_copy)
            w = copy_layer_weights(own, fallback)
            expected = {"to_q": (info.inner_dim, info.inner_dim), "to_k": (info.inner_dim, token_dim), "to_v": (info.inner_dim, token_dim)}
            for n, shape in expected.items():
                if tuple(w[n].shape) != shape:
                    raise IdentityAttentionError(
                        f"the adapter's '{n}' at layer {info.key} is {list(w[n].shape)}, this model needs {list(shape)}",
                        node=node,
                        input_name="id_adapter",
                        fix="use an adapter made for this model's base",
                    )
            with torch.inference_mode(False):
                initial[info.key] = {n: t.detach().float().cpu().clone() for n, t in w.items()}
        self.copied_layers = copied
        with torch.inference_mode(False):
            self.projections = VisualProjections(initial)
            self.tokens = PromptTokenVectors(token_vectors) if token_vectors else None
            self.projector = None
            if train_projector:
                if adapter.projector is None:
                    raise IdentityAttentionError("the adapter has no identity transformer to train", node=node, input_name="id_adapter")
                cls_name = projector_name(adapter.projector)
                state = {k: v.detach().float().cpu().clone() for k, v in adapter.projector.state_dict().items()}
                self.projector = build_projector(cls_name, adapter.projector.config, state)
                self.projector.requires_grad_(True)
            self.module = torch.nn.ModuleDict({"projections": self.projections})
            if self.tokens is not None:
                self.module["tokens"] = self.tokens
            if self.projector is not None:
                self.module["projector"] = self.projector
        self.token_learning_rate = token_learning_rate
        self.projector_learning_rate = projector_learning_rate

    # --- training -------------------------------------------------------------------------------
    def param_groups(self, learning_rate: float, weight_decay: float) -> List[dict]:
        groups = [{"params": list(self.projections.parameters()), "lr": learning_rate, "weight_decay": weight_decay, "name": "pva.projections"}]
        if self.tokens is not None:
            groups.append({"params": list(self.tokens.parameters()), "lr": self.token_learning_rate, "weight_decay": weight_decay, "name": "pva.token"})
        if self.projector is not None:
            groups.append({"params": list(self.projector.parameters()), "lr": PROJECTOR_LR if self.projector_learning_rate is None else float(self.projector_learning_rate), "weight_decay": weight_decay, "name": "pva.projector"})
        return groups

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainablePVAStage(self.projections, feed))

    def prepare(self, feed: TrainingFeed) -> None:
        """With a trainable identity transformer: this step's tokens from the samples' reference features.

        ``feed.features``: one ``IdentityFeatures`` per sample (on the projector's device), all
        references of a sample in one sequence (PVA); each sample's tokens are repeated
        ``feed.extras["repeat"]`` times (its noisy copies).
        """
        if self.projector is None or feed.features is None:
            return
        feats = feed.features if isinstance(feed.features, (list, tuple)) else [feed.features]
        tokens = torch.cat([self.projector.project(f) for f in feats], dim=0)
        feed.tokens = tokens.repeat_interleave(int(feed.extras.get("repeat", 1)), dim=0)

    def prompt_vectors(self) -> Optional[Callable[[str], Optional[torch.Tensor]]]:
        if self.tokens is None:
            return None
        vectors = self.tokens.vectors
        return lambda encoder: vectors[encoder] if encoder in vectors else None

    def export(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> IdAdapter:
        layers = self.projections.export()
        extras: Dict[str, object] = {}
        if self.tokens is not None:
            for encoder, vec in self.tokens.export().items():
                extras[f"{MODIFIER_PREFIX}{encoder}"] = vec
            extras["prompt_token"] = {"placeholder": PLACEHOLDER, "encoders": sorted(self.tokens.vectors.keys())}
        projector = self.adapter.projector
        if self.projector is not None:
            with torch.inference_mode(False):
                state = {k: v.detach().float().cpu().clone() for k, v in self.projector.state_dict().items()}
            projector = build_projector(projector_name(self.projector), self.projector.config, state)
        meta = {"source_format": self.adapter.format if self.adapter.format != "native" else self.adapter.metadata.get("source_format", "native")}
        meta.update({k: v for k, v in self.adapter.metadata.items() if k in ("identity_input",)})
        meta.update(metadata or {})
        return IdAdapter(format="native", base=base, context_dim=context_dim, projector=projector, layers=layers, extras=extras, metadata=meta, mechanism="joint")


def fresh_pva_adapter(model_patcher, settings: Mapping, seed: int = 0) -> IdAdapter:
    """A new PVA adapter for a model: an identity transformer with PVA's shape (``TransformNetwork``:
    512 -> context width, 10 query tokens, 4 layers, 8 heads, ff 2048; smaller via ``settings``) at
    PyTorch's default initialisation (``q_tokens`` ~ N(0, 1), ``pos_enc`` 0 as PVA), and no layer
    projections (they start as copies of the layers' own)."""
    from ...adapters.projectors.projector_pva import PVATransformNetwork
    from ..common.host import base_model_of, cross_attention_layers

    layers = cross_attention_layers(model_patcher)
    context_dim = layers[0].context_dim
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = PVATransformNetwork(
            in_dim=int(settings.get("embedding_dim", 512)), out_dim=context_dim, num_q_token=int(settings.get("tokens", 10)),
            num_layer=int(settings.get("layers", 4)), heads=int(settings.get("heads", 8)), ff_dim=int(settings.get("ff_dim", 2048)),
        )
        with torch.no_grad():
            projector.q_tokens.normal_()
    base = base_model_of(model_patcher)
    return IdAdapter(format="native", base=base if base != "unknown" else "sd15", context_dim=context_dim, projector=projector.eval(), mechanism="joint", metadata={"source_format": "native"})


@register_target("pva")
def make_pva_target(model_patcher, adapter: Optional[IdAdapter], settings: Mapping, token_vectors=None, seed: int = 0, **extra):
    """Trainer factory. ``adapter``: where to start (None: :func:`fresh_pva_adapter`). ``settings``:
    ``train_projector`` (True, stage 1), ``token_lr`` (1e-3; the token trains when the caption has
    ``<new1>``), ``projector_lr`` (default 3.2e-5, PVA's stage 1). On a Flux MODEL: the identity
    transformer through joint identity attention (nodes/training/flux_training.py)."""
    from .flux_training import is_flux, make_flux_pva_target

    if is_flux(model_patcher):
        return make_flux_pva_target(model_patcher, adapter, settings, seed=seed, token=extra.get("token"))
    if adapter is None:
        adapter = fresh_pva_adapter(model_patcher, settings, seed)
    return PVATarget(
        model_patcher,
        adapter,
        train_projector=bool(settings.get("train_projector", True)),
        token_vectors=token_vectors,
        token_learning_rate=float(settings.get("token_lr", 1e-3)),
        projector_learning_rate=settings.get("projector_lr"),
    )
