"""Nodes: Apply mixture-of-attention (MoA routing) and Show router maps (its inspect node)."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from ...adapters.attention.attention_routing import ROUTER_WEIGHT_NAMES, RouterRecorder
from ...adapters.projectors.id_adapter import IdAdapter
from ..dispatch.dispatcher import apply_attention_stage, installed_dispatcher
from ..common.dit_layout import dit_family
from .dit_moa import apply_moa_dit, dit_moa_stages
from ..common.errors import IdentityAttentionError
from ..pva.identity_inputs import check_base, model_layers
from ..common.input_checks import check_latent
from ..dispatch.base_projections import BaseProjections
from .routing_stage import PRIORS, ROUTERS, MixtureOfAttentionStage
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs, validate_mask, weight_input

CELL = 128  # pixels per map in the per-step sheet
MAX_SHEET_ROWS = 12


def router_weights_for(layers, adapter, node: str) -> Dict:
    """Per layer the learned router's four tensors, checked against the layer sizes."""
    if not isinstance(adapter, IdAdapter):
        raise IdentityAttentionError(
            "the learned router needs router weights",
            node=node,
            input_name="router_weights",
            fix="connect an ID_ADAPTER holding MoA router weights (this pack's native format, from the trainer), or pick another router",
        )
    out = {}
    for info in layers:
        entry = adapter.layer(info.key)
        missing = [n for n in ROUTER_WEIGHT_NAMES if n not in entry]
        if missing:
            raise IdentityAttentionError(
                f"the router weights have no {', '.join(missing)} for layer {info.key}",
                node=node,
                input_name="router_weights",
                fix="use router weights trained for this model (every cross-attention layer needs router.0/router.2 weights and biases)",
            )
        w0, b0, w2, b2 = (entry[n] for n in ROUTER_WEIGHT_NAMES)
        hidden = w0.shape[0]
        expected = {"router.0.weight": (hidden, info.inner_dim), "router.0.bias": (hidden,), "router.2.weight": (2, hidden), "router.2.bias": (2,)}
        for name, t in zip(ROUTER_WEIGHT_NAMES, (w0, b0, w2, b2)):
            if tuple(t.shape) != expected[name]:
                raise IdentityAttentionError(
                    f"router weight {name} at layer {info.key} has shape {list(t.shape)}, expected {list(expected[name])}",
                    node=node,
                    input_name="router_weights",
                    fix="use router weights trained for this model's base",
                )
        out[info.key] = {n: entry[n] for n in ROUTER_WEIGHT_NAMES}
    return out


