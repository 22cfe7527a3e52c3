"""Nodes: Load EVA-CLIP (PuLID), Load face parsing (BiSeNet), Encode PuLID face features (EVA-CLIP).

PuLID's ID encoder reads, besides the antelopev2 embedding, EVA02-CLIP-L-14-336
features of a grey, background-whitened picture of the face
(:mod:`..adapters.faces.pulid_face_image`). These nodes make them:

- the loaders read ``EVA02_CLIP_L_336_psz14_s6B.pt`` (or a safetensors
  conversion) from ``models/clip_vision`` or ``models/pulid``, and facexlib's
  ``parsing_bisenet.pth`` from ``models/facexlib`` or ``models/pulid``,
  through the pack's safe reader (safetensors / ``torch.load(weights_only=True)``);
- the encoder re-aligns each reference face of the IDENTITY at 512 px from
  the source photo (with the landmarks the identity encoder found), parses it,
  and stores ``eva_clip_embeds`` ``[R, 768]`` and ``eva_clip_hidden``
  ``[R, 5, 577, 1024]`` in a copy of the IDENTITY. Without a parsing model
  the face is not masked: the node says so on its preview and in the
  identity's notes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Tuple

import torch

import comfy.model_management

from ...adapters.faces.eva_clip_vision import EvaVisionTransformer, pulid_eva_features
from ...adapters.faces.face_parsing import PARSE_SIZE, BiSeNet, background_mask, parse_labels
from ...adapters.faces.face_visuals import banner
from ...adapters.faces.pulid_face_image import align_face_512, face_features_image
from ..common.errors import IdentityAttentionError
from ..common.folders import check_weight_choice, load_weight_choice, weight_choices
from ..dispatch.stage_inputs import CATEGORY

EVA_FOLDERS = ("clip_vision", "pulid")
PARSING_FOLDERS = ("facexlib", "pulid")
EVA_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_FILE = "parsing_bisenet.pth"
NO_PARSING_NOTE = (
    "no face parsing model: PuLID's EVA-CLIP input kept the background, neck and clothes (PuLID whitens them); "
    "connect 'Load face parsing (BiSeNet)' with parsing_bisenet.pth for PuLID's exact input"
)

PULID_PAPER = "PuLID: Guo et al., *PuLID: Pure and Lightning ID Customization via Contrastive Alignment*, NeurIPS 2024 ([arXiv 2404.16022](https://arxiv.org/abs/2404.16022))"

log = logging.getLogger(__name__)


class EvaClip:
    """The EVA_CLIP socket type: a loaded EVA02-CLIP vision tower and its file name."""

    def __init__(self, model: EvaVisionTransformer, name: str):
        self.model = model
        self.name = name

    def __deepcopy__(self, memo):
        return self


class FaceParsing:
    """The FACE_PARSING socket type: a loaded BiSeNet and its file name."""

    def __init__(self, model: BiSeNet, name: str):
        self.model = model
        self.name = name

    def __deepcopy__(self, memo):
        return self


EVA_FIX = f"choose {EVA_FILE} (EVA02-CLIP-L-14-336); ComfyUI's CLIP-vision files (ViT-H, ViT-bigG) are other networks"
PARSING_FIX = f"choose facexlib's {PARSING_FILE} (not parsing_parsenet.pth, another network)"


class LoadEvaClip:
    NODE_ID = "IdentityAttentionLoadEvaClip"
    DISPLAY_NAME = "Load EVA-CLIP (PuLID)"
    PAPER = PULID_PAPER + "; encoder: EVA02-CLIP (Sun et al., *EVA-CLIP*, arXiv 2303.15389)"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads EVA02-CLIP-L-14-336, the image encoder PuLID reads faces with (EVA02_CLIP_L_336_psz14_s6B.pt from BAAI's "
        "EVA-CLIP release, or a safetensors conversion), from models/clip_vision or models/pulid. Only the vision tower is kept."
    )
    RETURN_TYPES = ("EVA_CLIP",)
    RETURN_NAMES = ("eva_clip",)
    OUTPUT_TOOLTIPS = ("The EVA-CLIP vision encoder, for 'Encode PuLID face features (EVA-CLIP)'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "eva_clip_name": (
                    weight_choices(EVA_FOLDERS, prefixed=True),
                    {"tooltip": f"The EVA-CLIP weights in models/clip_vision or models/pulid ({EVA_FILE}, as PuLID uses). "
                                "Nothing there yet? Queue the workflow: the error says what to download and where it goes."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, eva_clip_name):
        return check_weight_choice(eva_clip_name, EVA_FOLDERS, node=cls.DISPLAY_NAME, input_name="eva_clip_name", node_id=cls.NODE_ID, prefixed=True)

    def load(self, eva_clip_name):
        model, path = load_weight_choice(eva_clip_name, EVA_FOLDERS, EvaVisionTransformer.from_state_dict, node=self.DISPLAY_NAME,
                                         input_name="eva_clip_name", node_id=self.NODE_ID, prefixed=True, wrong_file_fix=EVA_FIX)
        return (EvaClip(model, os.path.basename(path)),)


class LoadFaceParsing:
    NODE_ID = "IdentityAttentionLoadFaceParsing"
    DISPLAY_NAME = "Load face parsing (BiSeNet)"
    PAPER = PULID_PAPER + "; parsing: BiSeNet (Yu et al., ECCV 2018) as trained by facexlib"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads facexlib's BiSeNet face-parsing network (parsing_bisenet.pth), which PuLID uses to whiten the background, "
        "neck and clothes before EVA-CLIP reads the face. Reads models/facexlib and models/pulid."
    )
    RETURN_TYPES = ("FACE_PARSING",)
    RETURN_NAMES = ("face_parsing",)
    OUTPUT_TOOLTIPS = ("The face-parsing model, for 'Encode PuLID face features (EVA-CLIP)'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "parsing_name": (
                    weight_choices(PARSING_FOLDERS, prefixed=True),
                    {"tooltip": f"facexlib's {PARSING_FILE} in models/facexlib or models/pulid. "
                                "Nothing there yet? Queue the workflow: the error says what to download and where it goes."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, parsing_name):
        return check_weight_choice(parsing_name, PARSING_FOLDERS, node=cls.DISPLAY_NAME, input_name="parsing_name", node_id=cls.NODE_ID, prefixed=True)

    def load(self, parsing_name):
        model, path = load_weight_choice(parsing_name, PARSING_FOLDERS, BiSeNet.from_state_dict, node=self.DISPLAY_NAME,
                                         input_name="parsing_name", node_id=self.NODE_ID, prefixed=True, wrong_file_fix=PARSING_FIX)
        return (FaceParsing(model, os.path.basename(path)),)


def source_photo(images: torch.Tensor, face, node: str) -> torch.Tensor:
    """``[3, H, W]`` of the reference photo a FaceRecord came from (mirrored for a flipped copy)."""
    if face.image_index >= images.shape[0]:
        raise IdentityAttentionError(
            f"the identity has a face from reference image {face.image_index + 1}, but only {images.shape[0]} images are connected",
            node=node, input_name="images", fix="connect the same reference images that went into the identity encoder, in the same order",
        )
    photo = images[face.image_index]
    if tuple(photo.shape[:2]) != tuple(face.image_size):
        h, w = face.image_size
        raise IdentityAttentionError(
            f"reference image {face.image_index + 1} is {photo.shape[1]}x{photo.shape[0]}, but the identity's face was found in a {w}x{h} image",
            node=node, input_name="images", fix="connect the same reference images that went into the identity encoder, in the same order",
        )
    photo = photo[..., :3].permute(2, 0, 1).float()
    return torch.flip(photo, dims=[-1]) if face.flipped else photo


def encode_pulid_features(eva_clip: EvaClip, identity, images: torch.Tensor, parsing, node: str, progress=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eva_clip_embeds [R, E], eva_clip_hidden [R, 5, T, W], face-features images [R, 512, 512, 3])``."""
    device = comfy.model_management.get_torch_device()
    eva_model = eva_clip.model.to(device)
    parse_model = parsing.model.to(device) if parsing is not None else None
    embeds, hidden, previews = [], [], []
    try:
        with torch.no_grad():
            for face in identity.faces:
                aligned = align_face_512(source_photo(images, face, node).to(device), face.landmarks.float(), PARSE_SIZE).unsqueeze(0)
                bg = background_mask(parse_labels(parse_model, aligned)) if parse_model is not None else None
                features = face_features_image(aligned, bg).clamp(0.0, 1.0)
                e, h = pulid_eva_features(eva_model, features)
                embeds.append(e.cpu())
                hidden.append(h.cpu())
                previews.append(features[0].permute(1, 2, 0).cpu())
                if progress is not None:
                    progress(1)
    finally:
        eva_clip.model.to("cpu")
        if parsing is not None:
            parsing.model.to("cpu")
    return torch.cat(embeds), torch.cat(hidden), torch.stack(previews)


