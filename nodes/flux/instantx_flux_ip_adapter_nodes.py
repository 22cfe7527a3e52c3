"""InstantX's Flux IP-Adapter nodes: 'Load Flux IP-Adapter (InstantX)' (``ip-adapter.bin`` from models/ipadapter, detected
from its keys, plus the SigLIP file's attention-pooling head) and 'Apply Flux IP-Adapter (InstantX)' (SigLIP so400m through
ComfyUI's 'Load CLIP Vision' -> pooled 1152 -> 128 tokens -> image-prompt attention in every double and single block; math
in adapters/flux/instantx_flux_ip_adapter.py, hooks in nodes/flux/instantx_flux_ip_adapter_stage.py).

New nodes rather than a second format of the XLabs nodes: the image encoder (SigLIP, not CLIP ViT-L), the head file the
loader needs, and where the residual goes (inside every block's attention, not after the double blocks) all differ, so one
node taking either would have inputs that half the files ignore.

Choices the release leaves open:

- the pooled feature: ComfyUI's CLIP-vision loader keeps SigLIP's tower but drops its attention-pooling head, which the
  official code's ``pooler_output`` is; the loader reads that head from the same SigLIP file (models/clip_vision) and the
  apply node runs it on the tower's last hidden state, so the adapter gets the official feature;
- the image is resized to 384 x 384 without a centre crop when the host's ``encode_image`` takes ``crop`` (as the
  official SigLIP processor does), else ComfyUI's default crop;
- several reference images are averaged in pooled-feature space (the official pipeline takes one);
- the negative prompt's rows get a black image's tokens at the same weight (the official demo samples FLUX.1-dev without
  true CFG, so it has no negative; a black image is the IP-Adapter convention and what the XLabs node does).
"""

from __future__ import annotations

import os

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.flux.instantx_flux_ip_adapter import InstantXFluxIPAdapter, SiglipPoolingHead
from ...adapters.weights.weight_errors import WeightError
from ..common.dit_layout import dit_blocks, require_flux
from ..common.errors import IdentityAttentionError
from ..common.folders import check_weight_choice, load_weight_choice, weight_choices
from .instantx_flux_ip_adapter_stage import apply_instantx_flux_ip_adapter
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs

PAPER = "InstantX, *FLUX.1-dev-IP-Adapter* (2024; IP-Adapter: Ye et al., arXiv 2308.06721; SigLIP: Zhai et al., arXiv 2303.15343)"
FOLDERS = ("ipadapter",)
SIGLIP_FOLDERS = ("clip_vision",)
FILE = "ip-adapter.bin"
SIGLIP_FILE = "sigclip_vision_patch14_384.safetensors"
WRONG_FILE_FIX = (
    f"choose {FILE} from InstantX/FLUX.1-dev-IP-Adapter; XLabs' Flux IP-Adapter goes to 'Load Flux IP-Adapter (XLabs)', "
    "SD1.5/SDXL IP-Adapters to 'Load identity adapter'"
)
WRONG_SIGLIP_FIX = f"choose the SigLIP so400m patch14 384 vision file ({SIGLIP_FILE}) in models/clip_vision"


class InstantXFluxIPAdapterWeights:
    """A loaded InstantX Flux IP-Adapter with its SigLIP head, and its name (ComfyUI type ``INSTANTX_FLUX_IP_ADAPTER``)."""

    def __init__(self, model: InstantXFluxIPAdapter, name: str):
        self.model, self.name = model, name

    def __deepcopy__(self, memo):
        return self


