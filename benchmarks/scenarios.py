"""Every benchmarked scenario, registered in one place.

A scenario patches a MODEL the way its nodes would and says what arithmetic it
adds (its floor, ``attention_floor.py``). The harness times each against the
unpatched model in the same run.

    @scenario("name", issue="#6", summary="...", needs=("adapters.x",), floor=lambda fi: ...)
    def _build_name(model, ctx):      # model: a ComfyUI ModelPatcher (unpatched)
        return patched_model          # or Patched(patched_model, noise_mask=...)

``needs`` names the pack modules the scenario imports; when one is not in this
branch the row reads "not available" (never silently dropped). Import pack
modules inside the body (``pack("nodes.x")``), never at the top of this file.
A body that cannot run raises :class:`ScenarioUnavailable` with the reason.

For the mechanism engineers: fill the body of your stub below (keep its name,
so RESULTS.md rows stay comparable), correct ``needs`` to your module names and
the floor's token counts to what your node uses by default. ``ctx`` gives the
synthetic identity and adapter (``tests/testkit/synthetic.py``) at the model's
real layer sizes, the layer geometry and the latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import attention_floor as floors
from .geometry import LayerGeometry
from .host_setup import pack, pack_has


class ScenarioUnavailable(Exception):
    """The scenario cannot run in this branch or on this model; the message says why."""


@dataclass
class Patched:
    """A patched MODEL plus what the sampler must be given besides (e.g. an inpainting noise mask)."""

    model: object
    noise_mask: Optional[torch.Tensor] = None  # [1, 1, h, w] latent-space mask, as KSampler takes it


@dataclass
class BenchContext:
    """What a scenario body may use. One per (architecture, latent size)."""

    arch: str  # "sd15" | "sdxl"
    device: torch.device
    dtype: torch.dtype
    latent: torch.Tensor  # [1, 4, h, w], what is being sampled
    table: List[LayerGeometry]
    _cache: Dict[tuple, object] = field(default_factory=dict)

    @property
    def latent_hw(self) -> Tuple[int, int]:
        return tuple(self.latent.shape[-2:])

    def layers(self, model):
        """The model's cross-attention layers (``nodes.host.LayerInfo``)."""
        return pack("nodes.host").cross_attention_layers(model)

    def identity(self, references: int = 1):
        """A synthetic IDENTITY (random faces, CLIP features and face tokens of the usual shapes)."""
        key = ("identity", references)
        if key not in self._cache:
            from testkit.synthetic import synthetic_identity

            self._cache[key] = synthetic_identity(references=references, seed=0, face_tokens=True)
        return self._cache[key]

    def adapter(self, model, num_tokens: int = 4, visual_q: bool = False):
        """A synthetic ID_ADAPTER with random to_k / to_v (and to_q) at every layer of ``model``."""
        key = ("adapter", num_tokens, visual_q)
        if key not in self._cache:
            from testkit.synthetic import synthetic_adapter

            layers = self.layers(model)
            context_dim = layers[0].context_dim
            base = pack("nodes.host").BASE_BY_CONTEXT_DIM.get(context_dim, "sd15")
            self._cache[key] = synthetic_adapter(layers, base, context_dim, num_tokens=num_tokens, visual_q=visual_q)
        return self._cache[key]


@dataclass(frozen=True)
class Scenario:
    name: str
    issue: str
    summary: str
    needs: Tuple[str, ...]
    floor: Callable[[floors.FloorInputs], floors.Floor]
    build: Callable[[object, BenchContext], object]
    components: Tuple[str, ...] = ()  # for a stack: the scenarios it applies, in order

    def missing(self) -> List[str]:
        """Pack modules this scenario needs that this branch lacks (component scenarios, for a stack)."""
        if self.components:
            return [name for name in self.components if SCENARIOS[name].missing()]
        return [m for m in self.needs if not pack_has(m)]

    def patch(self, model, ctx: BenchContext) -> Patched:
        """The patched model, or ScenarioUnavailable."""
        missing = self.missing()
        if missing:
            what = "components" if self.components else "modules"
            raise ScenarioUnavailable(f"{what} not in this branch: " + ", ".join(missing))
        result = self.build(model, ctx)
        return result if isinstance(result, Patched) else Patched(result)


SCENARIOS: Dict[str, Scenario] = {}
REFERENCE = "unpatched"


def scenario(name: str, issue: str, summary: str, floor, needs: Tuple[str, ...] = ()):
    def register(build):
        SCENARIOS[name] = Scenario(name, issue, summary, tuple(needs), floor, build)
        return build

    return register


def _not_written(name: str):
    raise ScenarioUnavailable(f"benchmark body not written yet (benchmarks/scenarios.py: {name})")


def _schedule(weight: float = 1.0):
    return pack("nodes.dispatcher").StageSchedule(weight=weight)


# --- references ------------------------------------------------------------------------------------


@scenario(REFERENCE, "#5", "the model as loaded: every ratio is over this", floor=floors.nothing)
def _build_unpatched(model, ctx):
    return model.clone()


@scenario("unpatched_control", "#5", "the unpatched model timed again as if it were a scenario: its ratio is the noise (ideally 1.00)", floor=floors.nothing)
def _build_unpatched_control(model, ctx):
    return model.clone()


@scenario("dispatcher_overhead", "#2", "the dispatcher with one stage that returns `out` unchanged: the cost of the dispatcher itself", floor=floors.nothing)
def _build_dispatcher_overhead(model, ctx):
    from .reference_stages import PassThroughStage

    return pack("nodes.dispatcher").apply_attention_stage(model, PassThroughStage(_schedule()))


