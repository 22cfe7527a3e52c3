"""The stand-in files the demo and the workflow tests write are what the real loaders accept.

Every adapter the manifest lists for the loader node is written under its released name and
size and loaded by the pack's real node against a tiny model of its base; the toy face pack
under a real pack name finds the face of the generated reference photo; the tiny CLIP vision
has the real models' widths; the companion LoRAs patch every key they name.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import pack
from harness import provisioning as prov
from harness.host import Instance

import folder_paths  # noqa: E402  (the in-process host, set up by conftest)

weights_nodes = pack("nodes.identity.weights_nodes")
fa = pack("adapters.faces.face_analysis")

ADAPTER_ENTRIES = [e for e in prov.manifest_entries() if "IdentityAttentionLoadIdentityAdapter" in e["nodes"]]
LORA_ENTRIES = [e for e in prov.manifest_entries() if e["format"] == "lora"]


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """An instance whose adapter folders are the in-process host's folders."""
    instance = Instance(tmp_path)
    for name in weights_nodes.ADAPTER_FOLDERS:
        (instance.models / name).mkdir(parents=True)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(instance.models / name)], {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {}, raising=False)
    weights_nodes._ADAPTERS.clear()
    return instance


def test_the_manifest_lists_adapters_of_every_kind():
    assert {e["format"] for e in ADAPTER_ENTRIES} >= {"ip_adapter", "ip_adapter_plus", "ip_adapter_full_face", "faceid", "faceid_plus", "instantid", "pulid", "fact"}


@pytest.mark.parametrize("entry", ADAPTER_ENTRIES, ids=[e["id"] for e in ADAPTER_ENTRIES])
def test_adapter_stand_in_loads_through_the_real_node(scratch, tiny, entry):
    choice = f"{entry['folder']}/{entry['file']}"
    path = prov.write_adapter_file(scratch, choice)
    size = os.path.getsize(path)
    if entry["bytes"]:
        assert size == entry["bytes"]  # the loader's "incomplete download" check passes
        assert os.stat(path).st_blocks * 512 < size / 2  # ...without the disk space: the rest is a hole
    node = weights_nodes.LoadIdentityAdapter()
    try:
        adapter, info = node.load(choice, tiny.unet(entry["base"]))  # also checks it against the model
    finally:
        path.unlink()  # SDXL stand-ins hold ~60 MB of real tensors; pytest keeps old tmp folders
    assert adapter.format == entry["format"] and adapter.base == entry["base"]
    assert len(adapter.layers) == (16 if entry["base"] == "sd15" else 70)
    assert info.startswith(f"file: {choice}")


def test_unlisted_names_follow_the_name_and_the_workflow(scratch, tiny):
    prov.write_adapter_file(scratch, "ipadapter/my-faceid-plus.safetensors", {"arch": "sdxl"})
    adapter, _ = weights_nodes.LoadIdentityAdapter().load("ipadapter/my-faceid-plus.safetensors", tiny.unet("sdxl"))
    assert (adapter.format, adapter.base) == ("faceid_plus", "sdxl")
    node = {"class_type": "IdentityAttentionLoadIdentityAdapter", "inputs": {"adapter": "identity_attention/mine.bin", "model": ["1", 0], "verify_sha256": True}}
    out = prov.PROVISIONERS["IdentityAttentionLoadIdentityAdapter"](node, scratch, {"arch": "sd15"})
    assert out["inputs"]["verify_sha256"] is False  # no synthetic file has the published sha256
    adapter, _ = weights_nodes.LoadIdentityAdapter().load("identity_attention/mine.bin", tiny.unet("sd15"))
    assert (adapter.format, adapter.base) == ("ip_adapter", "sd15")


def test_hole_keeps_the_archive_readable(tmp_path):
    obj = {"a": torch.arange(6.0), "nested": {"b": torch.ones(2, 3, dtype=torch.float16)}}
    path = tmp_path / "padded.bin"
    prov.write_with_hole(prov.torch_zip_bytes(obj), path, 3 * 2**30)
    assert os.path.getsize(path) == 3 * 2**30 and os.stat(path).st_blocks * 512 < 2**20
    with open(path, "rb") as f:
        loaded = torch.load(f, weights_only=True)
    assert torch.equal(loaded["a"], obj["a"]) and torch.equal(loaded["nested"]["b"], obj["nested"]["b"])


def test_face_pack_finds_the_face_of_every_reference_photo(tmp_path):
    instance = Instance(tmp_path)
    folder = prov.write_face_pack(instance, "antelopev2")
    assert sorted(p.name for p in folder.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    assert sorted(p.name for p in prov.write_face_pack(instance, "buffalo_l").iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    model = fa.load_face_analysis(folder, "CPU", 640, name="antelopev2")
    embeddings = []
    for name in ("reference_face.png", "person_b.png"):
        photo = prov.reference_photo(name)
        assert photo.shape == (*prov.PHOTO_SIZE, 3)
        (face,) = model.detect(fa.rgb_to_bgr(photo))
        x, y, side = prov.FACE_BOX
        np.testing.assert_allclose(face.bbox[:4], [x, y, x + side, y + side], atol=1.0)
        bgr = fa.rgb_to_bgr(photo)
        (embedding,) = model.embed([model.align(bgr, face.kps)])
        embeddings.append(embedding / np.linalg.norm(embedding))
    assert float(embeddings[0] @ embeddings[1]) < 1 - 1e-6  # two file names, two "people" (the toy recognizer sees little)
    assert np.array_equal(prov.reference_photo("reference_face.png"), prov.reference_photo("reference_face.png"))


@pytest.mark.parametrize("clip_name, hidden, embeds", [
    ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", 1280, 1024),
    ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", 1664, 1280),
])
def test_tiny_clip_vision_has_the_real_widths(clip_name, hidden, embeds):
    from testkit import clip_vision

    node = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}}
    swapped = prov.PROVISIONERS["CLIPVisionLoader"](node, None, {})
    assert swapped["class_type"] == "IdentityAttentionTestKit_TinyClipVision"
    (model,) = clip_vision.TinyClipVision().load(**swapped["inputs"])
    with torch.inference_mode():
        out = model.encode_image(torch.rand(2, 224, 224, 3))
    assert tuple(out["penultimate_hidden_states"].shape) == (2, 50, hidden) and tuple(out["image_embeds"].shape) == (2, embeds)
    assert torch.isfinite(out["image_embeds"]).all() and out["image_embeds"][0].std() > 0


@pytest.mark.parametrize("entry", LORA_ENTRIES[:1] + [e for e in LORA_ENTRIES if e["base"] == "sdxl"][:1], ids=lambda e: e["id"])
def test_companion_lora_patches_every_key_it_names(tmp_path, tiny, entry):
    import comfy.lora

    node = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": entry["file"], "strength_model": 1.0}}
    prov.PROVISIONERS["LoraLoaderModelOnly"](node, Instance(tmp_path), {})
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "models" / "loras" / entry["file"]))
    key_map = comfy.lora.model_lora_keys_unet(tiny.unet(entry["base"]).model, {})
    patches = comfy.lora.load_lora(state, key_map)
    assert len(patches) == len(state) // 2 == 2 * (16 if entry["base"] == "sd15" else 70)
