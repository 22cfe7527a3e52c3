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

from ...adapters.projectors.id_adapter import DeviceCache
from ...adapters.attention.stage_tokens import StageContexts, stage_at, swap_rows
from ..dispatch.dispatcher import StageSchedule
from ..common.errors import IdentityAttentionError
from ..common.host import SigmaReader
from ..common.step_sigma import has_step_sigma


class StageTokenPatch:
    label = "Apply per-stage identity tokens"
    identity_attention_stage_tokens = True
    needs_step_sigma = True  # picks its stage by sigma: StepSigmaWrapper reads it once per step, before the layers

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
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return n, context, value
        # the step's sigma published once per step (StepSigmaWrapper): decide in Python, no device work
        on_device = not has_step_sigma(extra_options) and torch.is_tensor(sigmas) and sigmas.device.type != "cpu"
        if on_device and self.contexts.keys.shape[1] == context.shape[1] == value.shape[1]:
            return self._on_device(n, context, value, extra_options, sigmas)
        sigma = self._sigma(extra_options)
        if not s.active_at(sigma):
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

    def _on_device(self, n, context, value, extra_options, sigmas):
        """The same swap with the stage picked on the accelerator: no host sync.

        The stage index is ``sum(sigma < boundary)`` computed on the device and
        used to gather the stage's contexts; a sigma outside start/end selects
        the inputs with ``torch.where`` (exact either way).
        """
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        if context.shape[0] % len(chunks):
            raise IdentityAttentionError(
                f"the batch of {context.shape[0]} prompts cannot be split into {len(chunks)} cond/uncond chunks",
                node=self.label,
                fix="report this with your workflow: the sampler sent an unexpected batch",
            )
        c = self.contexts
        keys_all, values_all = self._cache.get("all", context.device, context.dtype, lambda: (c.keys, c.values))
        # boundaries compared in float32 whatever the model's dtype
        bounds = self._cache.get("bounds", context.device, torch.float32, lambda: torch.tensor(self.boundary_sigmas or [float("inf")]))
        sigma = sigmas.detach().reshape(-1)[:1].float()
        index = (sigma < bounds).sum().clamp(max=keys_all.shape[0] - 1).reshape(1)
        keys, values = keys_all.index_select(0, index), values_all.index_select(0, index)
        weights = [self.schedule.weight if code == 0 else 0.0 for code in chunks]
        rows = context.shape[0] // len(chunks)
        new_context, new_value = swap_rows(context, keys, weights, rows), swap_rows(value, values, weights, rows)
        window = self.schedule.window_in(extra_options)
        if window is not True:
            gate = window.reshape(1, 1, 1)
            new_context, new_value = torch.where(gate, new_context, context), torch.where(gate, new_value, value)
        return n, new_context, new_value

    def _stage_contexts(self, stage: int, like: torch.Tensor):
        c = self.contexts
        return self._cache.get(stage, like.device, like.dtype, lambda: (c.keys[stage : stage + 1], c.values[stage : stage + 1]))
