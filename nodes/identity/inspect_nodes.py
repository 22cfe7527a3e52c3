"""Inspect nodes: what a MODEL's cross-attention looks like and what this pack installed."""

from __future__ import annotations

from ..dispatch.dispatcher import installed_dispatcher
from ..dispatch.dit_report import dit_report_lines
from ..common.host import base_model_of, cross_attention_layers
from ..dispatch.stage_inputs import CATEGORY


class ModelAttentionInfo:
    NODE_ID = "IdentityAttentionModelInfo"
    DISPLAY_NAME = "Show attention patches"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = "Lists the model's cross-attention layers and the Identity Attention effects applied to it, in order. Connect the text to any text display node."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("A plain-text report: base model, layer count, and every applied effect with its settings.",)
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model to describe (after any Identity Attention nodes)."})}}

    def report(self, model):
        layers = cross_attention_layers(model)
        lines = [f"base model: {base_model_of(model)}", f"cross-attention layers: {len(layers)}"]
        if layers:
            dims = sorted({info.inner_dim for info in layers})
            lines.append(f"context size: {layers[0].context_dim}; layer channels: {', '.join(map(str, dims))}")
        dispatcher = installed_dispatcher(model)
        if dispatcher is None or not dispatcher.stages:
            lines.append("cross-attention effects: none" if _hook_effects(model) else "effects: none")
        else:
            lines.append("effects, in the order they run:")
            for i, stage in enumerate(dispatcher.stages, 1):
                s = stage.schedule
                window = "all steps" if s.sigma_start == float("inf") and s.sigma_end <= 0 else f"sigma {s.sigma_start:.3g} to {s.sigma_end:.3g}"
                where = "masked" if s.mask is not None else "everywhere"
                lines.append(f"  {i}. {stage.label}: weight {s.weight:g}, {window}, {s.apply_to}, {where}")
            chained = len(dispatcher.fallbacks)
            if chained:
                lines.append(f"patches from other packs kept underneath ours: {chained} layers")
        lines.extend(dit_report_lines(model))  # Flux: blocks, joint-attention effects, UNet-only nodes
        hooks = _hook_effects(model)
        if hooks:
            lines.append("effects outside cross-attention (in the order they run within a block):")
            lines.extend(f"  {name}: {label}: weight {weight:g}" for name, label, weight in hooks)
        return ("\n".join(lines),)


def _hook_effects(model):
    """Our patches installed as middle_patch / attn2_patch (they carry a label and a schedule)."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    found = []
    for name in ("middle_patch", "attn2_patch"):
        for patch in patches.get(name, []):
            label, schedule = getattr(patch, "label", None), getattr(patch, "schedule", None)
            if isinstance(label, str) and schedule is not None:
                found.append((name, label, schedule.weight))
    return found


NODES = [ModelAttentionInfo]
