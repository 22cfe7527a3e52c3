"""The dispatcher's DiT path: stages acting inside the joint attention of Flux blocks.

A DiT has no ``attn2`` slot (nodes/common/dit_layout.py describes the token layout), so the UNet
dispatcher cannot own one. Instead one :class:`DitDispatcher` per MODEL clone installs, on a
clone (the upstream MODEL is never changed):

- a ``patches_replace["dit"]`` replace on every ``("double_block", i)`` / ``("single_block", i)``:
  it notes the block, ``vec`` and the text length in the call's ``transformer_options``, then
  runs the block (through the replace another pack installed there before us, if any);
- a ``diffusion_model`` wrapper (``comfy.patcher_extension``) that notes the latent size (for
  masks) and sets ``transformer_options["optimized_attention_override"]`` for this forward,
  chaining the override another pack set, and restores it afterwards.

Per joint attention call (``q, k, v`` ``[B, H, M+N, D]`` after RoPE)::

    out = host attention (or the foreign override)     # exactly the unpatched call
    for stage in stages:                               # in node order
        if inactive (weight 0, outside window, block filtered, no chunk): skip
        out = stage.forward(call, out, region)         # rows of other chunks kept bit for bit
    return out                                         # [B, M+N, H*D]

Hosts without the hook (``optimized_attention_override`` or the ``dit`` replaces) cannot run
the DiT path; :func:`dit_path_available` feature-detects it and nodes refuse with a fix.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ...adapters.attention.spatial import mask_to_tokens
from .dispatcher import PACK_KEY, StageSchedule
from ..common.dit_layout import DitBlock, DitBlockKey, dit_blocks
from ..common.errors import IdentityAttentionError

DIT_KEY = PACK_KEY + "_dit"
"""Our key in ``transformer_options``: the installed DiT dispatcher."""

_BLOCK = "identity_attention_dit_block"  # the DitBlock running now
_VEC = "identity_attention_dit_vec"  # its modulation input [B, C]
_INPUT = "identity_attention_dit_input"  # its stream input: img [B, N, C] (double) / [txt; img] [B, M+N, C] (single)
_TXT_LEN = "identity_attention_dit_txt_len"  # text tokens at the front of the joint sequence
_LATENT_HW = "identity_attention_dit_latent_hw"  # (h, w) of the latent being denoised
_COND = 0


def dit_path_available() -> bool:
    """Whether the host routes attention through ``optimized_attention_override`` and has wrappers."""
    try:
        import comfy.ldm.modules.attention as attention
        import comfy.patcher_extension as ext
    except ImportError:
        return False
    return hasattr(attention, "wrap_attn") and hasattr(ext, "WrappersMP") and hasattr(ext.WrappersMP, "DIFFUSION_MODEL")


class DitCall:
    """One joint attention call as stages see it.

    q, k, v: ``[B, H, L, D]`` (L = M text + N image tokens, RoPE applied); block: the running
    :class:`DitBlock`; vec ``[B, C]``; chunks: ComfyUI's ``cond_or_uncond`` (0 cond, 1 uncond).
    """

    def __init__(self, q, k, v, options: dict):
        self.q, self.k, self.v = q, k, v
        self.options = options
        self.block: DitBlock = options[_BLOCK]
        self.vec: torch.Tensor = options[_VEC]
        self.block_input: Optional[torch.Tensor] = options.get(_INPUT)  # unchanged until the block adds its residuals
        self.text_tokens = int(options[_TXT_LEN])
        self.chunks = list(options.get("cond_or_uncond") or [_COND])
        self.heads = q.shape[1]
        self.host_out: Optional[torch.Tensor] = None  # the unpatched call's output [B, L, H*D] (set by the dispatcher)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def image_tokens(self) -> int:
        return self.q.shape[2] - self.text_tokens

    def row_mask(self, keep: Sequence[bool], cache: dict) -> torch.Tensor:
        """``[B, 1, 1]`` bool: the rows of the kept chunks (made once per batch layout: a host copy)."""
        n = self.batch // len(self.chunks)
        key = (tuple(keep), n, self.q.device)
        rows = cache.get(key)
        if rows is None:
            rows = torch.tensor([kept for kept in keep for _ in range(n)], device=self.q.device).view(-1, 1, 1)
            cache[key] = rows
        return rows

    def per_row(self, values: Dict[int, torch.Tensor]) -> torch.Tensor:
        """Chunk code -> ``[1, ...]`` tensors, stacked to ``[B, ...]`` in this call's row order."""
        n = self.batch // len(self.chunks)
        return torch.cat([values[c].expand(n, *values[c].shape[1:]) for c in self.chunks], dim=0)

    def patch_grid(self) -> Optional[Tuple[int, int]]:
        """``(rows, columns)`` of the 2x2 patch grid of the latent being denoised (None: unknown)."""
        hw = self.options.get(_LATENT_HW)
        return None if hw is None else ((hw[0] + 1) // 2, (hw[1] + 1) // 2)

    def image_region(self, mask: torch.Tensor, cache: dict, node: str) -> torch.Tensor:
        """A ``[Bm, H, W]`` MASK at the image tokens: ``[B, N, 1]`` (0 on reference-latent tokens)."""
        hw = self.options.get(_LATENT_HW)
        if hw is None:
            raise IdentityAttentionError("the latent size is unknown, so the mask cannot be placed", node=node, input_name="mask")
        grid = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)  # Flux's 2x2 patches over the padded latent
        key = (id(mask), grid, self.q.device, self.q.dtype)
        tokens = cache.get(key)
        if tokens is None:
            tokens = mask_to_tokens(mask, grid).to(device=self.q.device, dtype=self.q.dtype)
            cache[key] = tokens
        per_chunk = self.batch // len(self.chunks)
        if tokens.shape[0] == 1:
            tokens = tokens.expand(self.batch, -1, -1)
        elif tokens.shape[0] == per_chunk:
            tokens = tokens.repeat(len(self.chunks), 1, 1)
        else:
            raise IdentityAttentionError(
                f"the mask has {tokens.shape[0]} frames but the latent batch has {per_chunk} images",
                node=node, input_name="mask", fix="give one mask for all images, or exactly one mask per image in the batch",
            )
        extra = self.image_tokens - tokens.shape[1]
        return torch.nn.functional.pad(tokens, (0, 0, 0, extra)) if extra > 0 else tokens


