"""XLabs' Flux IP-Adapter nodes: 'Load Flux IP-Adapter (XLabs)' (``ip_adapter.safetensors`` from models/ipadapter,
detected from its keys) and 'Apply Flux IP-Adapter (XLabs)' (CLIP ViT-L/14 image embedding -> 4 tokens -> image-query
attention added after every double block; math in adapters/flux/flux_ip_adapter.py, hooks in nodes/flux/flux_ip_adapter_patch.py).

Separate nodes rather than 'Load identity adapter' + 'Apply parallel visual attention': the file is not a UNet
adapter (no cross-attention layers to map), and its residual goes after each double block, not into an attention.
Choices the release leaves open: several reference images are averaged in CLIP-embedding space (the official
pipeline takes one); the negative prompt's rows get a black image's tokens at the same weight (the official
``neg_image_prompt`` default, ``neg_ip_scale`` = ``ip_scale`` by default).
"""

from __future__ import annotations

import os

import torch

from ...adapters.flux.flux_ip_adapter import XLabsFluxIPAdapter
from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.weights.weight_errors import WeightError
from ..common.dit_layout import dit_blocks, require_flux
from ..common.errors import IdentityAttentionError
from .flux_ip_adapter_patch import apply_flux_ip_adapter
from ..common.folders import check_weight_choice, load_weight_choice, weight_choices
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs

PAPER = "XLabs-AI, *flux-ip-adapter* (x-flux, 2024; IP-Adapter: Ye et al., arXiv 2308.06721)"
FOLDERS = ("ipadapter",)
FILE = "ip_adapter.safetensors"
WRONG_FILE_FIX = (
    f"choose {FILE} from XLabs-AI/flux-ip-adapter; SD1.5/SDXL IP-Adapters go to 'Load identity adapter', "
    "PuLID-Flux to 'Load PuLID-Flux'"
)


class FluxIPAdapterWeights:
    """A loaded XLabs Flux IP-Adapter and its name (ComfyUI type ``FLUX_IP_ADAPTER``)."""

    def __init__(self, model: XLabsFluxIPAdapter, name: str):
        self.model, self.name = model, name

    def __deepcopy__(self, memo):
        return self


