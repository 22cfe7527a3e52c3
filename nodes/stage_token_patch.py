"""Per-stage K/V identity tokens as a ComfyUI ``attn2_patch``.

``attn2_patch(n, context, value, extra_options) -> (n, context, value)`` runs
in every transformer block before the text cross-attention; ComfyUI then
computes ``k = to_k(context)`` and ``v = to_v(value)`` (both hosts). So the
SeFi-IDE split is exact: for the positive prompt's rows, context (-> keys)
becomes the prompt encoded with ``P_i^K`` and value (-> values) the prompt
encoded with ``P_i^V``, i = the stage of the current sigma. Negative-prompt
rows are never touched (the identity prompt replaces the positive prompt only).

``weight`` w blends from the plain context: ``context + w (stage - context)``;
w = 0 (or a sigma outside start/end) returns the inputs themselves.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters.id_adapter import DeviceCache
from ..adapters.stage_tokens import StageContexts, stage_at, swap_rows
from .dispatcher import StageSchedule
from .errors import IdentityAttentionError
from .host import SigmaReader


class StageTokenPatch:
    label = "per-stage identity tokens"
    identity_attention_stage_tokens = True

    def __init__(self, schedule: StageSchedule, contexts: StageContexts, boundary_sigmas: Sequence[float], boundaries: Sequence[float]):
        self.schedule = schedule
        self.contexts = contexts
        self.boundary_sigmas = tuple(float(s) for s in boundary_sigmas)
        self.boundaries = tuple(boundaries)
        self._cache = DeviceCache()
        self._sigma = SigmaReader()

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    def stage_for(self, sigma: float) -> int:
        return stage_at(sigma, self.boundary_sigmas)

    def __call__(self, n, context, value, extra_options):
        s = self.schedule
        if s.weight == 0.0:
            return n, context, value
        sigma = self._sigma(extra_options)
        if sigma is None or not s.active_at(sigma):
            return n, context, value
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        weights = [s.weight if code == 0 else 0.0 for code in chunks]
        if context.shape[0] % len(chunks):
            raise IdentityAttentionError(
                f"the batch of {context.shape[0]} prompts cannot be split into {len(chunks)} cond/uncond chunks",
                node=self.label,
                fix="report this with your workflow: the sampler sent an unexpected batch",
            )
        stage = self.stage_for(sigma)
        keys, values = self._stage_contexts(stage, context)
        rows = context.shape[0] // len(chunks)
        return n, swap_rows(context, keys, weights, rows), swap_rows(value, values, weights, rows)

    def _stage_contexts(self, stage: int, like: torch.Tensor):
        c = self.contexts
        return self._cache.get(stage, like.device, like.dtype, lambda: (c.keys[stage : stage + 1], c.values[stage : stage + 1]))
