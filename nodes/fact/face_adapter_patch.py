"""FACT's gated self-attention as a ComfyUI ``middle_patch``.

ComfyUI calls every ``transformer_options["patches"]["middle_patch"]`` entry as
``x = patch(x, extra_options)`` inside each ``BasicTransformerBlock``, after the
self-attention residual and before ``norm2`` + the text cross-attention
(comfy/ldm/modules/attention.py in both hosts; GLIGEN uses the same point).
The patch picks the block's FACT weights by ``extra_options["block"]`` /
``["block_index"]`` and leaves blocks the adapter has no weights for alone.

It reuses the dispatcher's schedule machinery: it is an :class:`AttentionStage`
that is not run by the dispatcher but called as a middle patch, with the
residual stream ``x`` standing in for ``q`` in :class:`AttentionCall` (only its
shape, device and dtype are read: token grid, mask region, batch chunks).

Per call it launches only what depends on ``x`` (see :func:`gsa.gated_self_attention`): the
layer's weights (q/k/v stacked) are cast once per device/dtype, the face tokens' keys and
values once per cond/uncond, and their per-row stack once per sampling (the sampling's
:class:`~.sampling_scope.SamplingCache`); the self-attention is one fused SDPA call
(:meth:`AttentionCall.branch_attention`: the adapter's own attention, which no unpatched
model computes, so the host's chunked CPU fallback buys nothing).
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch

from ...adapters.attention import gated_self_attention as gsa
from ...adapters.projectors.id_adapter import DeviceCache, IdAdapter, IdentityTokens
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, autograd_safe
from ..common.host import LayerKey, SigmaReader, layer_key_of
from ..common.sampling_scope import get_or_make, sampling_cache

_TENSOR_KEYS = tuple(k for k in gsa.FACT_LAYER_KEYS if not k.startswith("alpha_"))


class FaceAdapterPatch(AttentionStage):
    """The middle patch: one instance per applied node, shared by MODEL clones."""

    label = "Apply face adapter (gated self-attention)"
    identity_attention_face_adapter = True

    def __init__(self, schedule: StageSchedule, adapter: IdAdapter, tokens: IdentityTokens, layers: Iterable[LayerKey]):
        super().__init__(schedule)
        self.adapter = adapter
        self.tokens = tokens
        self.gates: Dict[LayerKey, Tuple[float, float]] = {key: gsa.gates(adapter.layer(key), schedule.weight) for key in layers}
        self._cache = DeviceCache()
        self._sigma = SigmaReader()

    def __call__(self, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
        layer = layer_key_of(extra_options)
        gate = self.gates.get(layer)
        if gate is None:
            return x
        call = AttentionCall(x, x, x, extra_options, layer, sigma_reader=lambda: self._sigma(extra_options))
        if not self.is_active(call):
            return x
        window = self.schedule.window_in(extra_options)
        if window is False:
            return x
        keep = [self.schedule.applies_to_chunk(code) for code in call.chunks]
        if not any(keep):
            return x
        if all(keep):
            new = self._apply(call, gate)
        else:
            new = call.scatter_chunks(x, self._apply(call.select_chunks(keep), gate), keep)
        # a window decided on the GPU selects without a host sync (exact either way)
        return new if window is True else torch.where(window.reshape(1, 1, 1), new, x)

    def _apply(self, call: AttentionCall, gate: Tuple[float, float]) -> torch.Tensor:
        x = call.q
        weights = self._layer_weights(call.layer, x)
        return gsa.gated_self_attention(
            x,
            self._face_kv_rows(call),
            weights,
            call.heads,
            gate[0],
            gate[1],
            lambda q, k, v, heads: call.branch_attention(q, k, v),
            region=self.region(call),
            qkv_weight=weights["qkv"],
        )

    def _face_kv_rows(self, call: AttentionCall) -> torch.Tensor:
        """The face tokens' keys/values for ``call``'s rows, ``[B, T, 2C]``: stacked once per sampling."""
        x = call.q
        key = (id(self), "face_kv_rows", call.layer, tuple(call.chunks), call.rows_per_chunk, x.device, x.dtype)

        def make():
            return call.per_row({code: self._face_kv(call.layer, code, x) for code in set(call.chunks)})

        return autograd_safe(get_or_make(sampling_cache(call.extra_options), key, make))

    def _layer_weights(self, layer: LayerKey, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        source = self.adapter.layer(layer)

        def make():  # in the file's dtype; the cache casts to x's
            return tuple(source[k] for k in _TENSOR_KEYS) + (gsa.fused_qkv_weight(source),)

        values = self._cache.get((layer, "weights"), x.device, x.dtype, make)
        out = dict(zip(_TENSOR_KEYS, values[:-1]))
        out["qkv"] = values[-1]
        return out

    def _face_kv(self, layer: LayerKey, code: int, x: torch.Tensor) -> torch.Tensor:
        source = self.adapter.layer(layer)
        tokens = self.tokens.cond if code == 0 else self.tokens.uncond

        def make():
            # once per sampling run, on the weights' device, in float32 (float64 if given float64)
            work = torch.float64 if torch.float64 in (tokens.dtype, source["linear.weight"].dtype) else torch.float32
            with torch.no_grad():
                weights = {k: v.to(work) for k, v in source.items()}
                return gsa.face_keys_values(tokens.to(device=weights["linear.weight"].device, dtype=work), weights)

        return self._cache.get((layer, "face_kv", code), x.device, x.dtype, make)
