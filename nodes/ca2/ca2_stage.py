"""The CA² gate as a dispatcher stage (math in ``adapters/attention/ca2_gate.py``).

Per attn2 call: the visual K/V of the original image's tokens (cached once
per layer/device/dtype), the per-pixel score (native MLP or text attention),
the edit mask at the layer grid, then ``out + w (1 - Score ⊙ M) Attn(q, K_vis, V_vis)``
(the visual branch through fused SDPA). As the first stage of a call with the
training-free score, the layer's text attention and its content mass come from
one fused call (``text_attention_with_mass``) instead of two.
The edit mask is *not* the stage's schedule mask: the visual term acts
everywhere (full strength outside the mask), the mask only decides where the
score may suppress it.

Scores of the positive (cond) rows are recorded per step and layer for
:class:`~.ca2_nodes.InspectCA2Scores` (on their device, fp16, bounded).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...adapters.attention.ca2_gate import (
    ACTIVATION_EXTRA,
    ACTIVATIONS,
    SCORE_KEYS,
    gated_visual_attention,
    native_score,
    pooled_text_token,
    scaled_mass,
    sharpen,
    text_attention_score,
    visual_gate,
    visual_keys_values,
)
from ...adapters.attention.text_attention_mass import text_attention_with_mass
from ...adapters.projectors.id_adapter import DeviceCache
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, blend_in_region, mask_rows
from ..common.errors import IdentityAttentionError
from ..common.sampling_scope import device_constant, sampling_cache
from ..dispatch.step_recorder import StepRecorder

_COND, _UNCOND = 0, 1


class CA2GateStage(AttentionStage):
    """tokens_cond ``[R, T, D]`` (R = 1 or one per image), tokens_uncond ``[1, T, D]``, edit_mask ``[Bm, H, W]``."""

    label = "Apply CA² gate"

    def __init__(
        self,
        schedule: StageSchedule,
        adapter,
        tokens_cond: torch.Tensor,
        tokens_uncond: torch.Tensor,
        edit_mask: torch.Tensor,
        score_source: str = "text_attention",
        sharpness: float = 1.0,
        score_scale: str = "fixed",
    ):
        super().__init__(schedule)
        self.score_scale = score_scale
        self.adapter = adapter
        self.tokens = {_COND: tokens_cond, _UNCOND: tokens_uncond}
        self.edit_mask = edit_mask
        self.score_source = score_source
        self.sharpness = float(sharpness)
        self.activation = str(adapter.extras.get(ACTIVATION_EXTRA, "gelu"))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown score activation {self.activation!r}")
        self.needs_hidden_states = score_source == "native"
        self.recorder = StepRecorder()
        self._cache = DeviceCache()  # device constants where no sampling scope runs (else the sampling's cache)
        self._edit_cache: dict = {}

    def is_active(self, call: AttentionCall) -> bool:
        return super().is_active(call) and "to_k" in self.adapter.layer(call.layer)

    def _visual_kv(self, call: AttentionCall, code: int):
        layer = self.adapter.layer(call.layer)
        tokens = self.tokens[code]
        if tokens.shape[0] not in (1, call.rows_per_chunk):
            raise IdentityAttentionError(
                f"{tokens.shape[0]} original images were given for a batch of {call.rows_per_chunk}",
                node=self.label,
                input_name="image",
                fix="give one original image, or exactly one per image in the batch",
            )
        return device_constant(
            call.extra_options,
            id(self),
            (call.layer, code),
            call.q.device,
            call.q.dtype,
            lambda: visual_keys_values(tokens.float(), layer["to_k"].float(), layer["to_v"].float()),
            self._cache,
        )

    def _visual_kv_rows(self, call: AttentionCall):
        """``([B, T, C], [B, T, C])`` visual K/V in ``call``'s row order, stacked once per chunk
        pattern and reused (stacking them in every layer call was two launches per layer)."""

        def stack():
            kv = {code: self._visual_kv(call, code) for code in set(call.chunks)}
            return tuple(call.per_row({code: pair[i] for code, pair in kv.items()}).contiguous() for i in (0, 1))

        key = (call.layer, "rows", tuple(call.chunks), call.rows_per_chunk)
        return device_constant(call.extra_options, id(self), key, call.q.device, call.q.dtype, stack, self._cache)

    def score(self, call: AttentionCall, mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[b, N]`` float32 in [0, 1], after sharpening (``mass``: the content mass, if already known)."""
        if self.score_source == "native":
            layer = self.adapter.layer(call.layer)
            weights = device_constant(call.extra_options, id(self), (call.layer, "score"), call.q.device, call.q.dtype, lambda: tuple(layer[n].float() for n in SCORE_KEYS), self._cache)
            hidden = call.hidden_states()
            raw = native_score(hidden, pooled_text_token(call.context().to(hidden.dtype)), dict(zip(SCORE_KEYS, weights)), self.activation)
        elif mass is not None:
            raw = scaled_mass(mass, self.score_scale)
        else:
            raw = text_attention_score(call.q, call.k, call.heads, self.score_scale, sampling_cache(call.extra_options))
        return sharpen(raw, self.sharpness)

    def forward_first(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """As the first stage, with the training-free score: the text attention and its content
        mass come from one fused call instead of two."""
        if self.score_source != "text_attention" or self.schedule.mask is not None:
            return None
        text, mass = text_attention_with_mass(call.q, call.k, call.v, call.heads, upcast=call.upcast, cache=sampling_cache(call.extra_options))
        return self._gated(call, text, mass)

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        return blend_in_region(out, self._gated(call, out), region)

    def _gated(self, call: AttentionCall, out: torch.Tensor, mass: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``out + w (1 - Score ⊙ M) Attn(q, K_vis, V_vis)`` for ``call``'s rows; records the score."""
        k_vis, v_vis = self._visual_kv_rows(call)
        score = self.score(call, mass)
        mask = mask_rows(self.edit_mask, call, self._edit_cache, node=self.label, input_name="mask")
        gate = visual_gate(score, mask.float())
        new = gated_visual_attention(out, call.q, k_vis, v_vis, call.heads, gate, self.schedule.weight, lambda q, k, v, heads: call.branch_attention(q, k, v))
        self._record(call, score)
        return new

    def _record(self, call: AttentionCall, score: torch.Tensor) -> None:
        if _COND not in call.chunks:
            return
        n = call.rows_per_chunk
        i = call.chunks.index(_COND)
        gh, gw = call.token_grid()
        self.recorder.record(call.sigma, call.layer, score[i * n : (i + 1) * n].reshape(n, gh, gw))