class LoadInstantXFluxIPAdapter:
    NODE_ID = "IdentityAttentionLoadInstantXFluxIPAdapter"
    DISPLAY_NAME = "Load Flux IP-Adapter (InstantX)"
    PAPER = PAPER
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads InstantX's IP-Adapter for FLUX.1-dev (ip-adapter.bin from InstantX/FLUX.1-dev-IP-Adapter): the projection of a "
        "SigLIP image feature to 128 tokens and one key/value projection per Flux block, plus SigLIP's attention-pooling head "
        "read from the SigLIP file (ComfyUI's Load CLIP Vision leaves it out). Detected from the file's content."
    )
    RETURN_TYPES = ("INSTANTX_FLUX_IP_ADAPTER",)
    RETURN_NAMES = ("flux_ip_adapter",)
    OUTPUT_TOOLTIPS = ("InstantX's Flux IP-Adapter, for 'Apply Flux IP-Adapter (InstantX)'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter_file": (
                    weight_choices(FOLDERS),
                    {"tooltip": f"InstantX's Flux IP-Adapter in models/ipadapter ({FILE}). Nothing there yet? Queue the workflow: "
                                "the error says what to download and where it goes."},
                ),
                "siglip_file": (
                    weight_choices(SIGLIP_FOLDERS),
                    {"tooltip": f"The SigLIP so400m patch14 384 vision file in models/clip_vision ({SIGLIP_FILE}), the same one "
                                "'Load CLIP Vision' loads for the apply node: its attention-pooling head is read from here."},
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_file, siglip_file):
        ok = check_weight_choice(adapter_file, FOLDERS, node=cls.DISPLAY_NAME, input_name="adapter_file", node_id=cls.NODE_ID)
        if ok is not True:
            return ok
        return check_weight_choice(siglip_file, SIGLIP_FOLDERS, node=cls.DISPLAY_NAME, input_name="siglip_file", node_id=cls.NODE_ID)

    def load(self, adapter_file, siglip_file):
        head, _ = load_weight_choice(siglip_file, SIGLIP_FOLDERS, SiglipPoolingHead.from_state, node=self.DISPLAY_NAME,
                                     input_name="siglip_file", node_id=self.NODE_ID, wrong_file_fix=WRONG_SIGLIP_FIX)
        model, path = load_weight_choice(adapter_file, FOLDERS, lambda state: InstantXFluxIPAdapter.from_state(state, head),
                                         node=self.DISPLAY_NAME, input_name="adapter_file", node_id=self.NODE_ID,
                                         wrong_file_fix=WRONG_FILE_FIX)
        if model.embed_dim != head.probe.shape[-1]:
            raise IdentityAttentionError(
                f"the adapter reads {model.embed_dim}-wide image features, the SigLIP file's head makes {head.probe.shape[-1]}",
                node=self.DISPLAY_NAME, input_name="siglip_file", fix=WRONG_SIGLIP_FIX)
        return (InstantXFluxIPAdapterWeights(model, os.path.basename(path)),)


def siglip_hidden_states(clip_vision, image: torch.Tensor, node: str) -> torch.Tensor:
    """SigLIP's post-LayerNorm last hidden state ``[B, N, C]`` of ``image`` ``[B, H, W, 3]`` (resized, not cropped)."""
    encode = getattr(clip_vision, "encode_image", None)
    if encode is None:
        raise IdentityAttentionError("this is not a CLIP vision model", node=node, input_name="clip_vision",
                                     fix=f"connect 'Load CLIP Vision' with SigLIP ({SIGLIP_FILE})")
    with torch.no_grad():
        try:
            out = encode(image, crop=False)
        except TypeError:  # an older encode_image without the crop choice
            out = encode(image)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out["last_hidden_state"]
    return hidden


class ApplyInstantXFluxIPAdapter:
    NODE_ID = "IdentityAttentionApplyInstantXFluxIPAdapter"
    DISPLAY_NAME = "Apply Flux IP-Adapter (InstantX)"
    PAPER = PAPER
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Prompts a Flux.1 image with a picture (InstantX's IP-Adapter): SigLIP reads the image, the adapter turns it into 128 "
        "tokens, and in every double and single block the queries also attend to them, added before the block's output "
        "projection as InstantX's code does. The negative prompt gets a black image's tokens."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Flux model with the image prompt; the model you connected is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Flux.1 model (InstantX trained on FLUX.1-dev; fine-tunes of dev work). SD1.5/SDXL models use 'Apply parallel visual attention'."}),
                "flux_ip_adapter": ("INSTANTX_FLUX_IP_ADAPTER", {"tooltip": "From 'Load Flux IP-Adapter (InstantX)'."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": f"'Load CLIP Vision' with SigLIP so400m patch14 384 ({SIGLIP_FILE}; needs ComfyUI with SigLIP support, 0.3.x)."}),
                "image": ("IMAGE", {"tooltip": "The picture to prompt with (a style, an object, a face). Several images are averaged."}),
                **schedule_inputs(
                    weight_tooltip="InstantX's scale: how strongly the picture's attention is added in each block (their demo "
                    "uses 0.7; 0 = exactly the image without it).",
                ),
            }
        }

    def apply(self, model, flux_ip_adapter, clip_vision, image, weight, start_percent, end_percent, apply_to):
        node = self.DISPLAY_NAME
        require_flux(model, node, "InstantX's IP-Adapter is made for Flux.1's blocks",
                     fix="connect a Flux.1 model; for SD1.5/SDXL use an IP-Adapter with 'Load identity adapter' and 'Apply parallel visual attention'")
        if not isinstance(flux_ip_adapter, InstantXFluxIPAdapterWeights):
            raise IdentityAttentionError("this is not InstantX's Flux IP-Adapter", node=node, input_name="flux_ip_adapter",
                                         fix="connect 'Load Flux IP-Adapter (InstantX)'")
        blocks = dit_blocks(model)
        doubles = [b for b in blocks if b.kind == "double_block"]
        hidden = int(model.model.diffusion_model.hidden_size)
        try:
            flux_ip_adapter.model.check_model(len(doubles), len(blocks) - len(doubles), hidden, int(doubles[0].module.num_heads))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="flux_ip_adapter", fix=err.fix) from err
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, node=node)
        if schedule.weight == 0:
            return (apply_instantx_flux_ip_adapter(model, flux_ip_adapter.model, None, schedule),)
        adapter = flux_ip_adapter.model
        try:
            with torch.no_grad():
                cond = adapter.pooled(siglip_hidden_states(clip_vision, image, node)).float().mean(dim=0, keepdim=True)
                black = adapter.pooled(siglip_hidden_states(clip_vision, torch.zeros_like(image[:1]), node)).float()
                tokens = IdentityTokens(cond=adapter.tokens(cond), uncond=adapter.tokens(black))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="clip_vision", fix=err.fix) from err
        if not (torch.isfinite(tokens.cond).all() and torch.isfinite(tokens.uncond).all()):
            raise IdentityAttentionError("the image gave non-finite tokens", node=node, input_name="image",
                                         fix="check the image; if it persists, download the adapter file again")
        return (apply_instantx_flux_ip_adapter(model, adapter, tokens, schedule),)


NODES = [LoadInstantXFluxIPAdapter, ApplyInstantXFluxIPAdapter]
