"""Nodes: Apply nested attention, Find subject token.

The subject token is a position in the positive prompt's context (77 tokens
per section: 0 is the start token, the words follow). "last prompt token" is
the last word token before the end token ("a photo of a person" -> "person",
index 5); the node finds it by tokenizing the prompt with the CLIP (connect
the CLIP and give the same prompt text as the sampler's positive), because
inside cross-attention only the 77 encoded vectors are visible, not where the
words end. "token index" takes the position directly; 'Find subject token'
shows the positions of a prompt's words and outputs the index of a chosen
word (its last token).
"""

from __future__ import annotations

import math

from ..common import prompt_encoding
from ..dispatch.dispatcher import apply_attention_stage
from ..common.dit_layout import dit_family
from .dit_nested import apply_nested_dit
from ..common.errors import IdentityAttentionError
from ..common.host import cross_attention_layers
from ..common.identity_token_inputs import check_base, identity_tokens, references_input
from ..common.input_checks import check_cross_attention_adapter
from .nested_attention_stage import PROJECTIONS, NestedAttentionStage
from ..dispatch.stage_inputs import CATEGORY, build_schedule, mask_input, schedule_inputs

PROJECTION_CHOICES = {
    "adapter K/V (to_k, to_v)": "adapter",
    "native nested weights (nested.to_k, nested.to_v)": "nested",
    "model's own K/V (training-free)": "layer",
}
SUBJECT_CHOICES = ("last prompt token", "token index")
SECTION = 77


