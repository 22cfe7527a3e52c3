"""Weights nodes: load an identity-adapter file as one ID_ADAPTER.

The file list is the union of the model folders other packs already use
(``ipadapter``, ``instantid``, ``pulid``) and the pack's own
(``identity_attention``), shown as ``<folder>/<file>``. Loading goes through
``adapters.weights.safe_load`` (safetensors, or ``torch.load(weights_only=True)``),
the format comes from the tensors (``adapters.formats.weight_formats``), and the
adapter is checked against the MODEL it will patch before any sampling.

Memory: tensors stay on ComfyUI's offload device (the CPU in the usual
setups) in the dtype of the file; the mechanisms copy what they need to the
sampling device once per sampling (``adapters.projectors.id_adapter.DeviceCache``).
Converted adapters are kept for the two most recent files, so changing only
the MODEL does not read the file again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from typing import Optional, Tuple

import torch

import folder_paths

from ...adapters.weights.file_hash import sha256_file
from ...adapters.projectors.id_adapter import IdAdapter
from ...adapters.weights.layer_tables import BASE_NAMES
from ...adapters.faces.recognizer_identity import RECOGNIZER_CHECKS, SPACES, expected_space
from ...adapters.projectors.projector_mlp import has_face_structure, with_face_structure
from ...adapters.weights.safe_load import read_weight_file, resolve_in_folders
from ...adapters.weights.weight_errors import WeightError
from ...adapters.formats.weight_formats import KNOWN_FORMATS, check_against_model, convert
from ...adapters.weights.weights_manifest import manifest_or_none
from ..common.errors import IdentityAttentionError
from ..common.folders import check_weight_choice, damaged_weight_file, folder_list, resolve_weight_choice, weight_choices
from ..common.host import cross_attention_layers
from ..dispatch.stage_inputs import CATEGORY

ADAPTER_FOLDERS = ("ipadapter", "instantid", "pulid", "identity_attention")
FACE_STRUCTURE_TOOLTIP = (
    "FaceID-PlusV2 only: how much of the face structure read by CLIP vision is added to the face-ID tokens (s_scale in "
    "IP-Adapter's code; 1.0 as published). Higher = closer face shape, less freedom. ComfyUI_IPAdapter_plus's generic "
    "IPAdapter node uses 2 x its weight here (its FaceID node has weight_faceidv2). Other adapters ignore it."
)
DOWNLOAD_HINT = "python -m comfyui-identity-attention.weights"

_ADAPTERS: "OrderedDict[tuple, IdAdapter]" = OrderedDict()
_VERIFIED: dict = {}
_WITH_POLICY: "OrderedDict[tuple, tuple]" = OrderedDict()  # (id(loaded), policy, face pack) -> (loaded, copy with them)
_KEEP = 2

INPUT_KIND_WORDS = {
    "clip_embeds": "the CLIP-vision image embedding",
    "clip_hidden": "CLIP-vision hidden states",
    "arcface": "the raw ArcFace embedding",
    "arcface_normed": "the normalised ArcFace embedding",
    "arcface_normed+clip_hidden": "the normalised ArcFace embedding + CLIP-vision hidden states",
    "face_tokens": "TransFace face tokens",
    "arcface+eva_clip": "the raw ArcFace embedding + EVA02-CLIP features",
}


def adapter_choices() -> list:
    """Files of the adapter folders as ``<folder>/<file>``, or the placeholder entry while they are empty."""
    return weight_choices(ADAPTER_FOLDERS, prefixed=True)


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _progress_bar(total_bytes: int):
    try:
        import comfy.utils

        bar = comfy.utils.ProgressBar(max(1, math.ceil(total_bytes / 2**20)))
    except Exception:  # a host without progress bars still verifies
        return None
    return lambda done, total: bar.update_absolute(math.ceil(done / 2**20))


def _verify(path: str, folder: str, name: str, entry: Optional[dict]) -> str:
    if entry is None or not entry.get("sha256"):
        raise WeightError(
            f"verify_sha256 is on, but weights_manifest.json has no published sha256 for '{folder}/{name}'",
            fix=f"turn verify_sha256 off, or use a listed file under its listed name ({DOWNLOAD_HINT} list)",
        )
    key = _file_key(path)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = sha256_file(path, progress=_progress_bar(key[1]))
        _VERIFIED[key] = digest
    if digest != entry["sha256"]:
        raise WeightError(
            f"'{name}' is not the published file {entry['id']} (sha256 {digest[:12]}..., expected {entry['sha256'][:12]}...): it is damaged or another version",
            fix=f"download it again: {DOWNLOAD_HINT} download {entry['id']} --force",
        )
    return digest


def _hints(manifest, size: int) -> dict:
    """What no tensor records: FaceID-Plus v1 vs PlusV2, from the released file sizes."""
    if manifest is None:
        return {"faceid_plus_reason": "assumed (no manifest)"}
    same = manifest.with_size(size, "faceid_plus")
    if len(same) == 1 and same[0].get("variant") in ("v1", "v2"):
        return {"faceid_plus_shortcut": same[0]["variant"] == "v2", "faceid_plus_reason": f"same size as the released {same[0]['id']}"}
    return {"faceid_plus_shortcut": True, "faceid_plus_reason": "assumed: the size matches no released file, PlusV2 is the current version"}


def _offload(adapter: IdAdapter) -> IdAdapter:
    """Move an adapter to ComfyUI's offload device when that is not the CPU (--gpu-only), keeping dtypes."""
    try:
        import comfy.model_management as mm

        device = mm.unet_offload_device()
    except Exception:
        return adapter
    if torch.device(device).type == "cpu":
        return adapter
    adapter.layers = {k: {n: t.to(device) for n, t in v.items()} for k, v in adapter.layers.items()}
    if adapter.projector is not None:
        adapter.projector.to(device)
    adapter.extras = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in adapter.extras.items()}
    return adapter


