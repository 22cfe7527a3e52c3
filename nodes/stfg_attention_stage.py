"""STFG's text-attention map, recorded through the dispatcher during the normal model call.

The stage does not change the attention (after other stages it returns ``out``
itself; as the first stage of a call it returns the layer's text attention,
computed in the same fused call as the mass); it only measures, per cond row,
the content attention mass (``adapters/text_attention_mass.py``) at the
recorded layers and averages their maps, upsampled (bilinear) to the latent
grid: appendix Eq. 11 (mean over text tokens and layers, each map upsampled
to H x W). ``layers``:

- ``"all"`` (default, the paper: every text cross-attention layer). The mass
  is one fused SDPA call per layer with the content indicator as values, so no
  ``[B, H, N, 77]`` probabilities are materialised even at the 64x64 layers
  (memory: one ``[b, N]`` map per layer); as the first stage of a call it
  comes out of the text attention's own call, otherwise it costs one more
  attention call per layer per step.
- ``"low_resolution"``: only layers whose token grid is 1/4 of the latent's
  side or coarser (SD1.5 input 7-8, middle, output 3-5: 16x16 and 8x8 at
  512 px; SDXL input 7-8, middle, output 0-2: 32x32 at 1024 px): cheaper, the
  coarse semantic layout only.

Only the positive prompt's rows are measured: the boundary is where *the edit
prompt* barely reaches.

The post-CFG guidance of the same step takes the map with :meth:`take`; a
step outside the start/end window records nothing, so no guidance happens
there.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..adapters.text_attention_mass import content_attention_mass, text_attention_with_mass
from .dispatcher import AttentionCall, AttentionStage, StageSchedule
from .host import latent_hw

LOW_RES_FACTOR = 4
BOUNDARY_LAYERS = ("all", "low_resolution")
_COND = 0


def is_low_resolution(grid: Tuple[int, int], latent: Tuple[int, int]) -> bool:
    """Whether a layer's grid is the latent's downsampled at least ``LOW_RES_FACTOR`` times per side."""
    return grid[0] <= -(-latent[0] // LOW_RES_FACTOR) and grid[1] <= -(-latent[1] // LOW_RES_FACTOR)


class STFGAttentionStage(AttentionStage):
    """Records the positive rows' content attention mass at every layer, or at the low-resolution ones.

    Its schedule's ``apply_to`` is normally "both": the stage sees every row (so, as the first
    stage of a call, it can take the text attention and its mass from ONE fused call,
    :meth:`forward_first`) and measures the cond rows only. With ``apply_to = "cond"`` it runs
    on the cond rows and leaves the attention output bit-identical (a pure observer).
    Maps are summed per layer grid and upsampled once per step, in :meth:`take` (upsampling is
    linear: the mean of upsampled maps equals the upsampled sums over the count).
    """

    reads_attention_maps = True  # the cost ledger counts its budget per layer it reads
    needs_step_sigma = True  # its per-step sums are keyed by sigma: read once per step, before the layers

    label = "STFG text-attention map"

    def __init__(self, schedule: StageSchedule, layers: str = "all"):
        super().__init__(schedule)
        if layers not in BOUNDARY_LAYERS:
            raise ValueError(f"layers must be one of {BOUNDARY_LAYERS}, got {layers!r}")
        self.layers = layers
        self.paused = False  # set while STFG's own gradient pass re-runs the model
        self._sums: Dict[Tuple[int, int], torch.Tensor] = {}  # layer grid -> [b, h, w] summed mass
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

    def forward_first(self, call: AttentionCall) -> Optional[torch.Tensor]:
        if _COND not in call.chunks:
            return None
        text, mass = text_attention_with_mass(call.q, call.k, call.v, call.heads, upcast=call.upcast)
        keep = [code == _COND for code in call.chunks]
        self._add(call, mass if all(keep) else call.take_chunks(mass, keep))
        return text

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if _COND in call.chunks:
            keep = [code == _COND for code in call.chunks]
            cond = call if all(keep) else call.select_chunks(keep)
            self._add(call, content_attention_mass(cond.q, cond.k, cond.heads))
        return out

    def _add(self, call: AttentionCall, mass: torch.Tensor) -> None:
        """Add one layer's ``[b, N]`` cond-row mass to this step's per-grid sums."""
        grid = call.token_grid()
        maps = mass.reshape(-1, grid[0], grid[1])
        key = (call.sigma, latent_hw(call.extra_options), maps.shape[0])
        if key != self._key:
            self._sums, self._count, self._key = {}, 0, key
        previous = self._sums.get(grid)
        self._sums[grid] = maps if previous is None else previous + maps
        self._count += 1
        self._fresh = True

    def take(self) -> Optional[Tuple[Optional[float], torch.Tensor]]:
        """``(sigma, A)`` recorded since the last take, ``A`` ``[b, H, W]`` float32; None if nothing new.

        ``A`` = the mean over the recorded layers of each layer's map upsampled (bilinear) to the latent grid.
        """
        if not self._fresh:
            return None
        self._fresh = False
        sigma, latent, _ = self._key
        total = None
        for summed in self._sums.values():
            up = F.interpolate(summed.unsqueeze(1), size=latent, mode="bilinear", align_corners=False)[:, 0]
            total = up if total is None else total + up
        return sigma, total / self._count
