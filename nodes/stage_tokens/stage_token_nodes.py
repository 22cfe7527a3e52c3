"""Nodes for per-stage K/V identity tokens (SeFi-IDE): create, save, load, encode a prompt, apply.

Graph: Create/Load identity tokens -> Encode prompt with identity tokens (CLIP, "a photo of V*")
-> its CONDITIONING goes to the sampler's positive, its stage contexts to
Apply per-stage identity tokens (MODEL) -> sampler. Training of the tokens is a
separate node (the training issue); the tokens are plain tensors for it.
"""

from __future__ import annotations

import os
import re

import torch

import comfy.utils
import folder_paths

from ...adapters.weights.safe_load import read_weight_file, resolve_in_folders
from ...adapters.attention.stage_tokens import (
    DEFAULT_STAGES,
    ENCODER_WIDTHS,
    StageContexts,
    StageTokens,
    boundary_sigmas,
    even_boundaries,
    make_tokens,
    parse_boundaries,
)
from ...adapters.weights.weight_dtypes import usable_weights
from ...adapters.weights.weight_errors import WeightError
from ...adapters.weights.write_paths import name_parts, resolve_write_path, write_safetensors
from ..common import prompt_encoding
from ..common.errors import IdentityAttentionError
from ..common.folders import check_weight_choice, folder_list, resolve_weight_choice, weight_choices
from ..common.host import base_model_of, context_dim_of, percent_to_sigma
from ..common.step_sigma import install_step_sigma
from ..common.input_checks import check_finite
from ..dispatch.stage_inputs import CATEGORY, build_schedule, schedule_inputs
from .stage_token_patch import StageTokenPatch

FOLDER = "identity_attention"
BASES = tuple(ENCODER_WIDTHS)
CONTEXTS_TYPE = "ID_STAGE_CONTEXTS"


def _base_of_clip(clip) -> str:
    keys = tuple(sorted(prompt_encoding.tokenize(clip, "a")))
    for base, widths in ENCODER_WIDTHS.items():
        if tuple(sorted(widths)) == keys:
            return base
    return "unknown"


def _check_tokens_finite(tokens: StageTokens, node: str, input_name: str, fix: str) -> None:
    for encoder in tokens.encoders:
        for kind, table in (("keys", tokens.keys), ("values", tokens.values)):
            check_finite(table[encoder], node, input_name, f"the identity tokens ({encoder} {kind})", fix)


class CreateIdentityTokens:
    NODE_ID = "IdentityAttentionCreateIdentityTokens"
    DISPLAY_NAME = "Create identity tokens (per-stage K/V)"
    CATEGORY = f"{CATEGORY}/train"
    DESCRIPTION = (
        "Starts a new set of per-stage identity tokens (SeFi-IDE: five key/value token pairs, one per stage of "
        "denoising), from a word's embedding or from random noise. Train them with the training nodes, or save them."
    )
    RETURN_TYPES = ("ID_TOKENS",)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("Untrained identity tokens: every stage starts from the same vector (word) or small random values (seed).",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base": (list(BASES), {"default": "sd15", "tooltip": "The model family the tokens are for (sets the text encoders and widths). Checked against the CLIP when one is connected."}),
                "init": (["word", "seed"], {"default": "word", "tooltip": "word: start every token from init_word's embedding (textual-inversion style). seed: small random vectors."}),
                "init_word": ("STRING", {"default": "person", "tooltip": "The word whose embedding the tokens start from (needs the CLIP input)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Random seed for seed init and for the noise."}),
                "stages": ("INT", {"default": DEFAULT_STAGES, "min": 1, "max": 20, "tooltip": "How many key/value pairs, one per denoising stage. The paper uses 5."}),
                "vectors": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "Token vectors per key or value (1 in the paper; more = more capacity, longer prompt)."}),
                "noise": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "With word init: Gaussian noise added, relative to the embedding's spread, so stages start apart."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "The text encoder of the model the tokens are for (needed for word init)."})},
        }

    def create(self, base, init, init_word, seed, stages, vectors, noise, clip=None):
        node = self.DISPLAY_NAME
        if clip is not None:
            clip_base = _base_of_clip(clip)
            if clip_base != "unknown" and clip_base != base:
                raise IdentityAttentionError(f"base is {base} but the CLIP is {clip_base}", node=node, input_name="base", fix=f"set base to {clip_base}")
        start = None
        if init == "word":
            if clip is None:
                raise IdentityAttentionError("word init needs the CLIP", node=node, input_name="clip", fix="connect the CLIP, or set init to seed")
            try:
                start = prompt_encoding.word_embedding(clip, init_word.strip())
            except prompt_encoding.NoTokenTable as err:  # no word will help: say so
                raise IdentityAttentionError(str(err), node=node, input_name="init", fix="set init to seed (this text encoder cannot start tokens from a word)") from err
            except ValueError as err:
                raise IdentityAttentionError(str(err), node=node, input_name="init_word", fix="use a plain word such as 'person', or set init to seed") from err
            missing = set(ENCODER_WIDTHS[base]) - set(start)
            if missing:
                raise IdentityAttentionError(f"the CLIP has no text encoder {', '.join(sorted(missing))}", node=node, input_name="base", fix="set base to the CLIP's model family")
        metadata = {"init": f"word:{init_word.strip()}" if init == "word" else f"seed:{seed}"}
        return (make_tokens(base, stages=stages, vectors=vectors, seed=seed, init=start, noise=noise, metadata=metadata),)


