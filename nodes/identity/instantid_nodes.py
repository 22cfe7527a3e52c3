"""InstantID's IdentityNet: the face-keypoints hint and the ControlNet that reads identity tokens.

Most of InstantID's likeness comes from its ControlNet ("IdentityNet"), not its
image adapter: it sees the five face landmarks as its hint and attends to the
16 InstantID identity tokens instead of the prompt. Two nodes:

- Face keypoints image: draws the hint from an IDENTITY's landmarks exactly as
  InstantID does (``adapters/faces/face_keypoints.py``), at the reference's size or a
  canvas of another size, the face where the reference had it or where you put it.
- Apply InstantID IdentityNet: ComfyUI's own ControlNet mechanism (a CONTROL_NET
  from its Load ControlNet Model node, chained like Apply ControlNet does) with the
  identity tokens as the ControlNet's cross-attention context, through ComfyUI's
  conditioning key ``cross_attn_controlnet`` (read by every host version's
  ``ControlNet.get_control`` as ``crossattn_controlnet``): positive gets the
  identity's tokens, negative the uncond tokens (``adapters/projectors/identity_net.py``).

The attention half of InstantID (its image adapter) stays on Apply parallel visual
attention; use both, with the same ID_ADAPTER and IDENTITY.
"""

from __future__ import annotations

import torch

from ...adapters.faces import face_keypoints as fk
from ...adapters.projectors import identity_net
from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.faces.identity import Identity
from ..common.errors import IdentityAttentionError, MissingDependencyError
from ..common.input_checks import check_image, check_tokens_finite
from ..dispatch.stage_inputs import CATEGORY

INSTANTID_PAPER = "InstantID: Wang et al., *InstantID: Zero-shot Identity-Preserving Generation in Seconds* ([arXiv 2401.07519](https://arxiv.org/abs/2401.07519))"
MAX_SIDE = fk.MAX_SIDE


def _identity(identity, node: str) -> Identity:
    if not isinstance(identity, Identity):
        raise IdentityAttentionError(f"expected an IDENTITY, got {type(identity).__name__}", node=node, input_name="identity",
                                     fix="connect the output of Encode identity")
    return identity


class FaceKeypointsImage:
    NODE_ID = "IdentityAttentionFaceKeypointsImage"
    DISPLAY_NAME = "Face keypoints image (InstantID)"
    CATEGORY = f"{CATEGORY}/encode"
    PAPER = INSTANTID_PAPER
    DESCRIPTION = (
        "Draws the face keypoints picture InstantID's IdentityNet was trained on (5 landmarks and 4 limbs to the nose, "
        "InstantID's colours) from one reference face of the identity, at the photo's size or a size you choose. "
        "Connect it to Apply InstantID IdentityNet as the image."
    )
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("keypoints",)
    OUTPUT_TOOLTIPS = ("The keypoints picture (black background), for Apply InstantID IdentityNet. Make it the size of the image you generate.",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity": ("IDENTITY", {"tooltip": "The person, from Encode identity: the face landmarks found in the reference photo are drawn."}),
                "reference": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Which reference photo's face to draw (0 = the first). The face's pose and place come from it."}),
                "width": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": 8, "tooltip": "Width of the picture in pixels; 0 = the reference photo's (or its aspect, if only height is set). Use the size you generate at."}),
                "height": ("INT", {"default": 0, "min": 0, "max": MAX_SIDE, "step": 8, "tooltip": "Height of the picture in pixels; 0 = the reference photo's (or its aspect, if only width is set)."}),
                "placement": (list(fk.PLACEMENTS), {"default": "reference", "tooltip": "reference: the whole reference photo fitted into the picture, so the face is where and as big as in the photo. custom: the face centred at x, y with the height face_height."}),
                "x": ("FLOAT", {"default": 0.5, "min": -1.0, "max": 2.0, "step": 0.01, "tooltip": "custom placement: where the face's centre goes, from the left edge (0) to the right edge (1)."}),
                "y": ("FLOAT", {"default": 0.4, "min": -1.0, "max": 2.0, "step": 0.01, "tooltip": "custom placement: where the face's centre goes, from the top (0) to the bottom (1)."}),
                "face_height": ("FLOAT", {"default": 0.4, "min": 0.02, "max": 4.0, "step": 0.01, "tooltip": "custom placement: the face box's height as a fraction of the picture's height (0.4 = a head-and-shoulders portrait)."}),
            }
        }

    def draw(self, identity, reference, width, height, placement, x, y, face_height):
        node = self.DISPLAY_NAME
        faces = [f for f in _identity(identity, node).faces if not f.flipped]  # flip_augment copies are not photos
        if not 0 <= reference < len(faces):
            raise IdentityAttentionError(f"there is no reference {reference}: the identity has {len(faces)} reference face(s)", node=node,
                                         input_name="reference", fix=f"use 0 to {len(faces) - 1}")
        face = faces[reference]
        size = fk.canvas_size(face.image_size, int(width), int(height))
        try:
            kps = fk.place_keypoints(face.landmarks.double().numpy(), face.bbox.double().numpy(), face.image_size, size, placement, x, y, face_height)
            pixels = fk.draw_face_keypoints(kps, size[1], size[0])
        except ImportError:
            raise MissingDependencyError("opencv-python-headless", "pip install opencv-python-headless", node=node) from None
        except fk.KeypointError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="identity", fix="encode the identity again from a photo with a clear face") from None
        return (torch.from_numpy(pixels).float().div(255.0).unsqueeze(0),)


