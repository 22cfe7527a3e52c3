"""Nodes: Apply CA² gate (CA-Edit's causality-aware condition adapter) and its score-map inspector.

Category: ``identity_attention/attention``. The gate is a cross-attention
patch that stacks with the pack's other attention nodes through the
dispatcher; ``guidance`` holds sampler-level corrections (STFG).
"""

from __future__ import annotations

import torch

from ...adapters.attention.ca2_gate import SCORE_SCALES, SCORE_SOURCES, check_native_score
from .ca2_stage import CA2GateStage
from ..dispatch.dispatcher import apply_attention_stage, installed_dispatcher
from .dit_ca2 import DitCA2GateStage, apply_ca2_dit
from ..dispatch.dit_dispatcher import installed_dit_dispatcher
from ..common.dit_layout import dit_family
from ..common.errors import IdentityAttentionError
from ..common.host import cross_attention_layers
from ..common.input_checks import check_image, check_latent
from ...adapters.attention.spatial import mask_to_tokens
from ..common.map_images import LAYER_SELECTIONS, curve_image, gray_image, layer_mean, one_scale, pixel_size, resize_maps
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs, validate_mask
from ..common.visual_condition import clip_vision_features, visual_tokens

SCORE_CHOICES = {
    "text attention (training-free)": "text_attention",
    "native score weights": "native",
}
assert set(SCORE_CHOICES.values()) == set(SCORE_SOURCES)
SCALE_CHOICES = {
    "fixed (trend over steps)": "fixed",
    "per step (full contrast)": "per_step",
}
assert set(SCALE_CHOICES.values()) == set(SCORE_SCALES)


class ApplyCA2Gate:
    NODE_ID = "IdentityAttentionApplyCA2Gate"
    DISPLAY_NAME = "Apply CA² gate"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Local face editing (CA-Edit's CA²): the original photo is added as a visual condition to every "
        "cross-attention layer, like IP-Adapter, but inside the edit mask it is turned down wherever the prompt "
        "drives the picture, so the edit follows the text while skin tone and texture come from the original. "
        "Use with an inpainting setup (the same mask as the latent noise mask)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the CA² gate. Connect it to the sampler; to see the scores, add 'Inspect CA² scores' after the sampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to patch (an inpainting model or a normal one used for inpainting; SD1.5, SD2, SDXL or Flux.1: on Flux the photo's tokens go through each block's own text projections and the score is the text's share of the joint attention)."}),
            "id_adapter": (
                "ID_ADAPTER",
                {"tooltip": "An image adapter whose projection turns the original photo into attention tokens: IP-Adapter (base, plus, plus-face, full-face) or native CA² weights."},
            ),
            "mask": ("MASK", {"tooltip": "The edit region (white = edit), the same mask you inpaint with. Outside it the original photo conditions the model at full strength."}),
            "score_source": (
                list(SCORE_CHOICES),
                {
                    "default": "text attention (training-free)",
                    "tooltip": "How the per-pixel text importance is found. 'text attention': from the prompt's own cross-attention at each layer, works with any adapter. 'native score weights': the paper's trained score predictor, only with CA² weights that include it.",
                },
            ),
            "sharpness": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.1,
                    "max": 8.0,
                    "step": 0.05,
                    "tooltip": "Shapes the score: 1 = as computed. Higher keeps the original photo everywhere except where the text clearly dominates; lower turns the photo down across more of the mask.",
                },
            ),
        }
        required.update(
            schedule_inputs(
                weight_default=1.0,
                weight_tooltip="Strength of the original photo as a condition (0 = off, the model is exactly as without this node; 1 = the paper).",
            )
        )
        return {
            "required": required,
            "optional": {
                "score_scale": (
                    list(SCALE_CHOICES),
                    {
                        "default": "fixed (trend over steps)",
                        "tooltip": "Training-free score only. 'fixed': the share of each pixel's attention that goes to the prompt's words, on the same 0..1 scale at every step, so the paper's rise of the score over sampling shows (early steps keep more of the photo); gentler, raise it with sharpness below 1. 'per step': rescaled at every step and layer so the most text-driven pixel scores 1 (stronger, but every step looks alike).",
                    },
                ),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP-vision model the adapter was trained with (used with 'image')."}),
                "image": ("IMAGE", {"tooltip": "The original photo being edited (used with 'clip_vision')."}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "Instead of clip_vision + image: an already encoded original photo (CLIP Vision Encode)."}),
            },
        }

    def apply(
        self,
        model,
        id_adapter,
        mask,
        score_source,
        sharpness,
        weight,
        start_percent,
        end_percent,
        apply_to,
        clip_vision=None,
        image=None,
        clip_vision_output=None,
        score_scale="fixed (trend over steps)",
    ):
        node = self.DISPLAY_NAME
        scale = SCALE_CHOICES.get(score_scale)
        if scale is None:
            raise IdentityAttentionError(f"unknown score_scale {score_scale!r}", node=node, input_name="score_scale", fix=f"choose one of: {', '.join(SCALE_CHOICES)}")
        source = SCORE_CHOICES.get(score_source)
        if source is None:
            raise IdentityAttentionError(f"unknown score source {score_source!r}", node=node, input_name="score_source", fix=f"choose one of: {', '.join(SCORE_CHOICES)}")
        edit_mask = validate_mask(mask, node, "mask")
        if image is not None:
            image = check_image(image, node, "image", channels=(3,))
        if dit_family(model) is not None:  # Flux: the photo's tokens join each joint block (nodes/ca2/dit_ca2.py)
            features = clip_vision_features(node, clip_vision, image, clip_vision_output)
            return (apply_ca2_dit(model, id_adapter, edit_mask, source, sharpness, scale, weight, start_percent, end_percent, apply_to, features, node),)
        _check_adapter(model, id_adapter, source, node)
        features = clip_vision_features(node, clip_vision, image, clip_vision_output)
        tokens_cond, tokens_uncond = visual_tokens(id_adapter, features, node)
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, None, node=node)
        stage = CA2GateStage(schedule, id_adapter, tokens_cond, tokens_uncond, edit_mask, source, sharpness, scale)
        return (apply_attention_stage(model, stage),)