class SaveIdentityTokens:
    NODE_ID = "IdentityAttentionSaveIdentityTokens"
    DISPLAY_NAME = "Save identity tokens"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = "Saves identity tokens as a .safetensors file in models/identity_attention/ (with a header saying what they are), for Load identity tokens."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("file",)
    OUTPUT_TOOLTIPS = ("The saved file's name, relative to models/identity_attention/.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "tokens": ("ID_TOKENS", {"tooltip": "The identity tokens to save."}),
                "filename_prefix": ("STRING", {"default": "identity_tokens/person", "tooltip": "File name (a folder part is allowed); a counter and .safetensors are added."}),
            }
        }

    def save(self, tokens, filename_prefix):
        node = self.DISPLAY_NAME
        root = folder_list(FOLDER)[0] if folder_list(FOLDER) else os.path.join(folder_paths.models_dir, FOLDER)
        try:  # the whole name against the real folder: links, drives, devices, lengths (adapters/weights/write_paths.py)
            name_parts(filename_prefix)  # the prefix itself: not empty, no '..', devices, drives
            probe = resolve_write_path(root, filename_prefix.strip() + "_00000.safetensors")
        except WeightError as err:
            raise IdentityAttentionError(f"not a usable file name: {err.problem}", node=node, input_name="filename_prefix", fix=err.fix) from None
        folder, stem = os.path.split(probe[: -len("_00000.safetensors")])
        os.makedirs(folder, exist_ok=True)
        pattern = re.compile(re.escape(stem) + r"_(\d{5})\.safetensors$")
        taken = [int(m.group(1)) for m in (pattern.match(f) for f in os.listdir(folder)) if m]
        path = resolve_write_path(root, os.path.relpath(os.path.join(folder, f"{stem}_{max(taken, default=0) + 1:05d}.safetensors"), root))
        tensors, metadata = tokens.to_file_dict()
        write_safetensors(path, tensors, metadata=metadata)
        name = os.path.relpath(path, root).replace(os.sep, "/")
        return {"ui": {"text": [name]}, "result": (name,)}


TOKENS_HOW_TO_GET = "token files are made by Save identity tokens (or the trainer) into models/identity_attention/: run that first, then refresh the page"


