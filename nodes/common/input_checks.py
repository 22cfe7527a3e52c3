"""Checks of IMAGE / LATENT / token inputs at the node boundary, shared by several nodes.

Every check raises :class:`IdentityAttentionError` naming the node, the input
and the fix, before anything is computed from the value, so a wrong input
(another node's NaN output, an empty batch, a MASK wired into an IMAGE, an
IMAGE of integers) stops the prompt with one clear message instead of a raw
traceback or a silently black / noisy picture. MASK inputs are checked by
:func:`.stage_inputs.validate_mask`.

All checks are on CPU copies or on tensors the node already holds on the CPU,
once per node execution (never inside an attention patch).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...adapters.projectors.id_adapter import IdAdapter
from .errors import IdentityAttentionError


def check_finite(t: torch.Tensor, node: str, input_name: str, what: str, fix: str) -> None:
    """``t`` must hold no NaN / inf (integer tensors always pass)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise IdentityAttentionError(f"{what} contains {bad} NaN or infinite value{'s' if bad != 1 else ''}", node=node, input_name=input_name, fix=fix)


def check_image(image, node: str, input_name: str = "image", channels=(1, 3, 4)) -> torch.Tensor:
    """An IMAGE ``[B, H, W, C]`` with B, H, W >= 1, C in ``channels``, finite; returned as float32 in [0, 1] units.

    uint8 (0-255) and bool images are converted; other integer dtypes are refused
    (their scale is unknown).
    """
    connect = "connect an IMAGE output (Load Image, VAE Decode...)"
    if not torch.is_tensor(image):
        raise IdentityAttentionError(f"expected an IMAGE, got {type(image).__name__}", node=node, input_name=input_name, fix=connect)
    if image.dim() != 4:
        hint = " (that is a MASK: convert it with 'Convert Mask to Image')" if image.dim() == 3 else ""
        raise IdentityAttentionError(
            f"expected an IMAGE of shape [batch, height, width, channels], got {list(image.shape)}{hint}", node=node, input_name=input_name, fix=connect
        )
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise IdentityAttentionError(
            f"the IMAGE is empty ({b} images of {w}x{h} pixels)", node=node, input_name=input_name, fix="connect a node that outputs at least one image"
        )
    if c not in channels:
        raise IdentityAttentionError(
            f"the IMAGE has {c} channels; expected {' or '.join(map(str, channels))}", node=node, input_name=input_name, fix=connect
        )
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    elif image.dtype == torch.bool:
        image = image.float()
    elif not image.is_floating_point():
        raise IdentityAttentionError(
            f"the IMAGE holds {str(image.dtype).replace('torch.', '')} values; images are floats from 0 to 1",
            node=node,
            input_name=input_name,
            fix="connect an IMAGE output of a ComfyUI node (Load Image, VAE Decode...), or convert the values to floats in 0-1",
        )
    check_finite(image, node, input_name, "the IMAGE", "check the node that made it (a NaN often comes from a VAE decode in float16: try --fp32-vae or a fixed VAE)")
    return image


