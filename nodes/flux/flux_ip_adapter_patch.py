"""XLabs' Flux IP-Adapter on a ComfyUI Flux MODEL: a ``patches_replace["dit"]`` replace per double block.

Where the official code adds the image prompt (adapters/flux/flux_ip_adapter.py) is *after* the whole
double block (after its MLP), with queries taken *before* RoPE, so this is not a stage of the DiT
dispatcher (whose stages act inside the joint attention call, after RoPE): like PuLID-Flux
(nodes/flux/flux_identity_pulid_patch.py), on a clone of the MODEL each ``("double_block", i)`` replace

1. computes the block's image queries from its input ``img`` ``[B, N, C]`` and ``vec`` ``[B, C]`` with
   the block's own ``img_mod``, ``img_norm1``, ``img_attn.qkv`` and query norm (``[B, H, N, D]``),
   before the block runs (blocks may change their inputs in place);
2. runs the block through the replace that was there before (another pack's, or this pack's DiT
   dispatcher), else the original block;
3. adds ``weight * softmax(q K^T / sqrt(D)) V`` to ``out["img"]`` on the active rows.

Rows: cond rows attend to the image's tokens, uncond rows to a black image's (the official negative);
``apply_to`` and the sigma window keep other rows bit for bit; weight 0 installs nothing. Cost per double
block call: one extra modulation + LayerNorm + ``qkv`` on the image tokens and one SDPA over T = 4 keys.
"""

from __future__ import annotations

import torch

from ...adapters.flux.flux_ip_adapter import XLabsFluxIPAdapter, image_prompt_attention
from ...adapters.projectors.id_adapter import IdentityTokens
from ..dispatch.dispatcher import StageSchedule
from ..common.dit_layout import dit_blocks
from .flux_identity_pulid_patch import PuLIDFluxReplace, row_tokens


def image_queries(block: torch.nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """A Flux double block's image queries ``[B, H, N, D]`` (modulated LayerNorm, qkv, query RMS-norm; no RoPE)."""
    mod, _ = block.img_mod(vec)
    x = torch.addcmul(mod.shift, block.img_norm1(img), 1 + mod.scale)
    qkv = block.img_attn.qkv(x)
    b, n = qkv.shape[:2]
    q = qkv.view(b, n, 3, block.num_heads, -1)[:, :, 0].transpose(1, 2)
    return block.img_attn.norm.query_norm(q).to(qkv.dtype)


class FluxIPAdapterReplace(PuLIDFluxReplace):
    """The replace on one double block: PuLID-Flux's row / window / device handling, XLabs' residual.

    ``ca`` is the block's :class:`ImageKeyValue`; ``tokens`` cond / uncond image-prompt tokens ``[1, T, C]``."""

    def __init__(self, block: int, module: torch.nn.Module, kv, tokens: IdentityTokens, schedule: StageSchedule, previous):
        super().__init__("double_block", block, kv, tokens, schedule, previous)
        self.module = module

    def __call__(self, args, extra):
        options = args.get("transformer_options") or {}
        img_in = args["img"]
        rows = self._active_rows(options, img_in.shape[0], img_in.device)
        q = image_queries(self.module, img_in, args["vec"]) if rows is not None else None
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        if q is None:
            return out
        img = out["img"]
        prompt = row_tokens(self.tokens, options.get("cond_or_uncond") or [0], img.shape[0]).to(img.device, img.dtype)
        new = img + self.schedule.weight * image_prompt_attention(self._ca_for(img), q.to(img.dtype), prompt).to(img.dtype)
        if rows is not True:
            new = torch.where(rows, new, img)
        out = dict(out)
        out["img"] = new
        return out


def apply_flux_ip_adapter(model_patcher, adapter: XLabsFluxIPAdapter, tokens: IdentityTokens, schedule: StageSchedule):
    """A clone of the Flux ``model_patcher`` with the image prompt after every double block (upstream untouched).

    tokens: cond / uncond ``[1, T, C]`` from ``adapter.tokens``; the caller checks the family and ``adapter.check_model``."""
    m = model_patcher.clone()
    if schedule.weight == 0:
        return m  # nothing that runs
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for b in dit_blocks(model_patcher):
        if b.kind != "double_block":
            continue
        i = b.key[1]
        m.set_model_patch_replace(FluxIPAdapterReplace(i, b.module, adapter.blocks[i], tokens, schedule, existing.get(b.key)), "dit", b.key[0], i)
    return m
