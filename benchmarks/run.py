"""Benchmark every scenario against the unpatched model: ``python -m benchmarks.run``.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--out benchmarks/RESULTS.md]
                             [--configs sd15:64,sdxl:128] [--scenarios a,b] [--json PATH]
                             [--score-identity]

GPU (default when one is present): full-size SD1.5 and SDXL in fp16 at 512²
and 1024² px, 5 rounds x 5 timed steps (+2 warm-up calls per round) per
scenario. CPU: the micro models (real layouts, few channels) in fp32 at small
latents, for a quick relative check. The Markdown table is printed last and
appended to ``--out``; ``--json`` writes every timed step. ``--score-identity``
(off by default) also samples, decodes and scores one image per scenario with
the real face recognizer (``identity_scoring.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .host_setup import REPO, describe, prepare

GPU_CONFIGS = "sd15:64,sdxl:128,sd15:128,sdxl:64"  # SD1.5 512² and SDXL 1024² first: the field's numbers
GPU_QUICK_CONFIGS = "sd15:64,sdxl:128"
CPU_CONFIGS = "sd15:32,sdxl:32"
CPU_QUICK_CONFIGS = "sd15:16,sdxl:16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer configurations and, on the CPU, fewer steps (stated in the table)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "RESULTS.md"), help="append the table here ('' to skip)")
    p.add_argument("--json", default="", help="also write every timed step here")
    p.add_argument("--configs", default="", help=f"arch:latent list (GPU default {GPU_CONFIGS}; CPU {CPU_CONFIGS})")
    p.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all)")
    p.add_argument("--tasks", default="all", help="comma-separated task names, 'all' or 'none'")
    p.add_argument("--size", choices=("micro", "full_size"), default="", help="model size (default: full_size on GPU, micro on CPU)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="", help="UNet dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs; default 1: CPU time per step stays meaningful on shared cores)")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=-1, help="untimed calls per round")
    p.add_argument("--verbose", action="store_true", help="keep ComfyUI's info logging (model loads every round)")
    p.add_argument(
        "--score-identity",
        action="store_true",
        help="after timing, sample one image per scenario, decode it (the test kit's random TAESD) and score it against "
        "reference photos with the real YuNet/SFace recognizer (benchmarks/identity_scoring.py); off by default",
    )
    return p.parse_args(argv)


def plan(args) -> dict:
    """Resolve defaults: what runs where, and how many steps."""
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    if gpu:
        rounds, steps, warmup = 5, 5, 2
        configs = GPU_QUICK_CONFIGS if args.quick else GPU_CONFIGS
    else:
        rounds, steps, warmup = (6, 5, 1) if args.quick else (8, 6, 1)
        configs = CPU_QUICK_CONFIGS if args.quick else CPU_CONFIGS
    return {
        "device": torch.device("cuda" if gpu else "cpu"),
        "dtype": getattr(torch, args.dtype) if args.dtype else (torch.float16 if gpu else torch.float32),
        "size": args.size or ("full_size" if gpu else "micro"),
        "configs": args.configs or configs,
        "rounds": args.rounds or rounds,
        "steps": args.steps or steps,
        "warmup": warmup if args.warmup < 0 else args.warmup,
    }


def timing_note(p: dict, quick: bool) -> str:
    if p["device"].type == "cuda":
        clock = "CUDA events around each call, no host sync between calls"
    else:
        clock = f"process CPU time around each call ({torch.get_num_threads()} torch thread(s); other processes on shared cores not counted)"
    total = p["rounds"] * p["steps"]
    few = f" (quick mode: fewer than 20)" if total < 20 else ""
    return (
        f"one CFG step through ComfyUI's sampler (cond + uncond in one UNet call), {clock}; per scenario "
        f"{p['rounds']} rounds × {p['steps']} steps (+{p['warmup']} warm-up per round) = {total} timed steps{few}; "
        "rounds interleaved (A B … then … B A); × unpatched = median over rounds of (scenario median ÷ unpatched median "
        "in the same round), [min–max over rounds]"
    )


def free(model) -> None:
    import comfy.model_management

    del model
    comfy.model_management.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    p = plan(args)
    prepare(args.device)
    if p["device"].type == "cuda":
        import comfy.model_management

        p["device"] = comfy.model_management.get_torch_device()  # the device object ComfyUI compares against
    root = logging.getLogger()
    level = root.level
    threads = torch.get_num_threads()
    if p["device"].type == "cpu":
        torch.set_num_threads(args.threads)
    if not args.verbose:
        root.setLevel(logging.WARNING)  # ComfyUI logs every model load, i.e. every round
    try:
        return _run(args, p)
    finally:
        root.setLevel(level)
        torch.set_num_threads(threads)


def _run(args, p) -> int:
    from . import device_ceilings, report, scenarios, tasks
    from .compare import compare
    from .models import build_model, parse_configs

    configs = parse_configs(p["configs"])
    chosen = scenarios.selected([n for n in args.scenarios.split(",") if n] or None)
    facts = describe(args.device)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"benchmark on {facts['device']}, {p['size']} models, {p['dtype']}, configs {p['configs']}")
    ceilings = device_ceilings.measure(p["device"], p["dtype"])
    log(f"ceilings: {ceilings.describe()}")

    scoring = None
    if args.score_identity:
        from .identity_scoring import STEPS, IdentityScoring

        scoring = IdentityScoring(log=log)
    results = []
    for arch in dict.fromkeys(c.arch for c in configs):
        t0 = time.perf_counter()
        model = build_model(arch, p["size"], p["device"], p["dtype"])
        log(f"built {arch} {p['size']} in {time.perf_counter() - t0:.1f} s")
        inputs_cache = {}  # the scenarios' synthetic adapters etc., shared by this model's configurations
        for config in (c for c in configs if c.arch == arch):
            log(f"{config.label}: {len(chosen)} scenarios")
            results.append(
                compare(model, config, p["size"], p["dtype"], chosen, p["rounds"], p["steps"], p["warmup"], log=log, cache=inputs_cache, after=scoring)
            )
        del inputs_cache
        free(model)

    task_rows = []
    names = [] if args.tasks == "none" else (list(tasks.TASKS) if args.tasks == "all" else args.tasks.split(","))
    for name in names:
        result, status = tasks.run_task(tasks.TASKS[name], p["device"])
        task_rows.append((name, result, status))

    title = ("GPU" if p["device"].type == "cuda" else "CPU") + f", {p['size'].replace('_', '-')} models, {str(p['dtype']).replace('torch.', '')}"
    title += ", quick mode" if args.quick else ""
    memory = (
        "peak = weights + the scenario's persistent allocations + its transient step peak (torch.cuda.max_memory_allocated)"
        if p["device"].type == "cuda"
        else "n/a on the CPU (no allocator statistics)"
    )
    identity = ""
    if scoring is not None:
        identity = scoring.unavailable or (
            f"one image per scenario, euler {STEPS} steps, decoded by a random TAESD (plumbing: random weights draw no faces), "
            f"scored by {scoring.label}"
        )
    text = report.fragment(title, facts, timing_note(p, args.quick), ceilings, results, task_rows, memory, identity)
    if args.json:
        Path(args.json).write_text(json.dumps(_as_json(facts, p, ceilings, results), indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write("\n" + text)
    print("\n" + text, flush=True)
    failed = [row.scenario.name for r in results for row in r.rows if row.status.startswith("failed")]
    if failed:
        print(f"FAILED scenarios: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _as_json(facts, p, ceilings, results) -> dict:
    return {
        "facts": facts,
        "plan": {k: str(v) for k, v in p.items()},
        "ceilings": dataclasses.asdict(ceilings),
        "configs": [
            {
                "config": r.config.label,
                "unet_flops": r.unet_flops,
                "rows": [
                    {
                        "scenario": row.scenario.name,
                        "status": row.status,
                        "ratios": row.ratios,
                        "times": [rnd.times for rnd in row.rounds],
                        "floor": None if row.floor is None else dataclasses.asdict(row.floor),
                        "peak_bytes": r.peak_bytes(row),
                        "identity": None if row.identity is None else {"scores": row.identity.scores, "note": row.identity.note},
                    }
                    for row in r.rows
                ],
            }
            for r in results
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
