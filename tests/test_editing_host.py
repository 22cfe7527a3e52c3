"""CA² gate + STFG through a real ComfyUI's /prompt on the tiny SD1.5 / SDXL models (an inpainting graph)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import pack
from harness.server import PromptFailed

gradient_support = pack("nodes.dispatch.gradient_support")

pytestmark = pytest.mark.host

OUR_NODES = (
    "IdentityAttentionApplyCA2Gate",
    "IdentityAttentionInspectCA2Scores",
    "IdentityAttentionApplySTFG",
    "IdentityAttentionInspectSTFGBoundary",
)
STEPS = 3


def editing_graph(arch, ca2_weight=1.0, stfg_strength=10.0, mode="fast", inspect=True, save_latent=False, patch=True):
    """An inpainting graph: original photo -> VAE Encode -> noise mask; CA² gate and STFG on the model."""
    g = {
        "models": {"class_type": "IdentityAttentionTestKit_TinyModels", "inputs": {"arch": arch, "seed": 0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a face with green eyes and freckles", "clip": ["models", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["models", 1]}},
        "photo": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0xC08060}},
        "original": {"class_type": "VAEEncode", "inputs": {"pixels": ["photo", 0], "vae": ["models", 2]}},
        "blank": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 128, "height": 128}},
        "hole": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "mask": {"class_type": "MaskComposite", "inputs": {"destination": ["blank", 0], "source": ["hole", 0], "x": 32, "y": 32, "operation": "add"}},
        "noise_mask": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["original", 0], "mask": ["mask", 0]}},
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["stfg", 0] if patch else ["models", 0],
                "seed": 0,
                "steps": STEPS,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["noise_mask", 0],
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["models", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"edit_{arch}"}},
    }
    if patch:
        g.update(
            {
                "adapter": {
                    "class_type": "IdentityAttentionTestKit_SyntheticAdapter",
                    "inputs": {"model": ["models", 0], "num_tokens": 4, "seed": 0, "visual_q": False, "projector_input": "clip_embeds"},
                },
                "clip_vision": {"class_type": "IdentityAttentionTestKit_SyntheticClipVision", "inputs": {"seed": 0}},
                "ca2": {
                    "class_type": "IdentityAttentionApplyCA2Gate",
                    "inputs": {
                        "model": ["models", 0],
                        "id_adapter": ["adapter", 0],
                        "mask": ["mask", 0],
                        "score_source": "text attention (training-free)",
                        "sharpness": 1.0,
                        "weight": ca2_weight,
                        "start_percent": 0.0,
                        "end_percent": 1.0,
                        "apply_to": "both",
                        "clip_vision": ["clip_vision", 0],
                        "image": ["photo", 0],
                    },
                },
                "stfg": {
                    "class_type": "IdentityAttentionApplySTFG",
                    "inputs": {
                        "model": ["ca2", 0],
                        "original_latent": ["original", 0],
                        "mask": ["mask", 0],
                        "strength": stfg_strength,
                        "mode": mode,
                        "band": 0.5,
                        "start_percent": 0.0,
                        "end_percent": 1.0,
                    },
                },
            }
        )
    if patch and inspect:
        g.update(
            {
                "scores": {"class_type": "IdentityAttentionInspectCA2Scores", "inputs": {"model": ["stfg", 0], "samples": ["sampler", 0], "layers": "mean of all layers"}},
                "save_scores": {"class_type": "SaveImage", "inputs": {"images": ["scores", 0], "filename_prefix": f"ca2_scores_{arch}"}},
                "mean_score": {"class_type": "MaskToImage", "inputs": {"mask": ["scores", 1]}},
                "save_mean": {"class_type": "SaveImage", "inputs": {"images": ["mean_score", 0], "filename_prefix": f"ca2_mean_{arch}"}},
                "boundary": {"class_type": "IdentityAttentionInspectSTFGBoundary", "inputs": {"model": ["stfg", 0], "samples": ["sampler", 0]}},
                "boundary_image": {"class_type": "MaskToImage", "inputs": {"mask": ["boundary", 0]}},
                "save_boundary": {"class_type": "SaveImage", "inputs": {"images": ["boundary_image", 0], "filename_prefix": f"stfg_boundary_{arch}"}},
                "save_frames": {"class_type": "SaveImage", "inputs": {"images": ["boundary", 1], "filename_prefix": f"stfg_frames_{arch}"}},
                "save_attention": {"class_type": "SaveImage", "inputs": {"images": ["boundary", 2], "filename_prefix": f"stfg_attention_{arch}"}},
            }
        )
    if save_latent:
        g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": f"latents/edit_{arch}"}}
    return g


def node_images(server, entry, node):
    return server.output_files({"outputs": {node: entry["outputs"].get(node, {})}}, "images")


def test_nodes_are_registered_with_tooltips(server):
    info = server.object_info()
    for node_id in OUR_NODES:
        assert node_id in info, node_id
        spec = info[node_id]
        assert spec["category"].startswith("identity_attention/")
        assert spec["description"]
        for section in ("required", "optional"):
            for name, entry in spec["input"].get(section, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        if "output_tooltips" in spec:  # newer hosts export them
            assert len(spec["output_tooltips"]) == len(spec["output"])
    assert info["IdentityAttentionApplyCA2Gate"]["category"] == "identity_attention/attention"
    assert info["IdentityAttentionApplySTFG"]["category"] == "identity_attention/guidance"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_editing_graph_runs_and_inspect_nodes_return_images(server, arch):
    entry = server.run(editing_graph(arch))
    from PIL import Image

    assert len(node_images(server, entry, "save")) == 1
    scores = node_images(server, entry, "save_scores")
    assert len(scores) == STEPS  # one frame per step (Fig. 5)
    assert Image.open(scores[0]).size == (128, 128)
    assert len(node_images(server, entry, "save_mean")) == 1
    frames = node_images(server, entry, "save_frames")
    assert len(frames) == STEPS
    boundary = node_images(server, entry, "save_boundary")
    assert len(boundary) == 1 and Image.open(boundary[0]).size == (128, 128)
    assert len(node_images(server, entry, "save_attention")) == 1


def _latent(server, entry):
    (path,) = server.output_files(entry, "latents")
    return load_file(str(path))["latent_tensor"]


def test_zero_weight_and_strength_are_bit_identical_through_prompt(server):
    plain = _latent(server, server.run(editing_graph("sd15", patch=False, save_latent=True)))
    off = _latent(server, server.run(editing_graph("sd15", ca2_weight=0.0, stfg_strength=0.0, inspect=False, save_latent=True)))
    assert torch.equal(plain, off)
    on = _latent(server, server.run(editing_graph("sd15", inspect=False, save_latent=True)))
    assert not torch.equal(plain, on)


def test_exact_mode_through_prompt(server):
    supported, reason = gradient_support.gradient_support()  # this process imports the same ComfyUI as the server
    graph = editing_graph("sd15", mode="exact", inspect=False)
    if supported:
        entry = server.run(graph)
        assert len(node_images(server, entry, "save")) == 1
    else:
        with pytest.raises(PromptFailed) as failed:
            server.run(graph)
        message = failed.value.exception_message()
        assert "mode 'exact' needs a backward pass" in message and "set mode to 'fast'" in message
