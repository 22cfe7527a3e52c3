"""Node: Apply parallel visual attention (PVA joint attention, or IP-Adapter-style decoupled attention).

Joint mode's negative pass: PVA's sampling gives the unconditional (negative) prompt no identity
tokens: its context is the text alone (``AtlantixJJ/PVA-CelebAHQ-IDI`` ``lib/pva.py``: with only
the 77 text tokens the visual part is empty; ``extra_feat_neg`` is off by default). That is the
default here (``negative_identity`` "none (PVA)"): the stage applies to the positive rows only and
the negative rows are the unpatched model's up to float rounding (one joint call over the whole
batch with no identity columns for them, see nodes/pva/parallel_attention_stage.py). "zero identity" keeps the negative
attending to the tokens of an empty face (the projector's negative inputs, IP-Adapter's
convention), which this node did before. "identity (PVA extra_feat_neg)" gives the negative the
person's own tokens, PVA's ``extra_feat_neg=True`` (its "control" prompts: CFG then amplifies the
text only). Decoupled mode always uses the empty face's tokens on the negative.
"""

from __future__ import annotations

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.attention.parallel_attention import body_token_mask
from ..dispatch.dispatcher import apply_attention_stage
from ..common.dit_layout import dit_family
from .dit_parallel_attention import apply_parallel_attention_dit
from ..common.errors import IdentityAttentionError
from .identity_inputs import (
    PROJECTION_CHOICES,
    PULID_METHODS,
    REFERENCE_CHOICES,
    adapter_projection,
    as_float_tokens,
    check_base,
    check_finite,
    check_types,
    identity_tokens,
    layer_projections,
    model_layers,
    pulid_settings,
    query_weights,
)
from .parallel_attention_stage import IdentitySource, ParallelAttentionStage
from ..dispatch.stage_inputs import CATEGORY, build_schedule, mask_input, schedule_inputs

MODE_CHOICES = ("auto", "joint", "decoupled")

NEGATIVE_IDENTITY_CHOICES = ("none (PVA)", "zero identity", "identity (PVA extra_feat_neg)")

WEIGHT_TOOLTIP = (
    "How strongly the identity is applied; 0 turns this node off (the image is exactly as without it). "
    "Decoupled: the strength of the identity attention added to the prompt's (IP-Adapter's default 1.0; InstantID and PuLID suggest 0.8). "
    "Joint: multiplies the identity's odds against the prompt words in each pixel's attention (1 = as PVA was trained): "
    "if the identity gets a share s of the attention at 1, weight w gives w*s / (w*s + 1 - s). So 2 nearly doubles a small share, "
    "but a 50% share becomes 67%, not 100%. Joint needs 0 or more."
)

NEGATIVE_IDENTITY_TOOLTIP = (
    "Joint mode only: what the negative prompt's pass attends to. none (PVA): the negative prompt's words alone, as PVA samples, "
    "so that pass is the model without this node (to float rounding: one attention call serves both prompts). zero identity: the negative also attends to the tokens of an empty face "
    "(as this node did before). identity: the negative attends to the person's tokens too, PVA's extra_feat_neg, so guidance "
    "strengthens the prompt rather than the identity. Decoupled mode always gives the negative the empty face's tokens (IP-Adapter's convention)."
)


def resolve_mode(mode: str, adapter) -> str:
    """"auto": joint for weights trained for joint attention (PVA), decoupled for the rest."""
    if mode != "auto":
        return mode
    return "joint" if getattr(adapter, "mechanism", "decoupled") == "joint" else "decoupled"


def joint_rows(mode: str, apply_to: str, negative_identity: str, node: str) -> str:
    """The rows the stage patches: joint mode with "none (PVA)" leaves the negative rows to the text alone."""
    if mode != "joint" or negative_identity != NEGATIVE_IDENTITY_CHOICES[0]:
        return apply_to
    if apply_to == "uncond":
        raise IdentityAttentionError(
            "apply_to 'uncond' puts the identity on the negative prompt only, but negative_identity 'none (PVA)' gives the negative no identity tokens, so the node would do nothing",
            node=node,
            input_name="apply_to",
            fix="use apply_to 'both' or 'cond', or set negative_identity to 'zero identity'",
        )
    return "cond"


