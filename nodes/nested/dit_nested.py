"""*Apply nested attention* on a Flux MODEL: the subject token's value, per image query, from the identity.

Nested Attention (adapters/attention/nested_attention.py, Eq. 1-3) replaces, per query, the value of the
subject token ``s`` of the prompt by a nested attention over subject features, keys unchanged::

    v*_q = softmax(q Kn^T / sqrt(d)) Vn,      out_q' = out_q + w r a_S(q) (v*_q - V[s])

(``a_S(q)``: the query's attention probability on the subject's positions, per head). In a Flux
joint block (nodes/common/dit_layout.py) the text side of the joint attention stands where UNet
cross-attention's context stood, so per block and *image* query:

- the outer attention is the joint softmax over ``[txt; img]`` (the block's own ``q``/``k``/``v``
  after norms and RoPE); ``a_S`` is the image query's probability on the subject's text
  columns in that joint softmax; ``V[s]`` the block's value of the subject token;
- ``Kn`` / ``Vn``: the identity tokens through the block's text-side projections (``txt_in``,
  modulation, norm, ``qkv``, key norm; position 0, as every text token), i.e. the paper's nested
  keys and values made as the block would make them for words: the training-free ``layer``
  projection of the UNet node. The ``adapter`` / ``nested`` projections hold weights per UNet
  cross-attention layer and are refused on Flux; the tokens must be as wide as the text
  context (4096 for Flux.1);
- text queries (prompt tokens attending to each other and to the image) keep their output: the
  paper changes what the *image* reads from the subject word;
- ``r``: the MASK at the image token's 2x2 patch (reference-latent tokens: 0).

Subject position: an index into the text tokens Flux attends over. *last prompt token* finds it
with the CLIP's tokenizer in the encoder whose tokens become the context: ``t5xxl`` when the
CLIP has it (Flux.1's context is T5's; T5 has no start token), else its only encoder; every copy
of the prompt is covered when ComfyUI repeated it to batch it with a longer negative prompt.
*token index* takes the position as given (counted in those tokens, from 0) with no repeat
handling (Flux.1's T5 prompts are padded to 256 tokens, so cond and uncond rarely differ).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.attention.nested_attention import subject_positions
from ..dispatch.dispatcher import StageSchedule
from ..dispatch.dit_dispatcher import DitCall, DitStage, apply_dit_stage
from ..common.dit_layout import FAMILY_NAMES, context_width, dit_family, identity_hidden, identity_key_value
from ..common.errors import IdentityAttentionError


class DitNestedAttentionStage(DitStage):
    """tokens: cond/uncond subject features ``[1, T, context]``; hidden: ``tokens -> txt_in(tokens)``;
    token_index / prompt_length: the subject's position and the prompt's context length (0: unknown)."""

    def __init__(self, schedule: StageSchedule, tokens: IdentityTokens, hidden, token_index: int, prompt_length: int = 0, label: str = "Apply nested attention (Flux)"):
        super().__init__(schedule)
        self.tokens = tokens
        self.hidden = hidden
        self.token_index = int(token_index)
        self.prompt_length = int(prompt_length)
        self.label = label
        self._hidden_cache: Dict[tuple, torch.Tensor] = {}
        self._positions: Dict[int, Tuple[int, ...]] = {}
        self._hot: Dict[tuple, torch.Tensor] = {}

    def positions(self, text_tokens: int) -> Tuple[int, ...]:
        found = self._positions.get(text_tokens)
        if found is None:
            found = self._positions[text_tokens] = tuple(subject_positions(self.token_index, self.prompt_length, text_tokens))
        return found

    def _hot_values(self, call: DitCall, positions) -> torch.Tensor:
        """``[1, 1, L, D]``: 1 on the subject's columns of the joint keys (cached per layout)."""
        columns, d = call.k.shape[2], call.k.shape[3]
        key = (columns, positions, call.k.device, call.k.dtype)
        hot = self._hot.get(key)
        if hot is None:
            e = torch.zeros(columns, dtype=call.k.dtype)
            e[list(positions)] = 1.0
            hot = self._hot[key] = e.to(call.k.device).view(1, 1, columns, 1).expand(1, 1, columns, d)
        return hot

    def _subject_hidden(self, call: DitCall) -> torch.Tensor:
        rows = {}
        for code in set(call.chunks):
            key = (code, call.q.device, call.vec.dtype)
            found = self._hidden_cache.get(key)
            if found is None:
                tokens = self.tokens.cond if code == 0 else self.tokens.uncond
                found = self._hidden_cache[key] = self.hidden(tokens).to(device=call.q.device, dtype=call.vec.dtype)
            rows[code] = found
        return call.per_row(rows)

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        m = call.text_tokens
        positions = self.positions(m)
        if not positions:  # a shape, not a tensor value: no host sync
            raise IdentityAttentionError(
                f"the subject token index {self.token_index} is past the end of the prompt ({m} tokens), so nested attention would do nothing",
                node=self.label, input_name="token_index", fix="set subject to 'last prompt token' (with clip and prompt), or give an index inside the prompt",
            )
        q_img = call.q[:, :, m:]
        kn, vn = identity_key_value(call.block, self._subject_hidden(call), call.vec, call.heads)
        nested = F.scaled_dot_product_attention(q_img, kn.to(q_img.dtype), vn.to(q_img.dtype))  # v*_q [B, H, N, D]
        hot = self._hot_values(call, positions).expand(call.batch, call.heads, -1, -1)
        a = F.scaled_dot_product_attention(q_img, call.k, hot)  # a_S(q) in every channel
        s = positions[0]  # every copy holds the same token
        delta = (a * (nested - call.v[:, :, s : s + 1])).transpose(1, 2).reshape(out.shape[0], q_img.shape[2], -1).to(out.dtype)
        scale = self.schedule.weight if region is None else region.to(out.dtype) * self.schedule.weight
        return torch.cat([out[:, :m], out[:, m:] + delta * scale], dim=1)


