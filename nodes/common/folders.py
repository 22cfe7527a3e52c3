"""Model folders this pack reads, registered with ComfyUI's ``folder_paths``.

Artists keep weights where other packs put them: ``models/ipadapter/``,
``models/instantid/`` (ComfyUI_InstantID), ``models/pulid/`` (PuLID packs),
``models/insightface/models/<pack>/``, ``models/clip_vision/`` (also EVA-CLIP for
PuLID), ``models/facexlib/`` (facexlib's face-parsing weights); the pack's own
native weights go to ``models/identity_attention/``. Paths users add through
``extra_model_paths.yaml`` (keys ``ipadapter``, ``instantid``, ``pulid``,
``identity_attention``, ``insightface``, ``facexlib``) are kept: registration only appends
the default folder and sets the file extensions.

Loaders choose their files through :func:`weight_choices` (the list, with one
placeholder entry while the folders are empty), :func:`check_weight_choice`
(their ``VALIDATE_INPUTS``: a file that is not there is reported before the
prompt runs, with what to download, instead of ComfyUI's bare "Value not in
list") and :func:`resolve_weight_choice` (the path and its manifest entry);
loaders that build a network from a plain state dict use
:func:`load_weight_choice`, which also tells a damaged download from a wrong
file; the wording comes from ``adapters/weights/weights_guidance.py``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple, TypeVar

import folder_paths

from ...adapters.weights.safe_load import read_weight_file, resolve_in_folders, safe_relative_name
from ...adapters.weights.weight_dtypes import usable_weights
from ...adapters.weights.weight_errors import WeightError
from ...adapters.weights.weights_guidance import damaged_file, is_placeholder, missing_file, no_files, placeholder
from ...adapters.weights.weights_manifest import manifest_or_none
from .errors import IdentityAttentionError

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


# --- choosing a weight file in a loader ----------------------------------------------------------
# Shared by every loader of the pack: the list (a placeholder when empty), the check before the
# prompt runs (VALIDATE_INPUTS, so ComfyUI's bare "Value not in list" never answers instead), and
# the path, with errors that name the file, where it goes, its manifest id and the download command.


def weight_choices(folders: Sequence[str], prefixed: bool = False, suffixes: Optional[Sequence[str]] = None) -> list:
    """Files of ``folders`` for a combo (``<folder>/<file>`` when ``prefixed``), or the one placeholder entry."""
    names = []
    for folder in folders:
        try:
            files = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        names += [f"{folder}/{f}" if prefixed else f for f in files if not suffixes or f.endswith(tuple(suffixes))]
    return names or [placeholder(folders)]


def _locate(value: str, folders: Sequence[str], prefixed: bool) -> Tuple[str, str, list]:
    """(folder, name inside it, folders searched) for a loader value; WeightError for a value no folder can hold."""
    value = str(value).replace("\\", "/")
    if prefixed:
        folder, _, name = value.partition("/")
        if folder not in folders or not name:
            raise WeightError(
                f"'{value}' is not a file from {', '.join(f'models/{f}' for f in folders)}",
                fix="pick a file from the list; new files appear after refreshing the page",
            )
        return folder, name, folder_list(folder)
    searched = [root for f in folders for root in folder_list(f)]
    for f in folders:  # the first folder that has it, else the first folder
        for root in folder_list(f):
            if os.path.isfile(os.path.join(root, value)):
                return f, value, searched
    return folders[0], value, searched


def resolve_weight_choice(value, folders: Sequence[str], *, node: str, input_name: str, node_id: Optional[str] = None,
                          prefixed: bool = False, how_to_get: Optional[str] = None) -> Tuple[str, Optional[dict]]:
    """(path, manifest entry or None) of a loader's value; IdentityAttentionError saying what to download otherwise.

    ``how_to_get``: the fix for files nobody downloads (made by the pack's own save nodes).
    """
    manifest = manifest_or_none()
    try:
        if is_placeholder(value):
            searched = [root for f in folders for root in folder_list(f)]
            err = no_files(folders, searched, manifest, node_id)
            raise IdentityAttentionError(err.problem, node=node, input_name=input_name, fix=how_to_get or err.fix)
        folder, name, roots = _locate(value, folders, prefixed)
        safe_relative_name(name)
        if not any(os.path.isfile(os.path.join(root, name)) for root in roots):
            err = missing_file(str(value), folders, roots, manifest)
            raise IdentityAttentionError(err.problem, node=node, input_name=input_name, fix=how_to_get or err.fix)
        path = resolve_in_folders(name, roots)  # the pack's path rules: no links out of the model folders
    except WeightError as err:
        raise IdentityAttentionError(err.problem, node=node, input_name=input_name, fix=err.fix) from None
    return path, (manifest.find(folder, name) if manifest is not None else None)


def check_weight_choice(value, folders: Sequence[str], *, node: str, input_name: str, node_id: Optional[str] = None, prefixed: bool = False,
                        how_to_get: Optional[str] = None):
    """For a loader's ``VALIDATE_INPUTS``: True, or the error text (file, where it goes, id, download command)."""
    if value is None:  # fed by a link: checked when the node runs
        return True
    try:
        resolve_weight_choice(value, folders, node=node, input_name=input_name, node_id=node_id, prefixed=prefixed, how_to_get=how_to_get)
    except IdentityAttentionError as err:
        return str(err)
    return True


def damaged_weight_file(err: WeightError, path: str, entry: Optional[dict], *, node: str, input_name: str) -> IdentityAttentionError:
    """A file that did not parse, as the node error: "incomplete or corrupt download" when it differs from the released file."""
    err = damaged_file(err, path, entry)
    return IdentityAttentionError(err.problem, node=node, input_name=input_name, fix=err.fix)


Built = TypeVar("Built")


def load_weight_choice(value, folders: Sequence[str], build: Callable[[dict], Built], *, node: str, input_name: str,
                       node_id: Optional[str] = None, prefixed: bool = False, wrong_file_fix: str) -> Tuple[Built, str]:
    """``(build(state dict), path)`` for a loader's value, each failure as one node error that says what to do.

    - not there / nothing downloaded: :func:`resolve_weight_choice`'s guidance (file, folder, id, command);
    - the file does not parse (:class:`WeightError` from the safe reader or the dtype rules), or parses but
      ``build`` refuses it (``ValueError``: other keys or shapes) while it differs from the released file:
      "incomplete or corrupt download" with the command that replaces it;
    - ``build`` refuses a file that is whole (or unknown to the manifest): ``wrong_file_fix`` (which file fits).
    """
    path, entry = resolve_weight_choice(value, folders, node=node, input_name=input_name, node_id=node_id, prefixed=prefixed)
    try:
        state = usable_weights(read_weight_file(path, roots=None).tensors, what=os.path.basename(path))
    except WeightError as err:
        raise damaged_weight_file(err, path, entry, node=node, input_name=input_name) from None
    try:
        return build(state), path
    except ValueError as err:
        wrong = WeightError(f"{os.path.basename(path)}: {err}", fix=wrong_file_fix)
        if entry is None or (entry["bytes"] is None and entry["sha256"] is None):
            # parsed but other keys/shapes, nothing to compare with: most likely another network's file
            raise IdentityAttentionError(wrong.problem, node=node, input_name=input_name, fix=wrong.fix) from None
        raise damaged_weight_file(wrong, path, entry, node=node, input_name=input_name) from None