class ApplyNestedAttention:
    NODE_ID = "IdentityAttentionApplyNestedAttention"
    DISPLAY_NAME = "Apply nested attention"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "Nested Attention: the subject word of the prompt (e.g. 'person') gets a different value for every pixel, "
        "picked from the identity's tokens by a small attention of its own. The word keeps its place in the prompt, "
        "so the rest of the prompt keeps its power; the identity shows where the subject word is attended."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with nested attention on the subject token. The input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to patch (SD1.5, SD2, SDXL or Flux.1; on Flux choose the model's own K/V projection)."}),
            "adapter": ("ID_ADAPTER", {"tooltip": "Makes identity tokens from the identity (and, depending on projection, holds the nested key/value weights)."}),
            "identity": ("IDENTITY", {"tooltip": "The person whose features the subject word takes."}),
            "projection": (
                list(PROJECTION_CHOICES),
                {"tooltip": "How identity tokens become nested keys/values. native nested weights: the paper's mechanism, an adapter trained by the trainer's nested target (its query-former makes the tokens). Untrained alternatives: the adapter's identity projections (any IP-Adapter-style adapter; trained for a different attention), or the model's own text projections (tokens must be in the text-embedding space)."},
            ),
            "subject": (list(SUBJECT_CHOICES), {"tooltip": "Which prompt token is the subject: the last word of the prompt (needs clip and prompt below), or the position given in token_index."}),
            "token_index": ("INT", {"default": 5, "min": 1, "max": 76 * 8, "tooltip": "With subject = token index: the subject's position in the prompt (0 is the start token). 'Find subject token' shows every word's position. On Flux.1: counted in T5's tokens, from 0 (T5 has no start token)."}),
        }
        required.update(schedule_inputs(weight_tooltip="How much of the subject's value is replaced by the identity (1 = as in the paper). 0 turns the node off exactly."))
        required["apply_to"] = (required["apply_to"][0], dict(required["apply_to"][1], default="cond", tooltip="The subject token belongs to the positive prompt: keep 'cond' unless the negative prompt has the same subject word at the same position."))
        required["references"] = references_input("fused")
        optional = mask_input()
        optional["clip"] = ("CLIP", {"tooltip": "The text encoder, to find the last prompt token."})
        optional["prompt"] = ("STRING", {"multiline": True, "default": "", "tooltip": "The positive prompt text, exactly as given to the sampler's text encoder (for subject = last prompt token)."})
        return {"required": required, "optional": optional}

    def apply(self, model, adapter, identity, projection, subject, token_index, weight, start_percent, end_percent, apply_to, references, mask=None, clip=None, prompt=""):
        node = self.DISPLAY_NAME
        kind = PROJECTION_CHOICES.get(projection)
        if kind is None:
            raise IdentityAttentionError(f"unknown projection {projection!r}", node=node, input_name="projection", fix=f"choose one of: {', '.join(PROJECTION_CHOICES)}")
        check_cross_attention_adapter(adapter, node, "adapter")
        if dit_family(model) is not None:  # Flux: the subject's value in every joint block (nodes/nested/dit_nested.py)
            return (apply_nested_dit(model, adapter, identity, kind, subject, token_index, weight, start_percent, end_percent, apply_to, references, mask, clip, prompt, node),)
        check_base(model, adapter, node)
        index, prompt_length = self._subject(subject, token_index, clip, prompt, node)
        schedule = build_schedule(model, weight, start_percent, end_percent, apply_to, mask, node=node)
        tokens = identity_tokens(adapter, identity, references == "per_reference", node)
        layers = cross_attention_layers(model)
        modules = {}
        if kind == "layer":
            if tokens.dim != layers[0].context_dim:
                raise IdentityAttentionError(
                    f"the adapter's tokens are {tokens.dim} wide but the model's text projections take {layers[0].context_dim}",
                    node=node,
                    input_name="projection",
                    fix="use an adapter whose tokens live in the text space (IP-Adapter / PuLID / InstantID), or the adapter K/V projection",
                )
            diffusion_model = model.model.diffusion_model
            modules = {info.key: diffusion_model.get_submodule(info.module_path).attn2 for info in layers}
        else:
            names = PROJECTIONS[kind]
            usable = [info for info in layers if all(n in adapter.layer(info.key) for n in names)]
            if not usable:
                raise IdentityAttentionError(
                    f"the adapter has no {' / '.join(names)} weights for this model's layers",
                    node=node,
                    input_name="projection",
                    fix="choose another projection, or load an adapter that has these weights",
                )
            for info in usable:
                for n in names:
                    w = adapter.layer(info.key)[n]
                    if tuple(w.shape) != (info.inner_dim, tokens.dim):
                        raise IdentityAttentionError(
                            f"{n} of layer {info.key} is {list(w.shape)}, expected {[info.inner_dim, tokens.dim]}",
                            node=node,
                            input_name="adapter",
                            fix="use an adapter made for this base model",
                        )
        acting = frozenset(modules) if kind == "layer" else frozenset(info.key for info in usable)
        stage = NestedAttentionStage(schedule, tokens, kind, index, prompt_length, adapter=adapter, modules=modules, layers=acting)
        return (apply_attention_stage(model, stage),)

    @staticmethod
    def _subject(subject, token_index, clip, prompt, node):
        if subject == "token index":
            return int(token_index), SECTION * math.ceil((int(token_index) + 1) / SECTION)
        if clip is None or not prompt.strip():
            raise IdentityAttentionError(
                "'last prompt token' needs the CLIP and the prompt text to find where the prompt ends",
                node=node,
                input_name="prompt",
                fix="connect the CLIP and type (or link) the positive prompt, or set subject to 'token index'",
            )
        try:
            index, length, _ = prompt_encoding.subject_token(clip, prompt)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="prompt", fix="give the positive prompt text") from err
        return index, length


class FindSubjectToken:
    NODE_ID = "IdentityAttentionFindSubjectToken"
    DISPLAY_NAME = "Find subject token"
    CATEGORY = f"{CATEGORY}/inspect"
    DESCRIPTION = "Shows where each word of a prompt sits among the text encoder's tokens and outputs the position of the subject word (or of the last word), for Apply nested attention's token_index."
    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("token_index", "tokens")
    OUTPUT_TOOLTIPS = ("The subject's position (its last token) in the prompt's context.", "Every word token as position:token, the subject marked with '>'.")
    FUNCTION = "find"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder the prompt is encoded with."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of a person", "tooltip": "The positive prompt."}),
                "subject_word": ("STRING", {"default": "", "tooltip": "The subject word (e.g. person). Empty = the last word of the prompt."}),
            }
        }

    def find(self, clip, prompt, subject_word):
        try:
            index, _, listing = prompt_encoding.subject_token(clip, prompt, subject_word)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=self.DISPLAY_NAME, input_name="subject_word", fix="type a word that appears in the prompt, or leave it empty") from err
        return (index, listing)


NODES = [ApplyNestedAttention, FindSubjectToken]