def load_adapter_file(path: str, roots, entry: Optional[dict], manifest) -> IdAdapter:
    key = _file_key(path)
    cached = _ADAPTERS.get(key)
    if cached is not None:
        _ADAPTERS.move_to_end(key)
        return cached
    loaded = read_weight_file(path, roots=roots, expected_bytes=entry["bytes"] if entry else None)
    adapter = convert(loaded.tensors, loaded.metadata, source=os.path.basename(path), hints=_hints(manifest, loaded.size))
    adapter.metadata["file"] = f"{loaded.kind}, {loaded.size / 1e6:.1f} MB"
    adapter = _offload(adapter)
    _ADAPTERS[key] = adapter
    while len(_ADAPTERS) > _KEEP:
        _ADAPTERS.popitem(last=False)
    return adapter


def with_recognizer_policy(adapter: IdAdapter, entry: Optional[dict], policy: str) -> IdAdapter:
    """A shallow copy of the (cached, shared) adapter carrying the face pack it needs and the recognizer_check policy."""
    need = expected_space(adapter.format, adapter.metadata.get("source_format"), (entry or {}).get("requires", ()))
    key = (id(adapter), policy, need)
    found = _WITH_POLICY.get(key)
    if found is not None and found[0] is adapter:
        _WITH_POLICY.move_to_end(key)
        return found[1]  # the same ID_ADAPTER object for the same file and settings (ComfyUI's caching stays warm)
    extras = dict(adapter.extras)
    extras["recognizer_check"] = policy
    if need:
        extras["face_pack"] = need
    derived = dataclasses.replace(adapter, extras=extras)
    _WITH_POLICY[key] = (adapter, derived)
    while len(_WITH_POLICY) > 3 * _KEEP:
        _WITH_POLICY.popitem(last=False)
    return derived


def describe(adapter: IdAdapter, choice: str, verified: Optional[str]) -> str:
    lines = [f"file: {choice} ({adapter.metadata.get('file', '')})"]
    fmt = KNOWN_FORMATS.get(adapter.format, adapter.format)
    if adapter.format == "native":
        fmt += f" (from {adapter.metadata.get('source_format', 'native')})"
    lines.append(f"format: {fmt}; mechanism: {adapter.mechanism}")
    lines.append(f"base model: {BASE_NAMES.get(adapter.base, adapter.base)} (text context {adapter.context_dim}); layers with weights: {len(adapter.layers)}")
    p = adapter.projector
    if p is not None:
        lines.append(f"identity tokens: {p.num_tokens} x {p.token_dim} from {INPUT_KIND_WORDS.get(p.input_kind, p.input_kind)} ({type(p).__name__})")
    else:
        lines.append("identity tokens: none (this file has no token projector)")
    need = adapter.extras.get("face_pack")
    if need:
        lines.append(f"face pack: {need} (its {SPACES[need].file} embedding is what this adapter was trained on; "
                     f"recognizer_check: {adapter.extras.get('recognizer_check', 'error')})")
    for key in ("identity_input", "faceid_plus_version", "face_structure", "pulid_version", "requires", "note"):
        if adapter.metadata.get(key):
            lines.append(f"{key.replace('_', ' ')}: {adapter.metadata[key]}")
    lora = adapter.extras.get("lora")
    if isinstance(lora, dict):
        lines.append(f"LoRA in the file: {lora['layers']} layers, rank {lora['rank']} (not applied). {lora['note']}")
    lines.append(f"sha256: verified ({verified[:16]}...)" if verified else "sha256: not checked (turn on verify_sha256 to compare with the published file)")
    return "\n".join(lines)


