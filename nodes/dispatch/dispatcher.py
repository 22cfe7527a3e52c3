"""The attention dispatcher: one owner per attn2 slot, an ordered list of stages.

Every mechanism node of this pack adds one *stage* to a MODEL. Stages are not
installed as separate patches: one :class:`AttentionDispatcher` per MODEL clone
owns all our attn2 ``patches_replace`` slots and runs its stages in the order
the nodes were applied. Applying a node clones the MODEL and installs a new
dispatcher with one more stage (``stages`` is a tuple, dispatchers are
immutable), so the upstream MODEL is never changed and graphs can branch.

Per attn2 call (``q, k, v`` already projected by the layer, ``[B, N, H*D]``)::

    out = text attention            # the slot's previous (foreign) replace if any,
                                    # else the host's optimized_attention, exactly
                                    # (or, see below, the first stage's forward_first)
    for stage in stages:            # in node order
        if stage inactive here (weight 0, sigma outside its window, layer filtered,
                                    no batch chunk it applies to): skip
        rows   = batch chunks the stage applies to (cond / uncond / both)
        region = its MASK resized to this layer's token grid, [b, N, 1] (or None)
        out[rows] = stage.forward(call[rows], out[rows], region)
    return out                      # the layer applies to_out

A stage with ``region`` must leave ``out`` unchanged where ``region`` is 0
(helpers :func:`add_in_region` and :func:`blend_in_region` do that exactly).
With no active stage the dispatcher returns the unpatched computation bit for
bit.

The first active stage may skip the text attention altogether
(:meth:`AttentionStage.forward_first`): joint attention (PVA) is one attention
call over ``[text; identity]`` keys, so computing the text attention first and
then the identity part would cost two. Later stages that need the plain text
attention (a router's prior, PuLID's projection) still get it from
``call.text_attention()``, computed on first use. A stage that sets
``forward_first_on_chunks`` gets that single call also when it applies to some
chunks only (e.g. the positive prompt's), through
:meth:`AttentionStage.forward_first_rows`: by default the stage's ``forward_first``
on its rows, the other rows keeping the host's text attention of the whole batch
(the unpatched rows bit for bit); PVA joint instead runs ONE call over the whole
batch whose other rows see no identity (equal to the unpatched rows up to float
rounding, one attention call per layer instead of two and a merge).

A patch another pack installed in a slot before ours (3-tuple key, or the
2-tuple block-wide key) is kept as that slot's *fallback*: it computes the
text attention our stages build on, so it still runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ...adapters.attention.attention_core import fused_attention
from ...adapters.attention.spatial import mask_to_tokens, token_grid
from ..common.errors import IdentityAttentionError
from ..common.sampling_scope import sampling_cache
from ..common.step_sigma import install_step_sigma, step_sigma
from ..common.host import (
    LayerInfo,
    LayerKey,
    SigmaReader,
    activations_hw,
    cross_attention_layers,
    host_attention,
    latent_hw,
    layer_key_of,
)

PACK_KEY = "identity_attention"
"""Our key in ``model_options["transformer_options"]``: the installed dispatcher."""

HIDDEN_STATES_KEY = "identity_attention_hidden_states"
"""Where the attn2_patch stash puts the layer's pre-projection hidden states."""

CONTEXT_KEY = "identity_attention_context"
"""Where the same stash puts the raw text context ``to_k`` receives (``[B, M, Ct]``)."""

VALUE_KEY = "identity_attention_value"
"""Where the same stash puts what ``to_v`` receives (the context, unless an attn2_patch changed it)."""

APPLY_TO_CHOICES = ("both", "cond", "uncond")
_COND, _UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


