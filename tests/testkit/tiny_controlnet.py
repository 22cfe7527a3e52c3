"""A tiny random-weight ControlNet of the micro SDXL UNet (tests/testkit/tiny_models.py), as a file.

InstantID's IdentityNet is an SDXL ControlNet whose cross-attention reads InstantID's 16 identity
tokens (2048 wide, SDXL's text width). The stand-in keeps that: the micro SDXL layout (32/64/128
channels, transformer depths 0/2/10 + middle 10, context 2048, pooled ``y`` 2816) with the 3-channel
hint encoder, in ComfyUI's ldm key layout (``input_hint_block``, ``zero_convs``, ``middle_block_out``),
which every host's Load ControlNet Model detects from the tensors (a config no released model has
falls back to the detected one). Random zero convolutions, so the ControlNet really changes the UNet.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

import comfy.cldm.cldm
import comfy.ops

from .tiny_models import randomize_, unet_config


def build_tiny_controlnet(arch: str = "sdxl", seed: int = 11, scale: float = 1.0) -> torch.nn.Module:
    """The host's ``cldm.ControlNet`` matching the micro UNet of ``arch``, random weights (float32)."""
    _, config = unet_config(arch, "micro")
    config = {k: v for k, v in config.items() if k not in ("out_channels", "transformer_depth_output")}
    model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **config)
    return randomize_(model, seed, scale=scale)


def tiny_controlnet_state_dict(arch: str = "sdxl", seed: int = 11, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """The state dict (float16, ldm layout without prefix) of :func:`build_tiny_controlnet`.

    Only the SDXL one loads through Load ControlNet Model: the micro SD1.5 UNet's 8 heads of 4
    channels are not what the host's detection assumes for an unknown SD1.5-like config.
    """
    model = build_tiny_controlnet(arch, seed, scale)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def write_tiny_controlnet(path: str, arch: str = "sdxl", seed: int = 11) -> str:
    """Write the tiny ControlNet to ``path`` (safetensors) unless it exists; returns the path."""
    from safetensors.torch import save_file

    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_file(tiny_controlnet_state_dict(arch, seed), path + ".part")
        os.replace(path + ".part", path)
    return path
