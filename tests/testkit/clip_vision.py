"""A tiny random CLIP vision model built in-process through the host's own ``comfy.clip_vision``.

Workflows name the real CLIP vision files (ViT-H/14 for the IP-Adapter SD1.5 and "vit-h"
SDXL files, ViT-bigG/14 for ``ip-adapter_sdxl``); on test and demo hosts the
``CLIPVisionLoader`` is swapped for :class:`TinyClipVision` (tests/harness/provisioning.py).
The tiny model keeps what the adapters read, the widths: penultimate hidden states of 1280
(ViT-H) or 1664 (bigG) channels and image embeds of 1024 (ViT-H) or 1280 (bigG) (ViT-L/14: 1024 and
768, for XLabs' Flux IP-Adapter), so the
released projectors' shapes fit; it has 2 layers and 32-pixel patches (50 tokens at 224x224
instead of 257), random weights that are a function of the seed. The "siglip" kind (SigLIP so400m
patch14 384, InstantX's Flux IP-Adapter; hosts whose ``comfy.clip_vision`` reads SigLIP) keeps the
1152 width and 384 px input: 144 tokens with the 32-pixel patches.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading

import torch

# width, heads, image-embed (projection) width of the real models; depth and patch size are shrunk
KINDS = {
    "vit-h": {"hidden_size": 1280, "num_attention_heads": 16, "projection_dim": 1024},
    "vit-bigg": {"hidden_size": 1664, "num_attention_heads": 16, "projection_dim": 1280},
    "vit-l": {"hidden_size": 1024, "num_attention_heads": 16, "projection_dim": 768},  # OpenAI ViT-L/14 (XLabs' Flux IP-Adapter)
    # SigLIP so400m patch14 384 (InstantX's Flux IP-Adapter): no projection, no class token, 384 px (newer hosts only)
    "siglip": {"hidden_size": 1152, "num_attention_heads": 16, "model_type": "siglip_vision_model", "image_size": 384,
               "hidden_act": "gelu_pytorch_tanh", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
}
_CACHE = {}
_LOCK = threading.Lock()


def kind_of_file(name: str) -> str:
    """"vit-bigg" for ViT-bigG file names, "vit-l" for ViT-L/14 ones (clip-vit-large-patch14), "siglip" for SigLIP
    ones (sigclip_vision_patch14_384), else "vit-h"."""
    lowered = name.lower().replace("_", "-")
    if "siglip" in lowered or "sigclip" in lowered:
        return "siglip"
    if "bigg" in lowered or "vit-g" in lowered:
        return "vit-bigg"
    return "vit-l" if "vit-large" in lowered or "vit-l-" in lowered else "vit-h"


def config(kind: str) -> dict:
    base = dict(
        attention_dropout=0.0, dropout=0.0, hidden_act="gelu", image_size=224, initializer_factor=1.0,
        initializer_range=0.02, intermediate_size=256, layer_norm_eps=1e-5, model_type="clip_vision_model",
        num_channels=3, num_hidden_layers=2, patch_size=32, torch_dtype="float32",
    )
    return {**base, **KINDS[kind]}


def build_clip_vision(kind: str = "vit-h", seed: int = 0):
    """A ``comfy.clip_vision.ClipVisionModel`` of :func:`config`, deterministic for ``seed``."""
    import comfy.clip_vision

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"tiny_clip_vision_{kind}.json")
        with open(path, "w") as f:
            json.dump(config(kind), f)
        model = comfy.clip_vision.ClipVisionModel(path)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in sorted(model.get_sd().items()):
        if value.dim() >= 2:
            fresh = torch.randn(value.shape, generator=gen) / max(1.0, value[0].numel()) ** 0.5
        elif name.endswith("weight"):  # layer norm scales
            fresh = 1.0 + 0.05 * torch.randn(value.shape, generator=gen)
        else:
            fresh = 0.02 * torch.randn(value.shape, generator=gen)
        state[name] = fresh.to(value.dtype)
    model.load_sd(state)
    return model


def cached_clip_vision(kind: str, seed: int):
    with _LOCK:
        key = (kind, seed)
        if key not in _CACHE:
            _CACHE[key] = build_clip_vision(kind, seed)
        return _CACHE[key]


class TinyClipVision:
    NODE_ID = "IdentityAttentionTestKit_TinyClipVision"
    DISPLAY_NAME = "Tiny CLIP vision (test kit)"
    CATEGORY = "identity_attention/testkit"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    DESCRIPTION = "A random 2-layer CLIP vision model with the real ViT-H / ViT-bigG widths. Test and demo hosts only."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "kind": (list(KINDS), {"tooltip": "Which real model's widths to imitate."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Weights are a function of this seed."}),
            }
        }

    def load(self, kind, seed):
        return (cached_clip_vision(kind, seed),)
