"""STFG's text-attention map, recorded through the dispatcher during the normal model call.

The stage leaves the attention output untouched (it returns ``out`` itself, so
the image is bit-identical); it only measures, per cond row, the content
attention mass (``adapters/text_attention_mass.py``) at the *low-resolution*
layers and averages their maps, upsampled (bilinear) to the latent grid.
That is appendix Eq. 11 (mean over text tokens and layers, each map
upsampled to H x W) over these layers:

    layers whose token grid is 1/4 of the latent's side or coarser:
    SD1.5 input 7-8, middle, output 3-5 (16x16 and 8x8 at 512 px);
    SDXL  input 7-8, middle, output 0-2 (32x32 at 1024 px).

The paper averages every text cross-attention layer of its reference net;
the coarse layers carry the semantic layout the boundary is read from, and
materialising ``[B, H, N, 77]`` probabilities at the 64x64 layers would cost
more than the rest of the guidance. Only the positive prompt's rows are
measured (the schedule's ``apply_to = "cond"``): the boundary is where *the
edit prompt* barely reaches.

The post-CFG guidance of the same step takes the map with :meth:`take`; a
step outside the start/end window records nothing, so no guidance happens
there.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..adapters.text_attention_mass import content_attention_mass
from .dispatcher import AttentionCall, AttentionStage, StageSchedule
from .host import latent_hw

LOW_RES_FACTOR = 4


def is_low_resolution(grid: Tuple[int, int], latent: Tuple[int, int]) -> bool:
    """Whether a layer's grid is the latent's downsampled at least ``LOW_RES_FACTOR`` times per side."""
    return grid[0] <= -(-latent[0] // LOW_RES_FACTOR) and grid[1] <= -(-latent[1] // LOW_RES_FACTOR)


class STFGAttentionStage(AttentionStage):
    label = "STFG text-attention map"

    def __init__(self, schedule: StageSchedule):
        super().__init__(schedule)
        self.paused = False  # set while STFG's own gradient pass re-runs the model
        self._sum: Optional[torch.Tensor] = None
        self._count = 0
        self._key = None
        self._fresh = False

    def forward(self, call: AttentionCall, out: torch.Tensor, region: Optional[torch.Tensor]) -> torch.Tensor:
        if self.paused:
            return out
        latent = latent_hw(call.extra_options)
        if latent is None:
            return out
        grid = call.token_grid()
        if not is_low_resolution(grid, latent):
            return out
        mass = content_attention_mass(call.q, call.k, call.heads)  # [b, N]
        up = F.interpolate(mass.reshape(-1, 1, grid[0], grid[1]), size=latent, mode="bilinear", align_corners=False)[:, 0]
        key = (call.sigma, tuple(up.shape))
        if self._sum is None or key != self._key:
            self._sum, self._count, self._key = up, 1, key
        else:
            self._sum, self._count = self._sum + up, self._count + 1
        self._fresh = True
        return out

    def take(self) -> Optional[Tuple[Optional[float], torch.Tensor]]:
        """``(sigma, A)`` recorded since the last take, ``A`` ``[b, H, W]`` float32; None if nothing new."""
        if not self._fresh:
            return None
        self._fresh = False
        return self._key[0], self._sum / self._count
