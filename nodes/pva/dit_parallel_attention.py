"""*Apply parallel visual attention* on a Flux MODEL: joint identity attention (nodes/pva/dit_joint_identity.py).

On Flux only the training-free joint mode exists here: identity tokens through the layer's own
(text-side) projections, so ``mode`` must be joint or auto and ``projections`` layer. Adapter
projections trained for UNet layers have no Flux layer to load into (PuLID-Flux and the Flux
IP-Adapters have their own nodes). The identity tokens must be as wide as the model's text
context (4096 for Flux.1's T5-XXL): they are text-side tokens.
"""

from __future__ import annotations

from ..dispatch.dit_dispatcher import apply_dit_stage
from .dit_joint_identity import DitJointIdentityStage
from ..common.dit_layout import FAMILY_NAMES, context_width, dit_family, identity_hidden
from ..common.errors import IdentityAttentionError
from .identity_inputs import as_float_tokens, check_finite, check_types, identity_tokens
from ..dispatch.stage_inputs import build_schedule


def apply_parallel_attention_dit(
    model, id_adapter, identity, weight, start_percent, end_percent, apply_to, mode, projections, references, mask, negative_identity, node: str
):
    """The node's Flux path; returns the patched clone."""
    from ...adapters.projectors.id_adapter import IdentityTokens
    from .parallel_attention_nodes import NEGATIVE_IDENTITY_CHOICES, joint_rows

    family = FAMILY_NAMES[dit_family(model)]
    check_types(node, id_adapter, identity)
    if mode == "decoupled":
        raise IdentityAttentionError(
            f"decoupled mode patches UNet cross-attention layers, which {family} has none of",
            node=node, input_name="mode", fix="use mode joint (or auto) on Flux: the identity tokens join the joint attention",
        )
    if projections != "layer":
        raise IdentityAttentionError(
            f"adapter projections are trained for UNet layers; {family} has none to load them into",
            node=node, input_name="projections", fix="set projections to layer (training-free: the model's own text projections)",
        )
    if weight < 0:
        raise IdentityAttentionError(
            f"joint mode multiplies the identity's share of attention, so it cannot be negative (got {weight})",
            node=node, input_name="weight", fix="use a weight of 0 or more",
        )
    apply_to = joint_rows("joint", apply_to, negative_identity, node)
    schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
    tokens = as_float_tokens(identity_tokens(id_adapter, identity, references == "per_reference", node))
    check_finite(tokens, node, "identity")
    width = context_width(model)
    if tokens.dim != width:
        raise IdentityAttentionError(
            f"the adapter gives identity tokens {tokens.dim} wide, but this {family} model's text context is {width} wide",
            node=node, input_name="id_adapter", fix=f"use an adapter whose tokens are {width} wide (made for {family}'s text encoder)",
        )
    if negative_identity == NEGATIVE_IDENTITY_CHOICES[2]:
        tokens = IdentityTokens(cond=tokens.cond, uncond=tokens.cond)
    stage = DitJointIdentityStage(schedule, tokens, lambda t: identity_hidden(model, t), label=f"{node} (joint, {family}, layer projections)")
    return apply_dit_stage(model, stage, node=node)
