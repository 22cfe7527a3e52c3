"""Turning a node's MODEL / ID_ADAPTER / IDENTITY inputs into an identity source, with checks.

Shared by the parallel-attention and KV-mixed nodes. Every check raises
:class:`IdentityAttentionError` naming the node, the input and the fix.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ...adapters.projectors.id_adapter import IdAdapter, IdentityTokens
from ...adapters.faces.identity import Identity
from ...adapters.attention.parallel_attention import ORTHO_MODES
from ..common.errors import IdentityAttentionError
from ..common.host import LayerInfo, base_model_of, cross_attention_layers
from ..common.input_checks import check_cross_attention_adapter
from ..common.recognizer_check import check_recognizer
from .parallel_attention_stage import ModuleProjection, WeightProjection

REFERENCE_CHOICES = ("fused", "per_reference")
PROJECTION_CHOICES = ("adapter", "layer")


def model_layers(model, node: str) -> List[LayerInfo]:
    layers = cross_attention_layers(model)
    if not layers:
        raise IdentityAttentionError(
            "this MODEL has no UNet cross-attention layers", node=node, input_name="model", fix="use an SD1.5, SD2 or SDXL model"
        )
    return layers


def check_types(node: str, adapter, identity, adapter_input: str = "id_adapter", identity_input: str = "identity") -> None:
    if not isinstance(adapter, IdAdapter):
        raise IdentityAttentionError(
            f"expected an ID_ADAPTER, got {type(adapter).__name__}", node=node, input_name=adapter_input, fix="connect the output of an identity adapter loader"
        )
    check_cross_attention_adapter(adapter, node, adapter_input)
    if not isinstance(identity, Identity):
        raise IdentityAttentionError(
            f"expected an IDENTITY, got {type(identity).__name__}", node=node, input_name=identity_input, fix="connect the output of an identity encoder node"
        )


def check_base(model, layers: Sequence[LayerInfo], adapter: IdAdapter, node: str, input_name: str = "id_adapter") -> None:
    """The adapter must be made for the model's base (SD1.5 / SD2 / SDXL)."""
    base = base_model_of(model)
    if base == "unknown":
        if adapter.context_dim != layers[0].context_dim:
            raise IdentityAttentionError(
                f"the adapter expects a text context of {adapter.context_dim} channels but the model's is {layers[0].context_dim}",
                node=node,
                input_name=input_name,
                fix="load an adapter made for this model's base",
            )
        return
    if adapter.base != base:
        raise IdentityAttentionError(
            f"this adapter was made for {adapter.base} but the model is {base}",
            node=node,
            input_name=input_name,
            fix=f"load the {base} version of the adapter, or use a {adapter.base} checkpoint",
        )


def identity_tokens(adapter: IdAdapter, identity: Identity, per_reference: bool, node: str, adapter_input: str = "id_adapter", identity_input: str = "identity") -> IdentityTokens:
    """The adapter's tokens for the identity (computed once, on the adapter's device)."""
    if adapter.projector is None:
        raise IdentityAttentionError(
            f"this {adapter.format} adapter has no token projector, so it cannot turn an IDENTITY into tokens",
            node=node,
            input_name=adapter_input,
            fix="load the adapter file that includes its image projection model",
        )
    check_recognizer(adapter, identity, node, adapter_input, identity_input)
    try:
        return adapter.identity_tokens(identity, per_reference=per_reference)
    except (ValueError, TypeError, AttributeError, KeyError, RuntimeError) as err:
        kind = getattr(adapter.projector, "input_kind", "?")
        raise IdentityAttentionError(
            f"the adapter could not make tokens from this identity ({err}); it reads {kind} features",
            node=node,
            input_name=identity_input,
            fix="encode the identity with the features this adapter needs (e.g. enable CLIP vision in the encoder for CLIP-based adapters)",
        ) from err


def adapter_projection(layers: Sequence[LayerInfo], adapter: IdAdapter, name: str, token_dim: int, node: str, input_name: str) -> Dict:
    """Per layer ``WeightProjection(adapter.layers[key][name])``; every layer must have it with shape ``[C, token_dim]``."""
    missing, wrong = [], []
    out = {}
    for info in layers:
        weight = adapter.layer(info.key).get(name)
        if weight is None:
            missing.append(info.key)
        elif tuple(weight.shape) != (info.inner_dim, token_dim):
            wrong.append((info.key, tuple(weight.shape), (info.inner_dim, token_dim)))
        else:
            out[info.key] = WeightProjection(weight)
    if missing:
        raise IdentityAttentionError(
            f"the adapter has no '{name}' projection for {len(missing)} of the model's {len(layers)} cross-attention layers (first: {missing[0]})",
            node=node,
            input_name=input_name,
            fix="use an adapter made for this model, or set projections to 'layer' (training-free, uses the model's own projections)",
        )
    if wrong:
        key, got, expected = wrong[0]
        raise IdentityAttentionError(
            f"the adapter's '{name}' at layer {key} has shape {list(got)} but this model needs {list(expected)}",
            node=node,
            input_name=input_name,
            fix="use an adapter made for this model's base and token size",
        )
    return out


