"""The dispatcher stage of parallel (joint / decoupled) and KV-mixed attention to identity tokens.

One :class:`ParallelAttentionStage` per applied node. Its :class:`IdentitySource` says, per
cross-attention layer, which tokens give the identity keys and values (one IDENTITY through one
ID_ADAPTER for parallel attention; two for KV-mixed attention) and which projections map them
(an adapter's ``to_k`` / ``to_v`` weights, or the layer's own ``to_k`` / ``to_v`` modules for the
training-free modes), plus PVA's optional separate identity query (``to_q``).

Cost per attn2 call (the math is in ``adapters/attention/parallel_attention.py``):

- identity K/V are projected once per layer, device and dtype (adapter weights: once for the
  stage's lifetime; layer modules: again only if the layer's weight object changes, e.g. a LoRA
  patched after this node), and expanded to the call's cond/uncond rows once per batch layout;
- decoupled: one fused SDPA call for the identity branch (+ PuLID's projection when asked);
- joint, as the first stage of the call (no foreign patch, no mask): PVA's single fused SDPA
  call over ``[text ; identity]`` keys and values, *instead of* the layer's text attention (+ one
  ``to_q`` matmul with a separate identity query). When the identity goes to some chunks only
  (the node's default: the positive prompt's, the negative gets none), it is still ONE call over
  the whole batch: an additive mask made once per sampling and batch layout puts ``log w`` on
  the identity columns of those rows and ``-inf`` on the others', whose output is then their
  text attention (exact in exact arithmetic; up to float rounding, e.g. 2.4e-7 in float32, not
  the host's bits: the accepted trade of issue #22 — weight 0 still skips the stage, so it is
  the unpatched model bit for bit). Its ``[text ; identity]`` keys and values are, inside a
  sampling, one copy of the layer's text K/V each into buffers whose identity rows were
  written once per sampling, so a layer launches: the ``to_q`` matmul and the ``[q | q_id]``
  cat, two copies and the SDPA call, minus the host's text attention it replaces: 4 more
  launches than unpatched (issue #22's budget). A later stage that needs the plain text
  attention (a router's prior) computes it (``call.text_attention()``);
- joint after other stages: one fused SDPA call for the identity part and share, then an
  elementwise mix with what those stages produced;
- no host sync, no Python loop over batch items.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch

from ...adapters.projectors.id_adapter import DeviceCache, IdentityTokens
from ...adapters.attention.parallel_attention import (
    append_zero_tokens,
    decoupled_attention,
    fused_joint_call,
    fused_width,
    identity_key_block,
    identity_value_block,
    joint_query,
    joint_row_bias,
    mix_with_text,
    orthogonalize,
    pad_heads,
    project_tokens,
)
from ...adapters.attention.attention_core import token_heads
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule, add_in_region, blend_in_region
from ..common.host import LayerKey
from ..common.sampling_scope import device_constant, sampling_cache

MODES = ("joint", "decoupled")
_CACHE_LIMIT = 1024


class WeightProjection:
    """An adapter's bias-free projection ``[C, D]`` (kept on the CPU in its file dtype)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def project(self, cache: DeviceCache, key, tokens: torch.Tensor, device, dtype) -> torch.Tensor:
        """``tokens`` ``[n, T, D]`` (CPU float32) -> ``[n, T, C]`` on ``device``, computed once."""
        return cache.get(key, device, dtype, lambda: project_tokens(tokens.to(self.weight.device), self.weight))


