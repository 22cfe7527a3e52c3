"""Two stages that exist only to be measured: they bracket what a mechanism can cost.

- :class:`PassThroughStage` returns ``out`` unchanged: timing it measures the
  dispatcher itself (slot lookup, sigma read, stage loop), the overhead an
  artist pays for every stacked node before any mechanism does arithmetic.
- :class:`MinimalDecoupledStage` is the smallest IP-Adapter-style patch,
  ``out + w * attention(q, K_id, V_id)``, with the identity K/V projected once
  per layer/device/dtype/chunk layout and cached, one host attention call and
  one fused add per layer. It is the "minimal decoupled patch" of DESIGN.md's
  field comparison (1.06x SD1.5 / 1.11x SDXL on an H100), written with the
  pack's dispatcher API.
"""

from __future__ import annotations

from typing import Optional

import torch

from .host_setup import pack

_dispatcher = pack("nodes.dispatch.dispatcher")
_id_adapter = pack("adapters.projectors.id_adapter")


class PassThroughStage(_dispatcher.AttentionStage):
    """A stage with no effect: ``forward`` returns ``out`` as it came."""

    label = "pass-through (benchmark)"

    def forward(self, call, out, region):
        return out


class MinimalDecoupledStage(_dispatcher.AttentionStage):
    """``out + w * softmax(q K_id^T / sqrt(d)) V_id`` at every attn2 layer.

    adapter: an ID_ADAPTER with per-layer ``to_k`` / ``to_v`` ``[C, D]``;
    tokens: IdentityTokens, cond / uncond ``[1, T, D]``.
    K_id / V_id per row (``[B, T, C]``) are made once per (layer, device, dtype,
    chunk layout) and reused every step.
    """

    label = "minimal decoupled (benchmark)"

    def __init__(self, schedule, adapter, tokens):
        super().__init__(schedule)
        self.adapter = adapter
        self.tokens = tokens
        self._cache = _id_adapter.DeviceCache()

    def _key_value(self, call):
        def make():
            weights = self.adapter.layer(call.layer)
            per_chunk = {
                code: (t[0] @ weights["to_k"].float().T, t[0] @ weights["to_v"].float().T)  # [T, C] each
                for code, t in ((0, self.tokens.cond), (1, self.tokens.uncond))
            }
            n = call.rows_per_chunk
            k = torch.stack([per_chunk[c][0] for c in call.chunks for _ in range(n)])
            v = torch.stack([per_chunk[c][1] for c in call.chunks for _ in range(n)])
            return k, v

        key = (call.layer, tuple(call.chunks), call.rows_per_chunk)
        return self._cache.get(key, call.q.device, call.q.dtype, make)

    def forward(self, call, out, region: Optional[torch.Tensor]):
        k, v = self._key_value(call)
        identity = call.branch_attention(call.q, k, v)
        if region is None:
            return torch.add(out, identity, alpha=self.schedule.weight)
        return _dispatcher.add_in_region(out, identity * self.schedule.weight, region)
