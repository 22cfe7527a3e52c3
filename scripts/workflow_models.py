"""The model files of the example workflows, from weights_manifest.json: page metadata, notes, file lists.

One source for three things an artist reads:

- ComfyUI's model metadata in each workflow, so the page's missing-models dialog
  offers the downloads (:func:`add_model_metadata`, run by scripts/build_workflows.py
  on every workflow it writes). What the page reads (comfyui-frontend-package
  1.32.9, ComfyUI 0.3.75; the early-2024 page in ComfyUI's ``web/`` reads none of it):

  - ``node.properties.models``: ``[{name, url, directory, hash?, hash_type?}]``; an entry
    counts only while its ``name`` is one of the node's widget values;
  - the workflow's top-level ``models``: the same entries, always counted.

  On load the page lists each entry whose ``name`` is not among the files of model
  folder ``directory`` (``/experiment/models/<directory>``). It offers a download only
  for URLs on huggingface.co / civitai.com and names ending in ``.safetensors`` / ``.sft``
  (other entries show an error instead of a button), so only those are written
  (:func:`page_can_download`); the rest are in the workflow's "Download first" note.
  ComfyUI's own loaders (checkpoint, CLIP vision, LoRA) show the bare file name, so
  their entries go on the node; this pack's adapter loader shows ``<folder>/<file>``,
  which no folder lists under that name, so its entries go in the top-level list.

- The "Download first" note of each workflow (:func:`download_note_lines`).
- The minimum files of each workflow in the README (:func:`workflow_files`).

Matching is generic: a widget value names a manifest entry when it equals the
entry's ``file``, its ``<folder>/<file>``, or its group name (face packs), whatever
the node, so new loaders get metadata without a table here.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Dict, Iterable, List

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "weights_manifest.json"

PAGE_SOURCES = ("https://huggingface.co/", "https://civitai.com/")  # the frontend's allowed download sources
PAGE_SUFFIXES = (".safetensors", ".sft")  # ... and file name endings
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".gguf")
UI_ONLY_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
DOWNLOAD = "python -m comfyui-identity-attention.weights download"
DOWNLOAD_WINDOWS = r"python_embeded\python.exe ComfyUI\custom_nodes\comfyui-identity-attention\weights.py download"


def manifest_entries() -> List[dict]:
    return json.loads(MANIFEST.read_text())["entries"]


def page_can_download(entry: dict) -> bool:
    """Whether ComfyUI's missing-models dialog offers a download button for this file."""
    return entry["url"].startswith(PAGE_SOURCES) and entry["file"].endswith(PAGE_SUFFIXES)


def page_model(entry: dict) -> dict:
    """One entry of ComfyUI's model metadata (``hash`` only where the manifest has the published sha256)."""
    model = {"name": entry["file"], "url": entry["url"], "directory": entry["folder"]}
    if entry["sha256"]:
        model.update(hash=entry["sha256"], hash_type="SHA256")
    return model


def entries_named_by(value, entries: Iterable[dict]) -> List[dict]:
    """Manifest entries a widget value names: ``file``, ``<folder>/<file>`` or a group name."""
    if not isinstance(value, str) or not value:
        return []
    value = value.replace("\\", "/")
    return [e for e in entries if value in (e["file"], f"{e['folder']}/{e['file']}") or value == e.get("group")]


def _model_nodes(workflow: dict):
    return [n for n in workflow.get("nodes", []) if n.get("type") not in UI_ONLY_NODES]


def add_model_metadata(workflow: dict, entries: List[dict]) -> dict:
    """Write ComfyUI's model metadata into ``workflow`` (in place, replacing any earlier one); returns it."""
    top: List[dict] = []
    for node in _model_nodes(workflow):
        props = node.setdefault("properties", {})
        props.pop("models", None)
        on_node = []
        for value in node.get("widgets_values") or []:
            for e in entries_named_by(value, entries):
                if not page_can_download(e):
                    continue
                model = page_model(e)
                target = on_node if value == e["file"] else top  # the page filters node entries by widget value
                if model not in target:
                    target.append(model)
        if on_node:
            props["models"] = on_node
    workflow.pop("models", None)
    if top:
        workflow["models"] = top
    return workflow


def workflow_files(workflow: dict, entries: List[dict]) -> List[dict]:
    """The manifest entries a workflow's loaders name, in node order, without repeats (a face pack: all its files)."""
    out, seen = [], set()
    for node in _model_nodes(workflow):
        for value in node.get("widgets_values") or []:
            for e in entries_named_by(value, entries):
                if e["id"] not in seen:
                    seen.add(e["id"])
                    out.append(e)
    return out


def grouped(files: List[dict]) -> List[List[dict]]:
    """Entries with their group members together: one item per download id or group."""
    items: Dict[str, List[dict]] = {}
    for e in files:
        items.setdefault(e.get("group") or e["id"], []).append(e)
    return list(items.values())


def item_id(item: List[dict]) -> str:
    return item[0].get("group") or item[0]["id"]


def item_place(item: List[dict]) -> str:
    """Where the file (or the folder of a group's files) goes, e.g. ``models/ipadapter/`` or ``models/insightface/models/antelopev2/``."""
    e = item[0]
    folder = posixpath.dirname(e["file"]) if len(item) > 1 or e.get("group") else ""
    return f"models/{e['folder']}/" + (f"{folder}/" if folder else "")


def item_url(item: List[dict]) -> str:
    """The file's URL, or for a group the page of the folder that holds its files."""
    if len(item) == 1 and not item[0].get("group"):
        return item[0]["url"]
    return posixpath.dirname(item[0]["url"]).replace("/resolve/", "/tree/", 1)


def item_where(item: List[dict]) -> str:
    """What to save where: the full path of one file, or a group's folder and its file count."""
    if len(item) > 1 or item[0].get("group"):
        return f"all {len(item)} .onnx files of the {item_id(item)} face pack -> {item_place(item)}"
    return f"save as {item_place(item)}{item[0]['file']}"


def download_note_lines(ids: List[str], base: str, entries: List[dict]) -> List[str]:
    """The "Download first" lines for manifest ids / groups plus the checkpoint of ``base``: what, where, link, command."""
    by_id = {e["id"]: e for e in entries}
    items = []
    for name in ids:
        members = [e for e in entries if e.get("group") == name] or [by_id[name]]  # KeyError: an id the manifest lacks
        items.append(members)
    checkpoints = [e for e in entries if e["format"] == "checkpoint" and e["base"] == base]
    lines = ["Files this workflow needs (loading it in a recent ComfyUI offers the .safetensors ones to download):"]
    for item in items + [[c] for c in checkpoints]:
        kind = " (any checkpoint of this kind works)" if item[0]["format"] == "checkpoint" else ""
        lines.append(f"- {item_id(item)}: {item_where(item)}{kind}")
        lines.append(f"  {item_url(item)}")
    lines += [
        "",
        "Or download them with the pack's command (checked against their published sha256),",
        "from ComfyUI/custom_nodes:",
        f"{DOWNLOAD} {' '.join(ids)}",
        "Windows portable, from the ComfyUI_windows_portable folder:",
        f"{DOWNLOAD_WINDOWS} {' '.join(ids)}",
    ]
    return lines
