"""Model folders this pack reads, registered with ComfyUI's ``folder_paths``.

Artists keep weights where other packs put them: ``models/ipadapter/``,
``models/instantid/`` (ComfyUI_InstantID), ``models/pulid/`` (PuLID packs),
``models/insightface/models/<pack>/``, ``models/clip_vision/`` (also EVA-CLIP for
PuLID), ``models/facexlib/`` (facexlib's face-parsing weights); the pack's own
native weights go to ``models/identity_attention/``. Paths users add through
``extra_model_paths.yaml`` (keys ``ipadapter``, ``instantid``, ``pulid``,
``identity_attention``, ``insightface``, ``facexlib``) are kept: registration only appends
the default folder and sets the file extensions.
"""

from __future__ import annotations

import os

import folder_paths

WEIGHT_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}

FOLDERS = {
    "ipadapter": WEIGHT_EXTENSIONS,
    "instantid": WEIGHT_EXTENSIONS,
    "pulid": WEIGHT_EXTENSIONS,
    "identity_attention": WEIGHT_EXTENSIONS,
    "insightface": {".onnx"},
    "facexlib": WEIGHT_EXTENSIONS,
}


def register_model_folders() -> None:
    """Register our folders (idempotent)."""
    for name, extensions in FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(extensions))
            continue
        paths, known = entry[0], entry[1]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(known or ()) | set(extensions))


def folder_list(name: str) -> list:
    """The folders searched for ``name`` (for error messages)."""
    try:
        return list(folder_paths.get_folder_paths(name))
    except KeyError:
        return []