class LoadIdentityTokens:
    NODE_ID = "IdentityAttentionLoadIdentityTokens"
    DISPLAY_NAME = "Load identity tokens"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = "Loads per-stage identity tokens saved by Save identity tokens (or a trainer) from models/identity_attention/."
    RETURN_TYPES = ("ID_TOKENS",)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("The identity tokens.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = weight_choices((FOLDER,), suffixes=(".safetensors",))
        return {"required": {"tokens_name": (files, {"tooltip": "A .safetensors identity-token file in models/identity_attention/."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, tokens_name):
        return check_weight_choice(tokens_name, (FOLDER,), node=cls.DISPLAY_NAME, input_name="tokens_name", how_to_get=TOKENS_HOW_TO_GET)

    def load(self, tokens_name):
        node = self.DISPLAY_NAME
        # the pack's path rules: no '..', no absolute names, no links out of the model folders
        path, _ = resolve_weight_choice(tokens_name, (FOLDER,), node=node, input_name="tokens_name", how_to_get=TOKENS_HOW_TO_GET)
        try:
            loaded = read_weight_file(path)  # content-sniffed, size-checked; dtypes by adapters/weights/weight_dtypes.py
            tokens = StageTokens.from_file_dict(usable_weights(loaded.tensors, what=tokens_name), loaded.metadata)
        except (ValueError, OSError, RuntimeError, KeyError) as err:
            raise IdentityAttentionError(
                f"{tokens_name} is not a usable identity-token file ({err})",
                node=node,
                input_name="tokens_name",
                fix="choose a file written by Save identity tokens",
            ) from err
        _check_tokens_finite(tokens, node, "tokens_name", "train or save the tokens again; this file is damaged")
        return (tokens,)


class EncodePromptWithIdentityTokens:
    NODE_ID = "IdentityAttentionEncodePromptWithIdentityTokens"
    DISPLAY_NAME = "Encode prompt with identity tokens"
    CATEGORY = f"{CATEGORY}/encode"
    DESCRIPTION = (
        "Encodes the prompt once per stage with the placeholder word set to that stage's key token and once with "
        "its value token (SeFi-IDE). Connect 'conditioning' to the sampler's positive and 'stage_contexts' to "
        "Apply per-stage identity tokens."
    )
    RETURN_TYPES = ("CONDITIONING", CONTEXTS_TYPE)
    RETURN_NAMES = ("conditioning", "stage_contexts")
    OUTPUT_TOOLTIPS = (
        "The prompt with the placeholder replaced by class_word: the sampler's positive prompt (and the picture you get at weight 0).",
        "The prompt encoded with each stage's key and value tokens, for Apply per-stage identity tokens.",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The model's text encoder."}),
                "tokens": ("ID_TOKENS", {"tooltip": "Per-stage identity tokens (Create / Load identity tokens, or a trainer)."}),
                "text": ("STRING", {"multiline": True, "default": "a photo of V* person", "tooltip": "The prompt, with the placeholder where the person goes. Weights like (V*:1.2) work."}),
                "placeholder": ("STRING", {"default": "V*", "tooltip": "The placeholder word in the prompt that the identity tokens replace."}),
                "class_word": ("STRING", {"default": "", "tooltip": "What the placeholder becomes in the plain conditioning output (e.g. 'person'; empty = just removed)."}),
            }
        }

    def encode(self, clip, tokens, text, placeholder, class_word):
        node = self.DISPLAY_NAME
        _check_tokens_finite(tokens, node, "tokens", "train the tokens again with a lower learning rate, or load a saved set")
        placeholder = placeholder.strip()
        if not prompt_encoding.has_placeholder(text, placeholder):
            raise IdentityAttentionError(f"the prompt does not contain the placeholder '{placeholder}'", node=node, input_name="text", fix=f"write {placeholder or 'V*'} where the person goes, e.g. 'a photo of {placeholder or 'V*'} person'")
        try:
            marker, marker_ids = prompt_encoding.choose_marker(clip, text)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="text", fix="shorten or rephrase the prompt") from err
        marked = prompt_encoding.tokenize(clip, prompt_encoding.with_marker(text, placeholder, marker))
        missing = set(marked) - set(tokens.encoders)
        if missing:
            raise IdentityAttentionError(
                f"the tokens were made for {tokens.base} (text encoders {', '.join(tokens.encoders)}), this CLIP also has {', '.join(sorted(missing))}",
                node=node,
                input_name="tokens",
                fix="use tokens made for this model family",
            )
        bar = comfy.utils.ProgressBar(2 * tokens.stages + 1)
        keys, values = [], []
        try:
            for stage in range(tokens.stages):
                keys.append(prompt_encoding.encode_with_vectors(clip, marked, marker_ids, tokens.pair(stage, "keys")))
                bar.update(1)
                values.append(prompt_encoding.encode_with_vectors(clip, marked, marker_ids, tokens.pair(stage, "values")))
                bar.update(1)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="text", fix="shorten the prompt or use fewer token vectors") from err
        cond, pooled = prompt_encoding.encode(clip, clip.tokenize(prompt_encoding.with_marker(text, placeholder, class_word.strip())))
        bar.update(1)
        contexts = StageContexts(keys=torch.cat(keys).float().cpu(), values=torch.cat(values).float().cpu(), base=tokens.base, placeholder=placeholder)
        extra = {"pooled_output": pooled} if pooled is not None else {}
        return ([[cond, extra]], contexts)


class ApplyStageTokens:
    NODE_ID = "IdentityAttentionApplyStageTokens"
    DISPLAY_NAME = "Apply per-stage identity tokens"
    CATEGORY = f"{CATEGORY}/attention"
    DESCRIPTION = (
        "SeFi-IDE's per-stage K/V identity tokens: during each stage of denoising, every cross-attention takes its "
        "keys from the prompt encoded with that stage's key token and its values from the prompt encoded with its "
        "value token. Early stages shape layout and pose, late ones identity details. Positive prompt only."
    )
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the per-stage prompts swapped into its cross-attention. The input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": "The model to patch."}),
            "stage_contexts": (CONTEXTS_TYPE, {"tooltip": "From 'Encode prompt with identity tokens'."}),
        }
        inputs = schedule_inputs(weight_tooltip="1 = the identity prompts replace the positive prompt in cross-attention; between 0 and 1 they blend with it; 0 turns the node off exactly.")
        inputs.pop("apply_to")
        required.update(inputs)
        required["stage_boundaries"] = (
            "STRING",
            {
                "default": "0.2, 0.4, 0.6, 0.8",
                "tooltip": "Where each stage ends, as fractions of the denoising timesteps (0 = pure noise, 1 = clean); one number fewer than stages. Empty = equal stages. The paper's five stages are 0.2, 0.4, 0.6, 0.8.",
            },
        )
        return {"required": required}

    def apply(self, model, stage_contexts, weight, start_percent, end_percent, stage_boundaries):
        node = self.DISPLAY_NAME
        base = base_model_of(model)
        if base != "unknown" and stage_contexts.base not in (base, "unknown"):
            raise IdentityAttentionError(f"the prompt was encoded for {stage_contexts.base} but the model is {base}", node=node, input_name="stage_contexts", fix="encode with this model's CLIP and tokens made for it")
        dim = context_dim_of(model)
        if stage_contexts.keys.shape[-1] != dim:
            raise IdentityAttentionError(f"the encoded prompt is {stage_contexts.keys.shape[-1]} wide, the model takes {dim}", node=node, input_name="stage_contexts", fix="encode with this model's CLIP")
        try:
            text = stage_boundaries.strip()
            fractions = parse_boundaries(text, stage_contexts.stages) if text else even_boundaries(stage_contexts.stages)
        except ValueError as err:
            raise IdentityAttentionError(str(err), node=node, input_name="stage_boundaries", fix=f"give {stage_contexts.stages - 1} increasing numbers between 0 and 1, e.g. {', '.join(map(str, even_boundaries(stage_contexts.stages)))}") from err
        schedule = build_schedule(model, weight, start_percent, end_percent, "cond", None, node=node)
        sigmas = boundary_sigmas(fractions, lambda p: percent_to_sigma(model, p))
        patched = model.clone()
        patched.set_model_attn2_patch(StageTokenPatch(schedule, stage_contexts, sigmas, fractions))
        install_step_sigma(patched)  # the window and stage decided once per step
        return (patched,)


NODES = [CreateIdentityTokens, SaveIdentityTokens, LoadIdentityTokens, EncodePromptWithIdentityTokens, ApplyStageTokens]