class ApplyMixtureOfAttention:
    NODE_ID = "IdentityAttentionApplyMixtureOfAttention"
    DISPLAY_NAME = "Apply mixture-of-attention"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Mixture-of-Attention (MoA) routing: decides per pixel and per layer whether the model's own attention (the prior: "
        "composition, background, style) or the identity attention applied before this node (the personalized branch) is used. "
        "Put it AFTER the identity nodes. Connect 'Show router maps' after the sampler to see where the identity went."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with routing added: connect it to a sampler (and the same sampler's LATENT plus this MODEL to 'Show router maps').",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "A model that already has identity attention applied (parallel visual attention, KV-mixed...): that is the personalized branch being routed. On Flux.1: the identity_attention or mask router, with prior current."}),
            "router": (
                list(ROUTERS),
                {
                    "default": "identity_attention",
                    "tooltip": "Who decides where the identity goes. identity_attention: wherever the model itself attends to the identity (no training). mask: your mask (white = identity). learned: trained MoA router weights.",
                },
            ),
        }
        required.update(schedule_inputs(1.0))
        required["weight"] = weight_input(
            1.0, 0.0, 1.0, "How much the router decides: 1 = full routing (the prompt's own attention wherever the router says so), 0 = this node off (identity attention everywhere)."
        )
        required.update(
            {
                "temperature": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.01,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Edge softness of the routing: lower = crisper split between identity and background, higher = softer blend. Not used by the mask router (soften the mask instead).",
                    },
                ),
                "record_maps": ("BOOLEAN", {"default": True, "tooltip": "Keep the router maps of each step so 'Show router maps' can display them (a little memory, no slowdown worth noting)."}),
            }
        )
        optional = {
            "prior": (
                list(PRIORS),
                {
                    "default": "base",
                    "tooltip": "What the model's own attention (the prior) is computed with. base (the paper): the checkpoint's attention as loaded, before LoRAs and other weight patches, so outside the identity the picture follows the base model. current: the model as it arrives here, LoRAs included.",
                },
            ),
            "mask": ("MASK", {"tooltip": "Where the identity may appear (white). Outside it the model's own attention is used. Required for the mask router; with the other routers it limits them."}),
            "router_weights": ("ID_ADAPTER", {"tooltip": "Trained MoA router weights (this pack's native format). Only for the learned router."}),
        }
        return {"required": required, "optional": optional}

    def apply(self, model, router, weight, start_percent, end_percent, apply_to, temperature, record_maps, mask=None, router_weights=None, prior="base"):
        node = self.DISPLAY_NAME
        if not 0.0 <= weight <= 1.0:
            raise IdentityAttentionError(f"weight must be between 0 and 1, got {weight}", node=node, input_name="weight", fix="use 1 for full routing")
        if not temperature > 0:
            raise IdentityAttentionError(f"temperature must be above 0, got {temperature}", node=node, input_name="temperature", fix="use 1.0, or lower for crisper maps")
        if prior not in PRIORS:
            raise IdentityAttentionError(f"unknown prior {prior!r}", node=node, input_name="prior", fix=f"choose one of: {', '.join(PRIORS)}")
        if dit_family(model) is not None:  # Flux: routes the image tokens of every joint block (nodes/moa/dit_moa.py)
            return (apply_moa_dit(model, router, weight, start_percent, end_percent, apply_to, temperature, record_maps, mask, prior, node),)
        layers = model_layers(model, node)
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, None, node=node)
        router_mask = validate_mask(mask, node) if mask is not None else None
        if router == "mask" and router_mask is None:
            raise IdentityAttentionError("the mask router needs a mask", node=node, input_name="mask", fix="connect a MASK (white where the identity goes), or pick another router")
        weights = None
        if router == "learned":
            weights = router_weights_for(layers, router_weights, node)
            check_base(model, layers, router_weights, node, "router_weights")
        dispatcher = installed_dispatcher(model)
        identity_stages = [s for s in (dispatcher.stages if dispatcher else ()) if callable(getattr(s, "identity_share", None))]
        if router == "identity_attention" and not identity_stages:
            raise IdentityAttentionError(
                "the identity_attention router follows the identity attention applied before it, but this MODEL has none",
                node=node,
                input_name="model",
                fix="put this node after 'Apply parallel visual attention' or 'Apply KV-mixed attention', or use the mask router",
            )
        stage = MixtureOfAttentionStage(
            schedule,
            router,
            temperature=temperature,
            router_mask=router_mask,
            router_weights=weights,
            identity_stages=identity_stages if router == "identity_attention" else (),
            recorder=RouterRecorder() if record_maps else None,
            prior=prior,
            base=BaseProjections(model, layers) if prior == "base" else None,
        )
        return (apply_attention_stage(model, stage),)


# --- inspect --------------------------------------------------------------------------------------


def _gray(maps: torch.Tensor) -> torch.Tensor:
    """``[F, h, w]`` in [0, 1] -> IMAGE ``[F, h, w, 3]``."""
    return maps.clamp(0.0, 1.0).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def _resize(maps: torch.Tensor, size) -> torch.Tensor:
    """``[F, h, w] -> [F, H, W]``, nearest (each layer token stays a visible block)."""
    return F.interpolate(maps.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1)