class ModuleProjection:
    """The layer's own ``to_k`` / ``to_v`` module (training-free modes).

    Called on the device, so the host's casting, offloading and LoRA weight functions apply.
    The result is cached while the module's weight is the same tensor object (a weakref, so an
    old weight is never kept alive).
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._store: Dict[tuple, tuple] = {}

    def __deepcopy__(self, memo):
        return self

    @property
    def out_features(self) -> int:
        return int(self.module.weight.shape[0])

    def project(self, cache: DeviceCache, key, tokens: torch.Tensor, device, dtype) -> torch.Tensor:
        weight = getattr(self.module, "weight", None)
        full = (key, str(device), dtype)
        hit = self._store.get(full)
        if hit is not None and hit[0]() is weight:
            return hit[1]
        out = self.module(tokens.to(device=device, dtype=dtype)).to(dtype)
        self._store[full] = (weakref.ref(weight) if weight is not None else (lambda: None), out)
        return out


class IdentitySource:
    """Per-layer identity keys, values and (optionally) query of one stage.

    key_tokens / value_tokens: cond/uncond tokens ``[1, T, Dk]`` / ``[1, T, Dv]`` (same T).
    key_proj / value_proj: per layer key, a :class:`WeightProjection` or :class:`ModuleProjection`.
    query_weights: per layer key, PVA's ``to_visual_q`` ``[C, C]`` (None: the layer's own query).
    zero_tokens: PuLID's zero-token padding (zero keys and values appended after projection).
    """

    def __init__(
        self,
        key_tokens: IdentityTokens,
        value_tokens: IdentityTokens,
        key_proj: Dict[LayerKey, object],
        value_proj: Dict[LayerKey, object],
        query_weights: Optional[Dict[LayerKey, torch.Tensor]] = None,
        zero_tokens: int = 0,
    ):
        if key_tokens.count != value_tokens.count:
            raise ValueError(f"key and value token counts differ: {key_tokens.count} vs {value_tokens.count}")
        self._key_tokens = torch.cat([key_tokens.cond, key_tokens.uncond], dim=0).float()  # [2, T, Dk]
        self._value_tokens = torch.cat([value_tokens.cond, value_tokens.uncond], dim=0).float()
        self.key_proj = dict(key_proj)
        self.value_proj = dict(value_proj)
        self.query_weights = dict(query_weights) if query_weights else None
        self.zero_tokens = int(zero_tokens)
        self._cache = DeviceCache()
        self._rows: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __deepcopy__(self, memo):
        return self

    @property
    def token_count(self) -> int:
        """Identity tokens per row, zero tokens included (0 when the source has none)."""
        tokens = self._key_tokens.shape[1]
        return tokens + self.zero_tokens if tokens else 0

    @property
    def has_query(self) -> bool:
        return self.query_weights is not None

    def kv(self, call: AttentionCall) -> Tuple[torch.Tensor, torch.Tensor]:
        """Identity keys and values for ``call``'s rows: ``[b, T, C]`` each (cond/uncond per row).

        The projections return the same tensor objects while their weights are unchanged; rows
        made from other tensors (a layer's weight was replaced, e.g. by a LoRA applied after this
        node, or restored) are made again.
        """
        q, layer = call.q, call.layer
        k = self.key_proj[layer].project(self._cache, (layer, "k"), self._key_tokens, q.device, q.dtype)
        v = self.value_proj[layer].project(self._cache, (layer, "v"), self._value_tokens, q.device, q.dtype)
        key = (layer, str(q.device), q.dtype, tuple(call.chunks), call.rows_per_chunk)
        hit = self._rows.get(key)
        if hit is None or hit[0] is not k or hit[1] is not v:
            kz, vz = append_zero_tokens(k, self.zero_tokens), append_zero_tokens(v, self.zero_tokens)
            hit = (k, v, call.per_row({0: kz[0:1], 1: kz[1:2]}).contiguous(), call.per_row({0: vz[0:1], 1: vz[1:2]}).contiguous())
            if len(self._rows) > _CACHE_LIMIT:
                self._rows.clear()
            self._rows[key] = hit
        return hit[2], hit[3]

    def query(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """PVA's identity query ``to_visual_q(x)`` ``[b, N, C]``, or None (use the layer's ``q``)."""
        if self.query_weights is None:
            return None
        weight = self._cache.get((call.layer, "q"), call.q.device, call.q.dtype, lambda: self.query_weights[call.layer])
        return torch.nn.functional.linear(call.hidden_states().to(call.q.dtype), weight)


class ParallelAttentionStage(AttentionStage):
    """Joint (PVA) or decoupled (IP-Adapter / InstantID / PuLID) attention to an :class:`IdentitySource`.

    weight: decoupled: the identity branch's scale; joint: a log-prior on the identity columns
    (must be >= 0; the dispatcher skips weight 0). ortho / body: PuLID's orthogonal projection
    (decoupled only) and its "first 5 tokens" mask (``[T]`` bool).
    """

    def __init__(
        self,
        schedule: StageSchedule,
        source: IdentitySource,
        mode: str = "joint",
        label: str = "parallel attention",
        ortho: str = "none",
        body: Optional[torch.Tensor] = None,
    ):
        super().__init__(schedule)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        if mode == "joint" and schedule.weight < 0:
            raise ValueError("joint attention needs a weight >= 0 (it multiplies the identity's attention mass)")
        self.source = source
        self.mode = mode
        self.label = label
        self.ortho = ortho
        self.body = body
        self.needs_hidden_states = source.has_query
        self.forward_first_on_chunks = mode == "joint"  # the single call also when some rows get no identity (forward_first_rows)
        self._blocks: Dict[tuple, list] = {}  # where no sampling scope runs (a stage called directly)
        self._constants = DeviceCache()  # the same, for device constants made from CPU tensors

    # --- cached per-layout blocks --------------------------------------------------------------
    def _block(self, call: AttentionCall, name, make, source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``make()`` cached per layer and batch layout (and, given ``source``, while it is that tensor).

        Kept in the sampling's :class:`~.sampling_scope.SamplingCache` (made on the device on first
        use, released when the sampling ends), or in the stage where no sampling scope runs (a
        stage called directly).
        """
        key = (id(self), name, call.layer, str(call.q.device), call.q.dtype, tuple(call.chunks), call.rows_per_chunk, call.k.shape[1])
        scope = sampling_cache(call.extra_options)
        if scope is not None:
            hit = scope.get_or_make(key, lambda: [None, None])  # [source, value], refreshed below
        else:
            hit = self._blocks.get(key)
            if hit is None:
                if len(self._blocks) > _CACHE_LIMIT:
                    self._blocks.clear()
                hit = self._blocks[key] = [None, None]
        if hit[1] is None or hit[0] is not source:
            hit[0], hit[1] = source, make()
        return hit[1]

    def _text_and_identity(self, call: AttentionCall, name, text: torch.Tensor, id_rows: torch.Tensor) -> torch.Tensor:
        """``[text ; identity]`` operand of the fused call: ``[b, M + T, H, width]``.

        ``text`` ``[b, M, H*D]`` (the layer's k or v), ``id_rows`` ``[b, T, H, width]`` (a cached block).
        Inside a sampling without autograd: one copy of the text rows into a buffer kept for the
        sampling, whose identity rows and zero channels were written once (one launch instead of
        a pad and a cat per layer); the next call's copy into it comes after this call's
        attention in stream order. Where autograd records (STFG's gradient pass), or no
        sampling scope runs: the pad and the cat.
        """
        th = token_heads(text, call.heads)  # [b, M, H, D], a view
        width = id_rows.shape[-1]
        scope = sampling_cache(call.extra_options)
        inference = torch.is_inference_mode_enabled()
        if scope is None or (torch.is_grad_enabled() and not inference) or th.shape[0] != id_rows.shape[0]:
            return torch.cat([pad_heads(th, width), id_rows.to(th.dtype)], dim=1)
        # inference tensors cannot be written outside inference mode: one buffer per mode
        key = (id(self), "operand", name, call.layer, tuple(th.shape), width, id_rows.shape[1], str(th.device), th.dtype, inference)
        hit = scope.get_or_make(key, lambda: [None, None])  # [id_rows, buffer]
        if hit[1] is None or hit[0] is not id_rows:
            b, m, h, _ = th.shape
            hit[0], hit[1] = id_rows, torch.cat([th.new_zeros(b, m, h, width), id_rows.to(th.dtype)], dim=1)
        buffer = hit[1]
        buffer[:, : th.shape[1], :, : th.shape[-1]].copy_(th)
        return buffer

    def _bias(self, call: AttentionCall, keep: Optional[Sequence[bool]], id_tokens: int, dtype) -> Optional[torch.Tensor]:
        """The joint call's additive logits ``[b or 1, 1, 1, M + T]``: ``log w`` on identity columns (joint
        mode; None for w = 1 with every row kept); with ``keep`` (chunks the stage applies to, not
        all), ``-inf`` on the identity columns of the other rows. Made once per sampling and batch
        layout (not per call), a view of rows 16-column aligned (no per-call pad in GPU kernels)."""
        # decoupled mode asks for the share only, of the plain joint softmax (its weight scales its branch)
        text_tokens, weight = call.k.shape[1], self.schedule.weight if self.mode == "joint" else 1.0
        total = text_tokens + id_tokens
        if keep is None or all(keep):
            if weight == 1.0:
                return None
            layout, n = None, 1
        else:
            layout, n = tuple(bool(k) for k in keep), call.rows_per_chunk
        key = ("joint bias", layout, n, text_tokens, id_tokens, weight)
        columns = -(-total // 16) * 16
        make = lambda: joint_row_bias(text_tokens, id_tokens, weight, torch.tensor(layout or (True,)).repeat_interleave(n), columns)  # noqa: E731
        return device_constant(call.extra_options, id(self), key, call.q.device, dtype, make, self._constants)[..., :total]

    def _joint_call(self, call: AttentionCall, kind: str, keep: Optional[Sequence[bool]] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One fused SDPA call over ``[text ; identity]`` keys: ``(values [b, N, H*D] or None, share [b, N, H, 1] or None)``.

        kind "fused": values ``[v_text ; v_id]``, the joint output itself (no text attention needed;
        the share comes free with a separate identity query); "identity": values ``[0 ; v_id]`` and
        the share, to mix with a given text attention; "share": the share alone. ``keep``: per
        chunk, whether its rows get the identity (None: all); the other rows' identity columns
        get ``-inf`` (their output is their text attention, their share exactly 0).
        """
        k_id, v_id = self.source.kv(call)
        q_id = self.source.query(call)
        separate = q_id is not None
        heads, dim_head, text_tokens = call.heads, call.dim_head, call.k.shape[1]
        value_dim = 0 if kind == "share" else dim_head
        with_share = kind != "fused" or separate  # fused: only where the 2D-wide layout has a free channel
        width = fused_width(dim_head, separate, value_dim, with_share)
        id_keys = self._block(call, ("k", width, separate), lambda: identity_key_block(k_id, heads, width, separate), source=k_id)
        keys = self._text_and_identity(call, ("k", width), call.k, id_keys)
        id_values = lambda: identity_value_block(None if kind == "share" else v_id, heads, width, with_share, like=k_id)  # noqa: E731
        if kind == "fused":
            values = self._text_and_identity(call, ("v", width), call.v, self._block(call, ("v", kind, width), id_values, source=v_id))
        else:
            values = self._block(call, ("v", kind, width), lambda: torch.cat([k_id.new_zeros(k_id.shape[0], text_tokens, heads, width), id_values()], dim=1), source=v_id)
        q_joint = joint_query(call.q, q_id, heads, width)
        if call.upcast and q_joint.dtype != torch.float32:
            # the host upcasts this model's attention (SD2.x overflows in fp16): do the same
            q_joint, keys, values = q_joint.float(), keys.float(), values.float()
        bias = self._bias(call, keep, k_id.shape[1], q_joint.dtype)
        part, share = fused_joint_call(q_joint, keys, values, dim_head, value_dim, with_share, bias)
        if share is not None:
            call.scratch[(id(self), "share")] = share  # a mixture-of-attention router reads it, no second pass
        return (part if value_dim else None), share

    # --- the stage ----------------------------------------------------------------------------
    def forward_first(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """Joint mode as the first stage of a call: PVA's single call, no separate text attention."""
        if self.mode != "joint" or self.source.token_count == 0 or self.schedule.mask is not None:
            return None
        part, _ = self._joint_call(call, "fused")
        return part.to(call.q.dtype)

    def forward_first_rows(self, call: AttentionCall, keep: Sequence[bool]) -> Optional[torch.Tensor]:
        """Joint mode as the first stage on some chunks only (PVA's default: the positive prompt's):
        ONE call over the whole batch, ``-inf`` on the identity columns of the other rows, which so
        get their text attention (equal to the host's up to float rounding), not a second attention
        call and a row merge."""
        if self.mode != "joint" or self.source.token_count == 0 or self.schedule.mask is not None:
            return None
        part, _ = self._joint_call(call, "fused", keep=keep)
        return part.to(call.q.dtype)

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if self.source.token_count == 0:
            return out  # no identity tokens: exactly the input
        if self.mode == "decoupled":
            k_id, v_id = self.source.kv(call)
            q_id = self.source.query(call)
            query = call.q if q_id is None else q_id
            id_out = decoupled_attention(query, k_id, v_id, call.heads, lambda q, k, v, heads: call.branch_attention(q, k, v))
            if self.ortho != "none":
                body = None if self.body is None else self._block(call, "body", lambda: self.body.to(call.q.device))
                id_out = orthogonalize(id_out, call.text_attention(), self.ortho, q=query, k_id=k_id, heads=call.heads, body=body)
            if region is None:
                return torch.add(out, id_out, alpha=self.schedule.weight)  # one fused launch
            return add_in_region(out, id_out * self.schedule.weight, region)
        id_part, share = self._joint_call(call, "identity")
        mixed = mix_with_text(out, id_part.to(out.dtype), share.to(out.dtype), call.heads)
        return blend_in_region(out, mixed, region)

    def identity_share(self, call: AttentionCall) -> Optional[torch.Tensor]:
        """Mean over heads of the joint-softmax mass on this stage's identity keys: ``[b, N, 1]``.

        Zero outside the stage's mask and on rows it does not apply to; None when the stage is
        inactive at this layer and step. Used by the mixture-of-attention router.
        """
        if self.source.token_count == 0 or not self.is_active(call):
            return None
        keep = [self.schedule.applies_to_chunk(code) for code in call.chunks]
        if not any(keep):
            return None
        # computed on this very call: by forward_first / forward_first_rows (whole batch; with some
        # chunks kept, exactly 0 on the others' rows, their identity columns being -inf), or by
        # forward on the kept rows (the chunks' scratch)
        share = call.scratch.get((id(self), "share"))
        part = None if share is not None or all(keep) else call.chunk_scratch(keep).get((id(self), "share"))
        if part is not None:
            # forward ran on the kept rows only: their share, zero on the other rows (one cat)
            zeros = self._block(call, "no share", lambda: call.q.new_zeros(call.batch, call.q.shape[1], 1))
            share = call.scatter_chunks(zeros, part.mean(dim=2).to(call.q.dtype), keep)
        else:
            if share is None:
                _, share = self._joint_call(call, "share", keep=keep)  # 0 on rows not kept
            share = share.mean(dim=2).to(call.q.dtype)  # [b, N, 1]
        region = self.region(call)
        if region is not None:
            share = share * region
        return share
