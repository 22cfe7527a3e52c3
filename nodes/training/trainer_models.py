"""The trainer's models: the artist's checkpoints through ComfyUI's own loaders, and adapter files.

``models`` section of a trainer config (one of):

- ``{"checkpoint": "path/to/model.safetensors"}``: one file, like "Load Checkpoint"
  (``comfy.sd.load_checkpoint_guess_config``: UNet, CLIP and VAE detected from the keys);
- ``{"unet": path, "clip": path | [paths], "vae": path}``: split files, like "Load Diffusion
  Model" / "Load CLIP" / "Load VAE" (two CLIP paths: SDXL's CLIP-L and CLIP-G, or Flux.1's CLIP-L
  and T5-XXL); optional ``clip_type`` (a ComfyUI CLIPType name such as "flux" or "sd3"; default: "flux"
  for a Flux.1 diffusion model, else ComfyUI's own default);
- ``{"factory": "module:function", "args": {...}}``: a Python function returning
  ``(MODEL, CLIP, VAE)`` (tests, custom setups).

Relative paths are resolved against the config file's folder, then against ComfyUI's model
folders (``checkpoints``, ``diffusion_models`` / ``unet``, ``text_encoders`` / ``clip``,
``vae``), so a config can name files the way ComfyUI's loader nodes list them.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence, Tuple

import torch

from ...adapters.projectors.id_adapter import IdAdapter

FOLDERS = {"checkpoint": ("checkpoints",), "unet": ("diffusion_models", "unet"), "clip": ("text_encoders", "clip"), "vae": ("vae",), "adapter": ("identity_attention", "ipadapter", "instantid", "pulid")}


def resolve(path: str, kind: str, base_dir: str = "") -> str:
    """An existing file for ``path``: as given, relative to ``base_dir``, or in ComfyUI's folders for ``kind``."""
    candidates = [path, os.path.join(base_dir, path)] if not os.path.isabs(path) else [path]
    try:
        import folder_paths

        for folder in FOLDERS.get(kind, ()):
            try:
                found = folder_paths.get_full_path(folder, path)
            except KeyError:
                found = None
            if found:
                candidates.append(found)
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"{kind} file '{path}' not found (looked at: {', '.join(dict.fromkeys(c for c in candidates if c))})")


def _embedding_directory() -> Optional[list]:
    try:
        import folder_paths

        return folder_paths.get_folder_paths("embeddings")
    except (ImportError, KeyError):
        return None


def load_models(spec: dict, base_dir: str = "") -> Tuple[object, object, object]:
    """``(MODEL, CLIP, VAE)`` for a ``models`` config section (see module docstring).

    Loaded under ``torch.inference_mode()``, as ComfyUI's loader nodes run (the loaders initialise
    some tensors in place and expect it); training then works on aliases of those weights.
    """
    with torch.inference_mode():
        return _load_models(spec, base_dir)


def _load_models(spec: dict, base_dir: str):
    import comfy.sd
    import comfy.utils

    if "factory" in spec:
        module_name, _, fn_name = str(spec["factory"]).partition(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        return tuple(fn(**dict(spec.get("args", {}))))
    if "checkpoint" in spec:
        out = comfy.sd.load_checkpoint_guess_config(resolve(spec["checkpoint"], "checkpoint", base_dir), output_vae=True, output_clip=True, embedding_directory=_embedding_directory())
        model, clip, vae = out[:3]
    else:
        missing = [k for k in ("unet", "clip", "vae") if k not in spec]
        if missing:
            raise ValueError(f"the models section needs 'checkpoint', or 'unet' + 'clip' + 'vae' (missing {', '.join(missing)}), or 'factory'")
        unet_path = resolve(spec["unet"], "unet", base_dir)
        loader = getattr(comfy.sd, "load_diffusion_model", None) or comfy.sd.load_unet
        model = loader(unet_path)
        clips: Sequence[str] = spec["clip"] if isinstance(spec["clip"], (list, tuple)) else [spec["clip"]]
        kind = clip_type(spec.get("clip_type"), model)
        extra = {"clip_type": kind} if kind is not None else {}
        clip = comfy.sd.load_clip(ckpt_paths=[resolve(c, "clip", base_dir) for c in clips], embedding_directory=_embedding_directory(), **extra)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(resolve(spec["vae"], "vae", base_dir)))
    if model is None or clip is None or vae is None:
        raise ValueError("the checkpoint did not give a UNet, a text encoder and a VAE; give split files (unet, clip, vae) instead")
    return model, clip, vae


def clip_type(name: Optional[str], model):
    """ComfyUI's ``CLIPType`` for split text-encoder files, as "Load CLIP" / "DualCLIPLoader" take it.

    ``name``: the config's ``clip_type`` (a CLIPType name, e.g. "flux", "sd3"); without one, FLUX
    for a Flux.1 MODEL (its CLIP-L + T5-XXL pair) and None (ComfyUI's default) otherwise.
    """
    import comfy.sd

    types = getattr(comfy.sd, "CLIPType", None)
    if name is None:
        from ..common.dit_layout import FLUX, dit_family

        if dit_family(model) != FLUX or types is None or not hasattr(types, "FLUX"):
            return None
        return types.FLUX
    known = [t.name.lower() for t in types] if types is not None else []
    if str(name).lower() not in known:
        raise ValueError(f"models.clip_type {name!r} is not a text-encoder type of this ComfyUI (known: {', '.join(known) or 'none'})")
    return types[str(name).upper()]


def load_adapter(path: Optional[str], model, base_dir: str = "") -> Optional[IdAdapter]:
    """An ID_ADAPTER file (any format the pack's loader knows), checked against ``model``; None for no path."""
    if not path:
        return None
    from ...adapters.weights.safe_load import read_weight_file
    from ...adapters.formats.weight_formats import check_against_model, convert
    from ..common.host import cross_attention_layers

    full = resolve(path, "adapter", base_dir)
    loaded = read_weight_file(full)
    adapter = convert(loaded.tensors, loaded.metadata, source=os.path.basename(full))
    if adapter.layers and not any(n.startswith("router.") for e in adapter.layers.values() for n in e):
        check_against_model(adapter, cross_attention_layers(model))
    return adapter
