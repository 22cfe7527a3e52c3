"""A tiny training folder (photos, masks, captions, identity features) and the trainer's model factory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def make_folder(root: Path, identities: int = 2, per_identity: int = 2, size: int = 64, seed: int = 0) -> Path:
    """``root/person<i>/<j>.png`` with smooth random photos, a mask and ArcFace-like features for each,
    a caption for the first photo; plus one photo in the root (an identity of its own)."""
    from PIL import Image
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)

    def photo(path: Path):
        small = torch.rand(3, 8, 8, generator=gen)
        img = torch.nn.functional.interpolate(small[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
        Image.fromarray(mask).save(str(path)[:-4] + ".mask.png")
        save_file({"arcface": torch.randn(512, generator=gen) * 20}, str(path)[:-4] + ".id.safetensors")

    for i in range(identities):
        folder = root / f"person{i}"
        folder.mkdir(exist_ok=True)
        for j in range(per_identity):
            photo(folder / f"{j}.png")
    (root / "person0" / "0.txt").write_text("a close-up photo of a person")
    photo(root / "loner.png")
    return root


def tiny_models(arch: str = "sd15", seed: int = 0):
    """``(MODEL, CLIP, VAE)`` of the test kit, built the way the command line loads models (no inference mode)."""
    from testkit import tiny_models as tm

    return tm.build_unet(arch, seed=seed), tm.build_clip(arch, seed=seed + 1), tm.build_vae(seed=seed + 2)


def write_config(path: Path, **sections) -> Path:
    path.write_text(json.dumps(sections, indent=1))
    return path


def tiny_flux_models(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` of the test kit's tiny Flux.1 (newer host only), built as the command line loads models."""
    from testkit import tiny_flux

    return tiny_flux.build_flux(seed), tiny_flux.build_flux_clip(seed + 1), tiny_flux.build_flux_vae(seed + 2)
