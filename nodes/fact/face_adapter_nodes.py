"""Node: Apply face adapter (gated self-attention), FaceChain-FACT's sequential face adapter.

Two things are added to the MODEL clone, as FACT's official inference loads its checkpoint:
the gated self-attention as a ``middle_patch`` (:class:`FaceAdapterPatch`), and, for files that
carry it, each block's LayerNorm before the text cross-attention (the processor's ``ln``) in place
of the block's ``norm2``, as a weight patch of the clone (ComfyUI sets it while this clone is
loaded and restores the base weights for any other clone). The ``ln`` is not scheduled: it
applies in every step and to cond and uncond rows whenever ``weight`` is not 0; weight 0 adds
nothing at all (see ``adapters/attention/gated_self_attention.py``).
"""

from __future__ import annotations

from typing import Dict, Iterable

from ...adapters.attention import gated_self_attention as gsa
from ..common.errors import IdentityAttentionError
from .face_adapter_patch import FaceAdapterPatch
from ..common.step_sigma import install_step_sigma
from ..common.host import LayerInfo, cross_attention_layers
from ..common.identity_token_inputs import check_base, identity_tokens, references_input
from ..dispatch.stage_inputs import CATEGORY, build_schedule, mask_input, schedule_inputs

FACT_WEIGHT_DEFAULT = 0.5  # facechain/inference_fact.py: set_scale(0.5) for text-to-image


def block_norm_patches(adapter, layers: Iterable[LayerInfo]) -> Dict[str, tuple]:
    """ComfyUI weight patches that make each block's ``norm2`` the file's ``ln``: ``{state key: (tensor,)}``.

    Applied with ``strength_model=0``: ComfyUI computes ``weight * 0 + ln``, i.e. sets the
    weight to the file's value exactly (the early-2024 host has no "set" patch type).
    """
    patches: Dict[str, tuple] = {}
    for info in layers:
        norm = gsa.block_norm(adapter.layer(info.key))
        if norm is None:
            continue
        prefix = f"diffusion_model.{info.module_path}.norm2."
        patches[prefix + "weight"], patches[prefix + "bias"] = (norm[0],), (norm[1],)
    return patches


class ApplyFaceAdapter:
    NODE_ID = "IdentityAttentionApplyFaceAdapter"
    DISPLAY_NAME = "Apply face adapter (gated self-attention)"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "FaceChain-FACT's face adapter: in every transformer block, after self-attention and before the text "
        "cross-attention, the image attends to itself together with the face tokens, through a learned gate. "
        "The prompt's text attention is untouched, so the prompt keeps control of scene and style. Needs FACT "
        "weights (Load identity adapter) and an IDENTITY with TransFace face tokens (Encode face tokens). As FACT's own "
        "inference, the file's LayerNorm before the text attention replaces the block's (while weight is not 0)."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the face adapter in every block it has weights for. The input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The SD1.5 model to add the face adapter to (FACT was trained on SD1.5)."}),
            "adapter": ("ID_ADAPTER", {"tooltip": "FaceChain-FACT adapter weights (adapter_*_faceshuffle_*.ckpt) from Load identity adapter."}),
            "identity": ("IDENTITY", {"tooltip": "The person, with face tokens from 'Encode face tokens (TransFace)'."}),
        }
        required.update(
            schedule_inputs(
                weight_default=FACT_WEIGHT_DEFAULT,
                weight_tooltip=(
                    "The adapter's gate g: how strongly the face is imposed. FACT uses 0.5 for text-to-image. Any weight but 0 also "
                    "puts the file's LayerNorm before the text attention in every step, as FACT does; 0 turns the node off exactly."
                ),
            )
        )
        required["references"] = references_input("per_reference")
        return {"required": required, "optional": mask_input()}

    def apply(self, model, adapter, identity, weight, start_percent, end_percent, apply_to, references, mask=None):
        node = self.DISPLAY_NAME
        if adapter.format != "fact" and adapter.mechanism != "gated_self_attention":
            raise IdentityAttentionError(
                f"this is a {adapter.format} adapter; the face adapter needs FaceChain-FACT weights",
                node=node,
                input_name="adapter",
                fix="load adapter_maj_mask_large_new_reg001_faceshuffle_00290001.ckpt (or a native gated-self-attention file) with Load identity adapter",
            )
        check_base(model, adapter, node)
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
        tokens = identity_tokens(adapter, identity, references == "per_reference", node)
        layers, infos = [], []
        for info in cross_attention_layers(model):
            weights = adapter.layer(info.key)
            if not weights:
                continue
            problem = gsa.check_layer(weights, info.inner_dim, tokens.dim)
            if problem:
                raise IdentityAttentionError(
                    f"the adapter's weights for layer {info.key} do not fit this model: {problem}",
                    node=node,
                    input_name="adapter",
                    fix="use the adapter made for this base model",
                )
            layers.append(info.key)
            infos.append(info)
        if not layers:
            raise IdentityAttentionError(
                "none of the adapter's layers match this model's transformer blocks",
                node=node,
                input_name="adapter",
                fix="use an adapter made for this base model",
            )
        patch = FaceAdapterPatch(schedule, adapter, tokens, layers)
        patched = model.clone()
        patched.set_model_patch(patch, "middle_patch")
        install_step_sigma(patched)  # the window decided once per step
        norms = block_norm_patches(adapter, infos) if weight != 0.0 else {}
        if norms:
            taken = patched.add_patches(norms, strength_patch=1.0, strength_model=0.0)
            if len(taken) != len(norms):
                missing = sorted(set(norms) - set(taken))[0]
                raise IdentityAttentionError(
                    f"the model has no weight {missing} for the adapter's LayerNorm",
                    node=node,
                    input_name="model",
                    fix="use an SD1.5 model whose transformer blocks have a norm2 (the base FACT was trained on)",
                )
        return (patched,)


NODES = [ApplyFaceAdapter]
