"""STFG's text-attention map, recorded through the dispatcher during the normal model call.

The stage does not change the attention: it returns ``out`` itself (the layer's text
attention as the host computed it, bit for bit), and only measures, per cond row, the
content attention mass (``adapters/attention/text_attention_mass.py``) at the recorded layers and
averages their maps, upsampled (bilinear) to the latent grid: appendix Eq. 11 (mean over
text tokens and layers, each map upsampled to H x W). ``layers``:

- ``"all"`` (default, the paper: every text cross-attention layer);
- ``"low_resolution"``: only layers whose token grid is 1/4 of the latent's
  side or coarser (SD1.5 input 7-8, middle, output 3-5: 16x16 and 8x8 at
  512 px; SDXL input 7-8, middle, output 0-2: 32x32 at 1024 px): cheaper, the
  coarse semantic layout only.

Cost per layer read: ONE fused attention call of the cond rows' q and k with the content
indicator as values (made once per sampling), so no ``[B, H, N, 77]`` probabilities are
materialised. Its per-head map is kept as it is (a view of that call's output) until the
step's :meth:`~STFGAttentionStage.take`, which reduces each layer grid's maps over layers and
heads in one sum, upsamples each grid once and adds them: nothing else launches per layer.
The kept outputs are bounded (:data:`KEEP_BYTES`): past it a grid's maps are summed early.
(Folding the mass into the text attention's own call saves that call's FLOPs but needs a
pad of q and k and a cat of v per layer, and would keep the text output alive with it.)

Only the positive prompt's rows are measured: the boundary is where *the edit
prompt* barely reaches.

The post-CFG guidance of the same step takes the map with :meth:`take`; a
step outside the start/end window records nothing, so no guidance happens
there.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ...adapters.attention.text_attention_mass import content_mass_per_head
from ..dispatch.dispatcher import AttentionCall, AttentionStage, StageSchedule
from ..common.host import latent_hw
from ..common.sampling_scope import sampling_cache

LOW_RES_FACTOR = 4
BOUNDARY_LAYERS = ("all", "low_resolution")
_COND = 0
KEEP_BYTES = 256 * 2**20
"""Most bytes of attention outputs the kept per-layer maps may hold alive in one step; past it a
grid's maps are summed into one tensor (two launches) and their outputs freed."""


def is_low_resolution(grid: Tuple[int, int], latent: Tuple[int, int]) -> bool:
    """Whether a layer's grid is the latent's downsampled at least ``LOW_RES_FACTOR`` times per side."""
    return grid[0] <= -(-latent[0] // LOW_RES_FACTOR) and grid[1] <= -(-latent[1] // LOW_RES_FACTOR)


class STFGAttentionStage(AttentionStage):
    """Records the positive rows' content attention mass at every layer, or at the low-resolution ones.

    A pure observer: with ``apply_to`` "both" (the default) or "cond" it measures the cond rows
    and returns the attention it is given, bit for bit. Maps are kept per layer grid and
    reduced, upsampled and averaged once per step in :meth:`take` (upsampling is linear: the
    mean of upsampled maps equals the upsampled sums over the count).
    """

    reads_attention_maps = True  # the cost ledger counts its budget per layer it reads
    needs_step_sigma = True  # its per-step maps are keyed by sigma: read once per step, before the layers

    label = "STFG text-attention map"

    def __init__(self, schedule: StageSchedule, layers: str = "all"):
        super().__init__(schedule)
        if layers not in BOUNDARY_LAYERS:
            raise ValueError(f"layers must be one of {BOUNDARY_LAYERS}, got {layers!r}")
        self.layers = layers
        self.paused = False  # set while STFG's own gradient pass re-runs the model
        # layer grid -> [(map [b, H, n] per head, layers it sums)], this step's
        self._maps: Dict[Tuple[int, int], List[Tuple[torch.Tensor, int]]] = {}
        self._kept = 0  # bytes of attention outputs the kept maps hold alive
        self._count = 0
        self._key = None  # (sigma, latent grid, rows) of the step being recorded
        self._fresh = False

    def is_active(self, call: AttentionCall) -> bool:
        """At the recorded layers (``low_resolution``: elsewhere the dispatcher skips the stage entirely)."""
        if self.paused or not super().is_active(call):
            return False
        latent = latent_hw(call.extra_options)
        if latent is None:
            return False
        return self.layers == "all" or is_low_resolution(call.token_grid(), latent)

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if _COND in call.chunks:
            keep = [code == _COND for code in call.chunks]
            cond = call if all(keep) else call.select_chunks(keep)  # views of one chunk's rows
            q, k = (cond.q.float(), cond.k.float()) if call.upcast else (cond.q, cond.k)  # the host's attn_precision
            self._add(call, content_mass_per_head(q, k, cond.heads, sampling_cache(call.extra_options)))
        return out

    def _add(self, call: AttentionCall, per_head: torch.Tensor) -> None:
        """Keep one layer's ``[b, H, N]`` cond-row map for this step's :meth:`take` (no launch)."""
        grid = call.token_grid()
        key = (call.sigma, latent_hw(call.extra_options), per_head.shape[0])
        if key != self._key:
            self._maps, self._kept, self._count, self._key = {}, 0, 0, key
        maps = self._maps.setdefault(grid, [])
        maps.append((per_head, 1))
        self._kept += per_head.untyped_storage().nbytes()
        self._count += 1
        self._fresh = True
        if self._kept > KEEP_BYTES and len(maps) > 1:
            # memory over launches: sum this grid's maps now (float32, heads kept) and free their outputs
            summed = torch.stack([m for m, _ in maps]).sum(dim=0, dtype=torch.float32)
            self._kept -= sum(m.untyped_storage().nbytes() for m, _ in maps)
            self._maps[grid] = [(summed, sum(n for _, n in maps))]
            self._kept += summed.untyped_storage().nbytes()

    def take(self) -> Optional[Tuple[Optional[float], torch.Tensor]]:
        """``(sigma, A)`` recorded since the last take, ``A`` ``[b, H, W]`` float32; None if nothing new.

        ``A`` = the mean over the recorded layers and heads of each layer's map upsampled
        (bilinear) to the latent grid. Per layer grid: one sum over its layers and heads, one
        upsampling (none at the latent's own grid), one scaled add.
        """
        if not self._fresh:
            return None
        self._fresh = False
        sigma, latent, _ = self._key
        total, total_scale = None, 1.0
        for grid, maps in self._maps.items():
            tensors = [m for m, _ in maps]
            stacked = tensors[0] if len(tensors) == 1 else torch.stack(tensors)  # [(L,) b, H, n]
            heads = stacked.shape[-2]
            summed = stacked.sum(dim=(1,) if len(tensors) == 1 else (0, 2), dtype=torch.float32).reshape(-1, *grid)
            if tuple(grid) != tuple(latent):
                summed = F.interpolate(summed.unsqueeze(1), size=latent, mode="bilinear", align_corners=False)[:, 0]
            scale = 1.0 / (self._count * heads)  # this grid's maps in the mean over layers and heads
            if total is None:
                total, total_scale = summed, scale
            else:
                total = torch.add(total, summed, alpha=scale / total_scale)
        self._maps, self._kept = {}, 0  # the outputs they hold are free to go
        return sigma, (total * total_scale).clamp_(0.0, 1.0)