class DitStage:
    """Base class of a mechanism's contribution to every joint attention call of a DiT."""

    label = "stage"

    def __init__(self, schedule: StageSchedule):
        self.schedule = schedule
        self._region_cache: dict = {}

    def __deepcopy__(self, memo):
        return self

    def is_active(self, call: DitCall) -> bool:
        s = self.schedule
        return s.weight != 0.0 and (s.layers is None or call.block.key in s.layers)

    def region(self, call: DitCall) -> Optional[torch.Tensor]:
        """The MASK at the image tokens ``[B, N, 1]``, or None for everywhere."""
        mask = self.schedule.mask
        return None if mask is None else call.image_region(mask, self._region_cache, self.label)

    def forward(self, call: DitCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        """The new attention output ``[B, L, H*D]`` (all rows; the dispatcher keeps other chunks')."""
        raise NotImplementedError


def _accepts_kwarg(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


class DitDispatcher:
    """Owns our DiT hooks on one MODEL clone; runs the stages in order (see module docstring).

    fallbacks: per block key, the ``dit`` replace another pack installed before us.
    """

    identity_attention_dit_dispatcher = True

    def __init__(self, stages: Tuple[DitStage, ...], fallbacks: Dict[DitBlockKey, Callable], blocks: Dict[DitBlockKey, DitBlock]):
        self.stages = tuple(stages)
        self.fallbacks = dict(fallbacks)
        self.blocks = dict(blocks)
        self._row_masks: dict = {}

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    # --- the diffusion_model wrapper --------------------------------------------------------
    def wrapper(self, executor, x, *args, **kwargs):
        options = kwargs.get("transformer_options")
        if options is None and args:
            options = args[-1] if isinstance(args[-1], dict) else None
        if options is None:
            return executor(x, *args, **kwargs)
        foreign = options.get("optimized_attention_override")
        saved = {k: options.get(k) for k in ("optimized_attention_override", _LATENT_HW)}
        options[_LATENT_HW] = (int(x.shape[-2]), int(x.shape[-1]))
        options["optimized_attention_override"] = lambda func, *a, **kw: self.attention(foreign, func, *a, **kw)
        try:
            return executor(x, *args, **kwargs)
        finally:
            for k, v in saved.items():
                if v is None:
                    options.pop(k, None)
                else:
                    options[k] = v

    # --- the dit block replace ---------------------------------------------------------------
    def block_replace(self, key: DitBlockKey) -> Callable:
        def replace(args, extra):
            options = args.get("transformer_options")
            if options is not None:
                options[_BLOCK] = self.blocks[key]
                options[_VEC] = args["vec"]
                options[_INPUT] = args.get("img")
                if key[0] == "double_block":
                    options[_TXT_LEN] = args["txt"].shape[1]
            try:
                fallback = self.fallbacks.get(key)
                return fallback(args, extra) if fallback is not None else extra["original_block"](args)
            finally:
                if options is not None:
                    options.pop(_BLOCK, None)
                    options.pop(_INPUT, None)

        replace.identity_attention_dit_replace = self
        return replace

    # --- the attention override ----------------------------------------------------------------
    def attention(self, foreign, func, q, k, v, heads, *args, **kwargs):
        out = foreign(func, q, k, v, heads, *args, **kwargs) if foreign is not None else func(q, k, v, heads, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        if options.get(_BLOCK) is None or q.dim() != 4 or kwargs.get("skip_output_reshape"):
            return out  # not a joint block call we know the layout of (e.g. another module's attention)
        call = DitCall(q, k, v, options)
        call.host_out = out  # before any stage: mixture-of-attention's prior
        sigmas = options.get("sigmas")
        for stage in self.stages:
            if not stage.is_active(call):
                continue
            window = stage.schedule.window(sigmas)
            if window is False:
                continue
            keep = [stage.schedule.applies_to_chunk(code) for code in call.chunks]
            if not any(keep):
                continue
            new = stage.forward(call, out, stage.region(call))
            if not all(keep):
                new = torch.where(call.row_mask(keep, self._row_masks), new, out)  # other chunks' rows: exactly as before
            out = new if window is True else torch.where(window.reshape(1, 1, 1), new, out)
        return out


def is_dit_dispatcher(obj) -> bool:
    return getattr(obj, "identity_attention_dit_dispatcher", False) is True


def installed_dit_dispatcher(model_patcher) -> Optional[DitDispatcher]:
    found = model_patcher.model_options.get("transformer_options", {}).get(DIT_KEY)
    return found if is_dit_dispatcher(found) else None


def apply_dit_stage(model_patcher, stage: DitStage, node: str = ""):
    """A clone of ``model_patcher`` with ``stage`` appended to its DiT dispatcher."""
    import comfy.patcher_extension as ext

    blocks = dit_blocks(model_patcher)
    if not blocks:
        raise IdentityAttentionError("this MODEL has no DiT blocks this pack knows", node=node or stage.label, input_name="model", fix="use a Flux.1 model")
    if not dit_path_available():
        raise IdentityAttentionError(
            "this ComfyUI has no attention override hook, which the Flux path needs",
            node=node or stage.label, input_name="model", fix="update ComfyUI (0.3.60 or newer)",
        )
    m = model_patcher.clone()
    previous = installed_dit_dispatcher(m)
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    fallbacks: Dict[DitBlockKey, Callable] = {}
    for block in blocks:
        current = replace.get(block.key)
        owner = getattr(current, "identity_attention_dit_replace", None)
        if owner is not None:
            if owner.fallbacks.get(block.key) is not None:
                fallbacks[block.key] = owner.fallbacks[block.key]
        elif current is not None:
            fallbacks[block.key] = current
    stages = (previous.stages if previous is not None else ()) + (stage,)
    dispatcher = DitDispatcher(stages, fallbacks, {b.key: b for b in blocks})
    for block in blocks:
        m.set_model_patch_replace(dispatcher.block_replace(block.key), "dit", block.key[0], block.key[1])
    # one wrapper per MODEL: replace the previous dispatcher's (a clone's wrapper lists are its own)
    wrappers = m.wrappers.get(ext.WrappersMP.DIFFUSION_MODEL, {})
    if DIT_KEY in wrappers:
        wrappers[DIT_KEY] = []
    m.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, DIT_KEY, dispatcher.wrapper)
    m.model_options["transformer_options"][DIT_KEY] = dispatcher  # set_model_patch_replace made a new dict
    return m