class LoadIdentityAdapter:
    NODE_ID = "IdentityAttentionLoadIdentityAdapter"
    DISPLAY_NAME = "Load identity adapter"
    CATEGORY = f"{CATEGORY}/weights"
    DESCRIPTION = (
        "Loads identity-adapter weights for the attention nodes: IP-Adapter (plus, plus-face, full-face), IP-Adapter-FaceID and "
        "FaceID-Plus(V2), InstantID, PuLID, FaceChain-FACT, PVA, or this pack's own files. The kind of file is recognised from its "
        "contents, and it is checked against the model it will patch. Put files in models/ipadapter, models/instantid, models/pulid "
        f"or models/identity_attention ({DOWNLOAD_HINT} download ID fetches the known ones)."
    )
    RETURN_TYPES = ("ID_ADAPTER", "STRING")
    RETURN_NAMES = ("id_adapter", "info")
    OUTPUT_TOOLTIPS = (
        "The identity adapter: connect it to an Identity Attention attention node together with the same model.",
        "What was loaded: format, base model, token count, what identity features it reads, and anything still needed (a LoRA, an encoder).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter": (adapter_choices(), {"tooltip": "The adapter file, as <model folder>/<file name>. The loader works out which kind of adapter it is from the file itself."}),
                "model": ("MODEL", {"tooltip": "The model this adapter will patch. It is only read, to check that the adapter was made for it (SD1.5, SD2 or SDXL, same layer sizes)."}),
            },
            "optional": {
                "verify_sha256": ("BOOLEAN", {"default": False, "tooltip": "Compare the file with the published one (sha256) before loading. Slow for big files the first time; works for files listed in weights_manifest.json under their listed names."}),
                "recognizer_check": (list(RECOGNIZER_CHECKS), {"default": "error", "tooltip": "FaceID adapters were trained on buffalo_l's face embedding, InstantID and PuLID on antelopev2's. error: an identity from the other face pack stops the run with the fix. warn: only log it. off: do not check (for people who know their recognizer gives the same embedding)."}),
                "faceid_v2_structure": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": FACE_STRUCTURE_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, adapter):
        """A file that is not there is reported before anything runs: which file, where it goes, how to download it."""
        return check_weight_choice(adapter, ADAPTER_FOLDERS, node=cls.DISPLAY_NAME, input_name="adapter", node_id=cls.NODE_ID, prefixed=True)

    def load(self, adapter, model, verify_sha256=False, recognizer_check="error", faceid_v2_structure=1.0):
        node = self.DISPLAY_NAME
        path, _ = resolve_weight_choice(adapter, ADAPTER_FOLDERS, node=node, input_name="adapter", node_id=self.NODE_ID, prefixed=True)
        folder, _, name = str(adapter).replace("\\", "/").partition("/")  # resolve_weight_choice checked the form
        roots = folder_list(folder)
        manifest = manifest_or_none()
        entry = manifest.find(folder, name) if manifest is not None else None
        try:
            verified = _verify(path, folder, name, entry) if verify_sha256 else None
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="adapter", fix=err.fix) from None
        try:
            result = load_adapter_file(path, roots, entry, manifest)
        except WeightError as err:
            raise damaged_weight_file(err, path, entry, node=node, input_name="adapter") from None
        try:
            check_against_model(result, cross_attention_layers(model))
        except WeightError as err:
            raise IdentityAttentionError(err.problem, node=node, input_name="model", fix=err.fix) from None
        if recognizer_check not in RECOGNIZER_CHECKS:
            raise IdentityAttentionError(f"unknown recognizer_check '{recognizer_check}'", node=self.DISPLAY_NAME,
                                         input_name="recognizer_check", fix=f"choose one of {', '.join(RECOGNIZER_CHECKS)}")
        result = with_face_structure(result, faceid_v2_structure)  # a new ID_ADAPTER: the cached one keeps the published 1.0
        result = with_recognizer_policy(result, entry, recognizer_check)
        info = describe(result, adapter, verified)
        if faceid_v2_structure != 1.0 and not has_face_structure(result):
            info += "\nfaceid_v2_structure: ignored (only FaceID-PlusV2 files have a face-structure weight)"
        return (result, info)


NODES = [LoadIdentityAdapter]
