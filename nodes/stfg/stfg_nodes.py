"""Nodes: Apply STFG guidance (CA-Edit's skin transition frequency guidance) and its boundary inspector."""

from __future__ import annotations

import torch

from ..dispatch.dispatcher import StageSchedule, apply_attention_stage
from ..common.errors import IdentityAttentionError
from ..dispatch.gradient_support import add_identity_weight_wrappers, gradient_support
from ..common.host import model_sampling, percent_to_sigma
from ..common.input_checks import check_latent
from ..common.map_images import gray_image, pixel_size, resize_maps
from ..dispatch.stage_inputs import CATEGORY, validate_mask
from .stfg_attention_stage import BOUNDARY_LAYERS, STFGAttentionStage
from .stfg_post_cfg import MODES, STFGGuidance, installed_guidance

BOUNDARY_LAYER_CHOICES = {"all layers (paper)": "all", "low resolution layers": "low_resolution"}
assert set(BOUNDARY_LAYER_CHOICES.values()) == set(BOUNDARY_LAYERS)

EXACT_EVERY_DEFAULT = 3
"""Mode 'exact' takes the gradient on every 3rd step (fast between): about 2x a plain step instead of 4x."""


def _is_flow_model(model) -> bool:
    import comfy.model_sampling

    const = getattr(comfy.model_sampling, "CONST", None)
    return const is not None and isinstance(model_sampling(model), const)


class ApplySTFG:
    NODE_ID = "IdentityAttentionApplySTFG"
    DISPLAY_NAME = "Apply STFG guidance"
    CATEGORY = f"{CATEGORY}/guidance"
    DESCRIPTION = (
        "Smooth skin transitions in local face edits (CA-Edit's STFG): every step, inside the edit mask where the "
        "prompt barely reaches (the transition ring), the coarse colours and shading of the picture being made are "
        "pulled toward the original photo's. Use in an inpainting setup with the same mask."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the guidance. Connect it to the sampler; to see the transition region, add 'Inspect STFG boundary' after the sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to guide (an inpainting model or a normal one used for inpainting). SD1.5, SD2 and SDXL; eps- and v-prediction."}),
                "original_latent": (
                    "LATENT",
                    {"tooltip": "The original photo through a plain 'VAE Encode' at the size you sample (not 'VAE Encode (for Inpainting)', which greys out the masked area)."},
                ),
                "mask": ("MASK", {"tooltip": "The edit region (white = edit), the same mask you inpaint with."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 10.0,
                        "min": 0.0,
                        "max": 1000.0,
                        "step": 0.5,
                        "tooltip": "How hard the transition ring is pulled toward the original's coarse colours (the paper's lambda). 0 = off, exactly as without this node. The pull is strongest early in sampling and fades as the noise does.",
                    },
                ),
                "mode": (
                    list(MODES),
                    {
                        "default": "fast",
                        "tooltip": "'fast': the guidance with the model's own reaction left out, almost free. 'exact': the paper's gradient through the whole model: one more model pass plus a backward pass on every 'exact_every'-th step (default every 3rd: about twice as slow; more memory); needs ComfyUI from June 2025 or newer.",
                    },
                ),
                "band": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.05,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Which details count as 'coarse': the share of the frequency range kept by the low-pass (0.5 = the paper's quarter band). Lower = only broad colour and shading; 1 = everything.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "When the guidance starts, as a fraction of sampling (0 = the first step)."},
                ),
                "end_percent": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "When the guidance stops, as a fraction of sampling (1 = the last step)."},
                ),
            },
            "optional": {
                "exact_every": (
                    "INT",
                    {
                        "default": EXACT_EVERY_DEFAULT,
                        "min": 1,
                        "max": 100,
                        "tooltip": "Mode 'exact' only: take the gradient through the model on every Nth step and the fast update on the steps between. "
                        "1 = every step, as in the paper (about 4x the time of a step); 3 = about 2x. Ignored in 'fast' mode.",
                    },
                ),
                "boundary_layers": (
                    list(BOUNDARY_LAYER_CHOICES),
                    {
                        "default": "all layers (paper)",
                        "tooltip": "Which cross-attention layers find the transition ring. 'all layers (paper)': the prompt's attention of every layer, fine and coarse, averaged (no large attention maps are kept, so it fits memory at any size; one extra attention per layer unless STFG is the first attention effect). 'low resolution layers': only the coarse layers, a little cheaper and blurrier.",
                    },
                ),
                "mask_update": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Off (the paper): the guidance may touch the picture slightly past the mask edge, where the low-pass reaches. On: nothing outside the mask changes. With a latent noise mask the sampler restores the outside anyway.",
                    },
                ),
                "step_cap": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "On: each step pulls the ring at most all the way to the original's coarse colours, never past them. Off: the paper's step as written (strength x noise level squared), which at high strength overshoots and can blow up the first steps; lower strength a lot if you turn it off.",
                    },
                ),
            },
        }

    def apply(self, model, original_latent, mask, strength, mode, band, start_percent, end_percent, exact_every=None, boundary_layers="all layers (paper)", mask_update=False, step_cap=True):
        node = self.DISPLAY_NAME
        layers = BOUNDARY_LAYER_CHOICES.get(boundary_layers)
        if layers is None:
            raise IdentityAttentionError(f"unknown boundary_layers {boundary_layers!r}", node=node, input_name="boundary_layers", fix=f"choose one of: {', '.join(BOUNDARY_LAYER_CHOICES)}")
        if mode not in MODES:
            raise IdentityAttentionError(f"unknown mode {mode!r}", node=node, input_name="mode", fix="choose 'fast' or 'exact'")
        if not (0.0 <= start_percent <= end_percent <= 1.0):
            raise IdentityAttentionError(
                f"start_percent ({start_percent}) must not be after end_percent ({end_percent})", node=node, input_name="start_percent", fix="set start_percent lower than end_percent"
            )
        edit_mask = validate_mask(mask, node, "mask")
        samples = check_latent(original_latent, node, "original_latent")
        if _is_flow_model(model):
            raise IdentityAttentionError(
                "STFG is defined for diffusion models sampled as x = x0 + sigma * noise; this is a flow-matching model",
                node=node,
                input_name="model",
                fix="use an SD1.5, SD2 or SDXL model",
            )
        if strength == 0.0:
            return (model.clone(),)
        if mode == "exact":
            supported, reason = gradient_support()
            if not supported:
                raise IdentityAttentionError(
                    f"mode 'exact' needs a backward pass through the UNet, which this ComfyUI cannot do: {reason}",
                    node=node,
                    input_name="mode",
                    fix="set mode to 'fast' (the same guidance without the model's own reaction, no backward pass), or update ComfyUI to a release from June 2025 or newer",
                )
        z0 = model.model.process_latent_in(samples.float()).float().cpu()
        schedule = StageSchedule(
            weight=1.0,
            sigma_start=percent_to_sigma(model, start_percent),
            sigma_end=percent_to_sigma(model, end_percent),
            apply_to="both",  # measures the cond rows; sees all, to share the text attention's call
        )
        stage = STFGAttentionStage(schedule, layers)
        patched = apply_attention_stage(model, stage)
        every = EXACT_EVERY_DEFAULT if exact_every is None else int(exact_every)
        if every < 1:
            raise IdentityAttentionError(f"exact_every must be at least 1, got {every}", node=node, input_name="exact_every", fix="set exact_every to 1 (every step) or more")
        patched.set_model_sampler_post_cfg_function(STFGGuidance(stage, z0, edit_mask, strength, mode, band, exact_every=every, mask_update=mask_update, step_cap=step_cap))
        if mode == "exact":
            add_identity_weight_wrappers(patched)
        return (patched,)


