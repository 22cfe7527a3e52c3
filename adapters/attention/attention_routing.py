"""Mixture-of-attention (MoA) routing: per pixel, mix the model's prior attention with a personalized one.

MoA (Wang, Ostashev, Fang, Tulyakov, Aberman, SIGGRAPH Asia 2024, arXiv 2404.11565; no public
code or weights) keeps the frozen attention as a *prior* expert, adds a *personalized* expert,
and lets a per-layer router split every pixel between them::

    R = softmax(router(X))            # [b, N, 2] per query token (pixel)
    O = R0 * prior + R1 * personalized

At a cross-attention layer here: ``prior`` = the layer's own text attention (what the unpatched
model computes, ``[b, N, H*D]``), ``personalized`` = the attention output of the identity
mechanisms applied before the routing node (PVA, KV-mixed...). Routers:

``learned``: a two-layer MLP on the layer's hidden states ``X`` ``[b, N, C]`` (the input of the
  layer's ``to_q``, i.e. after ``norm2``), with per-layer weights under these names in an
  ID_ADAPTER's ``layers[key]`` (``key`` = ComfyUI's ``(block, id, index)``; the native file
  stores them per layer with the loader's usual layer prefix; the trainer produces them)::

      router.0.weight [Hr, C]   router.0.bias [Hr]      # Linear(C -> Hr)
      (router.1 = GELU, exact erf form; no parameters)
      router.2.weight [2, Hr]   router.2.bias [2]       # Linear(Hr -> 2): logits (prior, personalized)
      R = softmax(logits / temperature)

  The MoA paper describes the router as a small MLP per layer with a softmax over the experts; its
  width and activation are not public: GELU and a free ``Hr`` (read from the weights) are our
  choice.

``identity_attention`` (training-free): the subject's own cross-attention map. For each
  identity stage before the router, ``a(i)`` = the mean over heads of the joint-softmax mass that
  query ``i`` puts on the identity keys (text keys and identity keys in one softmax, the stage's
  own query and keys; for joint stages including their log-prior), multiplied by that stage's
  mask, zero where the stage is inactive; the stages' shares are summed and clipped to [0, 1].
  Normalised per layer and image by the map's peak, never by less than ``SHARE_FLOOR``:
  ``m(i) = a(i) / max(max a, SHARE_FLOOR)`` in [0, 1]; then
  ``R1 = sigmoid(SHARE_LOGIT_SCALE * (m - 1/2) / temperature)``, ``R0 = 1 - R1``
  (temperature 1: m's 0..1 spans logits -5..5, R1 0.007..0.993; lower is sharper, higher
  softer). The spec's training-free MoA suggests this source ("soft subject mask from the
  subject token's cross-attention ... normalize"); the normalisation is our choice. A share
  is a probability mass, so it is scaled, not shifted: a pixel counts as fully identity when
  it gets the image's peak share, and the floor keeps a weak map weak. A map whose peak
  share stays below ``SHARE_FLOOR`` (a fifth of the attention) -- the model hardly attends
  to the identity anywhere -- is not stretched to 0..1: it routes (mostly) to the prior, the
  router's "no identity here". A flat map gives a flat routing (the earlier per-image min-max
  stretched any nearly flat map, rounding noise included, to the full 0..1).

``mask``: ``R1`` = a MASK resized to the layer's grid, ``R0 = 1 - R1``.

Where ``R1 = 0`` the output is the prior exactly (``1 * prior + 0 * personalized``).

Two forms of the same math: the plain ones (``route_from_*``, :func:`mixture_of_attention`; the
trainer and the references) and the fused ones the sampling loop runs, a few launches per layer
(issue #22): :func:`identity_share_r1` (amax, maximum, one ``addcdiv``, sigmoid),
:func:`learned_router_r1` (the two-expert softmax is a sigmoid of the logits' difference, so
``router.2`` folds into one row), :func:`routed_mix` (``R0 * prior + R1 * personalized`` with
``R0 = 1 - R1`` is one ``lerp``). ``R0`` is never materialised there.

:class:`RouterRecorder` keeps the R1 maps of a sampling run for the inspect node: on the device,
averaged over the layers of one resolution, per model call (step), per cond/uncond half, with
bounded memory, and moved to the CPU only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

ROUTER_WEIGHT_NAMES = ("router.0.weight", "router.0.bias", "router.2.weight", "router.2.bias")
SHARE_LOGIT_SCALE = 10.0
"""Logit span of the identity-attention router at temperature 1: normalised map 0..1 -> -5..5."""
SHARE_FLOOR = 0.2
"""The smallest peak identity share the identity-attention router scales up to 1 (see the module docstring)."""


# --- routers -----------------------------------------------------------------------------------


def learned_router_logits(hidden: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``router.2(GELU(router.0(X)))``: ``[b, N, C] -> [b, N, 2]`` (prior, personalized)."""
    h = F.linear(hidden, weights["router.0.weight"], weights["router.0.bias"])
    return F.linear(F.gelu(h), weights["router.2.weight"], weights["router.2.bias"])