def layer_projections(model, layers: Sequence[LayerInfo], token_dim: int, node: str, input_name: str):
    """The layers' own ``to_k`` / ``to_v`` (training-free): tokens must have the text context's width."""
    if token_dim != layers[0].context_dim:
        raise IdentityAttentionError(
            f"the identity tokens have {token_dim} channels but the model's cross-attention takes {layers[0].context_dim}",
            node=node,
            input_name=input_name,
            fix="with projections 'layer' use an adapter whose tokens live in this model's text space (made for this base), or set projections to 'adapter'",
        )
    diffusion_model = model.model.diffusion_model
    keys, values = {}, {}
    for info in layers:
        attn2 = diffusion_model.get_submodule(info.module_path).attn2
        keys[info.key] = ModuleProjection(attn2.to_k)
        values[info.key] = ModuleProjection(attn2.to_v)
    return keys, values


def query_weights(layers: Sequence[LayerInfo], adapter: IdAdapter, node: str, input_name: str) -> Optional[Dict]:
    """PVA's ``to_q`` per layer when the adapter has it at every layer, else None (use the layer's query)."""
    found = {info.key: adapter.layer(info.key).get("to_q") for info in layers}
    if all(w is None for w in found.values()):
        return None
    for info in layers:
        w = found[info.key]
        if w is None or tuple(w.shape) != (info.inner_dim, info.inner_dim):
            got = "none" if w is None else list(w.shape)
            raise IdentityAttentionError(
                f"the adapter's identity query 'to_q' at layer {info.key} is {got}, expected [{info.inner_dim}, {info.inner_dim}]",
                node=node,
                input_name=input_name,
                fix="use a complete PVA adapter made for this model",
            )
    return found


PULID_DEFAULT_ZERO_TOKENS = 8
PULID_DEFAULT_ORTHO = "ortho_v2"
"""PuLID's default "fidelity" mode (``app.py``: mode value 'fidelity' -> NUM_ZERO 8, ORTHO_v2)."""

PULID_METHODS = {
    "fidelity": (8, "ortho_v2"),  # official app.py 'fidelity' (the default)
    "style": (16, "ortho"),  # official app.py 'extremely style'
    "neutral": (0, "none"),  # the official processor's module defaults (NUM_ZERO 0, no projection); PuLID_ComfyUI's 'neutral'
}
"""PuLID's methods: ``(zero tokens appended to the identity tokens, projection of the identity attention)``."""


def pulid_settings(adapter: IdAdapter, node: str, input_name: str = "id_adapter", method=None):
    """``(zero_tokens, ortho)`` for PuLID weights; ``(0, "none")`` for other adapters.

    ``method`` (a key of :data:`PULID_METHODS`) decides; without one, the loader's extras
    (``num_zero_tokens``, ``ortho``) or else PuLID's fidelity mode.
    """
    if adapter.format != "pulid":
        return 0, "none"
    if method is not None:
        if method not in PULID_METHODS:
            raise IdentityAttentionError(
                f"unknown PuLID method {method!r}", node=node, input_name="pulid_method", fix=f"choose one of {', '.join(PULID_METHODS)}",
            )
        return PULID_METHODS[method]
    zero = adapter.extras.get("num_zero_tokens")
    zero = PULID_DEFAULT_ZERO_TOKENS if zero is None else int(zero)
    ortho = str(adapter.extras.get("ortho") or PULID_DEFAULT_ORTHO)
    if zero < 0 or ortho not in ORTHO_MODES:
        raise IdentityAttentionError(
            f"PuLID settings not understood: num_zero_tokens={zero}, ortho={ortho!r}",
            node=node,
            input_name=input_name,
            fix=f"reload the PuLID weights; ortho must be one of {', '.join(ORTHO_MODES)}",
        )
    return zero, ortho


def as_float_tokens(tokens: IdentityTokens) -> IdentityTokens:
    return IdentityTokens(cond=tokens.cond.detach().float().cpu(), uncond=tokens.uncond.detach().float().cpu())


def check_finite(tokens: IdentityTokens, node: str, input_name: str) -> None:
    if not (torch.isfinite(tokens.cond).all() and torch.isfinite(tokens.uncond).all()):
        raise IdentityAttentionError(
            "the identity tokens contain NaN or infinite values", node=node, input_name=input_name, fix="re-encode the identity; check the adapter file"
        )
