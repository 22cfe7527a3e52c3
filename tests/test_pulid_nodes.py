"""PuLID from a graph: the EVA-CLIP / face-parsing loaders and 'Encode PuLID face features', then the attention node."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import folder_paths
from conftest import pack
from layer_harness import layer_inputs, run_layer, unpatched
from test_pulid_encoders import OPENAI_MEAN, OPENAI_STD, bisenet_reference, eva_reference
from weight_fixtures import bisenet_state, pulid_comfyui_state, pulid_state, tiny_eva_state

nodes = pack("nodes.identity.pulid_nodes")
attention_nodes = pack("nodes.pva.parallel_attention_nodes")
errors = pack("nodes.common.errors")
identity_mod = pack("adapters.faces.identity")
face_image = pack("adapters.faces.pulid_face_image")
formats = pack("adapters.formats.weight_formats")

TEMPLATE = torch.tensor([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]])
SDXL_KEY = ("input", 4, 0)


@contextlib.contextmanager
def model_folders(tmp_path, *names):
    """Point ComfyUI's folders ``names`` at fresh folders under tmp_path for the duration."""
    saved = {n: folder_paths.folder_names_and_paths.get(n) for n in names}
    try:
        for n in names:
            (tmp_path / n).mkdir(exist_ok=True)
            folder_paths.folder_names_and_paths[n] = ([str(tmp_path / n)], {".pt", ".pth", ".safetensors"})
        yield {n: tmp_path / n for n in names}
    finally:
        for n, entry in saved.items():
            if entry is None:
                folder_paths.folder_names_and_paths.pop(n, None)
            else:
                folder_paths.folder_names_and_paths[n] = entry
            # ComfyUI 0.3's file-list cache would keep listing tmp_path, which is deleted after a passed test:
            # a later INPUT_TYPES would stat the missing folder (FileNotFoundError)
            getattr(folder_paths, "filename_list_cache", {}).pop(n, None)


