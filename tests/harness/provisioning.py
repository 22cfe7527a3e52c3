"""Provisioners for the files example workflows name (see tiny_swap.py).

Each one gets an API node, writes a synthetic stand-in of the file it names into the
instance (same folder, same name, the real format, shapes that fit the tiny models) and
returns the node, so the pack's real loader nodes run unchanged; or it swaps a loader of
ComfyUI's for a test-kit node.

- ``IdentityAttentionLoadFaceAnalysis``: the toy insightface pack (tests/toy_faces.py: SCRFD and
  ArcFace contracts) under the pack name the workflow asks for, with that pack's file names.
- ``LoadImage``: a reference photo the toy detector finds a face in (the astronaut's face from
  scikit-image, blended with noise seeded by the file name so different names are different
  people), saved under the name the workflow asks for.
- ``IdentityAttentionLoadIdentityAdapter``: an adapter file of the format and base that
  weights_manifest.json lists for that name (or the name suggests), with the released key
  names and the tiny models' channel counts (tests/weight_fixtures.py, 1/10 of the real
  widths). A name the manifest lists with its size gets that size: the loader refuses files
  smaller than the release (an interrupted download), so the file is written in PyTorch's zip
  format with a sparse hole before the zip directory, which no reader visits. It takes no disk
  space and loads in milliseconds; the loader recognises the format from the bytes, not the
  extension. ``verify_sha256`` is turned off: no synthetic file has the published hash.
- ``CLIPVisionLoader``: swapped for the test kit's tiny CLIP vision with the real widths of
  the file's model (ViT-H, ViT-bigG, or ViT-L/14 for XLabs' Flux IP-Adapter).
- ``LoraLoaderModelOnly`` / ``LoraLoader``: a small LoRA on every cross-attention key/value
  projection of the tiny model of the LoRA's base (FaceID's companion LoRAs).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

from .host import REPO, Instance
from .tiny_swap import PROVISIONERS, register  # noqa: F401

TINY_SCALE = 10  # the tiny models have 1/10 of the real channels (32/64/128 for 320/640/1280)
CONTEXT = {"sd15": 768, "sd2": 1024, "sdxl": 2048}


# --------------------------------------------------------------------------------------------- manifest


@lru_cache(maxsize=1)
def manifest_entries() -> Tuple[dict, ...]:
    with open(REPO / "weights_manifest.json") as f:
        return tuple(json.load(f)["entries"])


def manifest_entry(folder: str, name: str) -> Optional[dict]:
    for entry in manifest_entries():
        if entry["folder"] == folder and entry["file"] == name:
            return entry
    return None


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- face packs

# insightface's own file names per pack (the loader probes contracts, the names only look real)
PACK_FILES = {"antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
DEFAULT_PACK_FILES = ("det_10g.onnx", "w600k_r50.onnx")


def write_face_pack(instance: Instance, pack: str) -> Path:
    """The toy detector + recognizer as ``models/insightface/models/<pack>/``."""
    import toy_faces as toy

    source = toy.toy_pack()
    target = instance.models / "insightface" / "models" / pack
    target.mkdir(parents=True, exist_ok=True)
    detector, recognizer = PACK_FILES.get(pack, DEFAULT_PACK_FILES)
    for src, dst in (("det_10g.onnx", detector), ("w600k_r50.onnx", recognizer)):
        if not (target / dst).is_file():
            (target / dst).write_bytes((source / src).read_bytes())
    return target


@register("IdentityAttentionLoadFaceAnalysis")
def _face_analysis(node: dict, instance: Instance, context: dict) -> dict:
    pack = node["inputs"].get("pack")
    if isinstance(pack, str):
        write_face_pack(instance, pack)
    return node


# --------------------------------------------------------------------------------------------- photos

PHOTO_SIZE = (480, 640)  # height, width
FACE_BOX = (256, 192, 32)  # x, y, side: one cell of the toy detector's stride-32 grid at det_size 640


def reference_photo(name: str):
    """``[H, W, 3]`` uint8: a dark gradient with one face the toy detector finds at det_size 640."""
    import numpy as np

    import toy_faces as toy

    h, w = PHOTO_SIZE
    ys = np.linspace(0.0, 1.0, h)[:, None, None]
    xs = np.linspace(0.0, 1.0, w)[None, :, None]
    tint = np.array([0.55, 0.75, 1.0])[None, None, :]
    image = (10 + 30 * (0.6 * ys + 0.4 * xs) * tint).round().astype(np.uint8)  # 10..40: far darker than a face
    face = toy.astronaut_face().astype(np.float32)
    noise = toy.noise_texture(_seed_of(name), size=face.shape[0]).astype(np.float32)
    texture = (0.7 * face + 0.3 * noise).round().astype(np.uint8)  # a different "person" per file name
    x, y, side = FACE_BOX
    toy.plant(image, x, y, side, texture)
    return image


@register("LoadImage")
def _load_image(node: dict, instance: Instance, context: dict) -> dict:
    from PIL import Image

    name = node["inputs"].get("image")
    if isinstance(name, str) and name:
        path = instance.input / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            Image.fromarray(reference_photo(name)).save(path)
    return node


# --------------------------------------------------------------------------------------------- adapters

NAME_FORMATS = (  # (substring of the lowercased name, format), first match wins
    ("faceid-plus", "faceid_plus"), ("faceid_plus", "faceid_plus"), ("faceid", "faceid"), ("full-face", "ip_adapter_full_face"),
    ("plus", "ip_adapter_plus"), ("pulid", "pulid"), ("instantid", "instantid"), ("fact", "fact"), ("pva", "pva"),
)


def adapter_format(folder: str, name: str, entry: Optional[dict]) -> str:
    if entry is not None and entry.get("format") not in (None, "native"):
        return entry["format"]
    if folder == "instantid":
        return "instantid"
    lowered = name.lower()
    return next((fmt for hint, fmt in NAME_FORMATS if hint in lowered), "ip_adapter")


def adapter_base(name: str, entry: Optional[dict], context: dict) -> str:
    if entry is not None and entry.get("base") in ("sd15", "sdxl"):
        return entry["base"]
    lowered = name.lower()
    if "sdxl" in lowered or "_xl" in lowered:
        return "sdxl"
    if "sd15" in lowered or "sd1.5" in lowered:
        return "sd15"
    return context.get("arch", "sd15")


def adapter_state(fmt: str, base: str, name: str, seed: int):
    """The synthetic checkpoint (a flat state dict; PVA's is nested as released), in float16 as released."""
    import torch

    import weight_fixtures as wf

    half = torch.float16
    if fmt in ("ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid", "faceid_plus", "instantid"):
        lora = 4 if fmt in ("faceid", "faceid_plus") else 0  # the FaceID releases carry their LoRA in the file
        state, _ = wf.ip_family_state(fmt, "sdxl" if fmt == "instantid" else base, scale=TINY_SCALE, seed=seed, dtype=half, lora_rank=lora)
        return state
    if fmt == "pulid":
        version = "v1.1" if "v1.1" in name or "v11" in name else "v1"
        state, _ = wf.pulid_state(version, seed=seed, scale=TINY_SCALE, dtype=half)
        return state
    if fmt == "fact":
        state, _ = wf.fact_state(scale=TINY_SCALE, seed=seed, dtype=half)
        return state
    if fmt == "pva":
        ckpt, _ = wf.pva_checkpoint(scale=TINY_SCALE, seed=seed, dtype=half)
        return ckpt
    raise ValueError(f"no synthetic adapter for format {fmt!r}")


def torch_zip_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_with_hole(data: bytes, path: Path, total: int) -> None:
    """Write a zip archive (``data``) as a file of ``total`` bytes: a sparse hole before its directory.

    Zip readers find the central directory through the end records, so bytes between the
    last entry and the directory are never read; the offsets in the zip64 end record, its
    locator and (when not saturated) the classic end record move by the hole's size.
    """
    hole = total - len(data)
    if hole <= 0:
        path.write_bytes(data)
        return
    blob = bytearray(data)
    eocd = blob.rfind(b"PK\x05\x06")
    zip64 = blob.rfind(b"PK\x06\x06")
    locator = blob.rfind(b"PK\x06\x07")
    if min(eocd, zip64, locator) < 0:
        raise ValueError("expected a zip64 archive (torch.save writes one)")
    directory = struct.unpack_from("<Q", blob, zip64 + 48)[0]
    struct.pack_into("<Q", blob, zip64 + 48, directory + hole)
    struct.pack_into("<Q", blob, locator + 8, zip64 + hole)
    if struct.unpack_from("<I", blob, eocd + 16)[0] != 0xFFFFFFFF:
        struct.pack_into("<I", blob, eocd + 16, min(directory + hole, 0xFFFFFFFF))
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(blob[:directory])
        f.seek(hole, os.SEEK_CUR)
        f.write(blob[directory:])
    os.replace(tmp, path)


def write_adapter_file(instance: Instance, choice: str, context: Optional[dict] = None) -> Path:
    """Write the synthetic adapter for a loader choice ``<folder>/<file>``; returns its path."""
    from safetensors.torch import save_file

    import weight_fixtures as wf

    folder, _, name = choice.replace("\\", "/").partition("/")
    entry = manifest_entry(folder, name)
    fmt = adapter_format(folder, name, entry)
    base = adapter_base(name, entry, context or {})
    obj = adapter_state(fmt, base, name, seed=_seed_of(choice))
    path = instance.models / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    released = entry.get("bytes") if entry else None
    if name.endswith(".safetensors") and not released:
        save_file(dict(obj), str(path))
        return path
    if fmt in ("ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid", "faceid_plus", "instantid") and not name.endswith(".safetensors"):
        obj = wf.nested_ip(obj)  # the .bin releases nest {"image_proj": ..., "ip_adapter": ...}
    write_with_hole(torch_zip_bytes(obj), path, released or 0)
    return path


@register("IdentityAttentionLoadIdentityAdapter")
def _identity_adapter(node: dict, instance: Instance, context: dict) -> dict:
    choice = node["inputs"].get("adapter")
    if isinstance(choice, str) and "/" in choice:
        write_adapter_file(instance, choice, context)
    if "verify_sha256" in node["inputs"]:
        node["inputs"]["verify_sha256"] = False  # a synthetic file never has the published sha256
    return node


# --------------------------------------------------------------------------------------------- CLIP vision, LoRA


@register("CLIPVisionLoader")
def _clip_vision(node: dict, instance: Instance, context: dict) -> dict:
    from testkit.clip_vision import kind_of_file

    kind = kind_of_file(str(node["inputs"].get("clip_name", "")))
    return {"class_type": "IdentityAttentionTestKit_TinyClipVision", "inputs": {"kind": kind, "seed": 0}}


def lora_state(base: str, rank: int = 4, seed: int = 0) -> dict:
    """LoRA up/down pairs for every attn2 to_k / to_v of the tiny ``base`` UNet (kohya ``lora_unet_*`` keys, read by every host)."""
    import torch

    import weight_fixtures as wf

    gen = torch.Generator().manual_seed(seed)
    blocks = {"input": "input_blocks.{}.1", "output": "output_blocks.{}.1", "middle": "middle_block.1"}
    state = {}
    for _, hidden, (block, index, t) in wf.diffusers_attention_blocks(base):
        channels = hidden // TINY_SCALE
        path = f"{blocks[block].format(index)}.transformer_blocks.{t}.attn2"
        for proj in ("to_k", "to_v"):
            key = "lora_unet_" + f"{path}.{proj}".replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, CONTEXT[base], generator=gen) * 0.01
            state[f"{key}.lora_up.weight"] = torch.randn(channels, rank, generator=gen) * 0.01
    return state


def _lora(node: dict, instance: Instance, context: dict) -> dict:
    from safetensors.torch import save_file

    name = node["inputs"].get("lora_name")
    if isinstance(name, str) and name:
        entry = manifest_entry("loras", name)
        base = adapter_base(name, entry, context)
        path = instance.models / "loras" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(lora_state(base, seed=_seed_of(name)), str(path))
    return node


register("LoraLoaderModelOnly")(_lora)
register("LoraLoader")(_lora)


# Provisioners of other mechanisms live in sibling modules ``provisioning_<topic>.py``; importing
# this module registers them all.
def _register_siblings() -> None:
    import importlib

    for path in sorted(Path(__file__).parent.glob("provisioning_*.py")):
        importlib.import_module(f"{__package__}.{path.stem}")


_register_siblings()
