"""PuLID-Flux nodes: 'Load PuLID-Flux' (``pulid_flux_v0.9.x.safetensors`` from models/pulid) and
'Apply PuLID-Flux' (its ID encoder on the IDENTITY's ArcFace + EVA-CLIP features, then the
cross-attention after the scheduled Flux blocks; math in adapters/flux/pulid_flux.py, hooks in
nodes/flux/flux_identity_pulid_patch.py).
"""

from __future__ import annotations

import os

import torch

from ...adapters.projectors.id_adapter import IdentityTokens
from ...adapters.flux.pulid_flux import PuLIDFlux
from ...adapters.weights.weight_errors import WeightError
from ..common.dit_layout import dit_blocks, require_flux
from ..common.errors import IdentityAttentionError
from .flux_identity_pulid_patch import apply_pulid_flux
from ..common.folders import check_weight_choice, load_weight_choice, weight_choices
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs

PULID_PAPER = "Guo et al., *PuLID: Pure and Lightning ID Customization via Contrastive Alignment*, NeurIPS 2024 (Flux release v0.9)"
PULID_FLUX_FOLDERS = ("pulid",)
PULID_FLUX_FILE = "pulid_flux_v0.9.1.safetensors"
WRONG_FILE_FIX = (
    f"choose {PULID_FLUX_FILE} (or v0.9.0) from guozinan/PuLID; the SDXL files (pulid_v1.bin, pulid_v1.1.safetensors) "
    "go to 'Load identity adapter' with an SDXL model"
)


class PuLIDFluxWeights:
    """A loaded PuLID-Flux file and its name (ComfyUI type ``PULID_FLUX``)."""

    def __init__(self, model: PuLIDFlux, name: str):
        self.model, self.name = model, name

    def __deepcopy__(self, memo):
        return self


class LoadPuLIDFlux:
    NODE_ID = "IdentityAttentionLoadPuLIDFlux"
    DISPLAY_NAME = "Load PuLID-Flux"
    PAPER = PULID_PAPER
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads PuLID for Flux.1 (pulid_flux_v0.9.x.safetensors from guozinan/PuLID): its ID encoder and the 20 "
        "cross-attention modules it inserts after Flux's blocks. Detected from the file's content."
    )
    RETURN_TYPES = ("PULID_FLUX",)
    RETURN_NAMES = ("pulid_flux",)
    OUTPUT_TOOLTIPS = ("PuLID-Flux, for 'Apply PuLID-Flux'.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pulid_file": (
                    weight_choices(PULID_FLUX_FOLDERS),
                    {"tooltip": f"The PuLID-Flux weights in models/pulid ({PULID_FLUX_FILE}). Nothing there yet? Queue the "
                                "workflow: the error says what to download and where it goes."},
                )
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, pulid_file):
        return check_weight_choice(pulid_file, PULID_FLUX_FOLDERS, node=cls.DISPLAY_NAME, input_name="pulid_file", node_id=cls.NODE_ID)

    def load(self, pulid_file):
        model, path = load_weight_choice(pulid_file, PULID_FLUX_FOLDERS, PuLIDFlux.from_state, node=self.DISPLAY_NAME,
                                         input_name="pulid_file", node_id=self.NODE_ID, wrong_file_fix=WRONG_FILE_FIX)
        return (PuLIDFluxWeights(model, os.path.basename(path)),)


class ApplyPuLIDFlux:
    NODE_ID = "IdentityAttentionApplyPuLIDFlux"
    DISPLAY_NAME = "Apply PuLID-Flux"
    PAPER = PULID_PAPER
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Puts a person into a Flux.1 image with PuLID-Flux: its ID encoder turns the face (ArcFace + EVA-CLIP features) "
        "into 32 identity tokens, and after every 2nd double block and every 4th single block the image tokens attend "
        "to them, as the official code does. The negative prompt gets the encoder's tokens for an empty face."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Flux model with PuLID-Flux; the model you connected is left unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Flux.1 model (dev, schnell or a fine-tune). SD1.5/SDXL models use 'Apply parallel visual attention' with PuLID for SDXL."}),
                "pulid_flux": ("PULID_FLUX", {"tooltip": "From 'Load PuLID-Flux'."}),
                "identity": ("IDENTITY", {"tooltip": "The person, through 'Encode PuLID face features (EVA-CLIP)' (PuLID reads ArcFace and EVA-CLIP features)."}),
                **schedule_inputs(
                    weight_tooltip="PuLID-Flux's id_weight: how strongly the face is added after each block (official default 1; "
                    "0 = exactly the image without it). Start later (start_percent) for more freedom in composition.",
                ),
            }
        }

    def apply(self, model, pulid_flux, identity, weight, start_percent, end_percent, apply_to):
        node = self.DISPLAY_NAME
        require_flux(model, node, "PuLID-Flux is made for Flux.1's blocks",
                     fix="connect a Flux.1 model; for SD1.5/SDXL use PuLID for SDXL (pulid_v1.1.safetensors) with 'Apply parallel visual attention'")
        if not isinstance(pulid_flux, PuLIDFluxWeights):
            raise IdentityAttentionError("this is not PuLID-Flux", node=node, input_name="pulid_flux", fix="connect 'Load PuLID-Flux'")
        blocks = dit_blocks(model)
        n_double = sum(1 for b in blocks if b.kind == "double_block")
        hidden = int(model.model.diffusion_model.hidden_size)
        try:
            pulid_flux.model.check_model(n_double, len(blocks) - n_double, hidden)
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="pulid_flux", fix=err.fix) from err
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, node=node)
        try:
            with torch.no_grad():
                cond, uncond = pulid_flux.model.encoder(identity.features(per_reference=False))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="identity", fix=err.fix) from err
        if not (torch.isfinite(cond).all() and torch.isfinite(uncond).all()):
            raise IdentityAttentionError("the ID encoder gave non-finite tokens", node=node, input_name="identity",
                                         fix="re-encode the identity; if it persists, download the PuLID-Flux file again")
        tokens = IdentityTokens(cond=cond[:1], uncond=uncond[:1])
        return (apply_pulid_flux(model, pulid_flux.model, tokens, schedule),)


NODES = [LoadPuLIDFlux, ApplyPuLIDFlux]
