"""InstantX's Flux IP-Adapter on a ComfyUI Flux MODEL: a stage of the DiT dispatcher (nodes/dispatch/dit_dispatcher.py).

The official processor adds its image prompt to the attention output *before* the block's output
projection, which is exactly where DiT stages act (they return the joint attention call's output
``[B, M+N, H*D]``, which the block then projects), so this is one :class:`DitStage`:

- double block i (adapter block i): ``out[:, M:] += weight * attn(q_img, K_i, V_i)`` (image rows only;
  the text rows go through ``txt_attn.proj`` untouched, as in the official code);
- single block i (adapter block 19 + i): ``out += weight * attn(q, K, V)`` on every row of ``[txt; img]``.

The queries are the block's own *before* RoPE (the official ``query`` after ``norm_q``): the call's ``q``
has RoPE applied, so the stage recomputes them from the block's input (noted by the dispatcher; the
block changes it only after the attention): modulation, LayerNorm, the qkv projection and the query
RMS-norm, the same modules and order as the host's block. Cost per block call: that recomputation on the
stream and one SDPA over T = 128 keys.

Rows: cond rows attend to the image's tokens, uncond rows to a black image's (see the nodes' docstring);
``apply_to`` and the sigma window keep other rows bit for bit (the dispatcher); weight 0 installs nothing.
"""

from __future__ import annotations

import copy

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.flux.instantx_flux_ip_adapter import InstantXFluxIPAdapter, image_prompt_attention
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage
from ..common.dit_layout import dit_blocks


def double_block_queries(block: torch.nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """A Flux double block's image queries ``[B, H, N, D]`` (modulated LayerNorm, qkv, query RMS-norm; no RoPE)."""
    mod, _ = block.img_mod(vec)
    x = torch.addcmul(mod.shift, block.img_norm1(img), 1 + mod.scale)
    qkv = block.img_attn.qkv(x)
    b, n = qkv.shape[:2]
    q = qkv.view(b, n, 3, block.num_heads, -1)[:, :, 0].transpose(1, 2)
    return block.img_attn.norm.query_norm(q).to(qkv.dtype)


def single_block_queries(block: torch.nn.Module, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """A Flux single block's queries ``[B, H, M+N, D]`` of ``[txt; img]`` (modulated LayerNorm, the q part of
    ``linear1`` (called whole: the host module handles casts and quantized weights), query RMS-norm; no RoPE)."""
    mod, _ = block.modulation(vec)
    h = torch.addcmul(mod.shift, block.pre_norm(x), 1 + mod.scale)
    width = block.hidden_size
    out = block.linear1(h)  # the host's own call: the q slice has the bits the block's attention gets
    b, n = out.shape[:2]
    q = out[..., :3 * width].reshape(b, n, 3, block.num_heads, -1)[:, :, 0].transpose(1, 2)
    return block.norm.query_norm(q).to(out.dtype)


class InstantXFluxStage(DitStage):
    """Adds InstantX's image-prompt attention to every Flux block's attention output (see module docstring)."""

    label = "Apply Flux IP-Adapter (InstantX)"

    def __init__(self, adapter: InstantXFluxIPAdapter, tokens: IdentityTokens, schedule: StageSchedule, n_double: int):
        super().__init__(schedule)
        self.adapter, self.tokens, self.n_double = adapter, tokens, n_double
        self._moved: dict = {}

    def _kv(self, index: int, device, dtype):
        """Block ``index``'s projections on ``device`` / ``dtype`` (a cached copy; the loaded adapter stays as it is)."""
        key = (index, device, dtype)
        kv = self._moved.get(key)
        if kv is None:
            kv = self.adapter.blocks[index]
            p = kv.to_k_ip.weight
            if (p.device, p.dtype) != (device, dtype):
                kv = copy.deepcopy(kv).to(device=device, dtype=dtype)
            self._moved[key] = kv
        return kv

    def forward(self, call: DitCall, out: torch.Tensor, region):
        block = call.block
        x = call.block_input
        if x is None:
            return out  # a host that does not pass the block input: nothing to recompute the queries from
        kind, i = block.key
        double = kind == "double_block"
        q = (double_block_queries if double else single_block_queries)(block.module, x, call.vec)
        tokens = call.per_row({0: self.tokens.cond, 1: self.tokens.uncond}).to(out.device, out.dtype)
        kv = self._kv(self.adapter.block_index(kind, i, self.n_double), out.device, out.dtype)
        extra = self.schedule.weight * image_prompt_attention(kv, q.to(out.dtype), tokens)
        if double:
            m = call.text_tokens
            return torch.cat([out[:, :m], out[:, m:] + extra], dim=1)
        return out + extra


def apply_instantx_flux_ip_adapter(model_patcher, adapter: InstantXFluxIPAdapter, tokens: IdentityTokens, schedule: StageSchedule):
    """A clone of the Flux ``model_patcher`` with the stage (upstream untouched); weight 0: a plain clone."""
    if schedule.weight == 0:
        return model_patcher.clone()  # nothing that runs
    n_double = sum(1 for b in dit_blocks(model_patcher) if b.kind == "double_block")
    return apply_dit_stage(model_patcher, InstantXFluxStage(adapter, tokens, schedule, n_double), node=InstantXFluxStage.label)
