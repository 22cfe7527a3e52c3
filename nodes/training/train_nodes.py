"""Node: Personalize identity (PVA's 40-step per-identity fine-tune, identity_attention/train)."""

from __future__ import annotations

import logging
import os
import re


import comfy.utils
import folder_paths

from ...adapters.training.loss_plot import draw_loss_curves, image_tensor
from ...adapters.formats.native_format import write_native
from ...adapters.training.training_schedule import PersonalizeRecipe
from ...adapters.weights.weight_errors import WeightError
from ...adapters.weights.write_paths import name_parts, resolve_write_path, write_safetensors
from ..common.errors import IdentityAttentionError
from ..pva.identity_inputs import REFERENCE_CHOICES
from .personalization import personalize_identity, recipe_from
from ..dispatch.prompt_token import DEFAULT_TEMPLATE, PLACEHOLDER, embedding_file_tensors
from ..dispatch.stage_inputs import CATEGORY, validate_mask

log = logging.getLogger("identity_attention")
SAVE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,120}$")
DEFAULTS = PersonalizeRecipe()


def checked_save_name(name: str, node: str) -> str:
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not name:
        return ""
    fix = "use letters, digits, spaces, '_', '-' or '.', no folders (or leave it empty to not save)"
    if not SAVE_NAME.match(name) or ".." in name:
        raise IdentityAttentionError(f"'{name}' cannot be used as a file name", node=node, input_name="save_name", fix=fix)
    try:
        name_parts(name + ".safetensors")  # Windows device names, trailing dots (adapters/weights/write_paths.py)
    except WeightError as err:
        raise IdentityAttentionError(err.problem, node=node, input_name="save_name", fix=fix) from None
    return name


def save_folder(kind: str) -> str:
    folder = folder_paths.get_folder_paths(kind)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def save_outputs(name: str, adapter, vectors) -> list:
    """Write ``models/identity_attention/<name>.safetensors`` (+ ``models/embeddings/<name>.safetensors``); returns the paths."""
    paths = []
    path = resolve_write_path(save_folder("identity_attention"), f"{name}.safetensors")  # links, devices, lengths (write_paths)
    emb = resolve_write_path(save_folder("embeddings"), f"{name}.safetensors") if vectors else None
    write_native(adapter, path)
    paths.append(path)
    if emb:
        write_safetensors(emb, embedding_file_tensors(vectors), metadata={"format": "identity_attention_token", "placeholder": PLACEHOLDER})
        paths.append(emb)
    return paths


def preview_file(img) -> dict:
    """Save a picture to ComfyUI's temp folder and describe it the way PreviewImage does."""
    import uuid

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"identity_attention_loss_{uuid.uuid4().hex[:12]}.png"
    img.save(os.path.join(folder, name), format="PNG")
    return {"filename": name, "subfolder": "", "type": "temp"}