class InspectRouter:
    NODE_ID = "IdentityAttentionInspectRouter"
    DISPLAY_NAME = "Show router maps"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = (
        "Shows where 'Apply mixture-of-attention' sent the identity during the last sampling: white = identity (personalized "
        "branch), black = the model's own attention. Place it after the sampler: connect the sampler's LATENT and the MODEL the sampler used."
    )
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("maps", "per_step")
    OUTPUT_TOOLTIPS = (
        "One picture per layer resolution (finest first) and per image of the batch, averaged over all steps, at the image's size.",
        "A sheet for the first image: one row per sampling step (early at the top, up to 12 rows), one column per layer resolution.",
    )
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL that went into the sampler (with 'Apply mixture-of-attention' on it)."}),
                "latent": ("LATENT", {"tooltip": "The sampler's output. It makes this node run after sampling and gives the picture size."}),
                "half": (["cond", "uncond"], {"default": "cond", "tooltip": "Which half of classifier-free guidance to show: the positive prompt (cond) or the negative (uncond)."}),
                "routing_node": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Which mixture-of-attention node to show when there are several: 0 = the last one applied, 1 = the first, 2 = the second..."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the maps change with every sampling

    def show(self, model, latent, half, routing_node):
        node = self.DISPLAY_NAME
        check_latent(latent, node, "latent")
        dispatcher = installed_dispatcher(model)
        stages: List[MixtureOfAttentionStage] = [s for s in (dispatcher.stages if dispatcher else ()) if isinstance(s, MixtureOfAttentionStage)]
        stages += dit_moa_stages(model)  # Flux (nodes/moa/dit_moa.py): the same recorder
        if not stages:
            raise IdentityAttentionError("this MODEL has no 'Apply mixture-of-attention' node", node=node, input_name="model", fix="connect the MODEL that went into the sampler, after 'Apply mixture-of-attention'")
        if routing_node > len(stages):
            raise IdentityAttentionError(
                f"there are only {len(stages)} mixture-of-attention nodes on this MODEL", node=node, input_name="routing_node", fix="use 0 for the last one, or a number up to the count"
            )
        stage = stages[routing_node - 1] if routing_node else stages[-1]
        if stage.recorder is None:
            raise IdentityAttentionError("this mixture-of-attention node does not record maps", node=node, input_name="model", fix="turn on record_maps in 'Apply mixture-of-attention'")
        snap = stage.recorder.snapshot()
        code = 0 if half == "cond" else 1
        grids = [g for g in snap.grids() if any((g, code) in step for step in snap.maps)]
        if not grids:
            raise IdentityAttentionError(
                f"no router maps were recorded for the {half} half",
                node=node,
                input_name="latent",
                fix="connect this node after the sampler that used this MODEL (its LATENT output); for uncond the sampler needs a CFG above 1",
            )
        samples = latent["samples"]
        size = (int(samples.shape[-2]) * 8, int(samples.shape[-1]) * 8)
        frames = []
        averages = {g: snap.average(g, code) for g in grids}
        rows = min(int(samples.shape[0]), min(a.shape[0] for a in averages.values()))
        for b in range(rows):
            for g in grids:
                frames.append(_resize(averages[g][b : b + 1], size))
        maps = _gray(torch.cat(frames, dim=0))
        return (maps, self._sheet(snap, grids, code, size))

    @staticmethod
    def _sheet(snap, grids, code, size) -> torch.Tensor:
        cell_w = CELL
        cell_h = max(1, round(CELL * size[0] / size[1]))
        steps = [i for i, step in enumerate(snap.maps) if any((g, code) in step for g in grids)]
        if len(steps) > MAX_SHEET_ROWS:
            picks = torch.linspace(0, len(steps) - 1, MAX_SHEET_ROWS).round().long().tolist()
            steps = [steps[i] for i in picks]
        gap = 2
        sheet = torch.full((len(steps) * (cell_h + gap) - gap, len(grids) * (cell_w + gap) - gap), 0.25)
        for r, i in enumerate(steps):
            for c, g in enumerate(grids):
                m = snap.maps[i].get((g, code))
                if m is None:
                    continue
                y, x = r * (cell_h + gap), c * (cell_w + gap)
                sheet[y : y + cell_h, x : x + cell_w] = _resize(m[:1], (cell_h, cell_w))[0]
        return _gray(sheet.unsqueeze(0))


NODES = [ApplyMixtureOfAttention, InspectRouter]