class ApplyParallelAttention:
    NODE_ID = "IdentityAttentionApplyParallelAttention"
    DISPLAY_NAME = "Apply parallel visual attention"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Makes every cross-attention layer also look at the identity's tokens. Joint mode (PVA, Personalized Face Inpainting by "
        "Parallel Visual Attention): the identity tokens compete with the prompt's words in one attention, so prompt and identity "
        "share each pixel. Decoupled mode (IP-Adapter, InstantID, PuLID): a separate identity attention is added on top of the "
        "prompt's. Stack several for several people (one mask each)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the identity attention added: connect it to a sampler, or to more Identity Attention nodes.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to add the identity to (SD1.5, SD2, SDXL, or Flux.1: joint mode with layer projections)."}),
            "id_adapter": ("ID_ADAPTER", {"tooltip": "Identity adapter weights (IP-Adapter, FaceID, InstantID, PuLID, PVA...) from an adapter loader. They turn the identity into tokens the model can attend to."}),
            "identity": ("IDENTITY", {"tooltip": "The person, from an identity encoder node (one or more reference photos)."}),
        }
        required.update(schedule_inputs(1.0, WEIGHT_TOOLTIP))
        required.update(
            {
                "mode": (
                    list(MODE_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "joint: identity and prompt share one attention (PVA). decoupled: identity attention added on top (IP-Adapter / InstantID / PuLID). auto: what the adapter was trained for.",
                    },
                ),
                "projections": (
                    list(PROJECTION_CHOICES),
                    {
                        "default": "adapter",
                        "tooltip": "adapter: the adapter's own identity projections (as trained). layer: the model's own text projections (training-free; in joint mode this is PVA before training: the identity tokens are simply added to the prompt).",
                    },
                ),
                "references": (
                    list(REFERENCE_CHOICES),
                    {
                        "default": "fused",
                        "tooltip": "fused: average all reference photos into one identity. per_reference: keep one set of tokens per photo (more detail from varied photos, slower).",
                    },
                ),
            }
        )
        optional = mask_input()
        optional["pulid_method"] = (
            list(PULID_METHODS),
            {
                "default": "fidelity",
                "tooltip": "Only for PuLID adapters (ignored by others). fidelity (PuLID's default): 8 empty tokens soak up the identity "
                "attention where it is not needed, and the part of the identity along the prompt's own attention output is kept only in "
                "proportion to the attention the identity gets (ORTHO_v2); "
                "style (PuLID's 'extremely style'): 16 empty tokens and only the part of the identity orthogonal to the prompt is added, "
                "so the prompt's style wins; neutral: plain identity attention, no empty tokens, no projection.",
            },
        )
        optional["negative_identity"] = (list(NEGATIVE_IDENTITY_CHOICES), {"default": NEGATIVE_IDENTITY_CHOICES[0], "tooltip": NEGATIVE_IDENTITY_TOOLTIP})
        return {"required": required, "optional": optional}

    def apply(
        self, model, id_adapter, identity, weight, start_percent, end_percent, apply_to, mode, projections, references, mask=None,
        pulid_method="fidelity", negative_identity=NEGATIVE_IDENTITY_CHOICES[0],
    ):
        node = self.DISPLAY_NAME
        if dit_family(model) is not None:  # Flux: identity tokens join the joint attention (nodes/pva/dit_parallel_attention.py)
            return (apply_parallel_attention_dit(
                model, id_adapter, identity, weight, start_percent, end_percent, apply_to, mode, projections, references, mask, negative_identity, node
            ),)
        check_types(node, id_adapter, identity)
        layers = model_layers(model, node)
        mode = resolve_mode(mode, id_adapter)
        if mode == "joint" and weight < 0:
            raise IdentityAttentionError(
                f"joint mode multiplies the identity's share of attention, so it cannot be negative (got {weight})",
                node=node,
                input_name="weight",
                fix="use a weight of 0 or more, or switch mode to decoupled",
            )
        if negative_identity not in NEGATIVE_IDENTITY_CHOICES:
            raise IdentityAttentionError(
                f"unknown negative_identity {negative_identity!r}",
                node=node,
                input_name="negative_identity",
                fix=f"choose one of: {', '.join(NEGATIVE_IDENTITY_CHOICES)}",
            )
        apply_to = joint_rows(mode, apply_to, negative_identity, node)
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
        tokens = as_float_tokens(identity_tokens(id_adapter, identity, references == "per_reference", node))
        check_finite(tokens, node, "identity")
        zero_tokens, ortho = pulid_settings(id_adapter, node, method=pulid_method)
        if projections == "adapter":
            check_base(model, layers, id_adapter, node)
            keys = adapter_projection(layers, id_adapter, "to_k", tokens.dim, node, "id_adapter")
            values = adapter_projection(layers, id_adapter, "to_v", tokens.dim, node, "id_adapter")
            queries = query_weights(layers, id_adapter, node, "id_adapter")
        else:
            keys, values = layer_projections(model, layers, tokens.dim, node, "id_adapter")
            queries = None
        if mode == "joint" and negative_identity == NEGATIVE_IDENTITY_CHOICES[2]:
            tokens = IdentityTokens(cond=tokens.cond, uncond=tokens.cond)
        source = IdentitySource(tokens, tokens, keys, values, queries, zero_tokens if tokens.count else 0)
        ortho = ortho if mode == "decoupled" else "none"
        body = body_token_mask(tokens.count, source.zero_tokens) if ortho == "ortho_v2" else None
        stage = ParallelAttentionStage(schedule, source, mode, label=f"{node} ({mode}, {id_adapter.format}, {projections} projections)", ortho=ortho, body=body)
        return (apply_attention_stage(model, stage),)


NODES = [ApplyParallelAttention]
