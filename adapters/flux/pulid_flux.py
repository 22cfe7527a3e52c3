"""PuLID-Flux (github:ToTheBeginning/PuLID, flux branch: ``pulid/pipeline_flux.py``, ``flux/model.py``,
``pulid/encoders_flux.py``; weights HF guozinan/PuLID ``pulid_flux_v0.9.0.safetensors`` / ``v0.9.1``).

One file, two parts:

- ``pulid_encoder.*``: the ID encoder, PuLID v1.1's IDFormer with the same keys (``latents``, ``proj_out``,
  ``layers.N.{0,1}.*``, ``mapping_0..4.*``, ``id_embedding_mapping.*``). It reads ``id_cond`` ``[N, 1280]``
  (ArcFace 512 ; EVA02-CLIP cls 768) and ``eva_hidden`` ``[N, 5, 577, 1024]`` and gives the id tokens
  ``[N, 32, 2048]``. The pack's :class:`~.projector_pulid.PuLIDIDFormer` runs it unchanged, fed by the
  same 'Encode PuLID face features (EVA-CLIP)' node as PuLID for SDXL.
- ``pulid_ca.N.*``: 20 cross-attention modules (``PerceiverAttentionCA``: ``norm1`` on the id tokens (2048),
  ``norm2`` on the image tokens (3072), ``to_q`` [2048, 3072], ``to_kv`` [4096, 2048], ``to_out`` [3072, 2048],
  no biases, 16 heads of 128). Queries are the Flux *image* tokens, keys/values the id tokens::

      img <- img + id_weight * to_out(softmax(q k^T / sqrt(128)) v),  q = to_q(LN2(img)), k, v = to_kv(LN1(id))

Schedule (``flux/model.py``): after double block i when ``i % 2 == 0`` (module ``i // 2``; 19 blocks -> 10
modules) and after single block i when ``i % 4 == 0`` on the image part of the joint sequence only (text tokens
untouched; module ``ceil(n_double / 2) + i // 4``; 38 blocks -> 10 modules). The official sampler passes the id
tokens from step ``start_step`` on; the unconditional (true-CFG) pass gets the encoder's output for all-zero
inputs (``pipeline_flux.get_id_embedding``). In ComfyUI's ordinary CFG the uncond half of the batch gets those
zero-input tokens too, so weight 0 or a step outside [start, end) leaves the block output untouched bit for bit.

Choice: the official attention scales q and k by ``dim_head^-1/4`` each before the product (for fp16 stability);
that is the same number as dividing by ``sqrt(dim_head)``, so :class:`PuLIDFluxCA` uses the fused attention.
Heads: the published files have 128-wide heads; a file whose inner width is not a multiple of 128 (the tiny
test files) is read as one head of that width.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..projectors.projector_pulid import PuLIDIDFormer
from ..weights.weight_errors import WeightError

ENCODER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
CA_DIM_HEAD = 128
CA_KEYS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "to_q.weight", "to_kv.weight", "to_out.weight")
MAX_CA_MODULES = 256  # bound on the walk over pulid_ca.N (the published files have 20)


def is_pulid_flux(keys) -> bool:
    """True when a state dict's keys are PuLID-Flux's (both parts present)."""
    has_ca = has_encoder = False
    for key in keys:
        has_ca = has_ca or key.startswith(CA_PREFIX)
        has_encoder = has_encoder or key.startswith(ENCODER_PREFIX)
        if has_ca and has_encoder:
            return True
    return False


def ca_count(n_double: int, n_single: int) -> int:
    """How many ``pulid_ca`` modules a Flux with these block counts uses (19, 38 -> 20)."""
    return math.ceil(n_double / DOUBLE_INTERVAL) + math.ceil(n_single / SINGLE_INTERVAL)


def ca_index(kind: str, block: int, n_double: int) -> Optional[int]:
    """The ``pulid_ca`` module run after ``kind`` ("double" or "single") block ``block``, or None for none."""
    if kind == "double":
        return block // DOUBLE_INTERVAL if block % DOUBLE_INTERVAL == 0 else None
    if kind == "single":
        return math.ceil(n_double / DOUBLE_INTERVAL) + block // SINGLE_INTERVAL if block % SINGLE_INTERVAL == 0 else None
    raise ValueError(f"block kind must be 'double' or 'single', not {kind!r}")


class PuLIDFluxCA(nn.Module):
    """``forward(id_tokens [B, M, kv_dim], img [B, L, dim]) -> [B, L, dim]`` (the residual, before ``id_weight``)."""

    def __init__(self, dim: int = 3072, kv_dim: int = 2048, inner: int = 2048, dim_head: int = CA_DIM_HEAD):
        super().__init__()
        if inner % dim_head:
            raise ValueError(f"inner width {inner} is not a multiple of the head width {dim_head}")
        self.heads, self.dim_head = inner // dim_head, dim_head
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, id_tokens: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.to_q(self.norm2(img)))
        k, v = (self._heads(t) for t in self.to_kv(self.norm1(id_tokens)).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


def add_identity(ca: PuLIDFluxCA, img: torch.Tensor, id_tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """``img + weight * ca(id_tokens, img)``; weight 0 returns ``img`` itself (bit for bit, no work)."""
    if weight == 0:
        return img
    return img + weight * ca(id_tokens.to(img.device, img.dtype), img)


class PuLIDFlux(nn.Module):
    """A loaded ``pulid_flux_*.safetensors``: ``encoder`` (IDFormer) and ``ca`` (the cross-attention modules)."""

    def __init__(self, encoder: PuLIDIDFormer, ca: nn.ModuleList):
        super().__init__()
        self.encoder, self.ca = encoder, ca

    @property
    def token_dim(self) -> int:
        return self.encoder.token_dim

    @property
    def image_dim(self) -> int:
        return self.ca[0].norm2.normalized_shape[0]

    def check_model(self, n_double: int, n_single: int, hidden_size: int) -> None:
        """Raise :class:`WeightError` when this file does not fit a Flux with these blocks and width."""
        need = ca_count(n_double, n_single)
        if len(self.ca) < need or self.image_dim != hidden_size:
            raise WeightError(
                f"this PuLID-Flux file has {len(self.ca)} cross-attention modules for image width {self.image_dim}; the model "
                f"has {n_double} double + {n_single} single blocks of width {hidden_size} (needs {need} of width {hidden_size})",
                fix="use a Flux.1 model (dev, schnell or a fine-tune) with the PuLID-Flux file made for it",
            )

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "PuLIDFlux":
        encoder_state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        if not encoder_state:
            raise WeightError("this file has no 'pulid_encoder.*' tensors, so it is not PuLID-Flux",
                              fix="pick pulid_flux_v0.9.1.safetensors (or v0.9.0) from models/pulid")
        encoder = PuLIDIDFormer(**PuLIDIDFormer.config_from_state(encoder_state))
        encoder.load_state_dict(encoder_state)
        pattern = re.compile(re.escape(CA_PREFIX) + r"(\d+)\.")
        indices = sorted({int(m.group(1)) for m in (pattern.match(k) for k in state) if m})
        if not indices or indices != list(range(len(indices))) or len(indices) > MAX_CA_MODULES:
            raise WeightError("the 'pulid_ca.N' modules are missing or not numbered 0..N-1",
                              fix="download the PuLID-Flux file again; this one is damaged or another format")
        modules = []
        for i in indices:
            part = {}
            for name in CA_KEYS:
                key = f"{CA_PREFIX}{i}.{name}"
                if key not in state:
                    raise WeightError(f"PuLID-Flux file lacks '{key}'", fix="download the PuLID-Flux file again")
                part[name] = state[key]
            inner, dim = part["to_q.weight"].shape
            kv_dim = part["to_kv.weight"].shape[1]
            ca = PuLIDFluxCA(dim=dim, kv_dim=kv_dim, inner=inner, dim_head=CA_DIM_HEAD if inner % CA_DIM_HEAD == 0 else inner)
            ca.load_state_dict(part)
            modules.append(ca)
        if modules[0].norm1.normalized_shape[0] != encoder.token_dim:
            raise WeightError(f"the id tokens are {encoder.token_dim} wide but pulid_ca expects {modules[0].norm1.normalized_shape[0]}",
                              fix="download the PuLID-Flux file again")
        return cls(encoder, nn.ModuleList(modules)).to(next(iter(state.values())).dtype)


def add_identity_single(ca: PuLIDFluxCA, x: torch.Tensor, txt_len: int, id_tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """After a single block: ``x`` ``[B, txt_len + L, dim]`` is ``[txt ; img]``; only the image part gets the identity."""
    if weight == 0:
        return x
    return torch.cat([x[:, :txt_len], add_identity(ca, x[:, txt_len:], id_tokens, weight)], dim=1)
