"""Node: Apply KV-mixed attention (keys from one identity encoding, values from another)."""

from __future__ import annotations

from ..adapters.id_adapter import IdentityTokens
from ..adapters.kv_mixed_attention import TOKEN_RULES, TokenCountMismatch, match_token_counts
from .dispatcher import apply_attention_stage
from .errors import IdentityAttentionError
from .identity_inputs import (
    PROJECTION_CHOICES,
    REFERENCE_CHOICES,
    adapter_projection,
    as_float_tokens,
    check_base,
    check_finite,
    check_types,
    identity_tokens,
    layer_projections,
    model_layers,
)
from .parallel_attention_stage import MODES, IdentitySource, ParallelAttentionStage
from .stage_inputs import CATEGORY, build_schedule, mask_input, schedule_inputs


def matched_tokens(keys: IdentityTokens, values: IdentityTokens, rule: str, node: str) -> IdentityTokens:
    """The value tokens lined up with the key tokens by ``rule`` (cond and uncond alike)."""
    try:
        _, cond = match_token_counts(keys.cond, values.cond, rule)
        _, uncond = match_token_counts(keys.uncond, values.uncond, rule)
    except TokenCountMismatch as err:
        raise IdentityAttentionError(
            f"the key source makes {err.key_tokens} tokens but the value source makes {err.value_tokens}",
            node=node,
            input_name="token_mismatch",
            fix="set token_mismatch to resample_values, or use two adapters that make the same number of tokens",
        ) from err
    return IdentityTokens(cond=cond, uncond=uncond)


class ApplyKVMixedAttention:
    NODE_ID = "IdentityAttentionApplyKVMixedAttention"
    DISPLAY_NAME = "Apply KV-mixed attention"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Identity attention whose keys (where the identity goes: layout, pose) come from one encoding and whose values (what it "
        "looks like: appearance detail) come from another, as in VisualComposer's KV-mixed cross-attention. Typical: keys from the "
        "face embedding through a FaceID/InstantID adapter, values from CLIP image tokens through an IP-Adapter Plus."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with KV-mixed identity attention added: connect it to a sampler or to more Identity Attention nodes.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to add the identity to (SD1.5, SD2 or SDXL)."}),
            "key_adapter": ("ID_ADAPTER", {"tooltip": "Adapter for the keys: decides WHERE the identity lands. A compact encoding (face embedding: FaceID, InstantID) leaves pose and layout free."}),
            "key_identity": ("IDENTITY", {"tooltip": "The person as seen by the key adapter (usually the same IDENTITY as for the values)."}),
            "value_adapter": ("ID_ADAPTER", {"tooltip": "Adapter for the values: decides WHAT the identity looks like. A detailed encoding (CLIP image tokens: IP-Adapter Plus / Plus Face) carries appearance."}),
            "value_identity": ("IDENTITY", {"tooltip": "The person as seen by the value adapter (it needs the features that adapter reads, e.g. CLIP vision)."}),
        }
        required.update(schedule_inputs(1.0, "How strongly the identity is applied; 0 turns this node off (exactly as without it). Decoupled: strength of the added identity attention. Joint: how much attention the identity gets next to the prompt (0 or more)."))
        required.update(
            {
                "mode": (list(MODES[::-1]), {"default": "decoupled", "tooltip": "decoupled: identity attention added on top of the prompt's (IP-Adapter style). joint: identity and prompt share one attention (PVA style)."}),
                "token_mismatch": (
                    list(TOKEN_RULES),
                    {
                        "default": "resample_values",
                        "tooltip": "When the two adapters make different numbers of tokens. resample_values: average the value tokens down (or repeat them up) to the key count, in order. error: stop and say so.",
                    },
                ),
                "projections": (
                    list(PROJECTION_CHOICES),
                    {"default": "adapter", "tooltip": "adapter: keys through the key adapter's projection, values through the value adapter's (as trained). layer: both through the model's own text projections (training-free)."},
                ),
                "references": (list(REFERENCE_CHOICES), {"default": "fused", "tooltip": "fused: average all reference photos into one identity. per_reference: one set of tokens per photo."}),
            }
        )
        return {"required": required, "optional": mask_input()}

    def apply(self, model, key_adapter, key_identity, value_adapter, value_identity, weight, start_percent, end_percent, apply_to, mode, token_mismatch, projections, references, mask=None):
        node = self.DISPLAY_NAME
        check_types(node, key_adapter, key_identity, "key_adapter", "key_identity")
        check_types(node, value_adapter, value_identity, "value_adapter", "value_identity")
        layers = model_layers(model, node)
        if mode == "joint" and weight < 0:
            raise IdentityAttentionError(
                f"joint mode multiplies the identity's share of attention, so it cannot be negative (got {weight})",
                node=node,
                input_name="weight",
                fix="use a weight of 0 or more, or switch mode to decoupled",
            )
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
        per_reference = references == "per_reference"
        key_tokens = as_float_tokens(identity_tokens(key_adapter, key_identity, per_reference, node, "key_adapter", "key_identity"))
        value_tokens = as_float_tokens(identity_tokens(value_adapter, value_identity, per_reference, node, "value_adapter", "value_identity"))
        check_finite(key_tokens, node, "key_identity")
        check_finite(value_tokens, node, "value_identity")
        value_tokens = matched_tokens(key_tokens, value_tokens, token_mismatch, node)
        if projections == "adapter":
            check_base(model, layers, key_adapter, node, "key_adapter")
            check_base(model, layers, value_adapter, node, "value_adapter")
            keys = adapter_projection(layers, key_adapter, "to_k", key_tokens.dim, node, "key_adapter")
            values = adapter_projection(layers, value_adapter, "to_v", value_tokens.dim, node, "value_adapter")
        else:
            keys, _ = layer_projections(model, layers, key_tokens.dim, node, "key_adapter")
            _, values = layer_projections(model, layers, value_tokens.dim, node, "value_adapter")
        source = IdentitySource(key_tokens, value_tokens, keys, values)
        stage = ParallelAttentionStage(schedule, source, mode, label=f"{node} ({mode}, keys {key_adapter.format}, values {value_adapter.format})")
        return (apply_attention_stage(model, stage),)


NODES = [ApplyKVMixedAttention]
