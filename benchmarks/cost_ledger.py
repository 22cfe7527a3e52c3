"""The cost ledger: kernels, host syncs and host-to-device copies of one CFG step, per scenario.

No GPU is needed to know most of what a batch-2 GPU step costs: how many kernels each mechanism
launches and whether it makes the host wait. This counts both, on any device, for one sampler
step exactly as ComfyUI runs it (cond + uncond in one UNet call, every ``model_options`` hook),
with a FRESH sigma tensor per call as a real sampler passes (a cache keyed on the sigma tensor
would otherwise hide per-call reads).

Counted with a ``TorchDispatchMode`` over the step, i.e. the backend ops after autograd and
composite decomposition, which is what a GPU launches (on CUDA, torch.profiler's kernel count is
reported next to it):

- ``launches``: every op except views (``OpOverload.is_view``), allocations (``empty*``) and
  ``lift_fresh`` (a tensor made from Python data: counted as a copy, below);
- ``syncs``: ops that make the host wait for the device: ``item`` / ``_local_scalar_dense`` (``.item()``,
  ``float(t)``, ``if t:``), ``nonzero``, ``equal``, ``is_nonzero``, and on a GPU any copy to the CPU;
- ``h2d``: host-to-device copies: ``lift_fresh`` (``torch.tensor(...)``, indexing with a Python
  list: on a GPU both are a blocking copy of host data) and, on a GPU, copies from CPU tensors;
- the same three counted again for what runs *inside* the cross-attention layers (each attn2
  replace, ``attn2_patch``, ``attn2_output_patch`` and ``middle_patch`` is wrapped while
  counting), and the number of attn2 replace calls in the counted step.
- ``aten.item`` (``.item()``, ``float(t)``) is a sync, not a launch (the mode sees ``item`` or
  ``_local_scalar_dense``, not both).

The host's attention is counted as on a GPU on every device: while a step is counted,
ComfyUI's ``optimized_attention`` (and ``_masked``, and every ``comfy`` module's copy of that name,
e.g. Flux's) is its PyTorch SDPA function ``attention_pytorch`` (one launch per attention, what a
GPU host picks), restored afterwards (:func:`sdpa_host_attention`). On a CPU the host would pick its
basic attention (``baddbmm`` + ``softmax`` + ``bmm``), so a mechanism that replaces the host's
attention by its own fused SDPA would get a discount a GPU does not give (issue #22: CA² measured
+6 per layer on CPU, +8 on CUDA). A host without ``attention_pytorch`` is counted as it is.

``extra per layer`` = (scenario launches - its reference's launches: unpatched, see :func:`reference_for`) / cross-attention layers of the
model (16 for SD1.5). A budget with ``"per": "layer_read"`` (STFG, which reads the attention maps
of some layers only: ``layers`` = ``low_resolution`` reads 1/4-grid layers) divides by the layers
read instead: the attn2 calls of the counted step where a stage that sets
``reads_attention_maps`` is active (``stage.is_active(call)``), counted in the attn2 wrapper.
:data:`BUDGETS` (``cost_budgets.json``) states each mechanism's allowance;
``tests/test_cost_budgets.py`` fails when a change exceeds it. Counts do not depend on widths, so
the micro models give the same numbers as full size.

    python -m benchmarks.cost_ledger [--configs sd15:16] [--scenarios pva_joint,moa] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .host_setup import describe, prepare

BUDGETS_FILE = Path(__file__).with_name("cost_budgets.json")
SYNC_OPS = {"item", "_local_scalar_dense", "nonzero", "equal", "is_nonzero"}
LAYER_PATCHES = ("attn2_patch", "attn2_output_patch", "middle_patch")
ALLOCATION_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_"}
COPY_OPS = {"_to_copy", "copy_"}


def _op_name(func) -> str:
    """``aten.index.Tensor`` -> ``index``."""
    return func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)


@dataclass
class Counts:
    """What one step (or the part of it inside attn2) did."""

    launches: int = 0
    syncs: int = 0
    h2d: int = 0
    ops: Counter = field(default_factory=Counter)  # launches by op name, for reading a change
    sync_ops: Counter = field(default_factory=Counter)
    h2d_ops: Counter = field(default_factory=Counter)


class OpCounter(TorchDispatchMode):
    """Counts the backend ops of everything run under it; ``inside_layer`` is set by the attn2 wrappers."""

    def __init__(self):
        super().__init__()
        self.step, self.layers = Counts(), Counts()
        self.inside_layer = 0
        self.layer_calls = 0
        self.layers_read = 0  # attn2 calls where a stage that reads attention maps is active

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        targets = (self.step, self.layers) if self.inside_layer else (self.step,)
        kind = self._kind(func, name, args, kwargs, out)
        for t in targets:
            if kind == "launch":
                t.launches += 1
                t.ops[name] += 1
            elif kind == "sync":
                t.syncs += 1
                t.sync_ops[name] += 1
            elif kind == "h2d":
                t.h2d += 1
                t.h2d_ops[name] += 1
        return out

    @staticmethod
    def _kind(func, name, args, kwargs, out) -> Optional[str]:
        if name == "lift_fresh" or name == "lift_fresh_copy":
            return "h2d"
        if getattr(func, "is_view", False) or name in ALLOCATION_OPS:
            return None
        if name in SYNC_OPS:
            return "sync"
        if name in COPY_OPS:
            src = args[1] if name == "copy_" and len(args) > 1 else (args[0] if args else None)
            dst = args[0] if name == "copy_" else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                return "sync" if dst.device.type == "cpu" else "h2d"
        return "launch"


@dataclass
class LedgerRow:
    scenario: str
    status: str  # "ok" or why not
    step: Optional[Counts] = None
    layers: Optional[Counts] = None
    layer_calls: int = 0
    cuda_kernels: Optional[int] = None  # torch.profiler's kernel count on a GPU
    layers_read: int = 0  # attn2 calls of the step where a stage reading attention maps is active

    def extra_per_layer(self, reference: "LedgerRow", cross_attention_layers: int, per: str = "layer") -> float:
        """Extra launches over ``reference`` per cross-attention layer, or per layer read (``per="layer_read"``)."""
        divisor = self.layers_read if per == "layer_read" else cross_attention_layers
        return (self.step.launches - reference.step.launches) / max(1, divisor)


def _reads_layer(q, k, v, extra_options) -> bool:
    """Whether a stage of our dispatcher that reads attention maps (STFG) is active in this attn2 call."""
    from .host_setup import pack

    dispatcher = pack("nodes.dispatch.dispatcher")
    installed = extra_options.get(dispatcher.PACK_KEY)
    readers = [s for s in getattr(installed, "stages", ()) if getattr(s, "reads_attention_maps", False)]
    if not readers:
        return False
    call = dispatcher.AttentionCall(q, k, v, extra_options, dispatcher.layer_key_of(extra_options))
    return any(s.is_active(call) for s in readers)


def _wrap_attn2(model, counter: OpCounter) -> None:
    """Mark everything an attn2 replace runs as "inside a layer" (the patched copy only)."""
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for key, fn in list(replaces.items()):

        def wrapped(q, k, v, extra_options, fn=fn):
            counter.layer_calls += 1
            counter.layers_read += _reads_layer(q, k, v, extra_options)
            counter.inside_layer += 1
            try:
                return fn(q, k, v, extra_options)
            finally:
                counter.inside_layer -= 1

        replaces[key] = wrapped
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    for name in LAYER_PATCHES:
        if patches.get(name):
            patches[name] = [_inside(counter, fn) for fn in patches[name]]


def _inside(counter: OpCounter, fn):
    """``fn`` with what it runs counted as inside a layer."""

    def wrapped(*args, **kwargs):
        counter.inside_layer += 1
        try:
            return fn(*args, **kwargs)
        finally:
            counter.inside_layer -= 1

    # what the step-sigma wrapper looks at to decide whether the step needs its sigma
    wrapped.schedule = getattr(fn, "schedule", None)
    wrapped.needs_step_sigma = getattr(fn, "needs_step_sigma", False)
    wrapped.recorder = getattr(fn, "recorder", None)
    return wrapped


ATTENTION_MODULE = "comfy.ldm.modules.attention"
ATTENTION_NAMES = ("optimized_attention", "optimized_attention_masked")


@contextmanager
def sdpa_host_attention():
    """While inside, the host's attention is its PyTorch SDPA function (``attention_pytorch``), as
    on a GPU; restored on exit (the test process shares one in-process host with every test).

    Rebinds :data:`ATTENTION_NAMES` in ComfyUI's attention module and in every imported ``comfy``
    module that imported one of them by name (``from ...attention import optimized_attention``:
    Flux, MMDiT) and holds the same function. Feature-detected: a host without ``attention_pytorch``
    is left as it is.
    """
    attention = sys.modules.get(ATTENTION_MODULE)
    sdpa = getattr(attention, "attention_pytorch", None)
    if sdpa is None:
        yield
        return
    host = {name: getattr(attention, name) for name in ATTENTION_NAMES if hasattr(attention, name)}
    saved = []  # (module, name, function) to restore
    for module_name, module in list(sys.modules.items()):  # bounded: the modules imported
        if module is None or not (module_name == "comfy" or module_name.startswith("comfy.")):
            continue
        for name, fn in host.items():
            if getattr(module, "__dict__", {}).get(name) is fn and fn is not sdpa:
                saved.append((module, name, fn))
    try:
        for module, name, _ in saved:
            setattr(module, name, sdpa)
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def count_step(patched, inputs, warmup: int = 2) -> tuple:
    """``(OpCounter, cuda kernel count or None)`` of one sampler step of ``patched`` (a :class:`scenarios.Patched`).

    The host's attention is SDPA while it runs (:func:`sdpa_host_attention`: counted as on a GPU).
    ``warmup`` untimed calls first (first-use caches are built then, as on step 1 of a real run),
    each with a fresh sigma tensor; then one counted call with a fresh sigma.
    """
    import comfy.sample
    import comfy.samplers

    model = patched.model.clone()  # the wrappers go on a copy: the scenario's model stays as built
    model.model_options = _copy_options(model.model_options)
    counter = OpCounter()
    _wrap_attn2(model, counter)
    device = torch.device(model.load_device)
    cuda = device.type == "cuda"
    kernels = []

    def counting_sampler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        for _ in range(warmup):
            denoiser(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
        sigma = sigmas[0] * x.new_ones([x.shape[0]])  # fresh, as every sampler step makes it
        counter.layer_calls = counter.layers_read = 0  # the counted step's only
        if cuda:
            torch.cuda.synchronize(device)
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, counter:
                denoiser(x, sigma, **extra_args)
                torch.cuda.synchronize(device)
            kernels.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
        else:
            with counter:
                denoiser(x, sigma, **extra_args)
        return x

    # a schedule that goes on after the counted sigma: the sampling (and its constants' cache) is not over yet
    sigmas = torch.tensor([inputs.sigma, inputs.sigma / 2, 0.0])
    latent = inputs.latent if patched.latent is None else patched.latent
    with torch.inference_mode(), sdpa_host_attention():
        comfy.sample.sample_custom(model, inputs.noise, inputs.cfg, comfy.samplers.KSAMPLER(counting_sampler), sigmas,
                                   inputs.positive, inputs.negative, latent, noise_mask=patched.noise_mask,
                                   disable_pbar=True, seed=0)
    return counter, (kernels[0] if kernels else None)


def _copy_options(options: dict) -> dict:
    """A copy of ``model_options`` deep enough that wrapping attn2 replaces leaves the original alone."""
    options = dict(options)
    to = dict(options.get("transformer_options", {}))
    pr = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
    to["patches_replace"] = pr
    to["patches"] = {k: list(v) for k, v in to.get("patches", {}).items()}
    options["transformer_options"] = to
    return options


def measure(model, config, names: List[str], log=print) -> tuple:
    """``(cross-attention layer count, {scenario: LedgerRow})`` for one model and configuration."""
    from .geometry import layer_table
    from .models import step_inputs
    from .scenarios import SCENARIOS, BenchContext, ScenarioUnavailable

    inputs = step_inputs(model, config)
    table = layer_table(model, config.latent_hw, batch=2, text_tokens=77)
    ctx = BenchContext(config.arch, torch.device(model.load_device), model.model.get_dtype(), inputs.latent, table, {})
    rows: Dict[str, LedgerRow] = {}
    for name in names:
        try:
            patched = SCENARIOS[name].patch(model, ctx)
        except ScenarioUnavailable as exc:
            rows[name] = LedgerRow(name, f"not available: {exc}")
            continue
        try:
            counter, kernels = count_step(patched, inputs)
        except Exception as exc:  # noqa: BLE001 - one scenario's failure is its row, not the run's end
            rows[name] = LedgerRow(name, f"failed: {type(exc).__name__}: {exc}")
            continue
        rows[name] = LedgerRow(name, "ok", counter.step, counter.layers, counter.layer_calls, kernels, counter.layers_read)
        log(f"  {name}: {counter.step.launches} launches, {counter.step.syncs} syncs, {counter.step.h2d} h2d "
            f"({counter.layers.syncs} syncs / {counter.layers.h2d} h2d inside {counter.layer_calls} attn2 calls)")
    return len(table), rows


def load_budgets() -> dict:
    return json.loads(BUDGETS_FILE.read_text())


def reference_for(name: str) -> str:
    """The row a scenario's extra launches are counted against: the unpatched one (edits: the
    inpainting setup), except MoA, which routes pva_joint's branch (adds no branch of its own): its
    row is pva_joint + MoA, so MoA's cost (issue #22: "MoA <= 8 over PVA joint") is its gap to pva_joint."""
    if name == "moa":
        return "pva_joint"
    return "inpainting_unpatched" if name.startswith("stfg") else "unpatched"


