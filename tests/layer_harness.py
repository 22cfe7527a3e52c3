"""Drive the real attention dispatcher at one layer with hand-made inputs; float64 reference pieces.

``layer_call(model, key, ...)`` builds q/k/v of that layer's size and the ``extra_options`` the host
would pass (n_heads, dim_head, block, block_index, cond_or_uncond, original_shape, sigmas, and the
stashed hidden states), then calls whatever attn2 replace the MODEL has in that slot.

The reference helpers here are plain float64 formulas (no pack code), used by the mechanism tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence

import torch

import comfy.sample
from conftest import pack
from testkit.synthetic import synthetic_adapter

dispatcher = pack("nodes.dispatch.dispatcher")
host = pack("nodes.common.host")

SD15_KEY = ("input", 1, 0)  # an SD1.5 layer at the latent's own resolution
SDXL_KEY = ("input", 4, 1)  # SDXL: second transformer of the first cross-attention block


@dataclass
class LayerInputs:
    q: torch.Tensor  # [B, N, C]
    k: torch.Tensor  # [B, M, C]
    v: torch.Tensor
    hidden: torch.Tensor  # [B, N, C] pre-to_q hidden states
    extra_options: dict
    info: object  # LayerInfo
    codes: Sequence[int]  # cond_or_uncond
    rows: int  # images per chunk

    def chunk_of_row(self, row: int) -> int:
        return self.codes[row // self.rows]


def layer_info(model, key):
    return {info.key: info for info in host.cross_attention_layers(model)}[key]


def layer_inputs(model, key, codes=(1, 0), rows=2, grid=(4, 4), text_tokens=77, sigma=5.0, seed=0) -> LayerInputs:
    """Random inputs for one attn2 call of ``model`` at ``key`` (a ``grid`` of query tokens)."""
    info = layer_info(model, key)
    gen = torch.Generator().manual_seed(seed)
    b = len(codes) * rows
    n = grid[0] * grid[1]
    attn2 = model.model.diffusion_model.get_submodule(info.module_path).attn2
    hidden = torch.randn(b, n, info.inner_dim, generator=gen)
    context = torch.randn(b, text_tokens, info.context_dim, generator=gen)
    with torch.no_grad():
        q, k, v = attn2.to_q(hidden), attn2.to_k(context), attn2.to_v(context)
    # the layer's grid is the latent's: original_shape is the UNet input [B, 4, h, w]
    eo = {
        "n_heads": info.heads,
        "dim_head": info.dim_head,
        "block": key[:2],
        "block_index": key[2],
        "cond_or_uncond": list(codes),
        "original_shape": [b, 4, grid[0], grid[1]],
        "sigmas": torch.tensor([sigma]),
        "transformer_index": 0,
        dispatcher.HIDDEN_STATES_KEY: hidden,
    }
    return LayerInputs(q, k, v, hidden, eo, info, list(codes), rows)


def run_layer(model, inputs: LayerInputs) -> torch.Tensor:
    """Call the attn2 replace installed in the MODEL's slot (our dispatcher), as the host would."""
    slot = model.model_options["transformer_options"]["patches_replace"]["attn2"][inputs.info.key]
    with torch.no_grad():
        return slot(inputs.q, inputs.k, inputs.v, dict(inputs.extra_options))


def unpatched(inputs: LayerInputs) -> torch.Tensor:
    """What the unpatched layer computes (the host's attention, exactly as CrossAttention calls it)."""
    with torch.no_grad():
        return host.host_attention(inputs.q, inputs.k, inputs.v, inputs.info.heads, inputs.extra_options)


# --- float64 reference formulas ---------------------------------------------------------------------


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] float64."""
    b, n, c = x.shape
    return x.double().reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def logits64(q, k, heads) -> torch.Tensor:
    qh, kh = heads_of(q, heads), heads_of(k, heads)
    return qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])


def attention64(q, k, v, heads) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V in float64: [B, N, H*D]."""
    return merge(logits64(q, k, heads).softmax(-1) @ heads_of(v, heads))


def rows_of(inputs: LayerInputs, per_chunk: Dict[int, torch.Tensor]) -> torch.Tensor:
    """Stack ``{0: cond [1, ...], 1: uncond [1, ...]}`` into the call's rows (float64)."""
    return torch.cat([per_chunk[inputs.chunk_of_row(r)].double() for r in range(inputs.q.shape[0])], dim=0)


def tokens_mask(mask_hw: torch.Tensor, batch: int) -> torch.Tensor:
    """A mask already at the layer grid [h, w] -> [B, N, 1] float64."""
    return mask_hw.double().reshape(1, -1, 1).expand(batch, -1, -1)


def close(got: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5) -> None:
    torch.testing.assert_close(got.double(), expected.double(), rtol=tol, atol=tol)


# --- models, adapters, sampling -----------------------------------------------------------------------


def adapter_for(model, **kwargs):
    layers = host.cross_attention_layers(model)
    return synthetic_adapter(layers, host.base_model_of(model), layers[0].context_dim, **kwargs)


def assert_same_sampling(got, expected):
    """Equal up to float32 noise: random tiny UNets amplify kernel rounding (values reach ~300)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def sample(model, arch, steps=2, size=8, seed=0, cfg=4.0):
    from testkit.tiny_models import random_conditioning

    pos, neg = random_conditioning(arch, 100), random_conditioning(arch, 200)
    latent = torch.zeros(1, 4, size, size)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)