@dataclass(frozen=True)
class StageSchedule:
    """When and where a stage acts. Built by nodes from the standard inputs.

    weight:       the mechanism's strength; 0 makes the stage a no-op.
    sigma_start:  active while sigma <= sigma_start (``inf`` = from the first step).
    sigma_end:    ... and sigma >= sigma_end (``0`` = to the last step).
    apply_to:     "both", "cond" (positive prompt only) or "uncond" (negative only).
    mask:         ``[Bm, H, W]`` in [0, 1], pixel space, or None for everywhere.
    layers:       restrict to these layer keys (None = every cross-attention layer).
    """

    weight: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    apply_to: str = "both"
    mask: Optional[torch.Tensor] = None
    layers: Optional[frozenset] = None

    def __post_init__(self):
        if self.apply_to not in APPLY_TO_CHOICES:
            raise ValueError(f"apply_to must be one of {APPLY_TO_CHOICES}, got {self.apply_to!r}")

    @property
    def full_window(self) -> bool:
        return self.sigma_start == math.inf and self.sigma_end <= 0.0

    def active_at(self, sigma: Optional[float]) -> bool:
        if sigma is None or self.full_window:
            return True
        return self.sigma_end <= sigma <= self.sigma_start

    def window_in(self, extra_options: dict) -> Union[bool, torch.Tensor]:
        """This step's window for an attn2 call: a Python bool, free, from the sigma the
        :class:`~.step_sigma.StepSigmaWrapper` read once for the step; without that
        wrapper (a foreign one replaced it), :meth:`window` of the call's sigmas."""
        if self.full_window:
            return True  # never needs the sigma
        sigma = step_sigma(extra_options)
        if sigma is not None:
            return self.active_at(sigma)
        return self.window(extra_options.get("sigmas"))

    def window(self, sigmas) -> Union[bool, torch.Tensor]:
        """Whether the current step is inside the window, without waiting for the GPU.

        ``sigmas`` is ``extra_options["sigmas"]``. Returns a Python bool when that
        is free to decide (full window, no sigma, a CPU tensor); for a sigma on an
        accelerator, a ``[1]`` bool tensor on that device, so the dispatcher
        selects with ``torch.where`` instead of reading the value (a host sync).
        """
        if sigmas is None or self.full_window:
            return True
        if not torch.is_tensor(sigmas):
            return self.active_at(float(sigmas))
        first = sigmas.detach().reshape(-1)[:1]
        if first.device.type == "cpu":
            return self.active_at(float(first[0]))
        return (first <= self.sigma_start) & (first >= self.sigma_end)

    def applies_to_chunk(self, code: int) -> bool:
        return self.apply_to == "both" or (self.apply_to == "cond") == (code == _COND)


