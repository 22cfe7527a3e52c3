"""Training target: SeFi-IDE's per-stage K/V identity tokens with the face-wise attention loss.

"Beyond Inserting" (Li et al., arXiv 2402.00631; mechanisms.md §6): one identity is ``S`` pairs
``(P_i^K, P_i^V)`` of token embeddings, pair ``i`` used in denoising stage ``i`` (stage 0 = the
noisiest timesteps, ``S`` equal bands of the timestep range). The prompt ("photo of a <new1>
person") is encoded twice by the frozen text encoder, with ``<new1>`` = ``P_i^K`` and with
``<new1>`` = ``P_i^V``; every cross-attention takes its keys from the first encoding and its
values from the second (an ``attn2_patch`` returning ``(n, c^K, c^V)``, as the per-stage token
node does).

Face-wise attention loss (weight 0.003): the attention map of ``<new1>`` under the trained
keys should match the map of the class word under a reference prompt ("a photo of the face of
person"), ``mean over layers of mean((A_t[:, :, :, i_t] - A_r[:, :, :, i_r])^2)``, with the same
queries (the paper's L2 form is assumed).

Trainable: the table ``StageTokenTable`` (one vector per stage, per text encoder; N(0, 0.02^2) at
the start, CLIP's token-embedding scale). Export: the per-stage token file the ID_TOKENS loader
reads (tensors ``<encoder>.keys`` / ``<encoder>.values`` ``[S, 1, width]``, header ``format =
identity_attention_tokens``, ``version``, ``base``, ``count``, ``vectors``, ``encoders``).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from ...adapters.attention.attention_core import attention_probabilities
from ...adapters.attention.stage_tokens import StageTokens
from ...adapters.training.trainable_modules import StageTokenTable
from ...adapters.training.training_losses import face_attention_loss
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, apply_attention_stage
from ..common.host import cross_attention_layers
from ..dispatch.prompt_token import CONTROL_WORDS, PLACEHOLDER, PromptToken, with_marker
from .training_targets import TOKEN_LR, TrainingFeed, TrainingTarget, register_target

REFERENCE_PROMPT = "a photo of the face of person"
CLASS_WORD = "person"
INIT_STD = 0.02


def stage_of(timesteps: torch.Tensor, stages: int, total: int = 1000) -> torch.Tensor:
    """Stage index per timestep: 0 for the noisiest band ``[total - total/S, total)``, ``S-1`` for the last."""
    return ((total - 1 - timesteps.long()) * stages // total).clamp(0, stages - 1)


def differing_position(clip, text_a: str, text_b: str) -> int:
    """Index (in the first encoder's first section) of the first token where two prompts differ."""
    a, b = clip.tokenize(text_a), clip.tokenize(text_b)
    key = sorted(a)[0] if isinstance(a, dict) else None
    sa, sb = (a[key][0], b[key][0]) if key is not None else (a[0], b[0])
    for i, (x, y) in enumerate(zip(sa, sb)):
        if (x[0] if not torch.is_tensor(x[0]) else -1) != (y[0] if not torch.is_tensor(y[0]) else -1):
            return i
    raise ValueError(f"'{text_a}' and '{text_b}' tokenize the same")


class StageTokenPatch:
    """attn2_patch: keys from the stage's K-encoding, values from its V-encoding (per row)."""

    def __init__(self, feed: TrainingFeed):
        self.feed = feed

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        keys, values = self.feed.extras["stage_keys"], self.feed.extras["stage_values"]
        return n, keys.to(device=n.device, dtype=context.dtype), values.to(device=n.device, dtype=context.dtype)


class FaceAttentionRecorder(AttentionStage):
    """Records, per layer, the subject token's attention map and the class word's under the reference prompt."""

    label = "face-wise attention (training)"

    def __init__(self, to_k: Dict, feed: TrainingFeed, name: str):
        super().__init__(StageSchedule())
        self.to_k = to_k
        self.feed = feed
        self.name = name

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.feed.recording and not torch.is_grad_enabled():
            return out
        # with gradient checkpointing the backward pass re-runs this forward after recording stopped: the same
        # maps are computed again (not recorded), so the recomputation saves the same tensors as the forward
        pos_t, pos_r = self.feed.extras["subject_position"], self.feed.extras["class_position"]
        ref = self.feed.extras["reference_context"].to(device=call.q.device, dtype=call.q.dtype).expand(call.batch, -1, -1)
        k_ref = self.to_k[call.layer](ref)
        a_t = attention_probabilities(call.q, call.k, call.heads)[..., pos_t]
        a_r = attention_probabilities(call.q, k_ref, call.heads)[..., pos_r]
        kept = self.feed.extras.get("text_kept")
        if kept is not None:  # rows whose caption condition dropout removed have no subject word
            kept = kept.to(a_t.device)
            a_t, a_r = a_t[kept], a_r[kept]
        self.feed.record(self.name, "target", a_t)
        self.feed.record(self.name, "reference", a_r.detach())
        return out


class StageTokenTarget(TrainingTarget):
    name = "stage_tokens"
    default_learning_rate = TOKEN_LR

    def __init__(self, model_patcher, clip, token: PromptToken, caption: str, base: str, stages: int = 5, attention_weight: float = 0.003, reference_prompt: str = REFERENCE_PROMPT, seed: int = 0, initial=None):
        if token is None:
            raise ValueError(f"the stage_tokens target needs '{PLACEHOLDER}' in the caption (where the identity's tokens go)")
        self.token, self.caption, self.base, self.stages = token, caption, base, int(stages)
        self.attention_weight = float(attention_weight)
        self.reference_prompt = reference_prompt
        gen = torch.Generator().manual_seed(seed)
        with torch.inference_mode(False):
            keys, values = {}, {}
            for t in token.tables:
                shape = (self.stages, 1, t.width)
                keys[t.encoder] = initial[0][t.encoder].float() if initial else INIT_STD * torch.randn(shape, generator=gen)
                values[t.encoder] = initial[1][t.encoder].float() if initial else INIT_STD * torch.randn(shape, generator=gen)
            self.table = StageTokenTable(keys, values)
        self.module = self.table
        self.needs_text_grad = True  # the loop's token CLIP must carry gradients to the tables
        self.layers = cross_attention_layers(model_patcher)
        diffusion = model_patcher.model.diffusion_model
        self.to_k = {info.key: diffusion.get_submodule(info.module_path).attn2.to_k for info in self.layers}
        control = next(w for w in CONTROL_WORDS if w not in caption.lower())
        self.subject_position = differing_position(clip, with_marker(caption, PLACEHOLDER, token.marker), with_marker(caption, PLACEHOLDER, control))
        other = next(w for w in CONTROL_WORDS if w not in reference_prompt.lower())
        self.class_position = differing_position(clip, reference_prompt, reference_prompt.replace(CLASS_WORD, other))
        self._reference: Optional[torch.Tensor] = None

    def install(self, model_patcher, feed: TrainingFeed):
        m = model_patcher.clone()
        m.set_model_patch(StageTokenPatch(feed), "attn2_patch")
        if self.attention_weight > 0:
            m = apply_attention_stage(m, FaceAttentionRecorder(self.to_k, feed, self.name))
        return m

    def prepare(self, feed: TrainingFeed) -> None:
        """Per row: the caption encoded with its stage's ``P^K`` and ``P^V`` (gradients reach the tables).

        ``feed.extras["encode_with"](caption, {encoder: vector}) -> (cond, pooled)`` is the loop's
        token text encoder (one CLIP clone per run: two clones of one model cannot be loaded at once).
        """
        encode_with = feed.extras["encode_with"]
        timesteps = feed.extras["timesteps"]
        captions = feed.extras["captions"]
        stages = stage_of(timesteps, self.stages).tolist()
        cache: Dict[Tuple[str, int, str], torch.Tensor] = {}
        keys, values = [], []
        for caption, s in zip(captions, stages):
            for which, out in (("keys", keys), ("values", values)):
                key = (caption, s, which)
                if key not in cache:
                    cache[key] = encode_with(caption, self.table.pair(s, which))[0]
                out.append(cache[key])
        device = feed.extras.get("device")
        feed.extras["stage_keys"] = torch.cat(keys).to(device)
        feed.extras["stage_values"] = torch.cat(values).to(device)
        if self._reference is None:
            with torch.no_grad():
                self._reference = encode_with(self.reference_prompt, None)[0].detach()
        feed.extras["reference_context"] = self._reference
        feed.extras["subject_position"] = self.subject_position
        feed.extras["class_position"] = self.class_position

    def regularizers(self, feed: TrainingFeed) -> Dict[str, torch.Tensor]:
        if self.attention_weight == 0.0:
            return {}
        if not feed.recorded(self.name, "target") or feed.recorded(self.name, "target")[0].shape[0] == 0:
            return {"face_attention": torch.zeros(())}  # every caption of this micro-batch was dropped
        return {"face_attention": self.attention_weight * face_attention_loss(feed.recorded(self.name, "target"), feed.recorded(self.name, "reference"))}

    def export_files(self, base: str, context_dim: int, metadata: Optional[Dict[str, str]] = None) -> Dict[str, Tuple[Dict[str, torch.Tensor], Dict[str, str]]]:
        """The per-stage token file, written by the ID_TOKENS type itself (``adapters/attention/stage_tokens.py``)."""
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta.update(placeholder=PLACEHOLDER, init="trained", boundaries=",".join(f"{i / self.stages:g}" for i in range(1, self.stages)))
        keys = {e: t.detach().float().cpu().clone() for e, t in self.table.keys.items()}
        values = {e: t.detach().float().cpu().clone() for e, t in self.table.values.items()}
        return {"": StageTokens(base=base, keys=keys, values=values, metadata=meta).to_file_dict()}


@register_target("stage_tokens")
def make_stage_token_target(model_patcher, adapter, settings: Mapping, clip=None, token=None, caption: str = "", base: str = "sd15", seed: int = 0, **_):
    """Trainer factory: ``stages`` (5), ``attention_weight`` (0.003), ``reference_prompt``."""
    return StageTokenTarget(
        model_patcher, clip, token, caption, base, stages=int(settings.get("stages", 5)), attention_weight=float(settings.get("attention_weight", 0.003)),
        reference_prompt=str(settings.get("reference_prompt", REFERENCE_PROMPT)), seed=seed,
    )
