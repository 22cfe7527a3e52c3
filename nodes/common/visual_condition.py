"""The original image as a visual condition: CLIP-vision features -> an adapter's tokens.

CA² attends to the *original image* (not a face crop), so there is no
IDENTITY here: the image's CLIP-vision features are put into
:class:`IdentityFeatures` directly (ArcFace fields zero) and the adapter's
token projector makes the tokens. Only projectors that read CLIP features
qualify (IP-Adapter base / plus / full-face, native CA² weights); face-embedding
projectors (FaceID, InstantID, PuLID) would see zeros and are refused.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...adapters.faces.identity import IdentityFeatures
from .errors import IdentityAttentionError
from .input_checks import check_finite

ARCFACE_WIDTH = 512


def _field(output, name: str) -> Optional[torch.Tensor]:
    value = getattr(output, name, None)
    if value is None:
        try:
            value = output[name]
        except (KeyError, TypeError, IndexError):
            value = None
    return value


def clip_vision_features(
    node: str,
    clip_vision=None,
    image: Optional[torch.Tensor] = None,
    clip_vision_output=None,
) -> IdentityFeatures:
    """Features of the original image(s): ``clip_embeds`` ``[R, De]``, ``clip_hidden`` ``[R, T, Dh]``.

    From ``clip_vision_output`` if given, else by encoding ``image`` with
    ``clip_vision`` (the negative is then the encoding of a black image, as
    IP-Adapter does; without it the projector uses zeros).
    """
    black = None
    if clip_vision_output is None:
        if clip_vision is None or image is None:
            raise IdentityAttentionError(
                "no visual condition: the original image's CLIP-vision features are needed",
                node=node,
                input_name="clip_vision_output",
                fix="connect clip_vision (Load CLIP Vision) and image (the original photo), or a CLIP Vision Encode output to clip_vision_output",
            )
        try:
            clip_vision_output = clip_vision.encode_image(image)
            black = clip_vision.encode_image(torch.zeros_like(image[:1]))
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:
            raise IdentityAttentionError(
                f"the CLIP vision model could not encode the image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                node=node,
                input_name="clip_vision",
                fix="connect a CLIP vision model from Load CLIP Vision and an RGB IMAGE",
            ) from err
    embeds = _field(clip_vision_output, "image_embeds")
    hidden = _field(clip_vision_output, "penultimate_hidden_states")
    if embeds is None and hidden is None:
        raise IdentityAttentionError(
            "the CLIP-vision output has neither image embeds nor hidden states",
            node=node,
            input_name="clip_vision_output",
            fix="connect the output of a CLIP Vision Encode node",
        )
    source = "clip_vision_output" if black is None else "image"
    for t in (embeds, hidden):
        if t is not None:
            check_finite(t.detach().float().cpu(), node, source, "the CLIP-vision features of the image", "check the image and the CLIP vision model (a NaN image or a model run in float16 can cause it)")
    count = (embeds if embeds is not None else hidden).shape[0]
    zeros = torch.zeros(count, ARCFACE_WIDTH)
    return IdentityFeatures(
        arcface=zeros,
        arcface_normed=zeros,
        clip_embeds=None if embeds is None else embeds.float().cpu(),
        clip_hidden=None if hidden is None else hidden.float().cpu(),
        clip_hidden_uncond=None if black is None or _field(black, "penultimate_hidden_states") is None else _field(black, "penultimate_hidden_states").float().cpu(),
    )


def visual_tokens(adapter, features: IdentityFeatures, node: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adapter's tokens for the image: cond ``[R, T, D]``, uncond ``[1, T, D]``, float32 on the CPU."""
    projector = adapter.projector
    if projector is None:
        raise IdentityAttentionError(
            f"this {adapter.format} adapter has no token projector",
            node=node,
            input_name="id_adapter",
            fix="load an image adapter (IP-Adapter, IP-Adapter plus / full-face, or native CA² weights)",
        )
    kind = str(getattr(projector, "input_kind", ""))
    if not kind.startswith("clip"):
        raise IdentityAttentionError(
            f"this {adapter.format} adapter makes its tokens from a face embedding ({kind}), not from an image's CLIP-vision features",
            node=node,
            input_name="id_adapter",
            fix="use an image adapter here: IP-Adapter, IP-Adapter plus / plus-face / full-face, or native CA² weights",
        )
    needed = features.clip_hidden if "hidden" in kind else features.clip_embeds
    if needed is None:
        raise IdentityAttentionError(
            f"the adapter needs CLIP-vision {'hidden states' if 'hidden' in kind else 'image embeds'}, which the given output lacks",
            node=node,
            input_name="clip_vision_output",
            fix="encode the image with Load CLIP Vision + CLIP Vision Encode, or connect clip_vision and image instead",
        )
    first = next(iter(projector.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32

    def move(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    moved = IdentityFeatures(**{name: move(getattr(features, name)) for name in IdentityFeatures.__dataclass_fields__})
    try:
        with torch.no_grad():
            cond, uncond = projector(moved)
    except RuntimeError as err:
        raise IdentityAttentionError(
            f"the adapter's projector cannot read these CLIP-vision features ({err})",
            node=node,
            input_name="clip_vision",
            fix="use the CLIP-vision model this adapter was trained with (ViT-H/14 for most SD1.5 IP-Adapters, ViT-bigG for ip-adapter_sdxl)",
        ) from err
    return cond.float().cpu(), uncond[:1].float().cpu()
