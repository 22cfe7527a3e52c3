"""The cost ledger's DiT part: kernels, host syncs and host-to-device copies of one Flux CFG step.

The same counting as ``cost_ledger.count_step`` (a ``TorchDispatchMode`` over one sampler step,
cond + uncond in one call, every hook the MODEL carries), on the tiny Flux (tests/testkit/
tiny_flux.py: counts do not depend on widths), for the unpatched model and for each DiT-path
scenario. ``extra per block`` = (scenario launches - unpatched launches) / joint blocks
(double + single). Hosts without Flux give no table.

    python -m benchmarks.dit_ledger [--device cpu]
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional

import torch

from .cost_ledger import LedgerRow, count_step
from .scenarios import Patched
from .step_timer import StepInputs

LATENT_HW = (16, 16)


def _pack(relative: str):
    import importlib

    return importlib.import_module(f"identity_attention.{relative}")


def flux_step_inputs(seed: int = 0) -> StepInputs:
    from testkit import tiny_flux

    h, w = LATENT_HW
    gen = torch.Generator().manual_seed(seed)
    return StepInputs(
        latent=torch.zeros(1, tiny_flux.LATENT_CHANNELS, h, w),
        noise=torch.randn(1, tiny_flux.LATENT_CHANNELS, h, w, generator=gen),
        positive=tiny_flux.random_flux_conditioning(seed + 1, tokens=16),
        negative=tiny_flux.random_flux_conditioning(seed + 2, tokens=16),
        sigma=0.5,
        cfg=3.5,
    )


def _joint_identity(model, apply_to: str, weight: float = 1.0):
    dispatcher = _pack("nodes.dispatch.dispatcher")
    dit_dispatcher = _pack("nodes.dispatch.dit_dispatcher")
    joint = _pack("nodes.pva.dit_joint_identity")
    layout = _pack("nodes.common.dit_layout")
    IdentityTokens = _pack("adapters.projectors.id_adapter").IdentityTokens
    gen = torch.Generator().manual_seed(7)
    width = layout.context_width(model)
    tokens = IdentityTokens(cond=torch.randn(1, 4, width, generator=gen), uncond=torch.randn(1, 4, width, generator=gen))
    stage = joint.DitJointIdentityStage(dispatcher.StageSchedule(weight=weight, apply_to=apply_to), tokens, lambda t: layout.identity_hidden(model, t))
    return dit_dispatcher.apply_dit_stage(model, stage)


def _tokens(model, seed: int, count: int = 4):
    IdentityTokens = _pack("adapters.projectors.id_adapter").IdentityTokens
    gen = torch.Generator().manual_seed(seed)
    width = _pack("nodes.common.dit_layout").context_width(model)
    return IdentityTokens(cond=torch.randn(1, count, width, generator=gen), uncond=torch.randn(1, count, width, generator=gen))


def _hidden(model):
    layout = _pack("nodes.common.dit_layout")
    return lambda t: layout.identity_hidden(model, t)


def _kv_mixed(model, mode: str):
    stage = _pack("nodes.kv_mixed.dit_kv_mixed").DitKVMixedStage(_pack("nodes.dispatch.dispatcher").StageSchedule(), _tokens(model, 8), _tokens(model, 9), _hidden(model), mode)
    return _pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(model, stage)


def _ca2(model):
    tokens = _tokens(model, 10)
    mask = torch.zeros(1, 8 * LATENT_HW[0], 8 * LATENT_HW[1])
    mask[:, :, : 4 * LATENT_HW[1]] = 1.0
    stage = _pack("nodes.ca2.dit_ca2").DitCA2GateStage(_pack("nodes.dispatch.dispatcher").StageSchedule(), tokens.cond, tokens.uncond, _hidden(model), mask)
    return _pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(model, stage)


def _moa(model):
    personal = _joint_identity(model, "both")
    identity_stages = _pack("nodes.dispatch.dit_dispatcher").installed_dit_dispatcher(personal).stages
    recorder = _pack("adapters.attention.attention_routing").RouterRecorder()
    stage = _pack("nodes.moa.dit_moa").DitMixtureOfAttentionStage(_pack("nodes.dispatch.dispatcher").StageSchedule(), "identity_attention", identity_stages=identity_stages, recorder=recorder)
    return _pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(personal, stage)


def _nested(model):
    stage = _pack("nodes.nested.dit_nested").DitNestedAttentionStage(_pack("nodes.dispatch.dispatcher").StageSchedule(apply_to="cond"), _tokens(model, 11), _hidden(model), 3)
    return _pack("nodes.dispatch.dit_dispatcher").apply_dit_stage(model, stage)


# scenario name -> MODEL -> patched MODEL
DIT_SCENARIOS: Dict[str, Callable] = {
    "flux_unpatched": lambda m: m,
    "flux_weight0": lambda m: _joint_identity(m, "both", weight=0.0),
    "flux_joint_identity": lambda m: _joint_identity(m, "both"),
    "flux_joint_identity_cond": lambda m: _joint_identity(m, "cond"),
    "flux_kv_mixed_joint": lambda m: _kv_mixed(m, "joint"),
    "flux_kv_mixed_decoupled": lambda m: _kv_mixed(m, "decoupled"),
    "flux_ca2_gate": _ca2,
    "flux_moa_over_joint_identity": _moa,
    "flux_nested_cond": _nested,
}


def measure_flux(device=None, dtype=torch.float32, names: Optional[List[str]] = None) -> tuple:
    """``(joint blocks, {scenario: LedgerRow})`` on the tiny Flux; ``(0, {})`` on hosts without Flux."""
    from testkit import tiny_flux

    if not tiny_flux.flux_available():
        return 0, {}
    model = tiny_flux.build_flux(0, device=device, dtype=dtype)
    blocks = tiny_flux.DEPTH + tiny_flux.DEPTH_SINGLE
    inputs = flux_step_inputs()
    rows = {}
    for name in names or list(DIT_SCENARIOS):
        counter, kernels = count_step(Patched(DIT_SCENARIOS[name](model)), inputs)
        rows[name] = LedgerRow(name, "ok", counter.step, counter.layers, counter.layer_calls, kernels)
    return blocks, rows


def flux_table(blocks: int, rows: Dict[str, LedgerRow]) -> str:
    if not rows:
        return ""
    base = rows["flux_unpatched"].step.launches
    lines = [f"### tiny Flux ({blocks} joint blocks), one CFG step", "", "| scenario | launches | extra per block | syncs | h2d |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        extra = (row.step.launches - base) / max(1, blocks)
        lines.append(f"| {name} | {row.step.launches} | {extra:.1f} | {row.step.syncs} | {row.step.h2d} |")
    return "\n".join(lines)


def flux_parts(device, dtype) -> List[str]:
    """The Flux table for ``cost_ledger.main`` (empty on hosts without Flux)."""
    table = flux_table(*measure_flux(device, dtype))
    return [table, ""] if table else []


def main(argv: Optional[List[str]] = None) -> int:
    from .host_setup import prepare

    p = argparse.ArgumentParser(prog="python -m benchmarks.dit_ledger", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    prepare(args.device)
    device = torch.device(args.device)
    print("\n".join(flux_parts(device, torch.float16 if device.type == "cuda" else torch.float32)) or "this host has no Flux")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
