"""Nodes: Load face encoder (TransFace), Encode face tokens.

FACT reads TransFace-S patch tokens of each reference face (144 x 512). The
loader reads ``ms1mv2_model_TransFace_S.pt`` (from FaceChain-FACT's ModelScope
release ``yucheng1996/FaceChain-FACT`` or the TransFace repository) from
``models/identity_attention/``; the encoder node runs it on the aligned crops
the identity encoder stored in the IDENTITY and returns the IDENTITY with
``face_tokens`` filled.

Head masking: FACT blacks out everything but face and hair (a ModelScope
human-parsing model, M2FP) before aligning. This pack ships no parsing model,
so by default the aligned crop is used as is (the crop is already tight on the
face; the difference is background and neck at the corners). Connect a MASK of
the head (from any segmentation node, drawn on the reference photos) to
``head_mask`` to reproduce FACT's preprocessing: it is warped into each crop
with the crop's own alignment.
"""

from __future__ import annotations

import dataclasses
import os

import torch

import comfy.model_management
import comfy.utils

from ...adapters.faces.face_crop_mask import warp_to_crop
from ...adapters.weights.safe_load import read_weight_file
from ...adapters.faces.transface_encoder import CROP_SIZE, TransFaceEncoder, preprocess
from ...adapters.weights.weight_dtypes import usable_weights
from ...adapters.weights.weight_errors import WeightError
from ..common.errors import IdentityAttentionError
from ..common.folders import check_weight_choice, load_weight_choice, weight_choices
from ..dispatch.stage_inputs import CATEGORY

FOLDER = "identity_attention"


class FaceEncoder:
    """The FACE_ENCODER socket type: a loaded TransFace model and where it came from."""

    def __init__(self, model: TransFaceEncoder, name: str):
        self.model = model
        self.name = name

    def __deepcopy__(self, memo):
        return self


ENCODER_FIX = "choose ms1mv2_model_TransFace_S.pt (TransFace-S, the encoder FACT was trained with)"


def read_state_dict(path: str, node: str) -> dict:
    """A weight file as a dict of tensors, through :func:`..adapters.weights.safe_load.read_weight_file`: the
    content (not the name) decides the format, with its size, inflation and nesting limits."""
    try:
        return usable_weights(read_weight_file(path).tensors, what=os.path.basename(path))
    except WeightError as err:
        raise IdentityAttentionError(f"could not read {os.path.basename(path)}: {err.problem}", node=node, input_name="encoder_name", fix=err.fix) from err


def load_face_encoder(path: str, node: str = "Load face encoder (TransFace)") -> FaceEncoder:
    """A face encoder from a file path (scripts and tests; the loader node goes through :func:`load_weight_choice`)."""
    sd = read_state_dict(path, node)
    try:
        model = build_face_encoder(sd)
    except ValueError as err:
        raise IdentityAttentionError(f"{os.path.basename(path)}: {err}", node=node, input_name="encoder_name", fix=ENCODER_FIX) from err
    return FaceEncoder(model, os.path.basename(path))


def build_face_encoder(state: dict) -> TransFaceEncoder:
    """The TransFace network of a state dict (``ValueError`` for another network's keys or shapes)."""
    return TransFaceEncoder.from_state_dict(state)