class PersonalizeIdentity:
    NODE_ID = "IdentityAttentionPersonalizeIdentity"
    DISPLAY_NAME = "Personalize identity"
    CATEGORY = f"{CATEGORY}/train"
    DESCRIPTION = (
        "Fine-tunes an identity adapter on one person's photos in about 40 steps (PVA, Personalized Face Inpainting by Parallel "
        "Visual Attention): only the adapter's visual query/key/value projections of every cross-attention layer and one learned "
        "prompt word (<new1>) change; the model, text encoder and VAE stay as they are. Connect the result to 'Apply parallel visual "
        "attention' (mode joint, projections adapter) with the same identity, and write <new1> in prompts through 'Identity prompt'. "
        "Shows the loss while it runs; Cancel stops it and leaves everything unchanged."
    )
    RETURN_TYPES = ("ID_ADAPTER", "IMAGE")
    RETURN_NAMES = ("id_adapter", "loss_curve")
    OUTPUT_TOOLTIPS = (
        "The personalized adapter (joint attention, this person). Use it with the same model and identity.",
        "The training loss per step (thin: raw, thick: smoothed). It should trend down; a flat or rising curve means the learning rate is off.",
    )
    FUNCTION = "personalize"
    MATCHING_BATCHES = {"masks": "images"}  # one mask for all photos or one per photo (input_guard checks it)
    OUTPUT_NODE = True  # runs (and saves) even when nothing downstream uses the adapter yet; shows the loss curve on the node

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint to personalize for (SD1.5, SDXL or their inpainting versions). It is not changed."}),
                "clip": ("CLIP", {"tooltip": "The same checkpoint's text encoder: it reads the training prompt with the learned <new1> word."}),
                "vae": ("VAE", {"tooltip": "The same checkpoint's VAE: it turns the photos into latents once, before training."}),
                "images": ("IMAGE", {"tooltip": "Photos of the person (a batch: join several Load Image with Batch images). Each is cropped square (around the face when masks are connected, else the middle) and resized to resolution, so photos in which the face is large work best."}),
                "id_adapter": ("ID_ADAPTER", {"tooltip": "The adapter to start from: a PVA adapter (with visual projections) or any adapter whose tokens fit the model's text space (its visual projections then start as copies of the model's own, as PVA does)."}),
                "identity": ("IDENTITY", {"tooltip": "The same person, from an identity encoder node fed with these photos: it gives the identity tokens the adapter attends to."}),
                "steps": ("INT", {"default": DEFAULTS.steps, "min": 1, "max": 2000, "tooltip": "Optimizer steps (PVA: 40). Each step looks at 2 photos x 2 noise levels."}),
                "learning_rate": ("FLOAT", {"default": DEFAULTS.learning_rate, "min": 0.0, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": "Learning rate of the visual projections (PVA: 1e-5 x batch of 2 = 2e-5). Higher learns faster but can forget the prompt."}),
                "token_learning_rate": ("FLOAT", {"default": DEFAULTS.token_learning_rate, "min": 0.0, "max": 1.0, "step": 1e-4, "round": False, "tooltip": "Learning rate of the <new1> prompt word (PVA: 1e-3). 0 keeps the word as it is."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "The same seed and inputs give the same result."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Training size in pixels: photos are centre-cropped square and resized to this (SD1.5: 512, SDXL: 1024)."}),
                "prompt": ("STRING", {"default": DEFAULT_TEMPLATE, "multiline": False, "tooltip": f"The training prompt; {PLACEHOLDER} is the learned word for this person (PVA: '{DEFAULT_TEMPLATE}'). Without {PLACEHOLDER} no word is learned."}),
                "references": (list(REFERENCE_CHOICES), {"default": "fused", "tooltip": "How the identity's photos become tokens; use the same setting later in 'Apply parallel visual attention'."}),
                "save_name": ("STRING", {"default": "", "tooltip": "If set, saves models/identity_attention/<name>.safetensors (for 'Load identity adapter') and models/embeddings/<name>.safetensors (the learned word, usable as embedding:<name> in any prompt). An existing file of that name is replaced."}),
            },
            "optional": {
                "masks": ("MASK", {"tooltip": "Optional face masks (white = face), one per photo or one for all: training masks are drawn around them. Without masks the face is assumed in the middle."}),
            },
        }

    def personalize(self, model, clip, vae, images, id_adapter, identity, steps, learning_rate, token_learning_rate, seed, resolution, prompt, references, save_name, masks=None):
        node = self.DISPLAY_NAME
        name = checked_save_name(save_name, node)
        if masks is not None:
            masks = validate_mask(masks, node, "masks")
        recipe = recipe_from(steps, learning_rate, token_learning_rate, seed)
        pbar = comfy.utils.ProgressBar(recipe.steps)

        def progress(step, total, loss, losses):
            log.info("%s: step %d/%d loss %.5f", node, step, total, loss)
            img = draw_loss_curves({"loss": losses}, title=f"{node}: step {step}/{total}, loss {loss:.4f}", width=512, height=288)
            pbar.update_absolute(step, total, ("PNG", img, 512))  # raises when the user interrupts

        result = personalize_identity(
            model, clip, vae, images, id_adapter, identity, masks=masks, recipe=recipe, template=prompt,
            per_reference=references == "per_reference", resolution=resolution, train_token=token_learning_rate > 0, progress=progress, node=node,
        )
        if name:
            try:
                paths = save_outputs(name, result.adapter, result.vectors)
            except (WeightError, OSError) as err:
                raise IdentityAttentionError(f"could not save the adapter ({err})", node=node, input_name="save_name", fix="check the folder is writable and the name is valid") from err
            log.info("%s: saved %s", node, ", ".join(paths))
        curve = draw_loss_curves({"loss": result.losses}, title=f"PVA personalization, {recipe.steps} steps ({result.seconds:.1f} s)")
        return {"ui": {"images": [preview_file(curve)]}, "result": (result.adapter, image_tensor(curve))}


NODES = [PersonalizeIdentity]
