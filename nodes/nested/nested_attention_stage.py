"""Nested attention as a dispatcher stage (the math is in ``adapters/attention/nested_attention.py``).

Subject features are identity tokens (an ID_ADAPTER's projector on an
IDENTITY); per layer they become nested keys/values through one of:

- ``adapter``: the adapter's identity projections ``to_k`` / ``to_v`` (IP-Adapter
  style weights, training-free: the nested attention picks, per pixel, which
  identity token's value stands in for the subject word);
- ``nested``: native nested-attention weights ``nested.to_k`` / ``nested.to_v``
  (``[C, token_dim]`` per layer in an ID_ADAPTER's ``layers``, the paper's
  per-layer W_Kn / W_Vn; this pack's native format, written by the trainer's
  ``nested`` target together with its query-former, ``nodes/training/nested_training.py``);
- ``layer``: the cross-attention layer's own ``to_k`` / ``to_v`` (training-free;
  the tokens must live in the text-embedding space, token_dim = context dim).
  Read from the live module during sampling, so LoRA-patched weights are used.

Projections are computed once per layer / batch chunk / device / dtype and cached; their
per-row stacks and the dense one-hot values of the subject positions once per sampling (the
sampling's :class:`~.sampling_scope.SamplingCache`), so a call launches only the two attention
calls (fused SDPA: :meth:`AttentionCall.branch_attention`, the mechanism's own branches) and
the two or three element-wise ops of :func:`add_subject_change`.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import DeviceCache, IdAdapter, IdentityTokens
from ...adapters.attention.nested_attention import nested_attention, one_hot, subject_positions, subject_values
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, autograd_safe
from ..common.errors import IdentityAttentionError
from ..common.host import LayerKey
from ..common.sampling_scope import get_or_make, sampling_cache

PROJECTIONS = {"adapter": ("to_k", "to_v"), "nested": ("nested.to_k", "nested.to_v")}


class NestedAttentionStage(AttentionStage):
    label = "Apply nested attention"

    def __init__(
        self,
        schedule: StageSchedule,
        tokens: IdentityTokens,
        projection: str,
        token_index: int,
        prompt_length: int,
        adapter: Optional[IdAdapter] = None,
        modules: Optional[Dict[LayerKey, torch.nn.Module]] = None,
        layers: Optional[frozenset] = None,
    ):
        super().__init__(schedule)
        self.tokens = tokens
        self.projection = projection
        self.token_index = int(token_index)
        self.prompt_length = int(prompt_length)
        self.adapter = adapter
        self.modules = modules or {}  # layer -> its attn2 module (projection "layer")
        if layers is None:
            layers = frozenset(self.modules) if projection == "layer" else frozenset(adapter.layers) if adapter else frozenset()
        self.layers = frozenset(layers)  # where the stage acts
        self._cache = DeviceCache()
        self._layer_kv: Dict[tuple, tuple] = {}
        self._positions: Dict[int, Tuple[int, ...]] = {}

    def is_active(self, call: AttentionCall) -> bool:
        return call.layer in self.layers and super().is_active(call)

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        positions = self._positions_for(call.k.shape[1])
        if not positions:  # a shape, not a tensor value: no host sync
            raise IdentityAttentionError(
                f"the subject token index {self.token_index} is past the end of the prompt ({call.k.shape[1]} tokens), so nested attention would do nothing",
                node=self.label,
                input_name="token_index",
                fix="use 'Find subject token' to get the subject word's index, or set subject to 'last prompt token'",
            )
        kn, vn = self._kv_rows(call)
        q, k = call.q, call.k
        hot = get_or_make(
            sampling_cache(call.extra_options),
            (id(self), "hot", positions, k.shape, k.device, k.dtype),
            lambda: subject_values(one_hot(k.shape[1], positions, device=k.device), k.shape[0], k.shape[2], k.dtype),
        )
        return nested_attention(
            out, q, k, call.v, kn, vn, positions, call.heads, lambda q, k, v, heads: call.branch_attention(q, k, v), self.schedule.weight, region, hot=autograd_safe(hot)
        )

    def _kv_rows(self, call: AttentionCall) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nested keys and values for ``call``'s rows, ``[B, T, H*d]`` each, dense: stacked once per sampling."""
        kv = {code: self._nested_kv(call.layer, code, call.q) for code in set(call.chunks)}
        sources = tuple(id(t) for code in sorted(kv) for t in kv[code])  # new projections (a replaced layer weight): a new entry
        key = (id(self), "kv_rows", call.layer, tuple(call.chunks), call.rows_per_chunk, sources)

        def make():
            kn = call.per_row({code: pair[0] for code, pair in kv.items()}).contiguous()
            vn = call.per_row({code: pair[1] for code, pair in kv.items()}).contiguous()
            return kn, vn, kv  # kv kept alive with the entry, so its ids are not reused while it lives

        kn, vn, _ = get_or_make(sampling_cache(call.extra_options), key, make)
        return autograd_safe(kn), autograd_safe(vn)

    def _positions_for(self, context_length: int) -> Tuple[int, ...]:
        found = self._positions.get(context_length)
        if found is None:
            found = tuple(subject_positions(self.token_index, self.prompt_length, context_length))
            self._positions[context_length] = found
        return found

    def _nested_kv(self, layer: LayerKey, code: int, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens.cond if code == 0 else self.tokens.uncond
        if self.projection != "layer":
            return self._cache.get((layer, code), q.device, q.dtype, lambda: self._project(layer, tokens))
        # the layer's own weights: made again when a weight tensor is replaced (a LoRA applied
        # after this node, or removed); weakrefs, so an old weight is never kept alive
        module = self.modules[layer]
        wk, wv = module.to_k.weight, module.to_v.weight
        key = (layer, code, str(q.device), q.dtype)
        hit = self._layer_kv.get(key)
        if hit is None or hit[0]() is not wk or hit[1]() is not wv:
            k, v = self._project(layer, tokens)
            hit = (weakref.ref(wk), weakref.ref(wv), (k.to(device=q.device, dtype=q.dtype), v.to(device=q.device, dtype=q.dtype)))
            self._layer_kv[key] = hit
        return hit[2]

    def _project(self, layer: LayerKey, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.projection == "layer":
                module = self.modules[layer]
                k_lin, v_lin = module.to_k, module.to_v
                w = k_lin.weight
                t = tokens.to(device=w.device, dtype=w.dtype)
                return F.linear(t, w, getattr(k_lin, "bias", None)), F.linear(t, v_lin.weight, getattr(v_lin, "bias", None))
            k_name, v_name = PROJECTIONS[self.projection]
            weights = self.adapter.layer(layer)
            wk, wv = weights[k_name], weights[v_name]
            work = torch.float64 if torch.float64 in (wk.dtype, tokens.dtype) else torch.float32
            t = tokens.to(device=wk.device, dtype=work)
            return F.linear(t, wk.to(work)), F.linear(t, wv.to(work))
