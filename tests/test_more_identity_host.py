"""FACT face adapter, per-stage identity tokens and nested attention through a real ComfyUI's /prompt API.

One graph per architecture chains everything this part of the pack adds, plus a
dispatcher stage from the test kit (standing in for the other mechanism nodes):
TransFace file -> Load face encoder -> Encode face tokens -> Apply face adapter
-> Create identity tokens -> Encode prompt with identity tokens -> Apply per-stage
identity tokens -> Apply nested attention -> dummy stage -> KSampler -> SaveLatent.
With every weight at 0 the latent equals the plain graph's bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from harness.server import PromptFailed

pytestmark = pytest.mark.host

MY_NODES = (
    "IdentityAttentionApplyFaceAdapter",
    "IdentityAttentionLoadFaceEncoder",
    "IdentityAttentionEncodeFaceTokens",
    "IdentityAttentionCreateIdentityTokens",
    "IdentityAttentionSaveIdentityTokens",
    "IdentityAttentionLoadIdentityTokens",
    "IdentityAttentionEncodePromptWithIdentityTokens",
    "IdentityAttentionApplyStageTokens",
    "IdentityAttentionApplyNestedAttention",
    "IdentityAttentionFindSubjectToken",
)
ENCODER_FILE = "tiny_transface.pt"


@pytest.fixture(scope="module")
def encoder_file(instance):
    from test_transface_encoder import transface_state_dict

    folder = instance.models / "identity_attention"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ENCODER_FILE
    if not path.exists():
        torch.save(transface_state_dict(depth=2, heads=False, seed=7), path)
    return ENCODER_FILE


def graph(arch, fact=0.0, tokens=0.0, nested=0.0, dummy=0.0, with_patches=True):
    g = {
        "models": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": arch, "seed": 0}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "id": {"class_type": "IdentityAttentionTestKit_SyntheticIdentity", "inputs": {"references": 2, "seed": 1, "with_clip": False, "with_face_tokens": False}},
        "encoder": {"class_type": "IdentityAttentionLoadFaceEncoder", "inputs": {"encoder_name": ENCODER_FILE}},
        "face": {"class_type": "IdentityAttentionEncodeFaceTokens", "inputs": {"face_encoder": ["encoder", 0], "identity": ["id", 0]}},
        "fact_adapter": {"class_type": "IdentityAttentionTestKit_SyntheticFactAdapter", "inputs": {"model": ["models", 0], "seed": 2, "alpha": 0.5}},
        "ip_adapter": {"class_type": "IdentityAttentionTestKit_SyntheticAdapter", "inputs": {"model": ["models", 0], "num_tokens": 4, "seed": 3, "visual_q": False}},
        "tokens": {
            "class_type": "IdentityAttentionCreateIdentityTokens",
            "inputs": {"base": arch, "init": "seed", "init_word": "person", "seed": 4, "stages": 5, "vectors": 1, "noise": 0.0, "clip": ["models", 1]},
        },
        "prompt": {
            "class_type": "IdentityAttentionEncodePromptWithIdentityTokens",
            "inputs": {"clip": ["models", 1], "tokens": ["tokens", 0], "text": "a photo of V* person, smiling", "placeholder": "V*", "class_word": ""},
        },
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["models", 0],
                "seed": 5,
                "steps": 2 if arch == "sd15" else 1,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["prompt", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": f"more_identity_{arch}"}},
    }
    if not with_patches:
        return g
    window = {"start_percent": 0.0, "end_percent": 1.0}
    g["fact"] = {
        "class_type": "IdentityAttentionApplyFaceAdapter",
        "inputs": {"model": ["models", 0], "adapter": ["fact_adapter", 0], "identity": ["face", 0], "weight": fact, "apply_to": "both", "references": "per_reference", **window},
    }
    g["stage_tokens"] = {
        "class_type": "IdentityAttentionApplyStageTokens",
        "inputs": {"model": ["fact", 0], "stage_contexts": ["prompt", 1], "weight": tokens, "stage_boundaries": "0.2, 0.4, 0.6, 0.8", **window},
    }
    g["nested"] = {
        "class_type": "IdentityAttentionApplyNestedAttention",
        "inputs": {
            "model": ["stage_tokens", 0],
            "adapter": ["ip_adapter", 0],
            "identity": ["id", 0],
            "projection": "adapter K/V (to_k, to_v)",
            "subject": "last prompt token",
            "token_index": 5,
            "weight": nested,
            "apply_to": "cond",
            "references": "fused",
            "clip": ["models", 1],
            "prompt": "a photo of V* person, smiling",
            **window,
        },
    }
    g["dummy"] = {
        "class_type": "IdentityAttentionTestKit_DummyStage",
        "inputs": {"model": ["nested", 0], "kind": "add_tanh_q", "weight": dummy, "apply_to": "both", **window},
    }
    g["sampler"]["inputs"]["model"] = ["dummy", 0]
    return g


def latent_of(server, entry):
    from safetensors.torch import load_file

    (path,) = server.output_files(entry, "latents")
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_everything_stacked_through_prompt_api(server, encoder_file, arch):
    plain = latent_of(server, server.run(graph(arch, with_patches=False)))
    zero = latent_of(server, server.run(graph(arch)))
    assert torch.equal(zero, plain)
    on = latent_of(server, server.run(graph(arch, fact=0.5, tokens=1.0, nested=1.0, dummy=0.3)))
    assert torch.isfinite(on).all() and not torch.allclose(on, plain, atol=1e-3)


def test_nodes_are_listed_with_tooltips_and_errors_reach_the_ui(server, encoder_file):
    info = server.object_info()
    for node_id in MY_NODES:
        node = info[node_id]
        assert node["category"].startswith("identity_attention/")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert ENCODER_FILE in info["IdentityAttentionLoadFaceEncoder"]["input"]["required"]["encoder_name"][0]
    bad = graph("sd15", fact=0.5)
    bad["prompt"]["inputs"]["text"] = "a photo of a person"  # no placeholder
    with pytest.raises(PromptFailed) as failure:
        server.run(bad)
    assert "placeholder 'V*'" in failure.value.exception_message()
