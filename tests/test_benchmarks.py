"""The benchmark harness in its quickest mode: structure, floors, geometry, the scenarios' patches; never timings."""

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
from benchmarks.scenario_inputs import BenchContext, node_defaults
from benchmarks.scenarios import FULL_STACK, SCENARIOS
from benchmarks.step_timer import run_round

dispatcher = pack("nodes.dispatch.dispatcher")
gradient_support = pack("nodes.dispatch.gradient_support")


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


def insightface_installed() -> bool:
    try:
        pack("adapters.faces.face_analysis").require_insightface()
        return True
    except Exception:
        return False


def test_quick_run_writes_the_table(tiny, tmp_path):
    """One round, one step, every scenario: the table, the ratios and the floors are there.

    Every mechanism scenario runs through its node on the micro model; only stfg_exact waits
    for a host that can take a gradient through the UNet (not the CI host), and says why.
    """
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
    exact_here, why_not = gradient_support.gradient_support()
    for name in SCENARIOS:
        status, step_ms, ratio = cells[name][1:4]
        if name == "stfg_exact" and not exact_here:
            assert status.startswith("not available: this host cannot take a gradient through the UNet") and why_not in status
            assert step_ms == "—"
            continue
        assert status == "ok", (name, status)
        assert float(step_ms) > 0 and float(ratio.split()[0]) > 0
    assert float(cells["minimal_decoupled"][6].split()[0]) > 0  # extra GFLOP of the floor
    assert cells["dispatcher_overhead"][5] == "0"  # no arithmetic, no floor
    encoding = "| `identity_encoding` | ok | " if insightface_installed() else "| `identity_encoding` | not available"
    assert encoding in text
    assert "| `personalization_40_steps` | ok | " in text

    report = json.loads(data.read_text())
    (config,) = report["configs"]
    by_name = {row["scenario"]: row for row in config["rows"]}
    assert by_name["unpatched"]["ratios"] == [1.0]
    assert len(by_name["minimal_decoupled"]["ratios"]) == 1 and by_name["minimal_decoupled"]["ratios"][0] > 0
    assert all(row["identity"] is None for row in config["rows"])  # --score-identity is off by default

    # the decoupled floor, from the shapes a real step delivers (not from geometry.py)
    seen = probe(tiny.unet("sd15"), "sd15", (8, 8))
    t = 4
    expected = sum(4 * b * n * t * c + 5 * b * h * n * t + 2 * b * n * c for _, b, n, c, h in seen)
    assert by_name["minimal_decoupled"]["floor"]["flops"] == expected
    # the stack counts MoA's router once, on pva_joint's branch (not a second branch)
    flops = {name: by_name[name]["floor"]["flops"] for name in FULL_STACK}
    router = by_name["moa"]["floor"]["flops"] - by_name["pva_joint"]["floor"]["flops"]
    assert router > 0
    assert by_name["full_stack"]["floor"]["flops"] == pytest.approx(sum(flops.values()) - flops["pva_joint"])


def test_scenarios_patch_as_their_nodes(tiny):
    """What each scenario puts on the model is its node's patch at the node's defaults, and the stack has each once."""
    model = tiny.unet("sd15")
    config = Config("sd15", (8, 8))
    inputs = step_inputs(model, config)
    ctx = BenchContext("sd15", torch.device("cpu"), torch.float32, inputs.latent, layer_table(model, config.latent_hw))
    stage = pack("nodes.pva.parallel_attention_stage")

    def stages(patched):
        found = dispatcher.installed_dispatcher(patched.model)
        return list(found.stages) if found else []

    joint = SCENARIOS["pva_joint"].patch(model, ctx)
    (pva,) = stages(joint)
    assert isinstance(pva, stage.ParallelAttentionStage) and pva.mode == "joint"
    assert pva.source.token_count == 10 and pva.source.has_query and pva.schedule.weight == 1.0
    (decoupled,) = stages(SCENARIOS["pva_decoupled"].patch(model, ctx))
    assert decoupled.mode == "decoupled" and decoupled.source.token_count == 16
    moa = stages(SCENARIOS["moa"].patch(model, ctx))
    assert [type(s).__name__ for s in moa] == ["ParallelAttentionStage", "MixtureOfAttentionStage"]
    assert moa[1].router == "identity_attention" and moa[1].identity_stages == (moa[0],)

    stack = SCENARIOS["full_stack"].patch(model, ctx)
    names = [type(s).__name__ for s in stages(stack)]
    assert names == ["ParallelAttentionStage", "MixtureOfAttentionStage", "CA2GateStage", "STFGAttentionStage", "NestedAttentionStage"]
    options = stack.model.model_options
    patches = options["transformer_options"]["patches"]
    assert sum(getattr(p, "identity_attention_face_adapter", False) for p in patches["middle_patch"]) == 1
    assert sum(getattr(p, "identity_attention_stage_tokens", False) for p in patches["attn2_patch"]) == 1
    assert sum(getattr(f, "identity_attention_stfg", False) for f in options["sampler_post_cfg_function"]) == 1
    assert stack.noise_mask is not None and stack.latent is not None  # STFG's inpainting edit
    assert not dispatcher.installed_dispatcher(model)  # the input MODEL is untouched

    defaults = node_defaults(pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention)
    assert defaults["mode"] == "auto" and defaults["weight"] == 1.0 and defaults["references"] == "fused"
    assert "model" not in defaults and "mask" not in defaults  # sockets have no default


def test_score_identity_samples_decodes_and_scores(tmp_path):
    """--score-identity: one row per scenario with the real recognizer's verdict (random weights draw no faces)."""
    from harness import real_face_pack, real_face_photos

    results = tmp_path / "RESULTS.md"
    code = bench_run.main(
        ["--device", "cpu", "--configs", "sd15:8", "--rounds", "1", "--steps", "1", "--warmup", "0", "--tasks", "none",
         "--scenarios", "unpatched,pva_joint", "--score-identity", "--out", str(results)]
    )
    assert code == 0
    text = results.read_text()
    assert "| scenario | identity similarity of one sampled image (--score-identity) |" in text
    cached = (real_face_pack.pack_dir() / "LICENSE.txt").is_file() and (real_face_photos.folder() / "fr_obama.jpg").is_file()
    if cached and insightface_installed():
        assert "- identity: one image per scenario" in text and "yunet_sface" in text
        for name in ("unpatched", "pva_joint"):
            assert re.search(rf"^\| `{name}` \| (no face \(0/1\)|0\.\d+ \(1/1 with a face\)) \|$", text, re.M), text
    else:
        assert "- identity: scorer unavailable" in text and "| `pva_joint` | scorer unavailable" in text


def bench_run_report():
    from benchmarks import report

    return report


def test_layer_costs_captures_every_attn2_call_and_compares_with_the_host(tiny):
    """benchmarks/layer_costs.py: one call per attn2 layer, the scenario's replace and the host's attention both timed."""
    from benchmarks import layer_costs

    model = tiny.unet("sd15")
    step, costs = layer_costs.measure(model, Config("sd15", (8, 8)), ["dispatcher_overhead", "pva_joint"], repeats=2, log=lambda msg: None)
    assert step > 0
    assert [c.scenario for c in costs] == ["dispatcher_overhead", "pva_joint"]
    for cost in costs:
        assert cost.status == "ok" and cost.calls == 16 and cost.patched_ms > 0 and cost.host_ms > 0
    text = layer_costs.table("sd15 test", step, costs)
    assert "| `pva_joint` | 16 |" in text
