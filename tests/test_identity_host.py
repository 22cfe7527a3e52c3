"""The encode nodes in a real headless ComfyUI: listed with tooltips, and a prompt from LoadImage to SaveImage."""

from __future__ import annotations

import numpy as np
import pytest

import toy_faces as toy
from harness.server import PromptFailed

pytestmark = pytest.mark.host

NODE_IDS = ("IdentityAttentionLoadFaceAnalysis", "IdentityAttentionEncodeIdentity", "IdentityAttentionIdentitySimilarity")


@pytest.fixture(scope="module")
def toy_in_instance(instance):
    """The toy pack in the instance's models/insightface/models/, and test photos in its input/."""
    from PIL import Image

    toy.copy_pack(toy.toy_pack(), instance.models / "insightface" / "models" / "toypack")
    img = toy.blank(480, 640)
    box = toy.plant(img, 256, 192, 32, toy.astronaut_face())
    Image.fromarray(img).save(instance.input / "identity_face.png")
    Image.fromarray(toy.blank(200, 300, level=60)).save(instance.input / "identity_no_face.png")
    return {"image": img, "box": box}


def load_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_nodes_are_listed_with_tooltips(server):
    info = server.object_info()
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "identity_attention/encode" and node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        if "output_tooltips" in node:  # newer hosts publish them
            assert all(node["output_tooltips"])
    assert info["IdentityAttentionEncodeIdentity"]["output"] == ["IDENTITY", "IMAGE", "MASK", "IMAGE"]
    assert info["IdentityAttentionEncodeIdentity"]["output_is_list"] == [False, False, True, True]


def encode_prompt(filename, flip=True):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": filename}},
        "2": {"class_type": "IdentityAttentionLoadFaceAnalysis", "inputs": {"pack": "toypack", "provider": "CPU", "det_size": 640}},
        "3": {"class_type": "IdentityAttentionEncodeIdentity", "inputs": {
            "face_analysis": ["2", 0], "images": ["1", 0], "face": "largest", "face_index": 0, "retry_smaller_sizes": True,
            "flip_augment": flip, "mask_grow": 1.2, "mask_feather": 0.25}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "identity_crops"}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["3", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "identity_mask"}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["3", 3], "filename_prefix": "identity_preview"}},
        "8": {"class_type": "IdentityAttentionIdentitySimilarity", "inputs": {
            "images": ["1", 0], "identity": ["3", 0], "face_analysis": ["2", 0], "face": "largest"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 2], "filename_prefix": "identity_similarity"}},
    }


def test_encode_identity_prompt_runs(server, toy_in_instance):
    from insightface.utils import face_align

    entry = server.run(encode_prompt("identity_face.png"))
    files = {}
    for node_id, out in entry["outputs"].items():
        files[node_id] = [server.instance.output / i.get("subfolder", "") / i["filename"] for i in out.get("images", [])]
    crops = [load_png(p) for p in files["4"]]
    assert [c.shape for c in crops] == [(112, 112, 3), (112, 112, 3)]  # the face and its mirror
    img, box = toy_in_instance["image"], toy_in_instance["box"]
    expected = face_align.norm_crop(img[..., ::-1].copy(), landmark=toy.expected_kps(box), image_size=112)[..., ::-1]
    assert np.abs(crops[0].astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(crops[1], crops[0][:, ::-1])
    (mask,) = [load_png(p) for p in files["6"]]
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    assert mask.shape == (480, 640, 3) and mask[cy, cx, 0] == 255 and mask[0, 0, 0] == 0
    (preview,) = [load_png(p) for p in files["7"]]
    assert preview.shape == (480, 640, 3)
    assert np.abs(preview[cy, box[2]].astype(int) - [38, 229, 76]).max() <= 1  # green box edge
    (similarity,) = [load_png(p) for p in files["9"]]
    assert similarity.shape == (480, 640, 3)
    label = similarity[box[1] - 30:box[1] - 1, box[0]:box[0] + 80]  # "1.000" above the box, in green
    assert (np.abs(label.astype(int) - [38, 229, 76]).max(-1) <= 1).sum() > 20


def test_no_face_error_reaches_the_ui(server, toy_in_instance):
    prompt = encode_prompt("identity_no_face.png", flip=False)
    with pytest.raises(PromptFailed) as err:
        server.run(prompt)
    message = err.value.exception_message()
    assert message.startswith("Encode identity: input 'images': no face found in reference image 1")
    assert "use a clearer frontal photo or lower det_size" in message
