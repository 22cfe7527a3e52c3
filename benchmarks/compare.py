"""Run every scenario of one configuration side by side with the unpatched model.

Rounds are interleaved so drift (clocks, temperature, other processes) hits
every scenario alike: round 0 runs the scenarios in order, round 1 in reverse,
and so on (A B C, C B A, A B C...). A scenario's ratio in a round is the
median of its steps over the median of the unpatched model's steps in the
same round; the table gives the median of those per-round ratios and their
range.
"""

from __future__ import annotations

import statistics
import sys
import traceback
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import attention_floor as floors
from .models import Config, step_inputs
from .scenarios import REFERENCE, BenchContext, Scenario, ScenarioUnavailable
from .step_timer import RoundResult, run_round


@dataclass
class Row:
    scenario: Scenario
    status: str = "ok"  # "ok", "not available: ...", "failed: ..."
    rounds: List[RoundResult] = field(default_factory=list)
    floor: Optional[floors.Floor] = None
    ratios: List[float] = field(default_factory=list)  # per round, over the reference
    identity: Optional[object] = None  # identity_scoring.IdentityScore, with --score-identity

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.rounds)

    @property
    def step_seconds(self) -> Optional[float]:
        times = [t for r in self.rounds for t in r.times]
        return statistics.median(times) if times else None

    @property
    def steps_timed(self) -> int:
        return sum(len(r.times) for r in self.rounds)

    @property
    def ratio(self) -> Optional[float]:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def persistent_bytes(self) -> Optional[int]:
        first = self.rounds[0] if self.rounds else None
        if first is None or first.allocated_before is None:
            return None
        return first.allocated_after - first.allocated_before

    @property
    def transient_peak(self) -> Optional[int]:
        peaks = [r.transient_peak for r in self.rounds if r.transient_peak is not None]
        return max(peaks) if peaks else None

    @property
    def finite(self) -> bool:
        return all(r.finite for r in self.rounds)


@dataclass
class ConfigResult:
    config: Config
    size: str  # "micro" | "full_size"
    dtype: torch.dtype
    layers: int
    base_allocated: Optional[int]  # bytes allocated with only the model loaded (GPU)
    unet_flops: Optional[float]
    text_attention: floors.Floor  # the unpatched attn2 attention core, for scale
    rows: List[Row]

    def reference(self) -> Row:
        return self.rows[0]

    def peak_bytes(self, row: Row) -> Optional[int]:
        """Weights + the scenario's persistent allocations + its transient step peak."""
        if self.base_allocated is None or row.transient_peak is None:
            return None
        return self.base_allocated + (row.persistent_bytes or 0) + row.transient_peak


def _median(times):
    return statistics.median(times)


def compare(model, config: Config, size: str, dtype: torch.dtype, scenarios: List[Scenario], rounds: int, steps: int, warmup: int, log=print, cache: Optional[dict] = None, after=None) -> ConfigResult:
    """Patch ``model`` with each scenario and time them all, interleaved; floors for every row.

    cache: the scenario inputs of this model, shared by its configurations (synthetic adapters take
    seconds to draw). after(rows, patched, inputs, ctx): called once the timing is done, with every
    row and its patched model (``--score-identity`` samples and scores images there).
    """
    from .geometry import layer_table

    device = torch.device(model.load_device)
    inputs = step_inputs(model, config)
    table = layer_table(model, config.latent_hw, batch=2, text_tokens=inputs.positive[0][0].shape[1])
    ctx = BenchContext(config.arch, device, dtype, inputs.latent, table, cache if cache is not None else {})
    base_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    rows = [Row(s) for s in scenarios]
    patched = {}
    for row in rows:
        try:
            patched[row.scenario.name] = row.scenario.patch(model, ctx)
        except ScenarioUnavailable as exc:
            row.status = f"not available: {exc}"
        except Exception as exc:  # a bug in a scenario must not cost the other rows
            traceback.print_exc(file=sys.stderr)
            row.status = f"failed to patch: {type(exc).__name__}: {exc}"
    if rows[0].scenario.name != REFERENCE or not rows[0].status == "ok":
        raise RuntimeError(f"the reference scenario {REFERENCE!r} must run first and succeed: {rows[0].status}")

    for r in range(rounds):
        order = rows if r % 2 == 0 else rows[::-1]
        for row in order:
            if row.status != "ok":
                continue
            p = patched[row.scenario.name]
            try:
                count = row is rows[0] and r == 0
                row.rounds.append(run_round(p.model, inputs, warmup, steps, noise_mask=p.noise_mask, count_flops=count, latent=p.latent))
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                row.status = f"failed while sampling: {type(exc).__name__}: {exc}"
        log(f"  round {r + 1}/{rounds} done")

    reference = rows[0]
    unet_flops = reference.rounds[0].flops if reference.rounds else None
    fi = floors.FloorInputs(table, elem_bytes=torch.finfo(dtype).bits // 8, unet_flops=unet_flops)
    for row in rows:
        row.floor = row.scenario.floor(fi)
        if row.ok and len(row.rounds) == rounds:
            row.ratios = [_median(a.times) / _median(b.times) for a, b in zip(row.rounds, reference.rounds)]
        elif row.status == "ok":
            row.status = "failed: incomplete rounds"
    if after is not None:
        after(rows, patched, inputs, ctx)
    return ConfigResult(
        config=config,
        size=size,
        dtype=dtype,
        layers=len(table),
        base_allocated=base_allocated,
        unet_flops=unet_flops,
        text_attention=floors.unpatched_attention(fi),
        rows=rows,
    )