def photo_identity(count=2, seed=0):
    """Reference photos [count, 120, 100, 3] and an IDENTITY whose landmarks sit on them (the second flipped)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 120, 100, 3, generator=gen)
    faces = []
    for i in range(count):
        kps = TEMPLATE * (0.2 + 0.02 * i) + torch.tensor([-5.0, -10.0])
        faces.append(identity_mod.FaceRecord(
            image_index=i, image_size=(120, 100), bbox=torch.tensor([30.0, 30.0, 70.0, 80.0]), landmarks=kps, det_score=0.9,
            embedding=torch.randn(512, generator=gen), crop=torch.zeros(112, 112, 3), flipped=i == 1,
        ))
    return images, identity_mod.Identity(faces=tuple(faces), recognizer="antelopev2/glintr100.onnx")


def tiny_eva(seed=1):
    """Tiny EVA with the release's output width (768) and PuLID fixture's EVA width (32: one head of 32)."""
    sd = tiny_eva_state(seed=seed, width=32, mlp_hidden=48, embed_dim=768)
    return sd, nodes.EvaClip(pack("adapters.faces.eva_clip_vision").EvaVisionTransformer.from_state_dict(sd), "tiny-eva.pt")


def test_loaders_read_the_model_folders(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_eva_state(seed=2)
    with model_folders(tmp_path, "clip_vision", "pulid", "facexlib") as where:
        torch.save(sd, where["clip_vision"] / "EVA02_CLIP_L_336_psz14_s6B.pt")
        save_file({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, str(where["pulid"] / "eva_visual.safetensors"))
        torch.save(bisenet_state(seed=1), where["facexlib"] / "parsing_bisenet.pth")
        assert "clip_vision/EVA02_CLIP_L_336_psz14_s6B.pt" in nodes.LoadEvaClip.INPUT_TYPES()["required"]["eva_clip_name"][0]
        assert "facexlib/parsing_bisenet.pth" in nodes.LoadFaceParsing.INPUT_TYPES()["required"]["parsing_name"][0]
        a = nodes.LoadEvaClip().load("clip_vision/EVA02_CLIP_L_336_psz14_s6B.pt")[0]
        b = nodes.LoadEvaClip().load("pulid/eva_visual.safetensors")[0]
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
        parsing = nodes.LoadFaceParsing().load("facexlib/parsing_bisenet.pth")[0]
        assert isinstance(parsing, nodes.FaceParsing)
        with pytest.raises(errors.IdentityAttentionError, match="Load EVA-CLIP.*eva_clip_name.*outside the model folders"):
            nodes.LoadEvaClip().load("pulid/../facexlib/parsing_bisenet.pth")
        # the wrong file in each loader: one clear error naming node, input and the file to use
        torch.save(bisenet_state(seed=1), where["clip_vision"] / "wrong.pth")
        with pytest.raises(errors.IdentityAttentionError, match="eva_clip_name.*EVA02_CLIP_L_336_psz14_s6B.pt"):
            nodes.LoadEvaClip().load("clip_vision/wrong.pth")
        with pytest.raises(errors.IdentityAttentionError, match="parsing_name.*not a file from models/facexlib, models/pulid"):
            nodes.LoadFaceParsing().load("clip_vision/EVA02_CLIP_L_336_psz14_s6B.pt")
        torch.save(sd, where["pulid"] / "eva.pt")
        with pytest.raises(errors.IdentityAttentionError, match="parsing_name.*parsing_bisenet.pth"):
            nodes.LoadFaceParsing().load("pulid/eva.pt")


def test_encode_fills_eva_fields_as_pulid_computes_them():
    """aligned 512 face -> BiSeNet labels -> white background / grey face -> EVA (float64 references)."""
    images, identity = photo_identity()
    eva_sd, eva_clip = tiny_eva()
    parse_sd = bisenet_state(seed=4)
    parsing = nodes.FaceParsing(pack("adapters.faces.face_parsing").BiSeNet.from_state_dict(parse_sd), "parsing_bisenet.pth")
    out, preview = nodes.EncodePuLIDFeatures().encode(eva_clip, identity, images, parsing)
    assert out.eva_clip_embeds.shape == (2, 768) and out.eva_clip_hidden.shape == (2, 5, 10, 32)
    assert preview.shape == (2, 512, 512, 3)
    assert identity.eva_clip_embeds is None  # the input IDENTITY is not changed
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    bg_classes = torch.tensor([0, 16, 18, 7, 8, 9, 14, 15])
    for r, face in enumerate(identity.faces):
        photo = images[r].permute(2, 0, 1)
        photo = torch.flip(photo, dims=[-1]) if face.flipped else photo
        aligned = face_image.align_face_512(photo, face.landmarks).unsqueeze(0).double()
        labels = bisenet_reference(parse_sd, (aligned - mean) / std).argmax(1)
        bg = torch.isin(labels, bg_classes)
        gray = 0.299 * aligned[:, 0] + 0.587 * aligned[:, 1] + 0.114 * aligned[:, 2]
        expected = torch.where(bg, torch.ones_like(gray), gray).clamp(0, 1)
        agree = (preview[r, ..., 0].double() - expected[0]).abs() < 1e-4
        assert agree.float().mean() > 0.999  # argmax ties at float32 noise may flip a few pixels
        assert torch.equal(preview[r, ..., 0], preview[r, ..., 2])  # grey
        pixels = F.interpolate(preview[r].permute(2, 0, 1).unsqueeze(0).double(), size=(42, 42), mode="bicubic", align_corners=False)
        ref_e, ref_h = eva_reference(eva_sd, (pixels - OPENAI_MEAN) / OPENAI_STD, heads=1)
        torch.testing.assert_close(out.eva_clip_embeds[r : r + 1].double(), ref_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.eva_clip_hidden[r : r + 1].double(), ref_h, rtol=1e-4, atol=1e-4)
    assert any("parsing_bisenet.pth" in n for n in out.notes)


def test_encode_without_parsing_warns_and_keeps_the_face_crop(caplog):
    images, identity = photo_identity(count=1)
    _, eva_clip = tiny_eva()
    with caplog.at_level("WARNING"):
        out, preview = nodes.EncodePuLIDFeatures().encode(eva_clip, identity, images)
    assert any("no face parsing model" in n for n in out.notes)
    assert "no face parsing model" in caplog.text
    face = identity.faces[0]
    aligned = face_image.align_face_512(images[0].permute(2, 0, 1), face.landmarks).unsqueeze(0)
    gray = face_image.to_gray(aligned)[0].permute(1, 2, 0)
    torch.testing.assert_close(preview[0, 100:], gray[100:].clamp(0, 1))  # below the banner: the whole grey crop
    assert (preview[0, :20, :200, 0] > preview[0, :20, :200, 1] + 0.3).any()  # the red banner says so


def test_encode_refuses_other_photos():
    images, identity = photo_identity(count=2)
    _, eva_clip = tiny_eva()
    with pytest.raises(errors.IdentityAttentionError, match="images.*only 1 images"):
        nodes.EncodePuLIDFeatures().encode(eva_clip, identity, images[:1])
    with pytest.raises(errors.IdentityAttentionError, match="images.*same reference images"):
        nodes.EncodePuLIDFeatures().encode(eva_clip, identity, images[:, :100])
    with pytest.raises(errors.IdentityAttentionError, match="eva_clip"):
        nodes.EncodePuLIDFeatures().encode("not a model", identity, images)


@pytest.mark.parametrize("layout", ["official", "pulid_comfyui"])
def test_pulid_graph_on_tiny_sdxl(tiny, layout):
    """Encode -> PuLID adapter (either file layout) -> Apply parallel visual attention: tokens from the EVA fields,
    the identity changes the layer, weight 0 is the unpatched layer bit for bit."""
    images, identity = photo_identity(count=1)
    _, eva_clip = tiny_eva()
    encoded, _ = nodes.EncodePuLIDFeatures().encode(eva_clip, identity, images)
    state, _ = pulid_state("v1", seed=5)
    adapter = formats.convert(state if layout == "official" else pulid_comfyui_state(state))
    model = tiny.unet("sdxl")
    node = attention_nodes.ApplyParallelAttention()
    with pytest.raises(errors.IdentityAttentionError, match="EVA02-CLIP"):
        node.apply(model, adapter, identity, 0.8, 0.0, 1.0, "both", "decoupled", "adapter", "fused")
    patched = node.apply(model, adapter, encoded, 0.8, 0.0, 1.0, "both", "decoupled", "adapter", "fused", pulid_method="fidelity")[0]
    inputs = layer_inputs(patched, SDXL_KEY, grid=(8, 8), rows=1)
    assert not torch.allclose(run_layer(patched, inputs), unpatched(inputs))
    off = node.apply(model, adapter, encoded, 0.0, 0.0, 1.0, "both", "decoupled", "adapter", "fused", pulid_method="fidelity")[0]
    assert torch.equal(run_layer(off, inputs), unpatched(inputs))
