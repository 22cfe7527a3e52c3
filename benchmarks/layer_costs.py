"""What each scenario adds to the cross-attention calls themselves: ``python -m benchmarks.layer_costs``.

A whole sampling step on shared CPU cores is noisy (the ``unpatched_control`` rows of
RESULTS.md range ±10-25 %), too noisy to see a 3 % overhead. This measures the part the
mechanisms change, each attn2 call, in isolation:

1. one sampler step of the patched model runs with every attn2 replace wrapped, capturing
   each layer's ``q, k, v, extra_options`` as the host passes them (hidden-state stash and
   all);
2. per layer, the scenario's replace (our dispatcher) and the host's own attention on the
   same inputs are timed alternately, ``repeats`` times each (process CPU time, one torch
   thread); the mean of the fastest fifth is kept (noise only ever adds time);
3. the sum over layers of (replace - host) is reported as a share of the unpatched step
   (its fastest fifth over ``repeats`` steps).

Only what runs inside attn2 is counted: post-CFG hooks (STFG's update), attn1 / block
patches (the face adapter) and the hidden-state stash are not. The full-step benchmark
(``benchmarks.run``) counts everything.

    python -m benchmarks.layer_costs [--configs sd15:16,sdxl:16] [--scenarios pva_joint,moa] [--repeats 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .host_setup import REPO, describe, pack, prepare

DEFAULT_SCENARIOS = "dispatcher_overhead,minimal_decoupled,pva_joint,pva_decoupled,kv_mixed,moa,ca2,stfg_fast,nested"


@dataclass
class LayerCost:
    scenario: str
    status: str  # "ok" or why not
    patched_ms: float = 0.0  # per step, summed over attn2 calls
    host_ms: float = 0.0  # the host's attention on the same calls
    calls: int = 0

    @property
    def extra_ms(self) -> float:
        return self.patched_ms - self.host_ms


def fastest_fifth(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds of the fastest fifth of ``repeats`` calls (process CPU time)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    times.sort()
    keep = max(1, repeats // 5)
    return sum(times[:keep]) / keep


def capture_calls(patched, inputs) -> list:
    """``(replace, q, k, v, extra_options)`` of every attn2 call of one CFG step (first call per layer)."""
    from .step_timer import run_round

    replaces = patched.model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if not replaces:
        return []
    originals = dict(replaces)
    seen: Dict[tuple, tuple] = {}
    for key, fn in originals.items():

        def wrap(q, k, v, eo, fn=fn, key=key):
            seen.setdefault(key, (fn, q, k, v, dict(eo)))
            return fn(q, k, v, eo)

        replaces[key] = wrap
    try:
        run_round(patched.model, inputs, 0, 1, noise_mask=patched.noise_mask, latent=patched.latent)
    finally:
        replaces.update(originals)
    return list(seen.values())


def measure(model, config, names: List[str], repeats: int, log=print) -> tuple:
    """``(unpatched step seconds, [LayerCost])`` for one model and configuration."""
    from .geometry import layer_table
    from .models import step_inputs
    from .scenarios import SCENARIOS, BenchContext, ScenarioUnavailable
    from .step_timer import run_round

    host = pack("nodes.common.host")
    inputs = step_inputs(model, config)
    table = layer_table(model, config.latent_hw, batch=2, text_tokens=77)
    ctx = BenchContext(config.arch, torch.device(model.load_device), model.model.get_dtype(), inputs.latent, table, {})
    plain = SCENARIOS["unpatched"].patch(model, ctx)
    times = sorted(run_round(plain.model, inputs, 1, repeats).times)
    keep = max(1, repeats // 5)
    step = sum(times[:keep]) / keep
    costs = []
    for name in names:
        try:
            patched = SCENARIOS[name].patch(model, ctx)
        except ScenarioUnavailable as exc:
            costs.append(LayerCost(name, f"not available: {exc}"))
            continue
        calls = capture_calls(patched, inputs)
        if not calls:
            costs.append(LayerCost(name, "not measured: it installs no attn2 replace"))
            continue
        cost = LayerCost(name, "ok", calls=len(calls))
        with torch.inference_mode():
            for fn, q, k, v, eo in calls:
                cost.patched_ms += 1e3 * fastest_fifth(lambda: fn(q, k, v, eo), repeats)
                cost.host_ms += 1e3 * fastest_fifth(lambda: host.host_attention(q, k, v, eo["n_heads"], eo), repeats)
        log(f"  {name}: +{cost.extra_ms:.2f} ms over {cost.calls} attn2 calls")
        costs.append(cost)
    return step, costs


def table(title: str, step: float, costs: List[LayerCost]) -> str:
    lines = [
        f"### {title}",
        "",
        f"unpatched step {step * 1e3:.2f} ms (fastest fifth)",
        "",
        "| scenario | attn2 calls | attn2 ms, patched | attn2 ms, host's attention | extra ms | extra, % of the step |",
        "|---|---|---|---|---|---|",
    ]
    for c in costs:
        if c.status != "ok":
            lines.append(f"| `{c.scenario}` | {c.status} | — | — | — | — |")
            continue
        lines.append(f"| `{c.scenario}` | {c.calls} | {c.patched_ms:.2f} | {c.host_ms:.2f} | {c.extra_ms:+.2f} | {100 * c.extra_ms / (step * 1e3):+.1f}% |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layer_costs", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="sd15:16,sdxl:16")
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="", help="append the tables here (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    prepare("cpu")
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(1)
    from .models import build_model, parse_configs

    facts = describe("cpu")
    parts = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · attn2 costs per layer (benchmarks/layer_costs.py), CPU, micro models, float32",
        "",
        f"- commit `{facts['commit']}` · {facts['device']} · torch {facts['torch']} · host {facts['host']} · host attention `{facts['attention']}` · {args.repeats} repeats per call, fastest fifth",
        "- extra = the scenario's attn2 replace minus the host's attention on the same captured inputs, summed over one step's calls (attn2 only: post-CFG hooks and block patches not counted)",
        "",
    ]
    for config in parse_configs(args.configs):
        model = build_model(config.arch, "micro", torch.device("cpu"), torch.float32)
        print(f"{config.label}", flush=True)
        step, costs = measure(model, config, [n for n in args.scenarios.split(",") if n], args.repeats)
        parts += [table(config.label, step, costs), ""]
    text = "\n".join(parts)
    print("\n" + text)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