def flux_subject_token(clip, prompt: str) -> Tuple[int, int]:
    """``(index, prompt_length)`` of the last prompt token in the tokens that become Flux's context."""
    from ...adapters.attention import prompt_tokens
    from ..common.prompt_encoding import tokenize

    tokens = tokenize(clip, prompt)
    sections = tokens["t5xxl"] if "t5xxl" in tokens else tokens[sorted(tokens)[0]]
    return prompt_tokens.last_prompt_token(sections), prompt_tokens.flatten_count(sections)


def apply_nested_dit(model, adapter, identity, kind: str, subject: str, token_index, weight, start_percent, end_percent, apply_to, references, mask, clip, prompt, node: str):
    """The node's Flux path (projection name and adapter kind checked by the node); returns the patched clone."""
    from ..common.identity_token_inputs import identity_tokens
    from ..dispatch.stage_inputs import build_schedule

    family = FAMILY_NAMES[dit_family(model)]
    if kind != "layer":
        raise IdentityAttentionError(
            f"this projection's weights are made per UNet cross-attention layer; {family} has none to load them into",
            node=node, input_name="projection", fix="choose \"model's own K/V (training-free)\" on Flux (each block's own text projections)",
        )
    if subject == "token index":
        index, length = int(token_index), 0
    else:
        if clip is None or not prompt.strip():
            raise IdentityAttentionError(
                "'last prompt token' needs the CLIP and the prompt text to find where the prompt ends",
                node=node, input_name="prompt", fix="connect the CLIP and type (or link) the positive prompt, or set subject to 'token index'",
            )
        try:
            index, length = flux_subject_token(clip, prompt)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="prompt", fix="give the positive prompt text") from err
    schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
    tokens = identity_tokens(adapter, identity, references == "per_reference", node)
    width = context_width(model)
    if tokens.dim != width:
        raise IdentityAttentionError(
            f"the adapter's tokens are {tokens.dim} wide but this {family} model's text context is {width} wide",
            node=node, input_name="adapter", fix=f"use an adapter whose tokens are {width} wide (made for {family}'s text encoder)",
        )
    stage = DitNestedAttentionStage(schedule, tokens, lambda t: identity_hidden(model, t), index, length, label=f"{node} ({family}, token {index}, layer projections)")
    return apply_dit_stage(model, stage, node=node)