def check_latent(latent, node: str, input_name: str = "latent", dims=(4,)) -> torch.Tensor:
    """A LATENT dict whose ``samples`` are ``dims``-D, non-empty and finite; returns the samples."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.dim() not in dims:
        got = list(samples.shape) if torch.is_tensor(samples) else type(latent).__name__
        raise IdentityAttentionError(
            f"expected a LATENT with {'/'.join(map(str, dims))}-D samples, got {got}", node=node, input_name=input_name, fix="connect the output of a VAE Encode node"
        )
    if samples.numel() == 0:
        raise IdentityAttentionError(f"the LATENT is empty (shape {list(samples.shape)})", node=node, input_name=input_name, fix="connect a LATENT with at least one image")
    check_finite(samples, node, input_name, "the LATENT", "encode the picture again (a NaN often comes from a VAE in float16: try --fp32-vae)")
    return samples


def check_cross_attention_adapter(adapter, node: str, input_name: str) -> None:
    """The adapter must attend through cross-attention (not FACT's gated self-attention)."""
    if isinstance(adapter, IdAdapter) and (adapter.mechanism == "gated_self_attention" or adapter.format == "fact"):
        raise IdentityAttentionError(
            "this is a FaceChain-FACT face adapter (gated self-attention): it has no identity key/value projections for cross-attention",
            node=node,
            input_name=input_name,
            fix="connect it to 'Apply face adapter (gated self-attention)', and give this node an IP-Adapter, FaceID, InstantID, PuLID or PVA adapter",
        )


def check_tokens_finite(tokens, node: str, input_name: str, fix: Optional[str] = None) -> None:
    """Identity tokens (an :class:`IdentityTokens` or a tensor) must be finite."""
    fix = fix or "re-encode the identity; if it still happens, the adapter file or the identity encoder is damaged"
    for t in (tokens.cond, tokens.uncond) if hasattr(tokens, "cond") else (tokens,):
        check_finite(t, node, input_name, "the identity tokens made from this input", fix)


# --- the checks every node gets at its start (see input_guard.py) -----------------------------------

MIN_IMAGE_SIDE = 8  # one latent pixel of SD's VAE; smaller pictures have no face and no latent


def check_float_input(value, node: str, input_name: str, low=None, high=None) -> None:
    """A FLOAT input must be a finite number (ComfyUI's own range check lets NaN through)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
        return
    shown = "NaN" if isinstance(value, float) and value != value else repr(value)
    span = f" between {low} and {high}" if low is not None and high is not None else ""
    raise IdentityAttentionError(
        f"the value {shown} is not a finite number", node=node, input_name=input_name,
        fix=f"type a number{span} (a NaN or infinity usually comes from a math or expression node wired into this input)",
    )


def check_image_batch(image, node: str, input_name: str) -> None:
    """An IMAGE ``[B, H, W, C]``: B >= 1, H and W >= :data:`MIN_IMAGE_SIDE`, finite. (Channels and dtype: :func:`check_image`.)"""
    connect = "connect an IMAGE output (Load Image, VAE Decode...)"
    if not torch.is_tensor(image):
        raise IdentityAttentionError(f"expected an IMAGE, got {type(image).__name__}", node=node, input_name=input_name, fix=connect)
    if image.dim() != 4:
        hint = " (that is a MASK: convert it with 'Convert Mask to Image')" if image.dim() in (2, 3) else ""
        raise IdentityAttentionError(f"expected an IMAGE of shape [batch, height, width, channels], got {list(image.shape)}{hint}", node=node, input_name=input_name, fix=connect)
    b, h, w, _ = image.shape
    if b == 0:
        raise IdentityAttentionError("the IMAGE batch is empty (0 images)", node=node, input_name=input_name, fix="connect a node that outputs at least one image")
    if h < MIN_IMAGE_SIDE or w < MIN_IMAGE_SIDE:
        raise IdentityAttentionError(
            f"the IMAGE is {w}x{h} pixels; this node needs at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}", node=node, input_name=input_name,
            fix="connect the full picture, not a thumbnail or an empty crop",
        )
    check_finite(image, node, input_name, "the IMAGE", "check the node that made it (a NaN often comes from a VAE decode in float16: try --fp32-vae or a fixed VAE)")


def check_mask_batch(mask, node: str, input_name: str) -> None:
    """A MASK ``[H, W]`` or ``[B, H, W]`` with at least one pixel, finite."""
    if not torch.is_tensor(mask) or mask.dim() not in (2, 3):
        shape = list(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise IdentityAttentionError(f"expected a MASK of shape [H, W] or [batch, H, W], got {shape}", node=node, input_name=input_name, fix="connect a MASK output (Load Image's mask, a mask editor...)")
    if mask.numel() == 0:
        raise IdentityAttentionError(f"the MASK is empty (shape {list(mask.shape)})", node=node, input_name=input_name, fix="connect a mask with at least one pixel (and one mask per batch entry)")
    check_finite(mask, node, input_name, "the MASK", "regenerate the mask (a grow/feather/blur with a NaN setting makes NaN masks)")


def check_latent_batch(latent, node: str, input_name: str) -> None:
    """A LATENT dict whose ``samples`` are a non-empty finite tensor."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples):
        raise IdentityAttentionError(f"expected a LATENT, got {type(latent).__name__}", node=node, input_name=input_name, fix="connect the output of a VAE Encode or Empty Latent Image node")
    if samples.numel() == 0:
        raise IdentityAttentionError(f"the LATENT is empty (shape {list(samples.shape)})", node=node, input_name=input_name, fix="connect a LATENT with at least one image")
    check_finite(samples, node, input_name, "the LATENT", "encode the picture again (a NaN often comes from a VAE in float16: try --fp32-vae)")


def _tensors_of(value, depth: int = 0):
    """Tensors held by an IDENTITY / ID_TOKENS value: its fields, and fields of records in its tuples (2 levels, bounded)."""
    if torch.is_tensor(value):
        yield "", value
        return
    if depth > 1:
        return
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is None:
        return
    for name in fields:
        item = getattr(value, name, None)
        if torch.is_tensor(item):
            yield name, item
        elif isinstance(item, (tuple, list)):
            for i, record in enumerate(item[:4096]):
                for sub, t in _tensors_of(record, depth + 1):
                    yield f"{name}[{i}].{sub}".rstrip("."), t


def check_identity_finite(value, node: str, input_name: str) -> None:
    """Every tensor an IDENTITY / ID_TOKENS carries is finite (a NaN crop or embedding is named here, not as a NaN loss later)."""
    for name, t in _tensors_of(value):
        check_finite(
            t, node, input_name, f"the {name or 'tensor'} of this input",
            "encode the identity again from finite pictures (a NaN usually comes from an upstream node given a NaN setting)",
        )


def check_matching_batches(mask, image, node: str, mask_name: str, image_name: str) -> None:
    """One MASK for all images or one per image; the sizes need not match (masks are resized)."""
    if mask is None or image is None or not torch.is_tensor(mask) or not torch.is_tensor(image):
        return
    masks = 1 if mask.dim() == 2 else mask.shape[0]
    if masks not in (1, image.shape[0]):
        raise IdentityAttentionError(
            f"{masks} masks for {image.shape[0]} images in '{image_name}'", node=node, input_name=mask_name,
            fix=f"connect one mask for all images, or exactly one per image (in the same order)",
        )


def check_range(value, node: str, input_name: str, low=None, high=None) -> None:
    """A FLOAT / INT inside its declared ``min`` / ``max`` (ComfyUI skips this for linked values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, bool) or value is None:
            return
        raise IdentityAttentionError(f"expected a number, got {type(value).__name__}", node=node, input_name=input_name, fix="connect a number or type one")
    if (low is not None and value < low) or (high is not None and value > high):
        raise IdentityAttentionError(
            f"the value {value:g} is outside this input's range {low:g} to {high:g}" if low is not None and high is not None
            else f"the value {value:g} is outside this input's range", node=node, input_name=input_name,
            fix="use a value inside the range (a value from a math or primitive node skips ComfyUI's own range check)",
        )