def table(title: str, layers: int, rows: Dict[str, LedgerRow]) -> str:
    budgets = load_budgets()["scenarios"]
    lines = [
        f"### {title}: cost ledger (one CFG step, batch 2, fresh sigma; {layers} cross-attention layers)",
        "",
        "| scenario | launches per step | extra per layer (budget) | host syncs per step (in layers) | host-to-device copies (in layers) | CUDA kernels |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if row.status != "ok":
            lines.append(f"| `{name}` | {row.status} | — | — | — | — |")
            continue
        ref = rows.get(reference_for(name))
        extra = "—" if ref is None or ref.status != "ok" or name == ref.scenario else f"{row.extra_per_layer(ref, layers):+.2f}"
        budget = budgets.get(name, {}).get("extra_launches_per_layer")
        per = budgets.get(name, {}).get("per", "layer")
        if per == "layer_read" and ref is not None and ref.status == "ok":
            extra = f"{row.extra_per_layer(ref, layers, per):+.2f} per layer read ({row.layers_read})"
        extra += f" ({budget})" if budget is not None and extra != "—" else ""
        kernels = "—" if row.cuda_kernels is None else str(row.cuda_kernels)
        lines.append(f"| `{name}` | {row.step.launches} | {extra} | {row.step.syncs} ({row.layers.syncs}) | {row.step.h2d} ({row.layers.h2d}) | {kernels} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from .scenarios import SCENARIOS

    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_ledger", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="sd15:16")
    p.add_argument("--scenarios", default=",".join(n for n in SCENARIOS if n not in ("unpatched_control",)))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default="", help="append the tables here (e.g. benchmarks/RESULTS.md)")
    args = p.parse_args(argv)
    prepare(args.device)
    logging.getLogger().setLevel(logging.WARNING)
    from .models import build_model, parse_configs

    names = [n for n in args.scenarios.split(",") if n]
    for needed in ("unpatched", "inpainting_unpatched") + tuple(reference_for(n) for n in names):
        if needed not in names:
            names.insert(0, needed)
    facts = describe(args.device)
    parts = [f"- commit `{facts['commit']}` · {facts['device']} · torch {facts['torch']} · host {facts['host']}", ""]
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for config in parse_configs(args.configs):
        model = build_model(config.arch, "micro", device, dtype)
        print(config.label, flush=True)
        layers, rows = measure(model, config, names)
        parts += [table(config.label, layers, rows), ""]
    parts += __import__(f"{__package__}.dit_ledger", fromlist=["flux_parts"]).flux_parts(device, dtype)  # the DiT path (tiny Flux)
    text = "\n".join(parts)
    print("\n" + text)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
