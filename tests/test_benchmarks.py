"""The benchmark harness in its quickest mode: structure, floors, geometry; never timings."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import pack

from benchmarks import run as bench_run
from benchmarks.geometry import layer_table
from benchmarks.models import Config, step_inputs
from benchmarks.reference_stages import MinimalDecoupledStage
from benchmarks.scenarios import SCENARIOS
from benchmarks.step_timer import run_round

dispatcher = pack("nodes.dispatcher")


class Recorder(dispatcher.AttentionStage):
    """Records (layer, rows, query tokens, width, heads) of every attn2 call."""

    label = "recorder"

    def __init__(self, seen):
        super().__init__(dispatcher.StageSchedule())
        self.seen = seen

    def forward(self, call, out, region):
        self.seen.append((call.layer, call.q.shape[0], call.q.shape[1], call.q.shape[2], call.heads))
        return out


def probe(model, arch, latent_hw):
    """Per attn2 call of one real sampler step: what the layer actually received."""
    seen = []
    patched = dispatcher.apply_attention_stage(model, Recorder(seen))
    run_round(patched, step_inputs(model, Config(arch, latent_hw)), warmup=0, steps=1)
    return seen


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_layer_table_matches_a_real_step(tiny, arch):
    """geometry's analytic token grids equal the q shapes of one CFG step (odd, non-square latent)."""
    model = tiny.unet(arch)
    latent = (6, 5)
    seen = probe(model, arch, latent)
    table = layer_table(model, latent)
    assert [(g.key, 2, g.tokens, g.inner, g.heads) for g in table] == seen  # one call per layer, batch 2 (cond + uncond)


def test_minimal_decoupled_stage_matches_formula():
    """out + w * softmax(q K_id^T / sqrt(d)) V_id per row, uncond chunk first, in float64."""
    gen = torch.Generator().manual_seed(3)
    heads, d, n, t, dim = 4, 8, 6, 3, 10
    c = heads * d
    q = torch.randn(2, n, c, generator=gen)
    out = torch.randn(2, n, c, generator=gen)
    weights = {"to_k": torch.randn(c, dim, generator=gen), "to_v": torch.randn(c, dim, generator=gen)}
    cond, uncond = torch.randn(1, t, dim, generator=gen), torch.randn(1, t, dim, generator=gen)

    class Adapter:
        def layer(self, key):
            return weights

    class Tokens:
        pass

    tokens = Tokens()
    tokens.cond, tokens.uncond = cond, uncond
    stage = MinimalDecoupledStage(dispatcher.StageSchedule(weight=0.7), Adapter(), tokens)
    call = dispatcher.AttentionCall(q, q, q, {"n_heads": heads, "dim_head": d, "cond_or_uncond": [1, 0]}, ("input", 1, 0))
    got = stage.forward(call, out, None)

    expected = []
    for row, ctx in enumerate((uncond, cond)):  # cond_or_uncond [1, 0]: uncond rows first
        k = (ctx[0].double() @ weights["to_k"].double().T).reshape(t, heads, d).transpose(0, 1)
        v = (ctx[0].double() @ weights["to_v"].double().T).reshape(t, heads, d).transpose(0, 1)
        qh = q[row].double().reshape(n, heads, d).transpose(0, 1)
        attn = torch.softmax(qh @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
        expected.append(out[row].double() + 0.7 * attn.transpose(0, 1).reshape(n, c))
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_quick_run_writes_the_table(tiny, tmp_path):
    """One round, one step, every scenario: the table, the ratios and the floors are there."""
    results, data = tmp_path / "RESULTS.md", tmp_path / "results.json"
    code = bench_run.main(
        ["--device", "cpu", "--configs", "sd15:8", "--rounds", "1", "--steps", "1", "--warmup", "0", "--out", str(results), "--json", str(data)]
    )
    assert code == 0
    text = results.read_text()
    assert re.search(r"^## \d{4}-\d\d-\d\d .* · CPU, micro models, float32", text, re.M)
    assert "commit `" in text and "host ComfyUI" in text and "attention `" in text
    lines = text.splitlines()
    header = lines.index("| " + " | ".join(bench_run_report().COLUMNS) + " |")
    rows = [line for line in lines[header + 2 :] if line.startswith("| `")]
    names = [re.match(r"\| `([^`]+)`", line).group(1) for line in rows[: len(SCENARIOS)]]
    assert names == list(SCENARIOS)  # every registered scenario has a row, the reference first
    cells = {name: [c.strip() for c in line.strip("|").split("|")] for name, line in zip(names, rows)}
    for name in ("unpatched", "unpatched_control", "dispatcher_overhead", "minimal_decoupled"):
        status, step_ms, ratio = cells[name][1:4]
        assert status == "ok"
        assert float(step_ms) > 0 and float(ratio.split()[0]) > 0
    for name in ("pva_joint", "stfg_exact", "full_stack"):
        assert cells[name][1].startswith("not available"), cells[name]
        assert cells[name][2] == "—"
    assert float(cells["minimal_decoupled"][6].split()[0]) > 0  # extra GFLOP of the floor
    assert cells["dispatcher_overhead"][5] == "0"  # no arithmetic, no floor
    assert "| `identity_encoding` | not available" in text

    report = json.loads(data.read_text())
    (config,) = report["configs"]
    by_name = {row["scenario"]: row for row in config["rows"]}
    assert by_name["unpatched"]["ratios"] == [1.0]
    assert len(by_name["minimal_decoupled"]["ratios"]) == 1 and by_name["minimal_decoupled"]["ratios"][0] > 0

    # the decoupled floor, from the shapes a real step delivers (not from geometry.py)
    seen = probe(tiny.unet("sd15"), "sd15", (8, 8))
    t = 4
    expected = sum(4 * b * n * t * c + 5 * b * h * n * t + 2 * b * n * c for _, b, n, c, h in seen)
    assert by_name["minimal_decoupled"]["floor"]["flops"] == expected
    assert by_name["full_stack"]["floor"]["flops"] > by_name["pva_joint"]["floor"]["flops"] > 0


def bench_run_report():
    from benchmarks import report

    return report