class LoadFaceEncoder:
    NODE_ID = "IdentityAttentionLoadFaceEncoder"
    DISPLAY_NAME = "Load face encoder (TransFace)"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = "Loads the TransFace face-recognition ViT that FaceChain-FACT reads faces with (ms1mv2_model_TransFace_S.pt, from models/identity_attention/)."
    RETURN_TYPES = ("FACE_ENCODER",)
    RETURN_NAMES = ("face_encoder",)
    OUTPUT_TOOLTIPS = ("The face encoder, for 'Encode face tokens'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder_name": (
                    weight_choices((FOLDER,)),
                    {"tooltip": "The TransFace weights in models/identity_attention/ (FACT uses ms1mv2_model_TransFace_S.pt). "
                                "Nothing there yet? Queue the workflow: the error says what to download and where it goes."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, encoder_name):
        return check_weight_choice(encoder_name, (FOLDER,), node=cls.DISPLAY_NAME, input_name="encoder_name", node_id=cls.NODE_ID)

    def load(self, encoder_name):
        # the pack's path rules (no '..', no absolute names, no links out of the model folders), the safe reader,
        # and one error per failure: not downloaded, damaged download, another network's file
        model, path = load_weight_choice(encoder_name, (FOLDER,), build_face_encoder, node=self.DISPLAY_NAME,
                                         input_name="encoder_name", node_id=self.NODE_ID, wrong_file_fix=ENCODER_FIX)
        return (FaceEncoder(model, os.path.basename(path)),)


def head_masks_for(identity, mask: torch.Tensor, node: str) -> torch.Tensor:
    """``[R, 112, 112]``: the source-image MASK of each reference warped into its aligned crop."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    out = []
    for i, face in enumerate(identity.faces):
        frame = face.image_index if mask.shape[0] > 1 else 0
        if frame >= mask.shape[0]:
            raise IdentityAttentionError(
                f"reference {face.image_index + 1} has no mask: the mask has {mask.shape[0]} frames",
                node=node,
                input_name="head_mask",
                fix="give one mask for every reference image, in the same order",
            )
        h, w = face.image_size
        if tuple(mask.shape[-2:]) != (h, w):
            raise IdentityAttentionError(
                f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but reference image {face.image_index + 1} is {w}x{h}",
                node=node,
                input_name="head_mask",
                fix="make the mask from the reference photos themselves (same size)",
            )
        warped = warp_to_crop(mask[frame].float().unsqueeze(0), face.landmarks.float(), CROP_SIZE)[0]
        out.append(torch.flip(warped, dims=[-1]) if face.flipped else warped)
    return torch.stack(out).clamp(0.0, 1.0)


class EncodeFaceTokens:
    NODE_ID = "IdentityAttentionEncodeFaceTokens"
    DISPLAY_NAME = "Encode face tokens (TransFace)"
    CATEGORY = f"{CATEGORY}/encode"
    DESCRIPTION = (
        "Runs the TransFace encoder on every aligned reference face of the IDENTITY and stores its 144 patch "
        "tokens in it (what FaceChain-FACT's face adapter reads). The preview shows exactly what the encoder saw."
    )
    RETURN_TYPES = ("IDENTITY", "IMAGE")
    RETURN_NAMES = ("identity", "encoder_input")
    OUTPUT_TOOLTIPS = (
        "The same identity with TransFace face tokens added (144 x 512 per reference).",
        "The 112x112 aligned (and head-masked) crops as the encoder saw them.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "face_encoder": ("FACE_ENCODER", {"tooltip": "From 'Load face encoder (TransFace)'."}),
                "identity": ("IDENTITY", {"tooltip": "The person, from the identity encoder node (its aligned face crops are used)."}),
            },
            "optional": {
                "head_mask": (
                    "MASK",
                    {"tooltip": "Optional: face + hair of each reference photo (white), same size as the photos. FACT blacks out everything else; without a mask the aligned crop is used as is."},
                )
            },
        }

    def encode(self, face_encoder, identity, head_mask=None):
        node = self.DISPLAY_NAME
        crops = torch.stack([face.crop.float() for face in identity.faces])
        if crops.shape[-1] != 3:
            raise IdentityAttentionError("the identity's face crops are not RGB images", node=node, input_name="identity", fix="re-run the identity encoder node")
        masks = head_masks_for(identity, head_mask, node) if head_mask is not None else None
        images = preprocess(crops, masks)
        device = comfy.model_management.get_torch_device()
        model = face_encoder.model.to(device)
        bar = comfy.utils.ProgressBar(images.shape[0])
        tokens = []
        try:
            with torch.no_grad():
                for image in images:
                    tokens.append(model(image.unsqueeze(0).to(device)).float().cpu())
                    bar.update(1)
        finally:
            face_encoder.model.to("cpu")
        preview = ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()
        notes = tuple(identity.notes) + (f"face tokens: {face_encoder.name}{' (head-masked)' if masks is not None else ''}",)
        return (dataclasses.replace(identity, face_tokens=torch.cat(tokens), notes=notes), preview)


NODES = [LoadFaceEncoder, EncodeFaceTokens]