class InspectSTFGBoundary:
    NODE_ID = "IdentityAttentionInspectSTFGBoundary"
    DISPLAY_NAME = "Inspect STFG boundary"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = (
        "Shows where STFG guided in the last sampling run: the transition ring inside the mask where the prompt's "
        "attention is low (mean minus one standard deviation). Place it after the sampler: connect the guided MODEL "
        "and the sampler's LATENT."
    )
    RETURN_TYPES = ("MASK", "IMAGE", "IMAGE")
    RETURN_NAMES = ("boundary", "boundary_per_step", "text_attention")
    OUTPUT_TOOLTIPS = (
        "The boundary region of the last guided step, at the image's size.",
        "One frame per guided step: the prompt's attention in gray, the boundary in red.",
        "The prompt's attention map of the last guided step (light = strong), from which the boundary is found.",
    )
    FUNCTION = "inspect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of 'Apply STFG guidance' (the one the sampler used)."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output: makes this node run after sampling and gives the image size."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the recorded maps change with every sampling run

    def inspect(self, model, samples):
        node = self.DISPLAY_NAME
        check_latent(samples, node, "samples")
        guidance = installed_guidance(model)
        if guidance is None:
            raise IdentityAttentionError("this MODEL has no STFG guidance", node=node, input_name="model", fix="connect the MODEL output of 'Apply STFG guidance' (with strength above 0)")
        steps = [entries for _, entries in guidance.recorder.steps if "boundary" in entries]
        if not steps:
            raise IdentityAttentionError(
                "no guided step was recorded yet",
                node=node,
                input_name="samples",
                fix="sample with this MODEL first (with a positive prompt, the guidance active at some step), then connect the sampler's LATENT here",
            )
        size = pixel_size(samples["samples"])
        boundaries = [resize_maps(e["boundary"], size).round() for e in steps]
        attention = [_normalise(resize_maps(e["attention"], size)) for e in steps]
        frames = torch.cat([_overlay(a, b) for a, b in zip(attention, boundaries)], dim=0)
        return (boundaries[-1].cpu(), frames, gray_image(attention[-1]))


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-6)


def _overlay(gray: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
    """Gray attention with the boundary in red: ``[B, H, W]`` x2 -> IMAGE ``[B, H, W, 3]``."""
    keep = 1.0 - boundary
    return torch.stack([torch.maximum(gray, boundary), gray * keep, gray * keep], dim=-1).clamp(0, 1).cpu()


NODES = [ApplySTFG, InspectSTFGBoundary]