def route_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(logits / temperature)`` split into ``(R0, R1)``, each ``[b, N, 1]``."""
    probs = (logits.float() / temperature).softmax(dim=-1).to(logits.dtype)
    return probs[..., 0:1], probs[..., 1:2]


def normalise_share(share: torch.Tensor, floor: float = SHARE_FLOOR) -> torch.Tensor:
    """``a / max(max a, floor)`` per row of an identity share ``[b, N, 1]`` in [0, 1] (no shift, no stretch below ``floor``)."""
    peak = share.amax(dim=1, keepdim=True)
    return (share / peak.clamp_min(floor)).clamp(0.0, 1.0)


def route_from_identity_share(share: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``identity_attention`` router: ``share`` ``[b, N, 1]`` -> ``(R0, R1)``."""
    m = normalise_share(share.float())
    r1 = torch.sigmoid(SHARE_LOGIT_SCALE * (m - 0.5) / temperature).to(share.dtype)
    return 1.0 - r1, r1


def route_from_mask(mask_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``mask`` router: ``mask_tokens`` ``[b, N, 1]`` in [0, 1] -> ``(1 - m, m)``."""
    return 1.0 - mask_tokens, mask_tokens


def mixture_of_attention(prior: torch.Tensor, personalized: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """``R0 * prior + R1 * personalized``: ``[b, N, H*D]`` (``r0``/``r1`` ``[b, N, 1]``)."""
    return prior * r0.to(prior.dtype) + personalized * r1.to(prior.dtype)


# --- the same routers, fused for the sampling loop (one launch per line; numbers as above up to rounding) ---


def identity_share_constants(temperature: float = 1.0, floor: float = SHARE_FLOOR, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(floor, offset)`` for :func:`identity_share_r1`, each a ``[1, 1, 1]`` tensor (float32 unless
    asked): the smallest peak and ``-SHARE_LOGIT_SCALE / (2 T)``, the logits' constant term (made
    once per stage and device, not per layer)."""
    return torch.full((1, 1, 1), floor, dtype=dtype), torch.full((1, 1, 1), -SHARE_LOGIT_SCALE / (2.0 * temperature), dtype=dtype)


def identity_share_r1(share: torch.Tensor, floor: torch.Tensor, offset: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """:func:`route_from_identity_share`'s ``R1`` in four launches: ``share`` ``[b, N, 1]`` -> ``[b, N, 1]``.

    ``sigmoid(S (a / max(peak, floor) - 1/2) / T)`` rewritten as
    ``sigmoid(offset + (S / T) * a / max(peak, floor))`` (``floor``, ``offset`` from
    :func:`identity_share_constants`): amax, maximum, one ``addcdiv``, sigmoid.
    :func:`normalise_share`'s clamp to [0, 1] is left out: for ``a >= 0`` (an attention mass)
    ``a <= peak`` makes ``a / max(peak, floor)`` lie in [0, 1] already (a correctly rounded
    division of ``x <= y`` never exceeds 1). The float32 constants promote a half-precision share:
    the floor and the logits are float32, as in the unfused router.
    """
    peak = torch.maximum(share.amax(dim=1, keepdim=True), floor)
    return torch.addcdiv(offset, share, peak, value=SHARE_LOGIT_SCALE / temperature).sigmoid()


def learned_router_r1_weights(weights: Mapping[str, torch.Tensor], temperature: float = 1.0) -> Tuple[torch.Tensor, ...]:
    """``(W0, b0, Wd, bd)`` for :func:`learned_router_r1`: ``router.0`` as is, and the two logits'
    difference divided by ``temperature``: ``Wd = (W2[1] - W2[0]) / T`` ``[1, Hr]``, ``bd = (b2[1] - b2[0]) / T`` ``[1]``.

    A softmax over two experts is the sigmoid of their logits' difference,
    ``softmax(l / T)[1] = sigmoid((l1 - l0) / T)``, so the last layer and the softmax fold into
    one ``[1, Hr]`` projection and one sigmoid (made once per layer and device).
    """
    w2, b2 = weights["router.2.weight"], weights["router.2.bias"]
    return (weights["router.0.weight"], weights["router.0.bias"], ((w2[1] - w2[0]) / temperature).unsqueeze(0), ((b2[1] - b2[0]) / temperature).reshape(1))


def learned_router_r1(hidden: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor) -> torch.Tensor:
    """The learned router's ``R1`` ``[b, N, 1]`` from ``X`` ``[b, N, C]`` in four launches (linear, GELU, linear, sigmoid)."""
    return F.linear(F.gelu(F.linear(hidden, w0, b0)), wd, bd).sigmoid()


def routed_mix(prior: torch.Tensor, personalized: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """:func:`mixture_of_attention` with ``R0 = 1 - R1`` in one launch: ``lerp(prior, personalized, R1)``.

    Where ``R1 = 0`` the result is ``prior`` exactly (``prior + 0 * (personalized - prior)``), as is
    every row where ``personalized`` is ``prior`` (whatever ``R1``).
    """
    return torch.lerp(prior, personalized, r1.to(prior.dtype))


# --- recording ---------------------------------------------------------------------------------


@dataclass
class _Step:
    sigma: Optional[float]
    # (grid, codes) -> [len(codes), rows, h, w] float32: all halves of a call in one tensor, so one add per layer
    sums: Dict[Tuple[Tuple[int, int], Tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    counts: Dict[Tuple[Tuple[int, int], Tuple[int, ...]], int] = field(default_factory=dict)


@dataclass(frozen=True)
class RouterMaps:
    """What :meth:`RouterRecorder.snapshot` returns (CPU, float32).

    steps: the sigma of each recorded model call, first first (None if unknown).
    maps: per step, ``{(grid_hw, code): [rows, h, w]}`` R1 averaged over the layers of that grid
    (``code`` 0 cond, 1 uncond; maps larger than ``max_side`` are area-downsampled).
    """

    steps: Tuple[Optional[float], ...]
    maps: Tuple[Dict[Tuple[Tuple[int, int], int], torch.Tensor], ...]

    def grids(self) -> List[Tuple[int, int]]:
        found = {key[0] for step in self.maps for key in step}
        return sorted(found, key=lambda g: -g[0] * g[1])

    def average(self, grid: Tuple[int, int], code: int) -> Optional[torch.Tensor]:
        """``[rows, h, w]``: the map of one grid and half averaged over every recorded step."""
        found = [step[(grid, code)] for step in self.maps if (grid, code) in step]
        if not found:
            return None
        rows = min(t.shape[0] for t in found)
        return torch.stack([t[:rows] for t in found]).mean(dim=0)


class RouterRecorder:
    """Per-step router maps of one sampling run, kept on the device until asked for.

    ``record(sigma, codes, grid, r1)`` with ``r1`` ``[b, N]`` (rows: ``codes`` chunks in order)
    adds to a running sum per (step, grid, batch layout): one in-place add per layer for every
    cond/uncond half together; the halves are split and averaged in :meth:`snapshot`. No host
    sync (sigma is the Python float the step wrapper already read). A model call at a higher sigma than the previous one starts a new
    run (samplers go from high to low noise) and clears the record. At most ``max_steps`` steps
    are kept: beyond that every other step is dropped, so the record still spans the whole run.
    Maps are area-downsampled on the device to at most ``max_side`` per side.
    """

    def __init__(self, max_steps: int = 48, max_side: int = 64):
        self.max_steps = max_steps
        self.max_side = max_side
        self._steps: List[_Step] = []

    def clear(self) -> None:
        self._steps = []

    def __len__(self) -> int:
        return len(self._steps)

    def _step_for(self, sigma: Optional[float]) -> _Step:
        last = self._steps[-1] if self._steps else None
        if last is not None and last.sigma == sigma:
            return last
        if last is not None and sigma is not None and last.sigma is not None and sigma > last.sigma:
            self.clear()  # a new sampling run
        step = _Step(sigma)
        self._steps.append(step)
        if len(self._steps) > self.max_steps:
            self._steps = self._steps[:-1][::2] + [step]  # thin out, keep the current step
        return step

    def record(self, sigma: Optional[float], codes: List[int], grid: Tuple[int, int], r1: torch.Tensor) -> None:
        step = self._step_for(sigma)
        gh, gw = grid
        maps = r1.detach().reshape(len(codes), -1, gh, gw)
        if gh > self.max_side or gw > self.max_side:
            scale = self.max_side / max(gh, gw)
            size = (max(1, round(gh * scale)), max(1, round(gw * scale)))
            maps = F.interpolate(maps.float().flatten(0, 1).unsqueeze(1), size=size, mode="area").squeeze(1).reshape(len(codes), -1, *size)
        key = (grid, tuple(int(c) for c in codes))
        total = step.sums.get(key)
        if total is not None and total.shape == maps.shape:
            total.add_(maps)  # float32 sum, any map dtype: one launch for every half of the call
            step.counts[key] += 1
        else:
            step.sums[key] = maps.float().clone()
            step.counts[key] = 1

    def snapshot(self) -> RouterMaps:
        """Averages per step, moved to the CPU (call after sampling, from the inspect node)."""
        steps, maps = [], []
        for step in self._steps:
            steps.append(step.sigma)
            halves: Dict[Tuple[Tuple[int, int], int], List] = {}  # (grid, code) -> [sum, count]
            for (grid, codes), total in step.sums.items():
                for i, code in enumerate(codes):
                    acc = halves.get((grid, code))
                    if acc is None or acc[0].shape != total[i].shape:
                        halves[(grid, code)] = [total[i].clone(), step.counts[(grid, codes)]]
                    else:
                        acc[0] += total[i]
                        acc[1] += step.counts[(grid, codes)]
            maps.append({key: (acc[0] / acc[1]).cpu() for key, acc in halves.items()})
        return RouterMaps(tuple(steps), tuple(maps))

