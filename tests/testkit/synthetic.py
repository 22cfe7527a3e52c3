"""Synthetic IDENTITY and ID_ADAPTER values for mechanism tests (no face models, no weight files).

- :func:`synthetic_identity`: R random reference faces (embeddings, boxes, crops) with
  optional CLIP-vision features and face tokens of the usual shapes.
- :class:`SyntheticProjector`: a deterministic linear token projector from the
  normalised ArcFace embedding (``input_kind = "arcface_normed"``).
- :func:`synthetic_adapter`: an ID_ADAPTER with random per-layer ``to_k`` / ``to_v``
  (and optionally PVA-style ``to_q``) for every cross-attention layer of a model.

All values are functions of the seed.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def _pack(relative: str):
    from . import pack_module

    return pack_module(relative)


def synthetic_identity(
    references: int = 1,
    seed: int = 0,
    clip: bool = True,
    clip_tokens: int = 257,
    clip_hidden_dim: int = 1280,
    clip_embed_dim: int = 1024,
    face_tokens: bool = False,
):
    identity_mod = _pack("adapters.faces.identity")
    gen = torch.Generator().manual_seed(seed)
    faces = []
    for i in range(references):
        x0, y0 = 40.0 + 3 * i, 50.0 + 2 * i
        faces.append(
            identity_mod.FaceRecord(
                image_index=i,
                image_size=(256, 256),
                bbox=torch.tensor([x0, y0, x0 + 120.0, y0 + 140.0]),
                landmarks=torch.tensor([[80.0, 100.0], [140.0, 100.0], [110.0, 130.0], [88.0, 160.0], [132.0, 160.0]]) + i,
                det_score=0.9,
                embedding=torch.randn(512, generator=gen) * 20.0,
                crop=torch.rand(112, 112, 3, generator=gen),
            )
        )
    kwargs = {}
    if clip:
        kwargs.update(
            clip_hidden=torch.randn(references, clip_tokens, clip_hidden_dim, generator=gen),
            clip_embeds=torch.randn(references, clip_embed_dim, generator=gen),
            clip_hidden_uncond=torch.randn(1, clip_tokens, clip_hidden_dim, generator=gen) * 0.1,
            clip_embeds_uncond=torch.randn(1, clip_embed_dim, generator=gen) * 0.1,
        )
    if face_tokens:
        kwargs["face_tokens"] = torch.randn(references, 144, 512, generator=gen)
    return identity_mod.Identity(faces=tuple(faces), recognizer="synthetic", **kwargs)


def _projector_class():
    TokenProjector = _pack("adapters.projectors.id_adapter").TokenProjector

    class SyntheticProjector(TokenProjector):
        """tokens = reshape(W @ arcface_normed + b) -> [N, T, D], then LayerNorm."""

        input_kind = "arcface_normed"

        def __init__(self, num_tokens: int, token_dim: int, seed: int = 0):
            super().__init__()
            self.num_tokens, self.token_dim = num_tokens, token_dim
            self.proj = torch.nn.Linear(512, num_tokens * token_dim)
            self.norm = torch.nn.LayerNorm(token_dim)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) / math.sqrt(512))
                self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=gen) * 0.02)

        def project(self, features):
            x = self.proj(features.arcface_normed)
            return self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim))

    return SyntheticProjector


def synthetic_projector(num_tokens: int, token_dim: int, seed: int = 0):
    return _projector_class()(num_tokens, token_dim, seed)


def _clip_projector_class():
    TokenProjector = _pack("adapters.projectors.id_adapter").TokenProjector

    class SyntheticClipProjector(TokenProjector):
        """An image adapter's projector: tokens = LayerNorm(reshape(W @ clip_embeds + b)) -> [N, T, D]."""

        input_kind = "clip_embeds"

        def __init__(self, num_tokens: int, token_dim: int, embed_dim: int = 1024, seed: int = 0):
            super().__init__()
            self.num_tokens, self.token_dim = num_tokens, token_dim
            self.proj = torch.nn.Linear(embed_dim, num_tokens * token_dim)
            self.norm = torch.nn.LayerNorm(token_dim)
            gen = torch.Generator().manual_seed(seed + 7)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) / math.sqrt(embed_dim))
                self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=gen) * 0.02)

        def project(self, features):
            x = self.proj(features.clip_embeds)
            return self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim))

    return SyntheticClipProjector