class LoadFluxIPAdapter:
    NODE_ID = "IdentityAttentionLoadFluxIPAdapter"
    DISPLAY_NAME = "Load Flux IP-Adapter (XLabs)"
    PAPER = PAPER
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads XLabs' IP-Adapter for FLUX.1-dev (ip_adapter.safetensors from XLabs-AI/flux-ip-adapter): the projection of a "
        "CLIP ViT-L/14 image embedding to 4 tokens and one key/value projection per double block. Detected from the file's content."
    )
    RETURN_TYPES = ("FLUX_IP_ADAPTER",)
    RETURN_NAMES = ("flux_ip_adapter",)
    OUTPUT_TOOLTIPS = ("XLabs' Flux IP-Adapter, for 'Apply Flux IP-Adapter (XLabs)'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter_file": (
                    weight_choices(FOLDERS),
                    {"tooltip": f"XLabs' Flux IP-Adapter in models/ipadapter ({FILE}). Nothing there yet? Queue the workflow: "
                                "the error says what to download and where it goes."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_file):
        return check_weight_choice(adapter_file, FOLDERS, node=cls.DISPLAY_NAME, input_name="adapter_file", node_id=cls.NODE_ID)

    def load(self, adapter_file):
        model, path = load_weight_choice(adapter_file, FOLDERS, XLabsFluxIPAdapter.from_state, node=self.DISPLAY_NAME,
                                         input_name="adapter_file", node_id=self.NODE_ID, wrong_file_fix=WRONG_FILE_FIX)
        return (FluxIPAdapterWeights(model, os.path.basename(path)),)


def _image_embeds(clip_vision, image: torch.Tensor, node: str) -> torch.Tensor:
    """CLIP vision's projected image embedding ``[1, E]`` of ``image`` ``[B, H, W, 3]`` (mean over the batch)."""
    encode = getattr(clip_vision, "encode_image", None)
    if encode is None:
        raise IdentityAttentionError("this is not a CLIP vision model", node=node, input_name="clip_vision",
                                     fix="connect 'Load CLIP Vision' with CLIP ViT-L/14 (clip-vit-large-patch14.safetensors)")
    with torch.no_grad():
        out = encode(image)
    embeds = getattr(out, "image_embeds", None)
    if embeds is None:
        embeds = out["image_embeds"]
    return embeds.float().mean(dim=0, keepdim=True)


class ApplyFluxIPAdapter:
    NODE_ID = "IdentityAttentionApplyFluxIPAdapter"
    DISPLAY_NAME = "Apply Flux IP-Adapter (XLabs)"
    PAPER = PAPER
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Prompts a Flux.1 image with a picture (XLabs' IP-Adapter): CLIP ViT-L/14 reads the image, the adapter turns it into 4 "
        "tokens, and after every double block the image tokens attend to them, as XLabs' code does. The negative prompt gets a "
        "black image's tokens (the official default)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Flux model with the image prompt; the model you connected is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Flux.1 model (XLabs trained on FLUX.1-dev; fine-tunes of dev work). SD1.5/SDXL models use 'Apply parallel visual attention'."}),
                "flux_ip_adapter": ("FLUX_IP_ADAPTER", {"tooltip": "From 'Load Flux IP-Adapter (XLabs)'."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "'Load CLIP Vision' with CLIP ViT-L/14 (clip-vit-large-patch14.safetensors): the adapter reads its 768-wide image embedding."}),
                "image": ("IMAGE", {"tooltip": "The picture to prompt with (a face, a style, an object). Several images are averaged."}),
                **schedule_inputs(
                    weight_tooltip="XLabs' ip_scale: how strongly the picture is added after each double block (their demos use "
                    "0.6-1.0; 0 = exactly the image without it).",
                ),
            }
        }

    def apply(self, model, flux_ip_adapter, clip_vision, image, weight, start_percent, end_percent, apply_to):
        node = self.DISPLAY_NAME
        require_flux(model, node, "XLabs' IP-Adapter is made for Flux.1's double blocks",
                     fix="connect a Flux.1 model; for SD1.5/SDXL use an IP-Adapter with 'Load identity adapter' and 'Apply parallel visual attention'")
        if not isinstance(flux_ip_adapter, FluxIPAdapterWeights):
            raise IdentityAttentionError("this is not a Flux IP-Adapter", node=node, input_name="flux_ip_adapter",
                                         fix="connect 'Load Flux IP-Adapter (XLabs)'")
        doubles = [b for b in dit_blocks(model) if b.kind == "double_block"]
        hidden = int(model.model.diffusion_model.hidden_size)
        try:
            flux_ip_adapter.model.check_model(len(doubles), hidden, int(doubles[0].module.num_heads))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="flux_ip_adapter", fix=err.fix) from err
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, node=node)
        if schedule.weight == 0:
            return (apply_flux_ip_adapter(model, flux_ip_adapter.model, None, schedule),)
        cond = _image_embeds(clip_vision, image, node)
        uncond = _image_embeds(clip_vision, torch.zeros_like(image[:1]), node)  # the official negative: a black image
        try:
            with torch.no_grad():
                tokens = IdentityTokens(cond=flux_ip_adapter.model.tokens(cond), uncond=flux_ip_adapter.model.tokens(uncond))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="clip_vision", fix=err.fix) from err
        if not (torch.isfinite(tokens.cond).all() and torch.isfinite(tokens.uncond).all()):
            raise IdentityAttentionError("the image gave non-finite tokens", node=node, input_name="image",
                                         fix="check the image; if it persists, download the adapter file again")
        return (apply_flux_ip_adapter(model, flux_ip_adapter.model, tokens, schedule),)


NODES = [LoadFluxIPAdapter, ApplyFluxIPAdapter]
