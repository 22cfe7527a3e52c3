"""The Markdown fragment a run prints last and appends to RESULTS.md."""

from __future__ import annotations

import datetime
from typing import List, Optional, Tuple

from .compare import ConfigResult, Row
from .device_ceilings import Ceilings
from .scenarios import SCENARIOS

COLUMNS = (
    "scenario",
    "status",
    "step ms",
    "× unpatched [range]",
    "overhead measured",
    "overhead floor",
    "extra GFLOP (% of step)",
    "extra MB",
    "peak MiB (Δ)",
)
DASH = "—"


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return DASH if x is None else fmt.format(x)


def _pct(x: Optional[float]) -> str:
    if x is None:
        return DASH
    if x == 0:
        return "0"
    if 0 < abs(x) < 0.01:
        return "<0.01%" if x > 0 else ">-0.01%"
    return f"{x:+.2f}%" if abs(x) < 10 else f"{x:+.0f}%"


def row_cells(result: ConfigResult, row: Row, ceilings: Ceilings) -> Tuple[str, ...]:
    ref = result.reference()
    ref_step = ref.step_seconds
    status = row.status if row.finite else row.status + " (non-finite output!)"
    ratio = DASH
    measured = None
    if row.ratio is not None:
        ratio = f"{row.ratio:.3f}"
        if row is not ref:
            ratio += f" [{min(row.ratios):.3f}–{max(row.ratios):.3f}]"
            measured = 100.0 * (row.ratio - 1.0)
    floor_pct = None
    gflop = DASH
    mbytes = DASH
    if row.floor is not None:
        if ref_step and row is not ref:
            floor_pct = 100.0 * row.floor.seconds(ceilings.flops, ceilings.bandwidth) / ref_step
        share = ""
        if result.unet_flops and row.floor.flops:
            pct = 100.0 * row.floor.flops / result.unet_flops
            share = f" ({pct:.2g}%)" if pct < 10 else f" ({pct:.0f}%)"
        gflop = f"{row.floor.flops / 1e9:.3g}{share}"
        mbytes = "n/a" if row.floor.bytes is None else f"{row.floor.bytes / 1e6:.3g}"
        if row.floor.note:
            mbytes += f" ({row.floor.note})"
    peak = result.peak_bytes(row)
    ref_peak = result.peak_bytes(ref)
    if peak is None:
        memory = "n/a" if row.ok else DASH
    else:
        memory = f"{peak / 2**20:.0f}"
        if row is not ref and ref_peak:
            memory += f" ({100.0 * (peak - ref_peak) / ref_peak:+.1f}%)"
    return (
        f"`{row.scenario.name}`",
        status,
        _num(None if row.step_seconds is None else row.step_seconds * 1e3, "{:.2f}"),
        ratio,
        _pct(measured),
        _pct(floor_pct),
        gflop,
        mbytes,
        memory,
    )


def config_section(result: ConfigResult, ceilings: Ceilings) -> List[str]:
    c = result.config
    unet = f"UNet step {result.unet_flops / 1e9:.4g} GFLOP (counted)" if result.unet_flops else "UNet FLOPs not counted"
    att = result.text_attention
    ref = result.reference()
    lines = [
        f"### {c.label}, {result.size.replace('_', '-')}, batch 2 (cond + uncond), 77 text tokens",
        "",
        f"{result.layers} cross-attention layers · {unet} · text attention core of all attn2 layers "
        f"{att.flops / 1e9:.3g} GFLOP, {att.bytes / 1e6:.3g} MB · {ref.steps_timed} timed steps per scenario",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in result.rows:
        lines.append("| " + " | ".join(row_cells(result, row, ceilings)) + " |")
    scored = [row for row in result.rows if row.identity is not None]
    if scored:
        lines += ["", "| scenario | identity similarity of one sampled image (--score-identity) |", "|---|---|"]
        lines += [f"| `{row.scenario.name}` | {row.identity.cell} |" for row in scored]
    return lines + [""]


def fragment(
    title: str,
    facts: dict,
    timing: str,
    ceilings: Ceilings,
    results: List[ConfigResult],
    tasks: List[tuple],
    memory_note: str,
    identity_note: str = "",
) -> str:
    """The whole Markdown fragment of one run."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {now} · {title}",
        "",
        f"- commit `{facts['commit']}` · {facts['device']} · torch {facts['torch']} · host {facts['host']} · "
        f"attention `{facts['attention']}` · Python {facts['python']}",
        f"- timing: {timing}",
        f"- ceilings: {ceilings.describe()}; overhead floor = max(extra FLOPs ÷ matmul rate, extra bytes ÷ copy rate) "
        "÷ the unpatched step (benchmarks/attention_floor.py)",
        f"- memory: {memory_note}",
    ]
    if identity_note:
        lines.append(f"- identity: {identity_note}")
    lines.append("")
    for result in results:
        lines += config_section(result, ceilings)
    if tasks:
        lines += ["| task | status | result |", "|---|---|---|"]
        for name, result, status in tasks:
            value = DASH if result is None else f"{result.value:.3g} {result.unit} ({result.detail})"
            lines.append(f"| `{name}` | {status} | {value} |")
        lines.append("")
    used = {row.scenario.name for r in results for row in r.rows}
    lines.append("Scenarios: " + "; ".join(f"`{n}` ({s.issue}) {s.summary}" for n, s in SCENARIOS.items() if n in used) + ".")
    return "\n".join(lines) + "\n"