def _check_adapter(model, adapter, source: str, node: str) -> None:
    layers = cross_attention_layers(model)
    if not layers:
        raise IdentityAttentionError("this MODEL has no UNet cross-attention layers", node=node, input_name="model", fix="use an SD1.5, SD2 or SDXL model")
    matched = 0
    for info in layers:
        entry = adapter.layer(info.key)
        if "to_k" not in entry or "to_v" not in entry:
            continue
        matched += 1
        for name in ("to_k", "to_v"):
            if tuple(entry[name].shape) != (info.inner_dim, adapter.token_dim):
                raise IdentityAttentionError(
                    f"the adapter's {name} at layer {info.key} is {tuple(entry[name].shape)}, but this model's layer needs [{info.inner_dim}, {adapter.token_dim}]: it was made for {adapter.base}",
                    node=node,
                    input_name="id_adapter",
                    fix="load the adapter file made for this base model (SD1.5 adapters for SD1.5 checkpoints, SDXL ones for SDXL)",
                )
        if source == "native":
            try:
                check_native_score(entry, info.inner_dim, info.context_dim)
            except ValueError as err:
                raise IdentityAttentionError(
                    f"the adapter has no usable CA² score predictor at layer {info.key} ({err})",
                    node=node,
                    input_name="score_source",
                    fix="choose 'text attention (training-free)', or load native CA² weights that include the score predictor",
                ) from err
    if matched == 0:
        raise IdentityAttentionError(
            f"the adapter has no visual K/V projections for any cross-attention layer of this model (it was made for {adapter.base})",
            node=node,
            input_name="id_adapter",
            fix="load an image adapter made for this base model",
        )


def ca2_stages(model):
    dispatcher = installed_dispatcher(model)
    dit = installed_dit_dispatcher(model)  # Flux: the DiT path's gates (nodes/ca2/dit_ca2.py)
    return [s for s in (dispatcher.stages if dispatcher else ()) if isinstance(s, CA2GateStage)] + [
        s for s in (dit.stages if dit else ()) if isinstance(s, DitCA2GateStage)
    ]


class InspectCA2Scores:
    NODE_ID = "IdentityAttentionInspectCA2Scores"
    DISPLAY_NAME = "Inspect CA² scores"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = (
        "Shows the CA² gate's score maps from the last sampling run, one frame per step (like the paper's Fig. 5): "
        "light = the text dominates there, so the original photo was turned down (inside the mask). "
        "Place it after the sampler: connect the patched MODEL and the sampler's LATENT."
    )
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("scores_per_step", "mean_score", "score_curve")
    OUTPUT_TOOLTIPS = (
        "One grayscale frame per sampling step (and per image of the batch), at the image's size, all on one colour scale (white = the highest score of the whole run), so a step that leans more on the text looks lighter.",
        "The score averaged over all steps, as a mask at the image's size (absolute, 0..1).",
        "The mean score per step (first image; x = step, y = 0..1): inside the edit mask in white, over the whole image in gray. With the 'fixed' scale it shows the paper's rise over sampling.",
    )
    FUNCTION = "inspect"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of 'Apply CA² gate' (the one the sampler used)."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output: makes this node run after sampling and gives the image size."}),
                "layers": (list(LAYER_SELECTIONS), {"default": LAYER_SELECTIONS[0], "tooltip": "Which cross-attention layers to show: all averaged, or only the coarsest / finest ones."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the recorded maps change with every sampling run

    def inspect(self, model, samples, layers):
        node = self.DISPLAY_NAME
        check_latent(samples, node, "samples")
        stages = ca2_stages(model)
        if not stages:
            raise IdentityAttentionError("this MODEL has no CA² gate", node=node, input_name="model", fix="connect the MODEL output of 'Apply CA² gate'")
        recorder = stages[-1].recorder
        if not recorder.steps:
            raise IdentityAttentionError(
                "no score maps were recorded yet",
                node=node,
                input_name="samples",
                fix="sample with this MODEL first (with a positive prompt and the gate active at some step), then connect the sampler's LATENT here",
            )
        latent = samples["samples"]
        grid = (int(latent.shape[-2]), int(latent.shape[-1]))
        size = pixel_size(latent)
        per_step = [layer_mean(entries, layers, grid) for _, entries in recorder.steps if entries]
        frames = torch.cat([resize_maps(m, size) for m in per_step], dim=0)
        mean = resize_maps(torch.stack(per_step).mean(dim=0), size)
        return (gray_image(one_scale(frames.clamp_min(0.0))), mean.clamp(0.0, 1.0).cpu(), curve_image(*score_curves(per_step, stages[-1].edit_mask, grid)))


def score_curves(per_step, edit_mask: torch.Tensor, grid):
    """Mean score per step of the first image, inside the edit mask (weighted by it) and overall:
    ``([inside...], [overall...]), colours`` for :func:`curve_image`."""
    weights = mask_to_tokens(edit_mask[:1], grid).reshape(grid).float()
    total = float(weights.sum())
    inside, overall = [], []
    for m in per_step:
        m = m[0].float().cpu()
        overall.append(float(m.mean()))
        if total > 0:  # an empty mask draws no inside line
            inside.append(float((m * weights).sum()) / total)
    return (inside, overall), ((1.0, 1.0, 1.0), (0.55, 0.55, 0.55))


NODES = [ApplyCA2Gate, InspectCA2Scores]
