"""*Apply CA² gate* on a Flux MODEL: the original photo as a decoupled condition, gated by text share.

CA² (adapters/attention/ca2_gate.py, Eq. 3-6) adds a visual cross-attention to the text attention and
turns it down, inside the edit mask, where the text drives the pixel::

    Z = F_txt + w (1 - Score ⊙ M) softmax(Q K_vis^T / sqrt(d)) V_vis

In a Flux joint block (nodes/common/dit_layout.py) the text side of the joint attention stands where
UNet cross-attention's context stood, so per block and image query:

- ``F_txt`` is the image tokens' joint attention output over ``[txt; img]`` (what the block
  computes anyway, or what earlier stages made of it); text queries keep their output;
- ``K_vis`` / ``V_vis``: the adapter's tokens of the original photo (its CLIP-vision features
  through the adapter's token projector), projected as a text token of that block would be
  (``txt_in``, the block's text-side modulation, norm, ``qkv``, key norm, position 0), exactly
  like joint identity attention's identity tokens. The adapter's own ``to_k`` / ``to_v`` are
  trained for UNet cross-attention widths, so a Flux block has no place for them; the tokens
  must be as wide as the text context (4096 for Flux.1). The visual branch has its own softmax
  (decoupled), as in the paper;
- ``Score`` (training-free; the paper's score MLP is per UNet layer and is refused on Flux): the
  *text share* of the image query's joint attention, heads averaged::

      Score = mean_h sum_{j < M} softmax(q_img [K_txt; K_img]^T / sqrt(D))_j      in [0, 1]

  On UNets the score is the attention mass on the prompt's content tokens (all but CLIP's start
  tokens, text_attention_mass.py); Flux's text is T5 (no start-token sink), and the joint
  softmax also covers the image tokens, so "how much this pixel listens to the text rather than
  to the picture" is the share on all M text columns. It is a probability on a fixed scale, so
  ``score_scale`` reads it as on UNets (fixed: as is; per step: min-max per image), then
  ``sharpness`` applies;
- ``M``: the edit mask at the 2x2 patch grid (0 on Kontext reference-latent tokens, so the photo
  conditions them at full strength, as outside the mask).

Weight 0: the dispatcher skips the stage (unpatched bit for bit). The schedule has no mask (the
edit mask only decides where the score may suppress the photo). Scores of the cond rows are
recorded per step and block for *Inspect CA² scores* (one sigma read per model call).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ...adapters.attention.ca2_gate import scaled_mass, sharpen, visual_gate
from ...adapters.attention.text_attention_mass import mass_from_heads
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage
from ..common.dit_layout import FAMILY_NAMES, context_width, dit_family, identity_hidden, identity_key_value
from ..common.errors import IdentityAttentionError
from ..dispatch.step_recorder import StepRecorder

_COND, _UNCOND = 0, 1


def text_share(q_img: torch.Tensor, k: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """``[B, N]`` float32: heads-averaged share of each image query's joint attention on the text.

    q_img ``[B, H, N, D]``, k ``[B, H, M+N', D]`` (text first). One fused SDPA whose values are
    the text indicator (repeated to the head width: fused kernels need one width).
    """
    b, h, _, d = q_img.shape
    columns = k.shape[2]
    indicator = (torch.arange(columns, device=k.device) < text_tokens).to(q_img.dtype)
    values = indicator.reshape(1, 1, columns, 1).expand(b, h, columns, d)
    return mass_from_heads(F.scaled_dot_product_attention(q_img, k, values)[..., 0])


class DitCA2GateStage(DitStage):
    """tokens_cond ``[R, T, context]`` (R = 1 or one per image), tokens_uncond ``[1, T, context]``,
    hidden: ``tokens -> txt_in(tokens)``, edit_mask ``[Bm, H, W]``."""

    def __init__(self, schedule: StageSchedule, tokens_cond, tokens_uncond, hidden, edit_mask, sharpness: float = 1.0, score_scale: str = "fixed", label: str = "Apply CA² gate (Flux)"):
        super().__init__(schedule)
        self.tokens = {_COND: tokens_cond, _UNCOND: tokens_uncond}
        self.hidden = hidden
        self.edit_mask = edit_mask
        self.sharpness = float(sharpness)
        self.score_scale = score_scale
        self.label = label
        self.recorder = StepRecorder()
        self._hidden_cache: Dict[tuple, torch.Tensor] = {}
        self._edit_cache: dict = {}
        self._sigma = (None, None)  # (the sigmas tensor of the model call, its float)

    def _visual_hidden(self, call: DitCall) -> torch.Tensor:
        """``txt_in`` of the photo's tokens in the call's row order: ``[B, T, C]`` (once per layout)."""
        n = call.batch // len(call.chunks)
        key = (tuple(call.chunks), n, call.q.device, call.vec.dtype)
        found = self._hidden_cache.get(key)
        if found is None:
            rows = []
            for code in call.chunks:
                tokens = self.tokens[code]
                if tokens.shape[0] not in (1, n):
                    raise IdentityAttentionError(
                        f"{tokens.shape[0]} original images were given for a batch of {n}",
                        node=self.label, input_name="image", fix="give one original image, or exactly one per image in the batch",
                    )
                h = self.hidden(tokens).to(device=call.q.device, dtype=call.vec.dtype)
                rows.append(h.expand(n, -1, -1) if h.shape[0] == 1 else h)
            found = self._hidden_cache[key] = torch.cat(rows, dim=0)
        return found

    def score(self, call: DitCall) -> torch.Tensor:
        """``[B, N]`` float32 in [0, 1], sharpened."""
        m = call.text_tokens
        return sharpen(scaled_mass(text_share(call.q[:, :, m:], call.k, m), self.score_scale), self.sharpness)

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        m = call.text_tokens
        q_img = call.q[:, :, m:]
        k_vis, v_vis = identity_key_value(call.block, self._visual_hidden(call), call.vec, call.heads)
        visual = F.scaled_dot_product_attention(q_img, k_vis.to(q_img.dtype), v_vis.to(q_img.dtype))
        visual = visual.transpose(1, 2).reshape(out.shape[0], q_img.shape[2], -1).to(out.dtype)
        score = self.score(call)
        edit = call.image_region(self.edit_mask, self._edit_cache, self.label)
        gate = visual_gate(score, edit.float()).to(out.dtype)  # [B, N, 1]
        image = out[:, m:]
        new = torch.addcmul(image, gate, visual, value=self.schedule.weight)
        if region is not None:
            new = torch.lerp(image, new, region.to(out.dtype))
        self._record(call, score)
        return torch.cat([out[:, :m], new], dim=1)

    def _step_sigma(self, call: DitCall) -> Optional[float]:
        sigmas = call.options.get("sigmas")
        if not torch.is_tensor(sigmas):
            return None if sigmas is None else float(sigmas)
        if self._sigma[0] is not sigmas:  # one read per model call: every block gets the same tensor
            self._sigma = (sigmas, float(sigmas.detach().reshape(-1)[0]))
        return self._sigma[1]

    def _record(self, call: DitCall, score: torch.Tensor) -> None:
        if _COND not in call.chunks:
            return
        grid = call.patch_grid()
        if grid is None:
            return
        gh, gw = grid
        n = call.batch // len(call.chunks)
        i = call.chunks.index(_COND)
        self.recorder.record(self._step_sigma(call), call.block.key, score[i * n : (i + 1) * n, : gh * gw].reshape(n, gh, gw))


def apply_ca2_dit(model, id_adapter, edit_mask, source: str, sharpness, scale: str, weight, start_percent, end_percent, apply_to, features, node: str):
    """The node's Flux path (inputs already checked by the node); returns the patched clone."""
    from ..dispatch.stage_inputs import build_schedule
    from ..common.visual_condition import visual_tokens

    family = FAMILY_NAMES[dit_family(model)]
    if source == "native":
        raise IdentityAttentionError(
            f"the native score predictor is one MLP per UNet cross-attention layer; {family} has no such layers",
            node=node, input_name="score_source", fix="choose 'text attention (training-free)' on Flux",
        )
    tokens_cond, tokens_uncond = visual_tokens(id_adapter, features, node)
    width = context_width(model)
    if tokens_cond.shape[-1] != width:
        raise IdentityAttentionError(
            f"the adapter gives tokens {tokens_cond.shape[-1]} wide, but this {family} model's text context is {width} wide "
            "(on Flux the photo's tokens go through each block's own text projections)",
            node=node, input_name="id_adapter", fix=f"use an image adapter whose tokens are {width} wide (made for {family}'s text encoder)",
        )
    if not (torch.isfinite(tokens_cond).all() and torch.isfinite(tokens_uncond).all()):
        raise IdentityAttentionError("the adapter made non-finite tokens from this image", node=node, input_name="id_adapter", fix="check the adapter file and the image")
    schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, None, node=node)
    stage = DitCA2GateStage(
        schedule, tokens_cond, tokens_uncond, lambda t: identity_hidden(model, t), edit_mask, sharpness, scale,
        label=f"{node} ({family}, text share score, layer projections)",
    )
    return apply_dit_stage(model, stage, node=node)
