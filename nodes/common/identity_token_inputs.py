"""Turning (IDENTITY, ID_ADAPTER) into identity tokens, with errors an artist can act on.

Shared by the face-adapter and nested-attention nodes.
"""

from __future__ import annotations

from ...adapters.projectors.id_adapter import IdAdapter, IdentityTokens
from ...adapters.faces.identity import Identity
from .errors import IdentityAttentionError
from .host import base_model_of
from .input_checks import check_tokens_finite
from .recognizer_check import check_recognizer

REFERENCE_CHOICES = ("per_reference", "fused")


def references_input(default: str = "per_reference") -> tuple:
    return (
        list(REFERENCE_CHOICES),
        {
            "default": default,
            "tooltip": "With several reference photos: per_reference gives each photo its own tokens (more detail, FACT's way); fused averages the photos first (one token set, faster).",
        },
    )


def check_base(model, adapter: IdAdapter, node: str) -> str:
    base = base_model_of(model)
    if base != "unknown" and adapter.base != base:
        raise IdentityAttentionError(
            f"the adapter was made for {adapter.base} but the model is {base}",
            node=node,
            input_name="adapter",
            fix=f"load a {base} adapter, or use a {adapter.base} checkpoint",
        )
    return base


def identity_tokens(adapter: IdAdapter, identity: Identity, per_reference: bool, node: str) -> IdentityTokens:
    """The adapter's projector on the identity, checking the features it needs are there."""
    if adapter.projector is None:
        raise IdentityAttentionError(
            f"this {adapter.format} adapter has no token projector",
            node=node,
            input_name="adapter",
            fix="load the complete adapter file (with its image/face projection weights)",
        )
    check_recognizer(adapter, identity, node, "adapter", "identity")
    kind = str(getattr(adapter.projector, "input_kind", ""))
    if "face_tokens" in kind and identity.face_tokens is None:
        raise IdentityAttentionError(
            "the IDENTITY has no face-encoder tokens, which this adapter reads",
            node=node,
            input_name="identity",
            fix="pass the IDENTITY through 'Encode face tokens (TransFace)' before this node",
        )
    if "clip" in kind and identity.clip_hidden is None and identity.clip_embeds is None:
        raise IdentityAttentionError(
            "the IDENTITY has no CLIP-vision features, which this adapter reads",
            node=node,
            input_name="identity",
            fix="connect a CLIP vision model to the identity encoder node",
        )
    try:
        tokens = adapter.identity_tokens(identity, per_reference=per_reference)
    except (RuntimeError, ValueError, AttributeError, TypeError) as err:
        raise IdentityAttentionError(
            f"could not make identity tokens with this adapter ({err})",
            node=node,
            input_name="adapter",
            fix="check that the adapter and the identity encoder belong together (same face/CLIP encoder)",
        ) from err
    check_tokens_finite(tokens, node, "identity")
    return tokens
