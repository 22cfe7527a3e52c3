"""TransFace ViT face encoder: the patch tokens FACT feeds its face adapter.

TransFace (Dan et al., ICCV 2023; github:DanJun6737/TransFace ``backbones/vit.py``;
FACT loads the same class from github:modelscope/facechain ``face_adapter/vit.py``)
is a plain ViT trained for face recognition on aligned 112x112 crops. FACT uses
TransFace-S (``ms1mv2_model_TransFace_S.pt``: patch 9 -> 12x12 = 144 tokens,
width 512, depth 12, 8 heads, MLP ratio 4 with ReLU6, qkv without bias) and
keeps **all 144 patch tokens after the final LayerNorm** (``local_fac_rep``,
``[R, 144, 512]``) as the input of its 16-token resampler.

Layout of the released state dict (a flat ``state_dict()`` of the class above)::

    patch_embed.proj.weight [D, 3, P, P], patch_embed.proj.bias [D]
    pos_embed [1, (112/P)^2, D]
    blocks.{i}.norm1.{weight,bias} [D]        blocks.{i}.attn.qkv.weight [3D, D]
    blocks.{i}.attn.proj.{weight [D, D], bias [D]}
    blocks.{i}.norm2.{weight,bias} [D]        blocks.{i}.mlp.fc1.{weight [M, D], bias [M]}
    blocks.{i}.mlp.fc2.{weight [D, M], bias [D]}
    norm.{weight,bias} [D]
    feature.* (global embedding head), senet.*, mask_token: not needed for patch tokens

This module rebuilds the inference path only (no token masking: TransFace masks
tokens at train time only; dropout/drop-path are identity in eval). Width,
patch size, depth and MLP width are read from the tensors' shapes, so the B/L
variants load too; the head count is not visible in the shapes and is 8 for
every released TransFace model.

Input: RGB crops aligned with the ArcFace 5-point template (what insightface's
``norm_crop`` and FACT's ``face_preprocess`` produce), normalised as
``(x - 0.5) / 0.5``. FACT additionally blacks out everything but face + hair
(M2FP human parsing) before aligning; :func:`preprocess` takes an optional
per-crop mask for that (see ``nodes/identity/face_encoder_nodes.py``).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

CROP_SIZE = 112
DEFAULT_HEADS = 8

REQUIRED_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias")
BLOCK_KEYS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_PREFIXES = ("module.", "net.", "backbone.", "face_transformer.net.")


class TransFaceBlock(torch.nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (ReLU6 MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.Module()
        self.attn.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.attn.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Module()
        self.mlp.fc1 = torch.nn.Linear(dim, mlp_dim)
        self.mlp.fc2 = torch.nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.attn.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        # TransFace computes the attention itself in (at least) float32, autocast off
        work = torch.promote_types(x.dtype, torch.float32)
        out = F.scaled_dot_product_attention(qkv[0].to(work), qkv[1].to(work), qkv[2].to(work)).to(x.dtype)
        x = x + self.attn.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + self.mlp.fc2(F.relu6(self.mlp.fc1(self.norm2(x))))


class TransFaceEncoder(torch.nn.Module):
    """``[R, 3, 112, 112]`` in [-1, 1] -> patch tokens ``[R, (112/P)^2, D]`` after the final LayerNorm."""

    def __init__(self, dim: int = 512, depth: int = 12, heads: int = DEFAULT_HEADS, patch: int = 9, mlp_dim: Optional[int] = None, image_size: int = CROP_SIZE):
        super().__init__()
        self.dim, self.depth, self.heads, self.patch, self.image_size = dim, depth, heads, patch, image_size
        grid = image_size // patch
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = torch.nn.ModuleList([TransFaceBlock(dim, heads, mlp_dim or 4 * dim) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.patch_embed.proj(images), "b d h w -> b (h w) d") + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x.to(torch.promote_types(x.dtype, self.norm.weight.dtype)))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], heads: int = DEFAULT_HEADS) -> "TransFaceEncoder":
        """Build and load from a TransFace state dict (extra heads such as ``feature.*`` are ignored).

        Raises ``ValueError`` saying what is missing or mis-shaped.
        """
        sd = backbone_state_dict(state_dict)
        missing = [k for k in REQUIRED_KEYS if k not in sd]
        if missing:
            raise ValueError(f"not a TransFace checkpoint: missing {', '.join(missing)}")
        proj = sd["patch_embed.proj.weight"]
        if proj.dim() != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
            raise ValueError(f"patch_embed.proj.weight has shape {list(proj.shape)}, expected [D, 3, P, P]")
        dim, patch = int(proj.shape[0]), int(proj.shape[2])
        depth = 1 + max((int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in sd) if m), default=-1)
        if depth == 0:
            raise ValueError("not a TransFace checkpoint: no transformer blocks (blocks.0.*)")
        fc1 = sd.get("blocks.0.mlp.fc1.weight")
        mlp_dim = int(fc1.shape[0]) if fc1 is not None else 4 * dim
        model = cls(dim=dim, depth=depth, heads=heads, patch=patch, mlp_dim=mlp_dim)
        expected = model.state_dict()
        wanted = {k: v for k, v in sd.items() if k in expected}
        absent = sorted(set(expected) - set(wanted))
        if absent:
            raise ValueError(f"incomplete TransFace checkpoint: missing {', '.join(absent[:6])}{' ...' if len(absent) > 6 else ''}")
        for k, v in wanted.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
        model.load_state_dict({k: v.float() for k, v in wanted.items()})
        return model.eval().requires_grad_(False)


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.`` from DDP, ``net.`` from FACT's wrapper) and keep tensors only."""
    out = {}
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def preprocess(crops: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Aligned crops ``[R, 112, 112, 3]`` RGB in [0, 1] -> encoder input ``[R, 3, 112, 112]`` in [-1, 1].

    ``masks``: optional ``[R, 112, 112]`` in [0, 1]; pixels are multiplied by it
    first (FACT's face+hair masking turns the background black, i.e. -1).
    """
    if crops.dim() != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected crops [R, H, W, 3], got {list(crops.shape)}")
    x = crops.float().clamp(0.0, 1.0)
    if masks is not None:
        x = x * masks.float().clamp(0.0, 1.0).unsqueeze(-1)
    x = rearrange(x, "r h w c -> r c h w")
    if x.shape[-2:] != (CROP_SIZE, CROP_SIZE):
        x = F.interpolate(x, size=(CROP_SIZE, CROP_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5