@scenario(
    "minimal_decoupled",
    "#5",
    "out + w·attn(q, K_id, V_id), 4 identity tokens, K/V cached: the field's minimal IP-Adapter-style patch",
    floor=lambda fi: floors.decoupled(fi, tokens=4),
)
def _build_minimal_decoupled(model, ctx):
    from .reference_stages import MinimalDecoupledStage

    adapter = ctx.adapter(model, num_tokens=4)
    tokens = adapter.identity_tokens(ctx.identity())
    return pack("nodes.dispatcher").apply_attention_stage(model, MinimalDecoupledStage(_schedule(0.8), adapter, tokens))


# --- mechanisms (issues #6-#8): stubs until their engineers fill them ------------------------------


@scenario(
    "pva_joint",
    "#6",
    "PVA joint softmax over [text; 10 identity tokens] with its own visual Q/K/V",
    floor=lambda fi: floors.joint(fi, tokens=10, visual_q=True),
    needs=("adapters.parallel_attention", "nodes.parallel_attention_nodes"),
)
def _build_pva_joint(model, ctx):
    _not_written("pva_joint")


@scenario(
    "pva_decoupled",
    "#6",
    "decoupled (IP-Adapter / InstantID / PuLID) mode of the PVA node, 16 identity tokens",
    floor=lambda fi: floors.decoupled(fi, tokens=16),
    needs=("adapters.parallel_attention", "nodes.parallel_attention_nodes"),
)
def _build_pva_decoupled(model, ctx):
    _not_written("pva_decoupled")


@scenario(
    "kv_mixed",
    "#6",
    "keys from one token source, values from another, 16 tokens",
    floor=lambda fi: floors.decoupled(fi, tokens=16),
    needs=("adapters.kv_mixed_attention", "nodes.kv_mixed_nodes"),
)
def _build_kv_mixed(model, ctx):
    _not_written("kv_mixed")


@scenario(
    "moa",
    "#6",
    "mixture of attention: prior + personalized branch over [text; 16 tokens], training-free router",
    floor=lambda fi: floors.routed_mixture(fi, tokens=16),
    needs=("adapters.mixture_of_attention", "nodes.mixture_of_attention_nodes"),
)
def _build_moa(model, ctx):
    _not_written("moa")


@scenario(
    "ca2",
    "#7",
    "CA² gate: decoupled visual attention (16 tokens) scaled by (1 - Score·Mask), training-free score",
    floor=lambda fi: floors.ca2_gate(fi, tokens=16),
    needs=("adapters.ca2_gate", "nodes.ca2_nodes"),
)
def _build_ca2(model, ctx):
    _not_written("ca2")


@scenario(
    "stfg_fast",
    "#7",
    "STFG guidance, closed form (no backward): boundary map from coarse text attention + FFT low-pass",
    floor=floors.boundary_guidance,
    needs=("adapters.stfg_guidance", "nodes.stfg_nodes"),
)
def _build_stfg_fast(model, ctx):
    _not_written("stfg_fast")


@scenario(
    "stfg_exact",
    "#7",
    "STFG guidance with the gradient through the UNet (newer hosts only)",
    floor=floors.boundary_guidance_exact,
    needs=("adapters.stfg_guidance", "nodes.stfg_nodes"),
)
def _build_stfg_exact(model, ctx):
    _not_written("stfg_exact")


@scenario(
    "face_adapter",
    "#8",
    "FACT gated self-attention over [x; 16 face tokens] plus its feed-forward, at every attn2 block",
    floor=lambda fi: floors.gated_self_attention(fi, tokens=16),
    needs=("adapters.gated_self_attention", "nodes.face_adapter_nodes"),
)
def _build_face_adapter(model, ctx):
    _not_written("face_adapter")


@scenario(
    "stage_tokens",
    "#8",
    "per-stage K/V identity tokens: keys and values from two encodings of the prompt",
    floor=floors.split_key_value_context,
    needs=("adapters.stage_tokens", "nodes.stage_token_nodes"),
)
def _build_stage_tokens(model, ctx):
    _not_written("stage_tokens")


@scenario(
    "nested",
    "#8",
    "nested attention: the subject token's value from an attention over 16 subject tokens",
    floor=lambda fi: floors.nested(fi, tokens=16),
    needs=("adapters.nested_attention", "nodes.nested_attention_nodes"),
)
def _build_nested(model, ctx):
    _not_written("nested")


FULL_STACK = ("pva_joint", "moa", "ca2", "stfg_fast", "face_adapter", "stage_tokens", "nested")


def _build_full_stack(model, ctx):
    """Each component applied in turn, in FULL_STACK order (as an artist would chain the nodes)."""
    patched = Patched(model)
    for name in FULL_STACK:
        step = SCENARIOS[name].patch(patched.model, ctx)
        patched = Patched(step.model, step.noise_mask if step.noise_mask is not None else patched.noise_mask)
    return patched


SCENARIOS["full_stack"] = Scenario(
    "full_stack",
    "#6-#8",
    "every step mechanism stacked on one model: " + " + ".join(FULL_STACK),
    tuple(dict.fromkeys(m for name in FULL_STACK for m in SCENARIOS[name].needs)),
    lambda fi: floors.total(SCENARIOS[name].floor(fi) for name in FULL_STACK),
    _build_full_stack,
    components=FULL_STACK,
)


def selected(names: Optional[List[str]] = None) -> List[Scenario]:
    """The scenarios to run, the reference first; unknown names raise with the known ones."""
    names = list(SCENARIOS) if not names else names
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    ordered = [REFERENCE] + [n for n in names if n != REFERENCE]
    return [SCENARIOS[n] for n in ordered]