def _context_width(control_net):
    """The width of the context the ControlNet's cross-attention takes (its first attn2.to_k), or None."""
    model = getattr(control_net, "control_model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    for name, module in model.named_modules():  # bounded: the ControlNet's own modules
        if name.endswith("attn2.to_k") and getattr(module, "weight", None) is not None:
            return int(module.weight.shape[1])
    return None


class ApplyInstantIDIdentityNet:
    NODE_ID = "IdentityAttentionApplyInstantIDIdentityNet"
    DISPLAY_NAME = "Apply InstantID IdentityNet (ControlNet)"
    CATEGORY = f"{CATEGORY}/attention"
    PAPER = INSTANTID_PAPER
    DESCRIPTION = (
        "Applies InstantID's ControlNet (IdentityNet) to the prompts: it follows the face keypoints picture and, instead of the "
        "prompt, attends to the person's InstantID tokens. This is where most of InstantID's likeness comes from; use it together "
        "with Apply parallel visual attention and the same InstantID adapter."
    )
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = (
        "The positive prompt with IdentityNet attached (it attends to the identity's tokens): connect to the sampler's positive.",
        "The negative prompt with IdentityNet attached (it attends to the negative identity tokens): connect to the sampler's negative.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "The positive prompt (CLIP Text Encode); its text stays for the model, the ControlNet reads the identity instead."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
                "control_net": ("CONTROL_NET", {"tooltip": "InstantID's ControlNet (ControlNetModel/diffusion_pytorch_model.safetensors from InstantX/InstantID), loaded with Load ControlNet Model."}),
                "id_adapter": ("ID_ADAPTER", {"tooltip": "InstantID's adapter (ip-adapter.bin) from Load identity adapter: its resampler makes the 16 identity tokens the ControlNet attends to."}),
                "identity": ("IDENTITY", {"tooltip": "The person, from Encode identity (antelopev2, as InstantID was trained). Several references are averaged."}),
                "image": ("IMAGE", {"tooltip": "The face keypoints picture (Face keypoints image): where the face goes and how it is turned."}),
                "strength": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "How strongly IdentityNet steers the image (InstantID's default 0.8). 0 = off: the prompts are returned unchanged."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "When IdentityNet starts, as a fraction of sampling (0 = from the first step)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "When IdentityNet stops, as a fraction of sampling (1 = until the last step). Ending early (0.6-0.8) loosens the pose."}),
                "negative_noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The negative identity tokens: 0 = from an all-zero face embedding, as the official InstantID. More = from seeded random noise of that size (ComfyUI_InstantID uses 0.35 by default), which some find less burnt at high CFG."}),
                "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "The seed of the negative noise (used only when negative_noise is above 0); the same seed gives the same tokens."}),
            }
        }

    def apply(self, positive, negative, control_net, id_adapter, identity, image, strength, start_percent, end_percent, negative_noise=0.0, noise_seed=0):
        node = self.DISPLAY_NAME
        if not (hasattr(control_net, "copy") and hasattr(control_net, "set_cond_hint")):
            raise IdentityAttentionError(f"expected a CONTROL_NET, got {type(control_net).__name__}", node=node, input_name="control_net",
                                         fix="load InstantID's ControlNet with Load ControlNet Model")
        if not isinstance(id_adapter, IdAdapter):
            raise IdentityAttentionError(f"expected an ID_ADAPTER, got {type(id_adapter).__name__}", node=node, input_name="id_adapter",
                                         fix="connect Load identity adapter with InstantID's ip-adapter.bin")
        _identity(identity, node)
        hint = check_image(image, node, "image", channels=(3, 4))[..., :3]
        if start_percent > end_percent:
            raise IdentityAttentionError(f"start_percent ({start_percent}) is after end_percent ({end_percent})", node=node,
                                         input_name="start_percent", fix="make start_percent smaller than end_percent")
        if strength == 0:
            return (positive, negative)  # off: exactly the prompts that came in, as Apply ControlNet does
        try:
            tokens = identity_net.identity_net_tokens(id_adapter, identity, noise=float(negative_noise), seed=int(noise_seed))
        except identity_net.IdentityNetError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="id_adapter",
                                         fix="load InstantID's ip-adapter.bin (models/instantid/) in Load identity adapter") from None
        check_tokens_finite(tokens, node, "identity")
        width = _context_width(control_net)
        if width is not None and width != tokens.dim:
            raise IdentityAttentionError(
                f"this ControlNet attends to {width}-wide context but InstantID's tokens are {tokens.dim} wide", node=node,
                input_name="control_net", fix="load InstantID's own ControlNet (it is an SDXL ControlNet)")
        hint = hint.movedim(-1, 1)
        chained = {}  # one ControlNet copy per previous ControlNet, shared by positive and negative (as Apply ControlNet)
        out = []
        for conditioning, context in ((positive, tokens.cond), (negative, tokens.uncond)):
            entries = []
            for embedding, options in conditioning:
                options = options.copy()
                previous = options.get("control", None)
                c_net = chained.get(previous)
                if c_net is None:
                    c_net = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent))
                    c_net.set_previous_controlnet(previous)
                    chained[previous] = c_net
                options["control"] = c_net
                options["control_apply_to_uncond"] = False
                options["cross_attn_controlnet"] = context  # [1, 16, 2048] on the CPU; the sampler moves and batches it
                entries.append([embedding, options])
            out.append(entries)
        return (out[0], out[1])


NODES = [FaceKeypointsImage, ApplyInstantIDIdentityNet]
