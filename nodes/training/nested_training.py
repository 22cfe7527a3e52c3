"""Training target ``nested``: Nested Attention's query-former and per-layer nested key/value projections.

Nested Attention (Patashnik et al., arXiv 2501.01407; equations and the chosen value regularizer
in ``adapters/attention/nested_attention.py``) replaces, per query, the value of the prompt's subject word
by ``v*_q = softmax(q Kn^T / sqrt(d)) Vn``. Trained here with the UNet frozen:

- the encoder: a small query-former (``adapters/projectors/query_former.py``) from each sample's fused
  identity features to ``T`` subject tokens (``encoder_lr``, default 1e-4: a fresh network);
- per cross-attention layer ``W_Kn`` / ``W_Vn`` ``[C, D]`` (native ``nested.to_k`` /
  ``nested.to_v``; the target's learning rate, default 1e-5), initialised as copies of the
  layer's own ``to_k`` / ``to_v`` when the tokens are as wide as the text context (the nested
  values then start in the space of the text values they replace), else ``N(0, 1/D)``.

The subject is, per caption, the last prompt word (``subject_word`` empty, as the node's
"last prompt token") or the given word; a caption without it (or one emptied by condition
dropout) trains only the denoising loss. Loss: denoising + ``value_reg`` (0.01) x the value
regularizer.

Export: a native ID_ADAPTER, ``mechanism = "nested"``, projector = the query-former, layers
``nested.to_k`` / ``nested.to_v``: "Apply nested attention" with projection "native nested
weights" applies it.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.attention.nested_attention import nested_attention_rows, value_gap
from ...adapters.projectors.query_former import QueryFormer
from ...adapters.training.trainable_modules import KeyValueProjections
from ..common import prompt_encoding
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from ..common.host import attention_fn_for
from .encoder_target import EncoderTarget, fused_tokens
from ..dispatch.prompt_token import PLACEHOLDER, with_marker
from .training_targets import TrainingFeed, register_target

PREFIX = "nested."


class TrainableNestedStage(AttentionStage):
    """``out + a_s(q) (softmax(q Kn^T s) Vn - V[s])`` per row, recording the value gap."""

    label = "nested attention (training)"

    def __init__(self, projections: KeyValueProjections, feed: TrainingFeed, name: str):
        super().__init__(StageSchedule())
        self.projections = projections
        self.feed = feed
        self.name = name

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.projections.has(call.layer):
            return out
        index = self.feed.extras["subject_index"].to(call.k.device)  # [rows], -1 = no subject
        index = self.feed.rows(index, call.batch)
        has = (index >= 0) & (index < call.k.shape[1])
        hot = torch.zeros(call.batch, call.k.shape[1], 1, device=call.k.device, dtype=call.k.dtype)
        rows = torch.nonzero(has).flatten()
        hot[rows, index[rows], 0] = 1.0
        dt = call.q.dtype
        tokens = self.feed.tokens_for(call.batch).to(device=call.q.device, dtype=dt)
        w_k, w_v = self.projections.weights(call.layer)
        kn, vn = F.linear(tokens, w_k.to(dt)), F.linear(tokens, w_v.to(dt))
        new, nested, v_s = nested_attention_rows(out, call.q, call.k, call.v, kn, vn, hot, call.heads, attention_fn_for(call.extra_options))
        if self.feed.recording or torch.is_grad_enabled():
            # also when gradient checkpointing re-runs this forward in the backward pass (recording has stopped
            # then): the recomputation must save the same tensors as the forward did; record() keeps nothing then
            self.feed.record(self.name, "value_gap", value_gap(nested, v_s, has))
        return new


class NestedTarget(EncoderTarget):
    name = "nested"
    projection_prefix = PREFIX
    trained = "Nested Attention query-former + nested K/V"
    exported_mechanism = "nested"

    def __init__(self, model_patcher, settings: Mapping, clip=None, token=None, init: Optional[IdAdapter] = None, seed: int = 0):
        super().__init__(model_patcher, settings, init=init, seed=seed)
        self.value_weight = float(settings.get("value_reg", 0.01))
        self.subject_word = str(settings.get("subject_word", ""))
        self.clip, self.token = clip, token
        self._subjects: Dict[str, int] = {}

    def check_init(self, init: IdAdapter) -> None:
        if init.mechanism != "nested" or not isinstance(init.projector, QueryFormer):
            raise ValueError(f"the nested target's 'init' must be a nested adapter (this one is {init.mechanism})")

    def new_encoder(self, settings: Mapping, context_dim: int) -> QueryFormer:
        return QueryFormer(
            in_dim=int(settings.get("embedding_dim", 512)), dim=int(settings.get("dim", 256)), token_dim=int(settings.get("token_dim", context_dim)),
            tokens=int(settings.get("tokens", 4)), depth=int(settings.get("depth", 2)), heads=int(settings.get("heads", 4)),
            input_kind=str(settings.get("input", "arcface_normed")),
        )

    def install(self, model_patcher, feed: TrainingFeed):
        return apply_attention_stage(model_patcher, TrainableNestedStage(self.projections, feed, self.name))

    def subject_index(self, caption: str) -> int:
        """The subject's position in ``caption``'s context (-1: none), as the loop encodes it."""
        if caption not in self._subjects:
            text = with_marker(caption, PLACEHOLDER, self.token.marker) if self.token is not None and PLACEHOLDER in caption else caption
            try:
                index = prompt_encoding.subject_token(self.clip, text, self.subject_word)[0] if text.strip() else -1
            except ValueError:
                index = -1
            self._subjects[caption] = int(index)
        return self._subjects[caption]

    def prepare(self, feed: TrainingFeed) -> None:
        feed.tokens = fused_tokens(self.encoder, feed)
        feed.extras["subject_index"] = torch.tensor([self.subject_index(c) for c in feed.extras["captions"]], dtype=torch.long)

    def regularizers(self, feed: TrainingFeed) -> Dict[str, torch.Tensor]:
        if self.value_weight == 0.0:
            return {}
        gaps = feed.recorded(self.name, "value_gap")
        return {"value_reg": self.value_weight * torch.stack(gaps).mean() if gaps else torch.zeros(())}


@register_target("nested")
def make_nested_target(model_patcher, adapter, settings: Mapping, init: Optional[IdAdapter] = None, clip=None, token=None, seed: int = 0, **_):
    """Trainer factory. ``settings``: ``tokens`` (4), ``dim`` (256), ``depth`` (2), ``heads`` (4), ``input``
    (arcface_normed), ``embedding_dim`` (512), ``token_dim`` (the text width), ``encoder_lr`` (1e-4),
    ``value_reg`` (0.01), ``subject_word`` ("" = the last prompt word); ``init``: a nested adapter to continue."""
    if adapter is not None:
        raise ValueError("the nested target trains its own encoder: give 'init' (a nested adapter) to continue one, not 'adapter'")
    return NestedTarget(model_patcher, settings, clip=clip, token=token, init=init, seed=seed)