def synthetic_clip_projector(num_tokens: int, token_dim: int, seed: int = 0, embed_dim: int = 1024):
    """A projector reading CLIP image embeds (``[N, embed_dim]``), like IP-Adapter's ImageProjModel."""
    return _clip_projector_class()(num_tokens, token_dim, embed_dim, seed)


class SyntheticClipVision:
    """A stand-in for ComfyUI's CLIP_VISION: ``encode_image`` is a fixed random function of the image.

    Output fields as ComfyUI's (``image_embeds`` ``[B, 1024]``, ``last_hidden_state`` /
    ``penultimate_hidden_states`` ``[B, 257, 1280]``); different images give different features.
    """

    def __init__(self, seed: int = 0, embed_dim: int = 1024, hidden_dim: int = 1280, grid: int = 16):
        gen = torch.Generator().manual_seed(seed + 11)
        self.grid = grid
        self.embed = torch.randn(3 * grid * grid, embed_dim, generator=gen) / math.sqrt(3 * grid * grid)
        self.hidden = torch.randn(3, hidden_dim, generator=gen)
        self.cls = torch.randn(1, 1, hidden_dim, generator=gen)

    def encode_image(self, image: torch.Tensor, crop: bool = True):
        import comfy.clip_vision

        pixels = image.float().movedim(-1, 1)  # [B, 3, H, W]
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels, self.grid)  # [B, 3, g, g]
        patches = pooled.flatten(2).transpose(1, 2) @ self.hidden  # [B, g*g, Dh]
        hidden = torch.cat([self.cls.expand(pixels.shape[0], -1, -1), patches], dim=1)
        out = comfy.clip_vision.Output()
        out["image_embeds"] = (pooled.flatten(1) - 0.5) @ self.embed * 4.0
        out["last_hidden_state"] = hidden
        out["penultimate_hidden_states"] = hidden * 0.9
        return out


def synthetic_adapter(
    layers: Iterable,
    base: str,
    context_dim: int,
    num_tokens: int = 4,
    seed: int = 0,
    visual_q: bool = False,
    token_dim: Optional[int] = None,
    fmt: str = "ip_adapter",
    mechanism: str = "decoupled",
    projector_input: str = "arcface_normed",
):
    """An ID_ADAPTER for the given LayerInfo list (from ``nodes.common.host.cross_attention_layers``).

    ``projector_input``: "arcface_normed" (a face adapter) or "clip_embeds" (an image adapter,
    tokens from CLIP image embeds, as IP-Adapter base).
    """
    id_adapter = _pack("adapters.projectors.id_adapter")
    token_dim = token_dim or context_dim
    gen = torch.Generator().manual_seed(seed + 1)
    per_layer = {}
    for info in layers:
        entry = {
            "to_k": torch.randn(info.inner_dim, token_dim, generator=gen) / math.sqrt(token_dim),
            "to_v": torch.randn(info.inner_dim, token_dim, generator=gen) / math.sqrt(token_dim),
        }
        if visual_q:
            entry["to_q"] = torch.randn(info.inner_dim, info.inner_dim, generator=gen) / math.sqrt(info.inner_dim)
        per_layer[info.key] = entry
    return id_adapter.IdAdapter(
        format=fmt,
        base=base,
        context_dim=context_dim,
        projector=synthetic_clip_projector(num_tokens, token_dim, seed) if projector_input == "clip_embeds" else synthetic_projector(num_tokens, token_dim, seed),
        layers=per_layer,
        metadata={"source": "synthetic test adapter"},
        mechanism=mechanism,
    )


