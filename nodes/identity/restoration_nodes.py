"""Nodes for personalized face restoration (Dual-Pivot Tuning): make and preview degraded -> clean pairs.

Restoring itself is a wiring of core nodes plus the pack's identity nodes (README, "Restore an
old photo of a person (Dual-Pivot)"; example workflow ``restore_old_photo_of_person``): the
degraded photo goes through VAE Encode (img2img, the sampler's denoise = restoration strength)
and, as the hint, through Apply ControlNet with the guide trained by the ``restoration_guide``
trainer target (``nodes/training/restoration_training.py``); the model is the personalized prior (Personalize
identity's output, or a LoRA) prompted with its fixed text pivot; Identity similarity scores the
result against the person.

:class:`DegradePhotos` runs the degradation model the guide is trained with
(``adapters/training/degradation.py``) on any images: to preview what the trainer feeds the guide, to make
a test set of pairs, or to check a restoration on a photo whose clean original is known.
"""

from __future__ import annotations

import torch

from ...adapters.training.degradation import DegradationSettings, degrade, describe
from ..common.errors import IdentityAttentionError
from ..common.input_checks import check_image
from ..dispatch.stage_inputs import CATEGORY


class DegradePhotos:
    NODE_ID = "IdentityAttentionDegradePhotos"
    DISPLAY_NAME = "Degrade photos (restoration pairs)"
    CATEGORY = f"{CATEGORY}/train"  # it makes the training pairs of the restoration guide
    DESCRIPTION = (
        "Damages photos the way old or poor photos are damaged, as blind face restoration is trained: Gaussian or motion "
        "blur, downscaling, noise and JPEG, in a random order and strength drawn from the seed (GFPGAN's ranges for "
        "512 px faces). The same seed gives the same damage. Use it to preview what the restoration guide learns from, "
        "or to make degraded/clean pairs."
    )
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("degraded", "pairs", "report")
    OUTPUT_TOOLTIPS = (
        "The degraded photos, same size as the input.",
        "Each clean photo next to its degraded version (left: clean, right: degraded), for a quick look.",
        "What was done to each photo, in order (sizes given for a 512 px face).",
    )
    FUNCTION = "degrade"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Clean photos to damage (faces work best cropped to the face, as the guide is trained)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Chooses the damage: the same seed gives the same result; each photo of a batch gets its own."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "How bad the damage may get: 1 uses the full ranges (blur up to sigma 10, 8x downscale, "
                                                  "strong noise, JPEG quality 60); 0 keeps every kind of damage at its mildest."}),
            }
        }

    def degrade(self, images, seed, strength):
        node = self.DISPLAY_NAME
        images = check_image(images, node, "images", channels=(1, 3, 4))
        images = images[..., :3] if images.shape[-1] == 4 else images.expand(-1, -1, -1, 3) if images.shape[-1] == 1 else images
        if min(images.shape[1:3]) < 2:
            raise IdentityAttentionError("the images are smaller than 2 pixels", node=node, input_name="images", fix="connect real photos")
        degraded, steps = degrade(images.float().cpu(), int(seed), settings=DegradationSettings().with_strength(float(strength)))
        pairs = torch.cat([images.float().cpu(), degraded], dim=2)
        report = "\n".join(f"image {i}: {describe(s)}" for i, s in enumerate(steps))
        return (degraded, pairs, report)


NODES = [DegradePhotos]