class EncodePuLIDFeatures:
    NODE_ID = "IdentityAttentionEncodePuLIDFeatures"
    DISPLAY_NAME = "Encode PuLID face features (EVA-CLIP)"
    PAPER = PULID_PAPER
    CATEGORY = f"{CATEGORY}/encode"
    DESCRIPTION = (
        "Adds what PuLID's ID encoder reads besides the face embedding: each reference face is aligned at 512 px, its background, "
        "neck and clothes are whitened (face parsing), the rest turned grey, and EVA02-CLIP-L reads it (image embedding + five "
        "hidden layers). Use it between the identity encoder (antelopev2) and a PuLID adapter."
    )
    RETURN_TYPES = ("IDENTITY", "IMAGE")
    RETURN_NAMES = ("identity", "eva_input")
    OUTPUT_TOOLTIPS = (
        "The same identity with PuLID's EVA-CLIP features added.",
        "The 512x512 face-features images EVA-CLIP read (resized to 336 inside); a red banner says when no parsing model was used.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "eva_clip": ("EVA_CLIP", {"tooltip": "From 'Load EVA-CLIP (PuLID)'."}),
                "identity": ("IDENTITY", {"tooltip": "The person, from the identity encoder node (antelopev2, as PuLID was trained)."}),
                "images": ("IMAGE", {"tooltip": "The same reference photos that went into the identity encoder, in the same order (the face is re-aligned at 512 px from them)."}),
            },
            "optional": {
                "face_parsing": (
                    "FACE_PARSING",
                    {"tooltip": "From 'Load face parsing (BiSeNet)'. PuLID whitens everything but the face and hair with it; without it the background stays (the node warns)."},
                ),
            },
        }

    def encode(self, eva_clip, identity, images, face_parsing=None):
        node = self.DISPLAY_NAME
        if not isinstance(eva_clip, EvaClip):
            raise IdentityAttentionError("this is not an EVA-CLIP model", node=node, input_name="eva_clip", fix="connect 'Load EVA-CLIP (PuLID)'")
        if face_parsing is not None and not isinstance(face_parsing, FaceParsing):
            raise IdentityAttentionError("this is not a face-parsing model", node=node, input_name="face_parsing", fix="connect 'Load face parsing (BiSeNet)'")
        if not hasattr(identity, "faces"):
            raise IdentityAttentionError("this is not an IDENTITY", node=node, input_name="identity", fix="connect the identity encoder's output")
        if images.dim() != 4 or images.shape[-1] < 3:
            raise IdentityAttentionError(f"expected RGB images [B, H, W, 3], got {list(images.shape)}", node=node, input_name="images", fix="connect an IMAGE")
        progress = None
        try:
            import comfy.utils

            bar = comfy.utils.ProgressBar(len(identity.faces))
            progress = bar.update
        except Exception:  # a host without progress bars still encodes
            pass
        embeds, hidden, previews = encode_pulid_features(eva_clip, identity, images, face_parsing, node, progress)
        notes = [f"PuLID EVA-CLIP features: {eva_clip.name}" + (f" + {face_parsing.name}" if face_parsing is not None else "")]
        if face_parsing is None:
            log.warning("%s: %s", node, NO_PARSING_NOTE)
            notes.append(NO_PARSING_NOTE)
            previews = torch.stack([banner(p, "NO FACE PARSING: BACKGROUND KEPT") for p in previews])
        out = dataclasses.replace(identity, eva_clip_embeds=embeds, eva_clip_hidden=hidden, notes=tuple(identity.notes) + tuple(notes))
        return (out, previews)


NODES = [LoadEvaClip, LoadFaceParsing, EncodePuLIDFeatures]
