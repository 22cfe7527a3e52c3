"""The encode nodes in-process: outputs, CLIP vision through ComfyUI's own model, errors, no insightface."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

import toy_faces as toy
from conftest import pack

fa = pack("adapters.faces.face_analysis")
nodes = pack("nodes.identity.identity_nodes")
errors = pack("nodes.common.errors")


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "insightface"
    toy.copy_pack(toy.toy_pack(), root / "models" / "toypack")
    return root


@pytest.fixture
def folders(monkeypatch, insightface_root):
    monkeypatch.setattr(nodes, "folder_list", lambda name: [str(insightface_root)] if name == "insightface" else [])
    return insightface_root


@pytest.fixture(scope="module")
def face_model(insightface_root):
    return fa.load_face_analysis(insightface_root / "models" / "toypack", "CPU", 640, name="toypack")


def image(array_uint8):
    return torch.from_numpy(array_uint8).float().div(255.0).unsqueeze(0)


def photo(size=32, x=256, y=192, height=480, width=640, texture=None):
    img = toy.blank(height, width)
    box = toy.plant(img, x, y, size, texture if texture is not None else toy.astronaut_face())
    return img, box


def encode(model, images, **kw):
    options = dict(face="largest", face_index=0, retry_smaller_sizes=True, flip_augment=False, mask_grow=1.2, mask_feather=0.25)
    options.update(kw)
    listed = {k: [v] for k, v in options.items()}  # INPUT_IS_LIST: ComfyUI passes every input as a list
    if "clip_vision" in listed:
        listed["clip_vision"] = [options["clip_vision"]]
    return nodes.EncodeIdentity().encode([model], images if isinstance(images, list) else [images], **listed)


def test_node_definitions_have_tooltips_everywhere():
    for cls in nodes.NODES:
        assert cls.NODE_ID.startswith("IdentityAttention") and cls.CATEGORY == "identity_attention/encode"
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, (kind, opts) in section.items():
                assert opts.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    registry = pack("nodes")
    for cls in nodes.NODES:
        assert registry.NODE_CLASS_MAPPINGS[cls.NODE_ID] is cls


def test_load_node_lists_packs_and_loads(folders):
    spec = nodes.LoadFaceAnalysis.INPUT_TYPES()["required"]
    assert spec["pack"][0] == ["toypack"] and spec["provider"][0] == ["auto", "CUDA", "CPU"]
    model, info = nodes.LoadFaceAnalysis().load("toypack", "CPU", 640)
    assert isinstance(model, fa.FaceAnalysisModel) and model.name == "toypack"
    assert "provider: CPU (chosen)" in info and "WARNING: recognizer toypack/w600k_r50.onnx: not identified" in info


def test_load_node_without_packs_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setattr(nodes, "folder_list", lambda name: [str(tmp_path / "insightface")])
    spec = nodes.LoadFaceAnalysis.INPUT_TYPES()["required"]
    assert spec["pack"][0] == [nodes.NO_PACKS]
    with pytest.raises(errors.IdentityAttentionError) as err:
        nodes.LoadFaceAnalysis().load(nodes.NO_PACKS, "auto", 640)
    text = str(err.value)
    assert text.startswith("Load face analysis model: input 'pack': no face analysis pack was found")
    assert str(tmp_path / "insightface" / "models") in text and "det_10g.onnx" in text and "glintr100.onnx" in text
    assert "weights download buffalo_l" in text and "weights download antelopev2" in text  # the manifest's packs, with commands
    assert nodes.LoadFaceAnalysis.VALIDATE_INPUTS(nodes.NO_PACKS) == text  # before the prompt runs: the same one error
    with pytest.raises(errors.IdentityAttentionError) as err:
        nodes.LoadFaceAnalysis().load("antelopev2", "auto", 640)
    text = str(err.value)
    assert "'antelopev2' is not downloaded yet: it is the antelopev2 set of 5 files" in text and "models/insightface/models/antelopev2/" in text
    assert "weights download antelopev2`" in text and nodes.LoadFaceAnalysis.VALIDATE_INPUTS("antelopev2") == text
    with pytest.raises(errors.IdentityAttentionError, match="'mypack' not found"):  # a pack the manifest does not know: the layout
        nodes.LoadFaceAnalysis().load("mypack", "auto", 640)
    assert nodes.LoadFaceAnalysis.VALIDATE_INPUTS(None) is True


def test_encode_node_outputs(face_model):
    a, box_a = photo()
    b, box_b = photo(size=16, x=96, y=32, height=200, width=320, texture=toy.noise_texture(4))  # another size: a second list item
    identity, crops, masks, previews = encode(face_model, [image(a), torch.cat([image(b), image(b)])], flip_augment=True)
    assert identity.count == 6 and [f.image_index for f in identity.faces] == [0, 0, 1, 1, 2, 2]
    assert crops.shape == (6, 112, 112, 3) and torch.equal(crops[1], identity.faces[1].crop)
    assert [m.shape for m in masks] == [(1, 480, 640), (2, 200, 320)]
    assert [p.shape for p in previews] == [(1, 480, 640, 3), (2, 200, 320, 3)]
    # the mask covers the chosen face, nothing far away
    cx, cy = (box_a[0] + box_a[2]) // 2, (box_a[1] + box_a[3]) // 2
    assert masks[0][0, cy, cx] == 1.0 and masks[0][0, 0, 0] == 0.0
    # the preview shows the chosen face's box in green
    green = torch.tensor(pack("adapters.faces.face_visuals").GREEN)
    assert torch.equal(previews[1][1, box_b[1] + 4, box_b[2]], green)


def test_encode_node_errors_are_for_artists(face_model):
    good, _ = photo()
    with pytest.raises(errors.IdentityAttentionError) as err:
        encode(face_model, torch.cat([image(good), image(toy.blank(480, 640))]))
    text = str(err.value)
    assert text.startswith("Encode identity: input 'images': no face found in reference image 2")
    assert "Fix: use a clearer frontal photo or lower det_size" in text
    with pytest.raises(errors.IdentityAttentionError, match="connect Load face analysis model"):
        encode("not a model", image(good))


def tiny_clip_vision(tmp_path):
    """A ComfyUI CLIP vision model (comfy.clip_vision.ClipVisionModel) of a tiny config, random weights."""
    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 224,
              "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-5,
              "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 3,
              "patch_size": 32, "projection_dim": 24, "torch_dtype": "float32"}
    path = tmp_path / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    gen = torch.Generator().manual_seed(0)
    model.load_sd({k: torch.randn(v.shape, generator=gen) * 0.05 + (1.0 if "norm" in k and k.endswith(".weight") else 0.0)
                   for k, v in model.get_sd().items()})
    return model


def test_clip_vision_features_of_the_aligned_crops(face_model, tmp_path):
    clip_vision = tiny_clip_vision(tmp_path)
    a, box = photo()
    b, _ = photo(texture=toy.noise_texture(5))
    with torch.inference_mode():  # as ComfyUI runs every prompt
        identity, *_ = encode(face_model, torch.cat([image(a), image(b)]), clip_vision=clip_vision, flip_augment=True)
        # by hand: the 224x224 norm_crop of each chosen face (and its mirror), through ComfyUI's encode_image
        crops = []
        for arr in (a, b):
            bgr = fa.rgb_to_bgr(arr)
            (f,) = face_model.detect(bgr)
            c = face_model.align(bgr, f.kps, 224)[..., ::-1]
            crops += [c, c[:, ::-1]]
        pixels = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).float() / 255.0
        out = clip_vision.encode_image(pixels)
        zero = clip_vision.encode_image(torch.zeros(1, 224, 224, 3))
    assert identity.clip_hidden.shape == (4, 50, 32) and identity.clip_embeds.shape == (4, 24)
    torch.testing.assert_close(identity.clip_hidden, out["penultimate_hidden_states"].float(), rtol=0, atol=0)
    torch.testing.assert_close(identity.clip_embeds, out["image_embeds"].float(), rtol=0, atol=0)
    torch.testing.assert_close(identity.clip_hidden_uncond, zero["penultimate_hidden_states"].float(), rtol=0, atol=0)
    torch.testing.assert_close(identity.clip_embeds_uncond, zero["image_embeds"].float(), rtol=0, atol=0)
    assert not torch.allclose(identity.clip_embeds[0], identity.clip_embeds[2])
    features = identity.features(per_reference=False)
    assert features.clip_hidden.shape == (1, 50, 32) and features.clip_embeds_uncond.shape == (1, 24)


def test_clip_vision_output_is_read_version_tolerantly():
    hidden, embeds = torch.randn(2, 5, 8), torch.randn(2, 4)

    class Output:  # ComfyUI's (early 2024 and 0.3.x): attributes, item access through getattr
        def __getitem__(self, key):
            return getattr(self, key)

    new = Output()
    new.penultimate_hidden_states, new.image_embeds, new.last_hidden_state = hidden, embeds, hidden + 1
    layers = tuple(torch.randn(2, 5, 8) for _ in range(3)) + (hidden, torch.randn(2, 5, 8))

    class TransformersStyle:  # older hosts: transformers' CLIPVisionModelOutput with every layer's states
        image_embeds = embeds
        hidden_states = layers

    for out in (new, TransformersStyle(), {"penultimate_hidden_states": hidden, "image_embeds": embeds}):
        h, e = nodes.clip_vision_outputs(out)
        assert torch.equal(h, hidden) and torch.equal(e, embeds)
    with pytest.raises(errors.IdentityAttentionError, match="no penultimate hidden states"):
        nodes.clip_vision_outputs({"last_hidden_state": hidden})


def test_similarity_node(face_model):
    a, _ = photo()
    identity, *_ = encode(face_model, image(a))
    other, _ = photo(texture=toy.noise_texture(9), x=64, y=64)
    scores, mean, preview = nodes.IdentitySimilarity().score(
        torch.cat([image(a), image(toy.blank(480, 640)), image(other)]), identity, face_model, "largest")
    assert isinstance(scores, list) and len(scores) == 3 and scores[1] == 0.0
    assert scores[0] == pytest.approx(1.0, abs=1e-6) and scores[2] < 0.999
    assert mean == pytest.approx((scores[0] + scores[2]) / 2)
    assert preview.shape == (3, 480, 640, 3)
    assert preview[1, :30].sum() > 0 and preview[1, 40:].sum() == 0  # "NO FACE" written on the blank image


def test_pack_loads_and_nodes_report_without_insightface(monkeypatch, folders):
    for module in ("insightface", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    reloaded = importlib.reload(nodes)  # the node module imports without them
    monkeypatch.setattr(reloaded, "folder_list", lambda name: [str(folders)])
    spec = reloaded.LoadFaceAnalysis.INPUT_TYPES()
    assert spec["required"]["pack"][0] == ["toypack"]  # listing packs needs no insightface
    with pytest.raises(errors.MissingDependencyError) as err:
        reloaded.LoadFaceAnalysis().load("toypack", "auto", 640)
    text = str(err.value).replace("'insightface>=2.1'", '"insightface>=2.1"')  # shell quoting differs per OS
    assert text.startswith("Load face analysis model: the Python package 'onnxruntime' is not installed")
    assert "-m pip install" in text and '"insightface>=2.1"' in text and "--no-deps" in text and "onnxruntime" in err.value.pip_command
    registry = importlib.reload(pack("nodes"))
    assert {"IdentityAttentionLoadFaceAnalysis", "IdentityAttentionEncodeIdentity", "IdentityAttentionModelInfo"} <= set(registry.NODE_CLASS_MAPPINGS)
