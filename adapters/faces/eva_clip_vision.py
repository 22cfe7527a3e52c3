"""EVA02-CLIP-L-14-336's vision tower, the image encoder PuLID reads faces with.

Written from the architecture of EVA-CLIP (github:baaivision/EVA, the copy in
github:ToTheBeginning/PuLID ``eva_clip/eva_vit_model.py``, config
``EVA02-CLIP-L-14-336.json``); the parameter names are those of the published
``EVA02_CLIP_L_336_psz14_s6B.pt`` (``visual.*``), so that file and its
safetensors conversions load as they are (with or without the ``visual.``
prefix; the text tower's keys are ignored).

Shapes for the published model: image 336, patch 14 -> 24x24 = 576 patches +
1 class token = 577 tokens, width W = 1024, 24 blocks, 16 heads of 64, SwiGLU
hidden 2730 (= int(1024 * 2.6667)), output embedding 768.

Per block (pre-norm, LayerNorm eps 1e-6 everywhere)::

    a = LN1(x)
    q = a Wq + q_bias; k = a Wk; v = a Wv + v_bias          (no key bias)
    q, k <- RoPE(q), RoPE(k) on the 576 patch tokens only (the class token is not rotated)
    o = inner_attn_ln(softmax(q k^T / sqrt(64)) v)           (heads concatenated, then LayerNorm: "sub-LN")
    x = x + proj(o)
    m = LN2(x)
    x = x + w3(ffn_ln(silu(w1 m) * (w2 m)))                   (SwiGLU with sub-LN)

2D RoPE (EVA02 ``VisionRotaryEmbeddingFast``): the first half of each head's
channels is rotated by the patch's row, the second half by its column, with
frequencies ``theta_i = 10000^(-2i/(D/2))`` at positions
``t = index / grid * 16`` (16 = the 224-px pre-training grid, interpolated to
the 24-wide grid); channel pairs are adjacent ``(x0, x1) -> (-x1, x0)``.

The image embedding is ``head(LN(x)[:, 0])`` (class token, no mean pooling).
PuLID's hidden states are the block INPUTS of blocks 4, 8, 12, 16, 20 (the
outputs of blocks 4, 8, 12, 16 and 20 counted from 1), un-normalised: PuLID's
``forward_features`` collects ``x`` before block ``idx`` for ``0 < idx <= 20``
and ``idx % 4 == 0``. For a model of another depth (the tests' tiny ones) the
five taps are ``round(depth * k / 6)``, k = 1..5, which is exactly PuLID's
choice for depth 24.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
"""EVA-CLIP's image normalisation (its ``pretrained.py`` gives no mean/std for EVA02-CLIP-L-14-336, so OpenAI's)."""

HEAD_WIDTH = 64  # EVA-CLIP's vision_cfg.head_width (heads = width // 64)
PRETRAIN_GRID = 16  # pt_hw_seq_len: 224 / 14
LN_EPS = 1e-6
NUM_HIDDEN = 5
ROPE_KEYS = ("freqs_cos", "freqs_sin")


@dataclass(frozen=True)
class EvaVisionConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 2730
    embed_dim: int = 768
    pretrain_grid: int = PRETRAIN_GRID

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.grid * self.grid + 1


def hidden_layer_taps(depth: int) -> Tuple[int, ...]:
    """Block indices whose INPUT PuLID keeps: (4, 8, 12, 16, 20) for depth 24."""
    if depth < NUM_HIDDEN + 1:
        raise ValueError(f"an EVA vision tower needs at least {NUM_HIDDEN + 1} blocks for PuLID's five hidden states (got {depth})")
    return tuple(int(round(depth * k / 6)) for k in range(1, NUM_HIDDEN + 1))


def rope_tables(grid: int, head_dim: int, pretrain_grid: int = PRETRAIN_GRID, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[grid*grid, head_dim]`` of EVA02's 2D RoPE (row-major patch order)."""
    if head_dim % 4:
        raise ValueError(f"EVA's 2D RoPE needs a head width divisible by 4 (got {head_dim})")
    half = head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.float64) / half))  # [half/2]
    t = torch.arange(grid, dtype=torch.float64) / grid * pretrain_grid
    f = torch.repeat_interleave(t[:, None] * inv[None, :], 2, dim=-1)  # [grid, half], each frequency twice (pairs)
    rows = f[:, None, :].expand(grid, grid, half)
    cols = f[None, :, :].expand(grid, grid, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` over the last axis."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class EvaRope(nn.Module):
    """2D rotary embedding of the patch tokens (tables are computed, never loaded)."""

    def __init__(self, grid: int, head_dim: int, pretrain_grid: int = PRETRAIN_GRID):
        super().__init__()
        cos, sin = rope_tables(grid, head_dim, pretrain_grid)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[B, H, P, D]`` (patch tokens only) -> rotated, same shape."""
        return t * self.freqs_cos.to(t.dtype) + rotate_pairs(t) * self.freqs_sin.to(t.dtype)


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: EvaRope) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q = torch.cat([q[:, :, :1], rope(q[:, :, 1:])], dim=2)
        k = torch.cat([k[:, :, :1], rope(k[:, :, 1:])], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(self.inner_attn_ln(out.transpose(1, 2).reshape(b, n, c)))


class EvaSwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=LN_EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = EvaSwiGLU(width, mlp_hidden)

    def forward(self, x: torch.Tensor, rope: EvaRope) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class EvaPatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)


class EvaVisionTransformer(nn.Module):
    """``forward(pixels [B, 3, S, S])`` -> ``(embeds [B, E], hidden [B, 5, T, W])``.

    ``pixels`` are already resized to ``image_size`` and normalised with
    :data:`OPENAI_MEAN` / :data:`OPENAI_STD`. ``embeds`` are NOT normalised
    (PuLID divides by the L2 norm; see :func:`pulid_eva_features`).
    """

    def __init__(self, config: EvaVisionConfig = EvaVisionConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.patch_embed = EvaPatchEmbed(config.patch_size, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.tokens, w))
        self.rope = EvaRope(config.grid, w // config.heads, config.pretrain_grid)
        self.blocks = nn.ModuleList(EvaBlock(w, config.heads, config.mlp_hidden) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w, eps=LN_EPS)
        self.head = nn.Linear(w, config.embed_dim)
        self.taps = hidden_layer_taps(config.depth)

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (s, s):
            raise ValueError(f"EVA-CLIP takes [B, 3, {s}, {s}] images, got {list(pixels.shape)}")
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in self.taps:
                hidden.append(x)
            x = block(x, self.rope)
        return self.head(self.norm(x)[:, 0]), torch.stack(hidden, dim=1)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "EvaVisionTransformer":
        """Build from the published keys (``visual.``-prefixed or bare; text-tower and RoPE-table keys ignored)."""
        visual = vision_keys(state)
        model = cls(config_from_state(visual))
        missing, unexpected = model.load_state_dict(visual, strict=False)
        if missing or unexpected:
            raise ValueError(
                "the file does not have EVA02-CLIP's vision-tower layout"
                + (f"; missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}" if missing else "")
                + (f"; unexpected {len(unexpected)}, e.g. {', '.join(unexpected[:3])}" if unexpected else "")
            )
        return model.eval()


def vision_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The vision tower's tensors without the ``visual.`` prefix, minus the RoPE tables (recomputed)."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ROPE_KEYS}


def config_from_state(visual: Mapping[str, torch.Tensor]) -> EvaVisionConfig:
    """Sizes read from tensor shapes; raises ``ValueError`` naming what is missing."""
    needed = ("patch_embed.proj.weight", "pos_embed", "head.weight", "blocks.0.mlp.w1.weight")
    absent = [k for k in needed if k not in visual]
    if absent:
        raise ValueError(f"not an EVA02-CLIP vision tower: no {', '.join(absent)}")
    patch = visual["patch_embed.proj.weight"]
    width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    tokens = int(visual["pos_embed"].shape[1])
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid + 1 != tokens:
        raise ValueError(f"pos_embed has {tokens} positions, not a square grid plus a class token")
    depth = 1 + max(int(k.split(".")[1]) for k in visual if k.startswith("blocks."))
    heads = max(width // HEAD_WIDTH, 1)
    return EvaVisionConfig(
        image_size=grid * patch_size, patch_size=patch_size, width=width, depth=depth, heads=heads,
        mlp_hidden=int(visual["blocks.0.mlp.w1.weight"].shape[0]), embed_dim=int(visual["head.weight"].shape[0]),
    )


def normalize_for_eva(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, h, w]`` in [0, 1] -> ``[B, 3, size, size]`` as PuLID feeds EVA-CLIP.

    Bicubic resize without antialiasing (torchvision 0.15's tensor ``resize``, which PuLID pins;
    ``align_corners=False``), then the OpenAI mean/std.
    """
    x = images
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def pulid_eva_features(model: EvaVisionTransformer, face_images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """PuLID's EVA inputs of ``face_images`` ``[B, 3, h, w]`` in [0, 1] (the grey face-features images).

    Returns ``eva_clip_embeds`` ``[B, E]`` = ``id_cond_vit / |id_cond_vit|`` and
    ``eva_clip_hidden`` ``[B, 5, T, W]`` (PuLID's ``id_vit_hidden`` stacked).
    """
    p = next(model.parameters())
    pixels = normalize_for_eva(face_images.to(p.device, torch.float32), model.config.image_size).to(p.dtype)
    embeds, hidden = model(pixels)
    embeds = embeds.float()
    return embeds / embeds.norm(p=2, dim=1, keepdim=True), hidden.float()


def config_dict(model: EvaVisionTransformer) -> dict:
    return asdict(model.config)