# --- FaceChain-FACT-shaped adapters (gated self-attention) -----------------------------------------


def _face_token_projector_class():
    TokenProjector = _pack("adapters.projectors.id_adapter").TokenProjector

    class SyntheticFaceTokenProjector(TokenProjector):
        """Reads ``face_tokens`` ``[N, 144, 512]`` like FACT's resampler: 16 tokens per set.

        tokens = LayerNorm(reshape(W @ mean_over_patches(face_tokens) + b)) + query embeddings.
        """

        input_kind = "face_tokens"

        def __init__(self, num_tokens: int, token_dim: int, seed: int = 0, face_dim: int = 512):
            super().__init__()
            self.num_tokens, self.token_dim = num_tokens, token_dim
            self.proj = torch.nn.Linear(face_dim, num_tokens * token_dim)
            self.queries = torch.nn.Parameter(torch.zeros(num_tokens, token_dim))
            self.norm = torch.nn.LayerNorm(token_dim)
            gen = torch.Generator().manual_seed(seed + 7)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=gen) / math.sqrt(face_dim))
                self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=gen) * 0.02)
                self.queries.copy_(torch.randn(self.queries.shape, generator=gen))

        def project(self, features):
            x = self.proj(features.face_tokens.mean(dim=1))
            return self.norm(x.reshape(x.shape[0], self.num_tokens, self.token_dim) + self.queries)

    return SyntheticFaceTokenProjector


def synthetic_face_token_projector(num_tokens: int = 16, token_dim: int = 768, seed: int = 0):
    return _face_token_projector_class()(num_tokens, token_dim, seed)


def fact_layer_weights(channels: int, token_dim: int, gen: torch.Generator, alpha: float = 0.5, dtype=torch.float32):
    """One layer of FACT weights with the released key names and shapes (random values)."""
    c = channels

    def w(out_dim, in_dim):
        return torch.randn(out_dim, in_dim, generator=gen, dtype=torch.float64) / math.sqrt(in_dim)

    def b(n):
        return 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)

    layer = {
        "linear.weight": w(c, token_dim),
        "linear.bias": b(c),
        "attn.to_q.weight": w(c, c),
        "attn.to_k.weight": w(c, c),
        "attn.to_v.weight": w(c, c),
        "attn.to_out.0.weight": w(c, c),
        "attn.to_out.0.bias": b(c),
        "ff.net.0.proj.weight": w(8 * c, c),
        "ff.net.0.proj.bias": b(8 * c),
        "ff.net.2.weight": w(c, 4 * c),
        "ff.net.2.bias": b(c),
        "norm1.weight": 1.0 + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64),
        "norm1.bias": b(c),
        "norm2.weight": 1.0 + 0.1 * torch.randn(c, generator=gen, dtype=torch.float64),
        "norm2.bias": b(c),
        "alpha_attn": torch.tensor(alpha + 0.1 * float(torch.randn(1, generator=gen)), dtype=torch.float64),
        "alpha_dense": torch.tensor(alpha + 0.1 * float(torch.randn(1, generator=gen)), dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in layer.items()}


def synthetic_fact_adapter(layers: Iterable, base: str, context_dim: int, seed: int = 0, alpha: float = 0.5, num_tokens: int = 16):
    """An ID_ADAPTER(format="fact") for the given LayerInfo list, with a face-token projector."""
    id_adapter = _pack("adapters.projectors.id_adapter")
    gen = torch.Generator().manual_seed(seed + 11)
    per_layer = {info.key: fact_layer_weights(info.inner_dim, context_dim, gen, alpha) for info in layers}
    return id_adapter.IdAdapter(
        format="fact",
        base=base,
        context_dim=context_dim,
        projector=synthetic_face_token_projector(num_tokens, context_dim, seed),
        layers=per_layer,
        metadata={"source": "synthetic FACT-shaped test adapter"},
        mechanism="gated_self_attention",
    )
