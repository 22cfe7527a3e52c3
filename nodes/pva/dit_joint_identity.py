"""Joint identity attention on Flux (PVA's idea on a DiT): identity tokens join the text side.

At every double and single block, the image queries attend over ``[txt; img; id]`` in one
softmax, where the identity keys/values are the block's own text-side projections of the
identity tokens (nodes/common/dit_layout.py: position 0, key-norm applied, not queries). ``weight``
is PVA's odds multiplier on the identity columns, as on UNets::

    out_img = softmax([q K_joint^T, q K_id^T + log w] / sqrt(D)) [V_joint; V_id]

(``log w`` added after scaling; w = 0 removes the identity, w = 1 is plain joint attention).
Text queries keep their unpatched output. With a MASK, image tokens blend linearly between
the unpatched and the joint output by the mask's value at their 2x2 patch. Rows of chunks
the stage does not apply to (cond/uncond) keep the unpatched output bit for bit (the
dispatcher selects them); weight 0 installs nothing that runs.

Cost per block call: one ``txt_in`` (cached per stage, device, dtype), one modulation + norm +
qkv on T identity tokens per row, one fused SDPA over the image queries.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage
from ..common.dit_layout import identity_key_value


class DitJointIdentityStage(DitStage):
    """PVA joint attention to identity tokens inside Flux's joint attention.

    tokens: cond / uncond identity tokens ``[1, T, context]`` (the text context's width);
    hidden: a function ``tokens -> txt_in(tokens)`` (the model's own input projection).
    """

    def __init__(self, schedule: StageSchedule, tokens: IdentityTokens, hidden, label: str = "joint identity attention (Flux)"):
        super().__init__(schedule)
        self.tokens = tokens
        self.hidden = hidden
        self.label = label
        self._hidden_cache: Dict[tuple, torch.Tensor] = {}

    def _hidden(self, code: int, device, dtype) -> torch.Tensor:
        key = (code, device, dtype)
        found = self._hidden_cache.get(key)
        if found is None:
            tokens = self.tokens.cond if code == 0 else self.tokens.uncond
            found = self.hidden(tokens).to(device=device, dtype=dtype)
            self._hidden_cache[key] = found
        return found

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        hidden = call.per_row({c: self._hidden(c, q.device, call.vec.dtype) for c in set(call.chunks)})
        k_id, v_id = identity_key_value(call.block, hidden, call.vec, call.heads)
        m = call.text_tokens
        q_img = q[:, :, m:]
        keys = torch.cat([k, k_id.to(k.dtype)], dim=2)
        values = torch.cat([v, v_id.to(v.dtype)], dim=2)
        bias = None
        if self.schedule.weight != 1.0:
            bias = torch.zeros(1, 1, 1, keys.shape[2], device=q.device, dtype=q.dtype)
            bias[..., k.shape[2]:] = math.log(self.schedule.weight) if self.schedule.weight > 0 else float("-inf")
        joint = torch.nn.functional.scaled_dot_product_attention(q_img, keys, values, attn_mask=bias)  # [B, H, N, D]
        joint = joint.transpose(1, 2).reshape(q.shape[0], q_img.shape[2], -1).to(out.dtype)
        image = out[:, m:]
        if region is not None:
            joint = torch.lerp(image, joint, region.to(out.dtype))
        return torch.cat([out[:, :m], joint], dim=1)