class AttentionCall:
    """One attn2 call at one layer, as stages see it.

    q: ``[B, N, H*D]``; k, v: ``[B, M, H*D]`` (the layer's projections of the text context).
    chunks: ComfyUI's ``cond_or_uncond`` for these rows (0 = cond, 1 = uncond);
    the batch is ``len(chunks)`` equal chunks in that order.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_options: dict,
        layer: LayerKey,
        fallback: Optional[Callable] = None,
        sigma_reader: Optional[Callable[[], Optional[float]]] = None,
        chunks: Optional[Sequence[int]] = None,
        text: Optional[torch.Tensor] = None,
        hidden: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        scratch: Optional[Dict[object, torch.Tensor]] = None,
    ):
        self.q, self.k, self.v = q, k, v
        self.extra_options = extra_options
        self.layer = layer
        self.heads = int(extra_options["n_heads"])
        self.dim_head = int(extra_options.get("dim_head") or q.shape[-1] // self.heads)
        self._sigma_reader = sigma_reader
        # per-call results one stage computes and a later one reuses (e.g. PVA's identity share for MoA)
        self.scratch: Dict[object, torch.Tensor] = scratch if scratch is not None else {}
        self._chunk_scratch: Dict[tuple, Dict[object, torch.Tensor]] = {}
        self.chunks = list(chunks) if chunks is not None else list(extra_options.get("cond_or_uncond") or [_COND])
        self._fallback = fallback
        self._text = text
        self._hidden = hidden if hidden is not None else extra_options.get(HIDDEN_STATES_KEY)
        self._context = context if context is not None else extra_options.get(CONTEXT_KEY)
        self._value = value if value is not None else extra_options.get(VALUE_KEY)

    @property
    def sigma(self) -> Optional[float]:
        """The current sigma as a float. Reading it waits for the GPU once per UNet call:
        only inspect recorders should need it (windows are checked without it)."""
        return self._sigma_reader() if self._sigma_reader is not None else None

    @property
    def fallback(self) -> Optional[Callable]:
        """The attention replace another pack installed in this slot before ours (None: the host's)."""
        return self._fallback

    # --- sizes -------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def rows_per_chunk(self) -> int:
        if self.batch % len(self.chunks):
            raise IdentityAttentionError(
                f"the batch of {self.batch} rows cannot be split into {len(self.chunks)} cond/uncond chunks",
                fix="report this with your workflow: the sampler sent an unexpected batch",
            )
        return self.batch // len(self.chunks)

    def token_grid(self) -> Tuple[int, int]:
        """``(H, W)`` of this layer's query tokens."""
        hw = latent_hw(self.extra_options)
        if hw is None:
            side = int(round(math.sqrt(self.q.shape[1])))
            return side, self.q.shape[1] // max(side, 1)
        return token_grid(self.q.shape[1], hw, activations_hw(self.extra_options))

    # --- attention ---------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The host's optimized attention with this layer's heads and precision."""
        return host_attention(q, k, v, self.heads, self.extra_options)

    @property
    def upcast(self) -> bool:
        """Whether the host computes this model's attention in float32 (``attn_precision``; SD2.x overflows in fp16)."""
        return self.extra_options.get("attn_precision") == torch.float32

    def branch_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A mechanism's own attention branch (identity / visual tokens): fused SDPA, the host's precision.

        The layer's *text* attention always goes through the host (:meth:`attention`), so a
        weight-0 node still gives the unpatched model bit for bit; an added branch has no
        unpatched value to match, and SDPA is the host's own kernel on GPUs and twice as fast
        as its CPU fallback (sub-quadratic attention).
        """
        return fused_attention(q, k, v, self.heads, upcast=self.upcast)

    def text_attention(self) -> torch.Tensor:
        """The layer's own text cross-attention output (what an unpatched model computes).

        Computed once per call; the slot's foreign patch, if any, produces it.
        """
        if self._text is None:
            if self._fallback is not None:
                self._text = self._fallback(self.q, self.k, self.v, self.extra_options)
            else:
                self._text = self.attention(self.q, self.k, self.v)
        return self._text

    def hidden_states(self) -> torch.Tensor:
        """The layer's input to ``to_q`` (after norm2), ``[B, N, C]``.

        Only available to stages that set ``needs_hidden_states``.
        """
        if self._hidden is None:
            raise RuntimeError("hidden states were not stashed: the stage must set needs_hidden_states = True")
        return self._hidden

    def context(self) -> torch.Tensor:
        """The raw text context the layer's ``to_k`` / ``to_v`` receive, ``[B, M, Ct]``.

        Stashed together with the hidden states (``needs_hidden_states``).
        """
        if self._context is None:
            raise RuntimeError("the text context was not stashed: the stage must set needs_hidden_states = True")
        return self._context

    def value_input(self) -> torch.Tensor:
        """What the layer's ``to_v`` receives, ``[B, M, Ct]``: the context unless an attn2_patch changed it.

        Stashed together with the hidden states (``needs_hidden_states``).
        """
        return self._value if self._value is not None else self.context()

    # --- batch chunks ------------------------------------------------------------------------
    def per_row(self, values: Dict[int, torch.Tensor]) -> torch.Tensor:
        """Stack per-chunk tensors into per-row ones.

        ``values`` maps a chunk code (0 cond, 1 uncond) to ``[1, ...]`` or
        ``[rows_per_chunk, ...]``; returns ``[B, ...]`` in this call's row order.
        """
        n = self.rows_per_chunk
        parts = []
        for code in self.chunks:
            t = values[code]
            parts.append(t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def take_chunks(self, t: Optional[torch.Tensor], keep: Sequence[bool]) -> Optional[torch.Tensor]:
        """The rows of ``t`` (``[B, ...]``) that belong to the kept chunks."""
        if t is None:
            return None
        rows = self._row_slices(keep)
        return torch.cat([t[s] for s in rows], dim=0) if len(rows) > 1 else t[rows[0]]

    def chunk_scratch(self, keep: Sequence[bool]) -> Dict[object, torch.Tensor]:
        """The ``scratch`` of every :meth:`select_chunks` view of these rows: what a stage computed on
        the kept rows only (e.g. PVA's share from its single call), for stages that see the whole call."""
        keep = tuple(bool(k) for k in keep)
        return self.scratch if all(keep) else self._chunk_scratch.setdefault(keep, {})

    def select_chunks(self, keep: Sequence[bool]) -> "AttentionCall":
        """A view of this call restricted to the chunks where ``keep`` is True (sharing :meth:`chunk_scratch`)."""

        def take(t):
            return self.take_chunks(t, keep)

        return AttentionCall(
            take(self.q),
            take(self.k),
            take(self.v),
            self.extra_options,
            self.layer,
            fallback=self._fallback,
            sigma_reader=self._sigma_reader,
            chunks=[c for c, kept in zip(self.chunks, keep) if kept],
            text=take(self._text),
            hidden=take(self._hidden),
            context=take(self._context),
            value=take(self._value),
            scratch=self.chunk_scratch(keep),
        )

    def _row_slices(self, keep: Sequence[bool]) -> List[slice]:
        n = self.rows_per_chunk
        return [slice(i * n, (i + 1) * n) for i, kept in enumerate(keep) if kept]

    def scatter_chunks(self, full: torch.Tensor, part: torch.Tensor, keep: Sequence[bool]) -> torch.Tensor:
        """Put ``part`` (rows of the kept chunks) back into a copy of ``full``."""
        n = self.rows_per_chunk
        pieces, offset = [], 0
        for i, kept in enumerate(keep):
            if kept:
                pieces.append(part[offset : offset + n])
                offset += n
            else:
                pieces.append(full[i * n : (i + 1) * n])
        return torch.cat(pieces, dim=0)


def add_in_region(out: torch.Tensor, delta: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
    """``out + region * delta`` (``region`` ``[b, N, 1]`` or None = everywhere)."""
    if region is None:
        return out + delta
    return out + delta * region.to(delta.dtype)


def blend_in_region(out: torch.Tensor, new: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
    """``new`` where ``region`` is 1, ``out`` where it is 0, linear between."""
    if region is None:
        return new
    return torch.lerp(out, new, region.to(out.dtype))


class AttentionStage:
    """Base class of a mechanism's contribution to every attn2 call.

    Subclasses implement :meth:`forward` and set ``label`` (shown in errors and
    inspect nodes). Instances are shared between MODEL clones, so they must not
    change after construction except for caches of derived tensors.
    """

    label = "stage"
    needs_hidden_states = False
    forward_first_on_chunks = False
    """Offer :meth:`forward_first` a sub-call of the chunks the stage applies to (the other rows
    keep the whole batch's text attention), not only calls where it applies to every row."""

    def __init__(self, schedule: StageSchedule):
        self.schedule = schedule
        self._region_cache: Dict[tuple, torch.Tensor] = {}

    # ComfyUI deep-copies model_options on every clone; a stage is immutable, so share it.
    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        """Return the new attention output ``[b, N, H*D]`` for ``call``'s rows.

        A stage that only observes returns ``out`` itself (the same object): the dispatcher
        then copies nothing.
        """
        raise NotImplementedError

    def forward_first(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """This stage's output straight from the layer's q/k/v, when it is the first to act.

        Called instead of ``forward(call, call.text_attention(), None)`` where that text
        attention has not been computed yet, the slot holds no other pack's patch, the stage
        applies to every row (or, with ``forward_first_on_chunks``, ``call`` holds just the
        rows it applies to) and the step's window is decided: a stage that can fold the
        text attention into its own computation (one attention call instead of two) returns
        ``[B, N, H*D]`` equal to ``forward``'s result up to rounding; the default, None, has
        the dispatcher compute the text attention and call ``forward``. A stage with a region
        (mask) must return None (outside the region the output is the text attention).
        """
        return None

    def forward_first_rows(self, call: AttentionCall, keep: Sequence[bool]) -> Optional[torch.Tensor]:
        """:meth:`forward_first` for a stage with ``forward_first_on_chunks`` that applies to the
        chunks where ``keep`` is True only: the whole batch's output ``[B, N, H*D]``, or None.

        Default: ``forward_first`` on the kept rows; the other rows keep the whole batch's text
        attention, the unpatched rows bit for bit (a host kernel need not give a row the same
        bits in a smaller batch). A stage may instead compute every row in one call, where its
        other rows equal the text attention up to float rounding.
        """
        first = self.forward_first(call.select_chunks(keep))
        return None if first is None else call.scatter_chunks(call.text_attention(), first, keep)

    def is_active(self, call: AttentionCall) -> bool:
        """Whether the stage acts at this layer (besides its sigma window and chunks,
        which the dispatcher checks)."""
        s = self.schedule
        if s.weight == 0.0:
            return False
        return s.layers is None or call.layer in s.layers

    def region(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """The stage's MASK at this layer's grid for ``call``'s rows: ``[b, N, 1]`` or None."""
        mask = self.schedule.mask
        if mask is None:
            return None
        return self.mask_tokens(call, mask, "mask")

    def mask_tokens(self, call: AttentionCall, mask: torch.Tensor, input_name: str = "mask") -> torch.Tensor:
        """Any ``[Bm, H, W]`` mask of this stage at ``call``'s layer grid, per row: ``[b, N, 1]``."""
        return mask_rows(mask, call, self._region_cache, node=self.label, input_name=input_name)


def autograd_safe(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it when it is an inference tensor and autograd is recording.

    Every prompt runs under ``torch.inference_mode()``, so cached tensors are
    inference tensors; a gradient pass (STFG ``exact``) cannot save those for
    backward. Outside such a pass this returns ``t`` itself.
    """
    if t.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return t.clone()
    return t


def mask_rows(mask: torch.Tensor, call: AttentionCall, cache: dict, node: str = "", input_name: str = "mask") -> torch.Tensor:
    """A ``[Bm, H, W]`` MASK at ``call``'s layer grid, one row per batch row: ``[b, N, 1]``.

    The resized mask is kept per (mask, grid, device, dtype) in the sampling's
    :class:`~.sampling_scope.SamplingCache` (released when sampling ends), or in
    ``cache`` where no sampling scope runs (a stage called directly). ``Bm`` must be 1 or the number of
    images per cond/uncond chunk.
    """
    grid = call.token_grid()
    key = (id(mask), grid, call.q.device, call.q.dtype)
    scope = sampling_cache(call.extra_options)
    if scope is not None:
        # made on first use in this sampling, released when it ends (the mask is held by the stage)
        tokens = scope.get_or_make(("mask_rows",) + key, lambda: mask_to_tokens(mask, grid).to(device=call.q.device, dtype=call.q.dtype))
    else:
        tokens = cache.get(key)
        if tokens is None:
            tokens = mask_to_tokens(mask, grid).to(device=call.q.device, dtype=call.q.dtype)
            cache[key] = tokens
    tokens = autograd_safe(tokens)
    per_chunk = call.rows_per_chunk
    if tokens.shape[0] == 1:
        return tokens.expand(call.batch, -1, -1)
    if tokens.shape[0] == per_chunk:
        return tokens.repeat(len(call.chunks), 1, 1)
    raise IdentityAttentionError(
        f"the mask has {tokens.shape[0]} frames but the latent batch has {per_chunk} images",
        node=node,
        input_name=input_name,
        fix="give one mask for all images, or exactly one mask per image in the batch",
    )


class HiddenStateStash:
    """An ``attn2_patch`` that keeps the layer's pre-``to_q`` hidden states for our stages.

    It returns its inputs unchanged, so it has no numerical effect.
    """

    identity_attention_stash = True

    def __call__(self, n, context, value, extra_options):
        extra_options[HIDDEN_STATES_KEY] = n
        extra_options[CONTEXT_KEY] = context
        extra_options[VALUE_KEY] = value
        return n, context, value

    def __deepcopy__(self, memo):
        return self


class AttentionDispatcher:
    """Owns our attn2 slots of one MODEL clone; runs the stages in order.

    stages:    the applied stages, first applied first.
    fallbacks: per layer key, the foreign replace that held the slot before us.
    layers:    the model's cross-attention layers (key -> LayerInfo).
    """

    identity_attention_dispatcher = True

    def __init__(self, stages: Tuple[AttentionStage, ...], fallbacks: Dict[LayerKey, Callable], layers: Dict[LayerKey, LayerInfo]):
        self.stages = tuple(stages)
        self.fallbacks = dict(fallbacks)
        self.layers = dict(layers)
        self._sigma = SigmaReader()

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    def __call__(self, q, k, v, extra_options):
        layer = layer_key_of(extra_options)
        fallback = self.fallbacks.get(layer)
        call = AttentionCall(q, k, v, extra_options, layer, fallback=fallback, sigma_reader=lambda: self._sigma(extra_options))
        out = None
        for stage in self.stages:
            if not stage.is_active(call):
                continue
            window = stage.schedule.window_in(extra_options)  # a bool once the step's sigma is published
            if window is False:
                continue
            keep = [stage.schedule.applies_to_chunk(code) for code in call.chunks]
            if not any(keep):
                continue
            every_row = all(keep)
            if out is None:
                if every_row and window is True and fallback is None:
                    out = stage.forward_first(call)  # e.g. PVA: one call over [text; identity]
                    if out is not None:
                        continue
                elif stage.forward_first_on_chunks and window is True and fallback is None:
                    out = stage.forward_first_rows(call, keep)
                    if out is not None:
                        continue
                out = call.text_attention()
            if every_row:
                new = stage.forward(call, out, stage.region(call))
            else:
                sub = call.select_chunks(keep)
                part_in = call.take_chunks(out, keep)
                part = stage.forward(sub, part_in, stage.region(sub))
                new = out if part is part_in else call.scatter_chunks(out, part, keep)  # an observer changed nothing
            # a window decided on the GPU selects without a host sync (exact either way)
            out = new if window is True else torch.where(window.reshape(1, 1, 1), new, out)
        return out if out is not None else call.text_attention()


def is_dispatcher(obj) -> bool:
    return getattr(obj, "identity_attention_dispatcher", False) is True


def installed_dispatcher(model_patcher) -> Optional[AttentionDispatcher]:
    """The dispatcher installed on a MODEL by our nodes, if any."""
    found = model_patcher.model_options.get("transformer_options", {}).get(PACK_KEY)
    return found if is_dispatcher(found) else None


def apply_attention_stage(model_patcher, stage: AttentionStage):
    """Return a clone of ``model_patcher`` with ``stage`` appended to its dispatcher.

    The input MODEL is not modified. Slots that another pack patched before
    us keep that patch as their fallback.
    """
    layers = cross_attention_layers(model_patcher)
    if not layers:
        raise IdentityAttentionError(
            "this MODEL has no UNet cross-attention layers to patch",
            node=stage.label,
            input_name="model",
            fix="use an SD1.5, SD2 or SDXL model",
        )
    m = model_patcher.clone()
    previous = installed_dispatcher(m)
    replace = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    fallbacks: Dict[LayerKey, Callable] = {}
    for info in layers:
        current = replace.get(info.key)
        if current is None:
            current = replace.get(info.key[:2])  # a block-wide patch applies to every depth
        if is_dispatcher(current):
            if current.fallbacks.get(info.key) is not None:
                fallbacks[info.key] = current.fallbacks[info.key]
        elif current is not None:
            fallbacks[info.key] = current
    stages = (previous.stages if previous is not None else ()) + (stage,)
    dispatcher = AttentionDispatcher(stages, fallbacks, {info.key: info for info in layers})
    for info in layers:
        m.set_model_attn2_replace(dispatcher, info.key[0], info.key[1], info.key[2])
    m.model_options["transformer_options"][PACK_KEY] = dispatcher
    install_step_sigma(m)  # windows decided once per step, constants once per sampling
    if any(s.needs_hidden_states for s in stages):
        _ensure_hidden_state_stash(m)
    return m


def _ensure_hidden_state_stash(model_patcher) -> None:
    """Make our stash the last attn2_patch, so it sees the hidden states ``to_q`` gets."""
    patches = model_patcher.model_options["transformer_options"].setdefault("patches", {})
    current = [p for p in patches.get("attn2_patch", []) if not getattr(p, "identity_attention_stash", False)]
    patches["attn2_patch"] = current + [HiddenStateStash()]
