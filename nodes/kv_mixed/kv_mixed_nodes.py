"""Node: Apply KV-mixed attention (keys and values of the identity attention from different encodings).

Three pairings of key token ``j`` with value token ``j``:

- ``trained kv_mixed adapter`` (default): one adapter trained by the ``kv_mixed`` target
  (``adapters/projectors/kv_mixed_encoders.py``): its key encoder (small bottleneck) and value encoder
  (large bottleneck) over the same identity features, its ``to_k`` / ``to_v``: VisualComposer's
  mechanism.
- ``one token set: model keys, adapter values (training-free)``: one adapter's tokens; keys
  through the layer's own ``to_k`` (each token is matched by the image's queries as a word of the
  prompt would be), values through the adapter's trained ``to_v``. Key ``j`` and value ``j`` are
  the same token, so the pairing holds; the key projection was never trained for these tokens.
- ``two adapters (unrelated tokens, experimental)``: keys from one adapter's tokens, values from
  another's, paired by position (``token_mismatch`` when the counts differ). The two were never
  trained together, so token ``j`` of one has no relation to token ``j`` of the other: kept for
  experiments, not VisualComposer's mechanism.
"""

from __future__ import annotations

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.attention.kv_mixed_attention import TOKEN_RULES, TokenCountMismatch, match_token_counts
from ...adapters.projectors.kv_mixed_encoders import KVMixedEncoder, split_key_value
from ..dispatch.dispatcher import apply_attention_stage
from .dit_kv_mixed import apply_kv_mixed_dit
from ..common.dit_layout import dit_family
from ..common.errors import IdentityAttentionError
from ..pva.identity_inputs import (
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
from ..pva.parallel_attention_stage import MODES, IdentitySource, ParallelAttentionStage
from ..dispatch.stage_inputs import CATEGORY, build_schedule, mask_input, schedule_inputs

TRAINED = "trained kv_mixed adapter"
SHARED = "one token set: model keys, adapter values (training-free)"
TWO_ADAPTERS = "two adapters (unrelated tokens, experimental)"
PAIRINGS = (TRAINED, SHARED, TWO_ADAPTERS)


def trained_tokens(adapter, identity, per_reference: bool, node: str):
    """A kv_mixed adapter's key and value tokens: ``(keys, values)`` IdentityTokens ``[1, R*T, D]`` each."""
    if adapter.mechanism != "kv_mixed" or not isinstance(adapter.projector, KVMixedEncoder):
        raise IdentityAttentionError(
            f"pairing '{TRAINED}' needs an adapter trained by the kv_mixed target; this one is a {adapter.format} adapter for {adapter.mechanism} attention",
            node=node,
            input_name="key_adapter",
            fix=f"load a kv_mixed adapter (train.py, target kv_mixed), or set pairing to '{SHARED}' or '{TWO_ADAPTERS}'",
        )
    tokens = as_float_tokens(identity_tokens(adapter, identity, per_reference, node, "key_adapter", "key_identity"))
    check_finite(tokens, node, "key_identity")
    t = adapter.projector.pair_tokens
    k_c, v_c = split_key_value(tokens.cond, t)
    k_u, v_u = split_key_value(tokens.uncond, t)
    return IdentityTokens(cond=k_c, uncond=k_u), IdentityTokens(cond=v_c, uncond=v_u)


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
        "Identity attention whose keys (where the identity goes: layout, pose) and values (what it looks like: appearance detail) "
        "come from different encodings, as in VisualComposer's KV-mixed cross-attention. Default: a kv_mixed adapter from the trainer "
        "(a small-bottleneck key encoder and a large-bottleneck value encoder trained together). Without one: 'one token set' "
        "(training-free: one adapter's tokens, keys through the model's own projection, values through the adapter's), or 'two "
        "adapters' (experimental: keys and values from two unrelated adapters, paired by position)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with KV-mixed identity attention added: connect it to a sampler or to more Identity Attention nodes.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to add the identity to (SD1.5, SD2, SDXL or Flux.1; on Flux the keys and values go through each block's own text projections, so projections must be layer)."}),
            "key_adapter": ("ID_ADAPTER", {"tooltip": "Trained pairing: the kv_mixed adapter (both encoders). One token set: the adapter whose tokens and value projection are used. Two adapters: the adapter for the keys, which decide WHERE the identity lands (a compact encoding: FaceID, InstantID)."}),
            "key_identity": ("IDENTITY", {"tooltip": "The person (as seen by key_adapter)."}),
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
                    {"default": "adapter", "tooltip": "Two-adapters pairing only: adapter = keys through the key adapter's projection, values through the value adapter's; layer = both through the model's own text projections. The other pairings fix their projections."},
                ),
                "references": (list(REFERENCE_CHOICES), {"default": "fused", "tooltip": "fused: average all reference photos into one identity. per_reference: one set of tokens per photo."}),
            }
        )
        optional = mask_input()
        optional.update(
            {
                "value_adapter": ("ID_ADAPTER", {"tooltip": "Two-adapters pairing only: the adapter for the values, which decide WHAT the identity looks like (a detailed encoding: IP-Adapter Plus / Plus Face)."}),
                "value_identity": ("IDENTITY", {"tooltip": "Two-adapters pairing only: the person as seen by the value adapter (it needs the features that adapter reads, e.g. CLIP vision)."}),
                "pairing": (
                    list(PAIRINGS),
                    {
                        "default": TRAINED,
                        "tooltip": "Where keys and values come from. trained: a kv_mixed adapter from the trainer (VisualComposer's two encoders). one token set (training-free): "
                        "the adapter's tokens, keys through the model's own projection, values through the adapter's. two adapters (experimental): keys from key_adapter, "
                        "values from value_adapter, token j paired with token j although the two were never trained together.",
                    },
                ),
            }
        )
        return {"required": required, "optional": optional}

    def apply(self, model, key_adapter, key_identity, weight, start_percent, end_percent, apply_to, mode, token_mismatch, projections, references, mask=None, value_adapter=None, value_identity=None, pairing=TRAINED):
        node = self.DISPLAY_NAME
        if pairing not in PAIRINGS:
            raise IdentityAttentionError(f"unknown pairing {pairing!r}", node=node, input_name="pairing", fix=f"choose one of: {', '.join(PAIRINGS)}")
        check_types(node, key_adapter, key_identity, "key_adapter", "key_identity")
        if pairing == TWO_ADAPTERS:
            if value_adapter is None or value_identity is None:
                raise IdentityAttentionError(
                    f"pairing '{TWO_ADAPTERS}' takes the values from value_adapter and value_identity, and one of them is not connected",
                    node=node, input_name="value_adapter" if value_adapter is None else "value_identity", fix="connect both, or choose another pairing",
                )
            check_types(node, value_adapter, value_identity, "value_adapter", "value_identity")
        elif value_adapter is not None or value_identity is not None:
            raise IdentityAttentionError(
                f"value_adapter / value_identity are connected but pairing '{pairing}' takes keys and values from key_adapter alone",
                node=node, input_name="pairing", fix=f"disconnect them, or set pairing to '{TWO_ADAPTERS}'",
            )
        if dit_family(model) is not None:  # Flux: keys/values join the joint attention (nodes/kv_mixed/dit_kv_mixed.py)
            return (apply_kv_mixed_dit(
                model, key_adapter, key_identity, value_adapter, value_identity, weight, start_percent, end_percent, apply_to, mode,
                token_mismatch, projections, references, mask, pairing, node,
            ),)
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
        if pairing != TWO_ADAPTERS:
            check_base(model, layers, key_adapter, node, "key_adapter")
            if pairing == TRAINED:
                key_tokens, value_tokens = trained_tokens(key_adapter, key_identity, per_reference, node)
                keys = adapter_projection(layers, key_adapter, "to_k", key_tokens.dim, node, "key_adapter")
            else:
                key_tokens = value_tokens = as_float_tokens(identity_tokens(key_adapter, key_identity, per_reference, node, "key_adapter", "key_identity"))
                check_finite(key_tokens, node, "key_identity")
                keys, _ = layer_projections(model, layers, key_tokens.dim, node, "key_adapter")
            values = adapter_projection(layers, key_adapter, "to_v", value_tokens.dim, node, "key_adapter")
            source = IdentitySource(key_tokens, value_tokens, keys, values)
            stage = ParallelAttentionStage(schedule, source, mode, label=f"{node} ({mode}, {pairing}, {key_adapter.format})")
            return (apply_attention_stage(model, stage),)
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
