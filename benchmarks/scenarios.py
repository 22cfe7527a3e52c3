"""Every benchmarked scenario, registered in one place.

A scenario patches a MODEL the way its node does and says what arithmetic it
adds (its floor, ``attention_floor.py``). The harness times each against the
unpatched model in the same run.

    @scenario("name", issue="#6", summary="...", needs=("nodes.x_nodes",), floor=lambda fi: ...)
    def _build_name(model, ctx):      # model: a ComfyUI ModelPatcher (unpatched)
        return patched_model          # or Patched(patched_model, noise_mask=..., latent=...)

``needs`` names the pack modules the scenario imports; when one is not in this
branch the row reads "not available" (never silently dropped). Import pack
modules inside the body (``pack("nodes.x")``), never at the top of this file.
A body that cannot run raises :class:`ScenarioUnavailable` with the reason.

Every mechanism scenario calls its node's ``FUNCTION`` (``scenario_inputs.apply_node``)
with the inputs an artist connects (synthetic IDENTITY / ID_ADAPTER / CLIP /
CLIP_VISION / mask / original latent from :class:`BenchContext`) and every other
input at the node's own default. Token counts (and so the floors) follow the
adapters the papers ship: PVA 10 identity tokens with its own visual query,
InstantID / IP-Adapter Plus 16, FACT 16 face tokens. A new mechanism: add a
scenario the same way and check it on the CPU first:
``python -m benchmarks.run --quick --out "" --scenarios unpatched,your_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import attention_floor as floors
from .host_setup import pack, pack_has
from .scenario_inputs import EDIT_PROMPT, BenchContext, apply_node, call_node

__all__ = ["BenchContext", "Patched", "SCENARIOS", "REFERENCE", "Scenario", "ScenarioUnavailable", "selected"]

PVA_TOKENS = 10  # PVA's checkpoint: 10 identity tokens, its own to_visual_q / k / v
ADAPTER_TOKENS = 16  # InstantID's Resampler, IP-Adapter Plus / Plus-Face: 16 tokens
FACE_TOKENS = 16  # FACT's resampler: 16 face tokens per reference


class ScenarioUnavailable(Exception):
    """The scenario cannot run in this branch or on this model; the message says why."""


@dataclass
class Patched:
    """A patched MODEL plus what the sampler must be given besides (inpainting: a noise mask and the original latent)."""

    model: object
    noise_mask: Optional[torch.Tensor] = None  # [1, 1, H, W] mask, as KSampler takes it (resized to the latent)
    latent: Optional[torch.Tensor] = None  # [1, 4, h, w] the latent to sample from instead of the empty one (inpainting: the original)


@dataclass(frozen=True)
class Scenario:
    name: str
    issue: str
    summary: str
    needs: Tuple[str, ...]
    floor: Callable[[floors.FloorInputs], floors.Floor]
    build: Callable[[object, BenchContext], object]
    components: Tuple[str, ...] = ()  # for a stack: the scenarios it applies, in order
    stack_floor: Optional[Callable[[floors.FloorInputs], floors.Floor]] = None  # what it adds inside a stack, if not ``floor``

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


def scenario(name: str, issue: str, summary: str, floor, needs: Tuple[str, ...] = (), stack_floor=None):
    def register(build):
        SCENARIOS[name] = Scenario(name, issue, summary, tuple(needs), floor, build, stack_floor=stack_floor)
        return build

    return register


def _schedule(weight: float = 1.0):
    return pack("nodes.dispatch.dispatcher").StageSchedule(weight=weight)


def _inpainting(model, ctx: BenchContext) -> Patched:
    """The sampler side of an inpainting edit: the edit mask as noise mask, the original latent to start from."""
    return Patched(model, noise_mask=ctx.noise_mask(), latent=ctx.original_latent())


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

    return pack("nodes.dispatch.dispatcher").apply_attention_stage(model, PassThroughStage(_schedule()))


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
    return pack("nodes.dispatch.dispatcher").apply_attention_stage(model, MinimalDecoupledStage(_schedule(0.8), adapter, tokens))


@scenario(
    "inpainting_unpatched",
    "#7",
    "the unpatched model sampled as an inpainting edit (noise mask + original latent): the setup the CA²/STFG rows run in",
    floor=floors.nothing,
)
def _build_inpainting_unpatched(model, ctx):
    return _inpainting(model.clone(), ctx)


# --- mechanisms (issues #6-#8): each through its node -----------------------------------------------


def _parallel_attention(model, ctx, adapter):
    node = pack("nodes.pva.parallel_attention_nodes").ApplyParallelAttention
    return apply_node(node, model=model, id_adapter=adapter, identity=ctx.identity())


@scenario(
    "pva_joint",
    "#6",
    f"Apply parallel visual attention, PVA weights (mode auto -> joint): one softmax over [text; {PVA_TOKENS} identity tokens], its own visual query",
    floor=lambda fi: floors.joint(fi, tokens=PVA_TOKENS, visual_q=True),
    needs=("adapters.attention.parallel_attention", "nodes.pva.parallel_attention_stage", "nodes.pva.parallel_attention_nodes"),
)
def _build_pva_joint(model, ctx):
    adapter = ctx.adapter(model, PVA_TOKENS, visual_q=True, fmt="pva", mechanism="joint")
    return _parallel_attention(model, ctx, adapter)


@scenario(
    "pva_decoupled",
    "#6",
    f"Apply parallel visual attention, InstantID-style weights (mode auto -> decoupled): out + w·attn(q, K_id, V_id), {ADAPTER_TOKENS} tokens",
    floor=lambda fi: floors.decoupled(fi, tokens=ADAPTER_TOKENS),
    needs=("adapters.attention.parallel_attention", "nodes.pva.parallel_attention_stage", "nodes.pva.parallel_attention_nodes"),
)
def _build_pva_decoupled(model, ctx):
    adapter = ctx.adapter(model, ADAPTER_TOKENS, fmt="instantid")
    return _parallel_attention(model, ctx, adapter)


@scenario(
    "kv_mixed",
    "#6",
    f"Apply KV-mixed attention: keys from the face embedding (InstantID-style, {ADAPTER_TOKENS} tokens), values from CLIP image features (IP-Adapter Plus-style, {ADAPTER_TOKENS} tokens)",
    floor=lambda fi: floors.decoupled(fi, tokens=ADAPTER_TOKENS),
    needs=("adapters.attention.kv_mixed_attention", "nodes.pva.parallel_attention_stage", "nodes.kv_mixed.kv_mixed_nodes"),
)
def _build_kv_mixed(model, ctx):
    node = pack("nodes.kv_mixed.kv_mixed_nodes").ApplyKVMixedAttention
    keys = ctx.adapter(model, ADAPTER_TOKENS, fmt="instantid")
    values = ctx.adapter(model, ADAPTER_TOKENS, projector="clip_embeds", fmt="ip_adapter_plus")
    identity = ctx.identity()
    return apply_node(node, model=model, key_adapter=keys, key_identity=identity, value_adapter=values, value_identity=identity,
                      pairing="two adapters (unrelated tokens, experimental)")


def _has_identity_attention(model) -> bool:
    dispatcher = pack("nodes.dispatch.dispatcher").installed_dispatcher(model)
    return any(callable(getattr(s, "identity_share", None)) for s in (dispatcher.stages if dispatcher else ()))


@scenario(
    "moa",
    "#6",
    "Apply mixture-of-attention (identity_attention router) routing pva_joint's branch against the prior: this row is pva_joint + MoA, so MoA alone is its gap to pva_joint",
    floor=lambda fi: floors.joint(fi, tokens=PVA_TOKENS, visual_q=True) + floors.routing(fi, tokens=PVA_TOKENS),
    stack_floor=lambda fi: floors.routing(fi, tokens=PVA_TOKENS),
    needs=("adapters.attention.attention_routing", "nodes.moa.routing_stage", "nodes.moa.mixture_of_attention_nodes", "nodes.pva.parallel_attention_nodes"),
)
def _build_moa(model, ctx):
    # the node routes the identity attention applied before it (and refuses a MODEL without one):
    # alone, it gets pva_joint's; in a stack, the one already there
    if not _has_identity_attention(model):
        model = _build_pva_joint(model, ctx)
    return apply_node(pack("nodes.moa.mixture_of_attention_nodes").ApplyMixtureOfAttention, model=model)


@scenario(
    "ca2",
    "#7",
    f"Apply CA² gate (training-free text-attention score): the original image's CLIP tokens ({ADAPTER_TOKENS}, IP-Adapter Plus-style) as a decoupled condition scaled by (1 - Score·Mask)",
    floor=lambda fi: floors.ca2_gate(fi, tokens=ADAPTER_TOKENS),
    needs=("adapters.attention.ca2_gate", "nodes.ca2.ca2_stage", "nodes.common.visual_condition", "nodes.ca2.ca2_nodes"),
)
def _build_ca2(model, ctx):
    node = pack("nodes.ca2.ca2_nodes").ApplyCA2Gate
    adapter = ctx.adapter(model, ADAPTER_TOKENS, projector="clip_embeds", fmt="ip_adapter_plus")
    return apply_node(node, model=model, id_adapter=adapter, mask=ctx.edit_mask(), clip_vision=ctx.clip_vision(), image=ctx.original_image())


def _stfg(model, ctx, mode: str, **inputs) -> Patched:
    node = pack("nodes.stfg.stfg_nodes").ApplySTFG
    patched = apply_node(node, model=model, original_latent={"samples": ctx.original_latent()}, mask=ctx.edit_mask(), mode=mode, **inputs)
    return _inpainting(patched, ctx)


@scenario(
    "stfg_fast",
    "#7",
    "Apply STFG guidance, mode fast, inpainting (closed form, no backward): every layer's text-attention map (paper default) + FFT low-pass pull; compare with inpainting_unpatched",
    floor=floors.boundary_guidance,
    needs=("adapters.attention.stfg_guidance", "nodes.stfg.stfg_attention_stage", "nodes.stfg.stfg_post_cfg", "nodes.stfg.stfg_nodes"),
)
def _build_stfg_fast(model, ctx):
    return _stfg(model, ctx, "fast")


@scenario(
    "stfg_exact",
    "#7",
    "Apply STFG guidance, mode exact with exact_every 1, inpainting: the gradient through the UNet on every step (hosts that support a backward pass only). "
    "The node's default exact_every k = 3 (fast between) costs (this row + (k - 1) x stfg_fast) / k on average",
    floor=floors.boundary_guidance_exact,
    needs=("adapters.attention.stfg_guidance", "nodes.dispatch.gradient_support", "nodes.stfg.stfg_post_cfg", "nodes.stfg.stfg_nodes"),
)
def _build_stfg_exact(model, ctx):
    supported, reason = pack("nodes.dispatch.gradient_support").gradient_support()
    if not supported:
        raise ScenarioUnavailable(f"this host cannot take a gradient through the UNet: {reason}")
    return _stfg(model, ctx, "exact", exact_every=1)  # the per-step cost; the timer calls at one sigma, so every-k would need a mean


@scenario(
    "face_adapter",
    "#8",
    f"Apply face adapter (FACT gated self-attention over [x; {FACE_TOKENS} face tokens] + its feed-forward) at every transformer block, gate 0.5",
    floor=lambda fi: floors.gated_self_attention(fi, tokens=FACE_TOKENS),
    needs=("adapters.attention.gated_self_attention", "nodes.fact.face_adapter_patch", "nodes.fact.face_adapter_nodes"),
)
def _build_face_adapter(model, ctx):
    node = pack("nodes.fact.face_adapter_nodes").ApplyFaceAdapter
    return apply_node(node, model=model, adapter=ctx.fact_adapter(model, FACE_TOKENS), identity=ctx.identity())


@scenario(
    "stage_tokens",
    "#8",
    "Apply per-stage identity tokens (5 stages): keys and values from two encodings of the prompt, swapped into the positive rows' context",
    floor=floors.split_key_value_context,
    needs=("adapters.attention.stage_tokens", "nodes.stage_tokens.stage_token_patch", "nodes.stage_tokens.stage_token_nodes"),
)
def _build_stage_tokens(model, ctx):
    nodes = pack("nodes.stage_tokens.stage_token_nodes")
    clip = ctx.text_encoder()
    # init "seed": the node's default "word" reads CLIP's token embedding table, which the tiny text
    # encoder does not expose; the tokens' values do not change what a step costs
    tokens = apply_node(nodes.CreateIdentityTokens, base=ctx.arch, init="seed", clip=clip)
    _, contexts = call_node(nodes.EncodePromptWithIdentityTokens, clip=clip, tokens=tokens)  # "a photo of V* person"
    return apply_node(nodes.ApplyStageTokens, model=model, stage_contexts=contexts)


@scenario(
    "nested",
    "#8",
    f"Apply nested attention: the subject token's value from an attention over {ADAPTER_TOKENS} identity tokens (adapter K/V), cond rows",
    floor=lambda fi: floors.nested(fi, tokens=ADAPTER_TOKENS),
    needs=("adapters.attention.nested_attention", "nodes.nested.nested_attention_stage", "nodes.nested.nested_attention_nodes"),
)
def _build_nested(model, ctx):
    node = pack("nodes.nested.nested_attention_nodes").ApplyNestedAttention
    adapter = ctx.adapter(model, ADAPTER_TOKENS, fmt="instantid")
    return apply_node(node, model=model, adapter=adapter, identity=ctx.identity(), clip=ctx.text_encoder(), prompt=EDIT_PROMPT)


FULL_STACK = ("pva_joint", "moa", "ca2", "stfg_fast", "face_adapter", "stage_tokens", "nested")


def _build_full_stack(model, ctx):
    """Each component applied in turn, in FULL_STACK order (as an artist would chain the nodes).

    MoA routes the pva_joint branch already on the model (it adds no branch of its own);
    the inpainting inputs come from stfg_fast.
    """
    patched = Patched(model)
    for name in FULL_STACK:
        step = SCENARIOS[name].patch(patched.model, ctx)
        patched = Patched(
            step.model,
            step.noise_mask if step.noise_mask is not None else patched.noise_mask,
            step.latent if step.latent is not None else patched.latent,
        )
    return patched


def _stack_floor(fi):
    return floors.total((SCENARIOS[name].stack_floor or SCENARIOS[name].floor)(fi) for name in FULL_STACK)


SCENARIOS["full_stack"] = Scenario(
    "full_stack",
    "#6-#8",
    "every step mechanism stacked on one model, inpainting: " + " + ".join(FULL_STACK),
    tuple(dict.fromkeys(m for name in FULL_STACK for m in SCENARIOS[name].needs)),
    _stack_floor,
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
