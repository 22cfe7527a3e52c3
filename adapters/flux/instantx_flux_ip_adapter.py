"""InstantX's Flux IP-Adapter (InstantX/FLUX.1-dev-IP-Adapter ``ip-adapter.bin``): the math, pure torch.

The release (official ``infer_flux_ipa_siglip.py``: ``MLPProjModel``, ``IPAFluxAttnProcessor2_0``):

- image encoder: SigLIP so400m patch14 384; the adapter reads its ``pooler_output`` ``[B, 1152]``,
  the attention-pooling ("MAP") head over the post-LayerNorm last hidden state ``[B, 729, 1152]``.
  ComfyUI's CLIP-vision loader returns that hidden state but drops the head, so
  :class:`SiglipPoolingHead` computes it from the head's tensors (``vision_model.head.*``, read
  from the same SigLIP file): a learned probe attends (``nn.MultiheadAttention``, 16 heads) over
  the tokens, then ``h + MLP(LayerNorm(h))`` (tanh-GELU), first token;
- image projection ``image_proj`` (MLPProjModel): ``Linear(1152, 2304) -> GELU -> Linear(2304,
  T*4096)``, reshape to ``[B, T, 4096]`` (T = 128 tokens), LayerNorm;
- per transformer block j (``ip_adapter.{j}``, j = 0..18 the 19 double blocks, 19..56 the 38
  single blocks, diffusers' processor order) ``to_k_ip`` / ``to_v_ip`` (Linear 4096 -> 3072, no
  bias); keys split into heads and RMS-normed over the head dim (eps 1e-5, no weight); the
  block's own queries (after its query RMS-norm, *before* RoPE) attend to them:
  ``softmax(q K^T / sqrt(D)) V`` -> ``[B, L, H*D]``;
- ``attention output += scale * that``, *before* the block's output projection: in a double block
  on the image stream only (``img_attn.proj``), in a single block on every row of the joint
  ``[txt; img]`` stream (before ``linear2``), as the official processor does.

Choices the release leaves open are documented where the nodes make them (nodes/flux/instantx_flux_ip_adapter_nodes.py).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.weight_errors import WeightError

PROJ_PREFIX = "image_proj."
BLOCK_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_([kv])_ip\.weight$")
HEAD_PREFIXES = ("vision_model.head.", "head.")
MAX_BLOCKS = 256  # bounded walk over the file's block numbers (Flux.1 has 19 + 38)
RMS_EPS = 1e-5  # the official norm_added_k
FIX_DOWNLOAD = "download ip-adapter.bin from InstantX/FLUX.1-dev-IP-Adapter again; this one is damaged or another format"


def is_instantx_flux(tensors: Mapping[str, torch.Tensor]) -> bool:
    """InstantX's layout: an ``image_proj.proj.{0,2}`` MLP and ``ip_adapter.0.to_k_ip`` (no bias) reading its tokens.

    UNet IP-Adapters number their processors 1, 3, 5, ... (the even ones are self-attention, with no
    ``to_k_ip``), so a ``to_k_ip`` at index 0 means a processor on every block: a DiT layout."""
    first = tensors.get(PROJ_PREFIX + "proj.0.weight")
    last = tensors.get(PROJ_PREFIX + "proj.2.weight")
    norm = tensors.get(PROJ_PREFIX + "norm.weight")
    k0 = tensors.get("ip_adapter.0.to_k_ip.weight")
    if any(t is None for t in (first, last, norm, k0)) or "ip_adapter.0.to_k_ip.bias" in tensors:
        return False
    return first.dim() == 2 and last.dim() == 2 and k0.dim() == 2 and k0.shape[1] == norm.shape[0]


class MLPImageProjection(nn.Module):
    """``forward(embeds [B, E]) -> [B, T, C]``: Linear E->2E, GELU, Linear 2E->T*C, reshape, LayerNorm."""

    def __init__(self, embed_dim: int, inner: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.context_dim, self.num_tokens = context_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(embed_dim, inner), nn.GELU(), nn.Linear(inner, num_tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.context_dim))


class SiglipPoolingHead(nn.Module):
    """SigLIP's attention-pooling head: ``[B, N, C]`` post-LayerNorm hidden states -> ``[B, C]`` pooled.

    A probe ``[1, 1, C]`` attends over the tokens (``nn.MultiheadAttention``), then ``h + MLP(LayerNorm(h))``."""

    def __init__(self, width: int, heads: int, inner: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(width, inner), nn.Linear(inner, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        probe = self.probe.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        h = self.attention(probe, hidden, hidden, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.layernorm(h)), approximate="tanh"))
        return h[:, 0]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], heads: int = 16) -> "SiglipPoolingHead":
        """From a SigLIP vision file's ``vision_model.head.*`` (or ``head.*``) tensors; ``heads``: 16 in so400m."""
        prefix = next((p for p in HEAD_PREFIXES if p + "probe" in state), None)
        if prefix is None:
            raise WeightError(
                "this SigLIP file has no attention-pooling head (vision_model.head.probe ...), which InstantX's adapter reads",
                fix="use the full SigLIP vision tower, e.g. sigclip_vision_patch14_384.safetensors (Comfy-Org) or "
                "google/siglip-so400m-patch14-384's model.safetensors, in models/clip_vision",
            )
        names = {
            "probe": "probe",
            "attention.in_proj_weight": "attention.in_proj_weight", "attention.in_proj_bias": "attention.in_proj_bias",
            "attention.out_proj.weight": "attention.out_proj.weight", "attention.out_proj.bias": "attention.out_proj.bias",
            "layernorm.weight": "layernorm.weight", "layernorm.bias": "layernorm.bias",
            "mlp.fc1.weight": "fc1.weight", "mlp.fc1.bias": "fc1.bias", "mlp.fc2.weight": "fc2.weight", "mlp.fc2.bias": "fc2.bias",
        }
        missing = [prefix + k for k in names if prefix + k not in state]
        if missing:
            raise WeightError(f"the SigLIP head lacks {missing}", fix="download the SigLIP vision file again")
        width, inner = int(state[prefix + "probe"].shape[-1]), int(state[prefix + "mlp.fc1.weight"].shape[0])
        if width % heads:
            raise WeightError(f"the SigLIP head's width {width} does not split into {heads} heads", fix="use SigLIP so400m")
        head = cls(width, heads, inner)
        head.load_state_dict({mine: state[prefix + theirs] for theirs, mine in names.items()})
        return head.to(state[prefix + "probe"].dtype)


def rms_norm_heads(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """RMS norm over the last (head) dim, no weight, computed in float32 or wider (diffusers' RMSNorm)."""
    wide = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class ImageKeyValue(nn.Module):
    """One block's ``to_k_ip`` / ``to_v_ip`` (Linear C -> hidden, no bias)."""

    def __init__(self, context_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden, bias=False)


def image_prompt_attention(kv: ImageKeyValue, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``q`` ``[B, H, L, D]`` (the block's queries, QK-normed, no RoPE), ``tokens`` ``[B, T, C]`` -> ``[B, L, H*D]``:
    ``softmax(q rms(K)^T / sqrt(D)) V`` over the image-prompt tokens."""
    b, h, n, d = q.shape
    k = rms_norm_heads(kv.to_k_ip(tokens).view(b, -1, h, d).transpose(1, 2))
    v = kv.to_v_ip(tokens).view(b, -1, h, d).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype)).transpose(1, 2).reshape(b, n, h * d)


class InstantXFluxIPAdapter(nn.Module):
    """A loaded InstantX Flux IP-Adapter: ``image_proj``, ``blocks[j]`` (doubles then singles), and the SigLIP ``head``."""

    def __init__(self, image_proj: MLPImageProjection, blocks: nn.ModuleList, head: Optional[SiglipPoolingHead] = None):
        super().__init__()
        self.image_proj, self.blocks, self.head = image_proj, blocks, head

    @property
    def embed_dim(self) -> int:
        return self.image_proj.proj[0].in_features

    @property
    def hidden(self) -> int:
        return self.blocks[0].to_k_ip.out_features

    def block_index(self, kind: str, i: int, n_double: int) -> int:
        """The file's processor index of ``("double_block", i)`` / ``("single_block", i)``."""
        return i if kind == "double_block" else n_double + i

    def check_model(self, n_double: int, n_single: int, hidden_size: int, heads: int) -> None:
        """Raise :class:`WeightError` when this file does not fit a Flux with these blocks, width and heads."""
        if len(self.blocks) != n_double + n_single or self.hidden != hidden_size or hidden_size % heads:
            raise WeightError(
                f"this Flux IP-Adapter has {len(self.blocks)} block projections of width {self.hidden}; the model has "
                f"{n_double} double + {n_single} single blocks of width {hidden_size}",
                fix="use it with FLUX.1-dev (or a fine-tune of it): InstantX's file is made for Flux.1's 19 + 38 blocks of width 3072",
            )

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """SigLIP's post-LayerNorm last hidden state ``[B, N, 1152]`` -> pooled ``[B, 1152]`` (needs the head)."""
        if self.head is None:
            raise WeightError("the SigLIP attention-pooling head is not loaded", fix="pick the SigLIP file in the loader")
        if hidden.dim() != 3 or hidden.shape[-1] != self.head.probe.shape[-1]:
            raise WeightError(
                f"the image features are {tuple(hidden.shape)}, the SigLIP head reads [batch, tokens, {self.head.probe.shape[-1]}]",
                fix="load SigLIP so400m patch14 384 (sigclip_vision_patch14_384.safetensors) in 'Load CLIP Vision'",
            )
        p = self.head.probe
        return self.head(hidden.to(p.device, p.dtype))

    def tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, 1152]`` pooled SigLIP features -> ``[B, T, C]`` image-prompt tokens."""
        if pooled.dim() != 2 or pooled.shape[1] != self.embed_dim:
            raise WeightError(f"the pooled image feature is {tuple(pooled.shape)}, the adapter reads [batch, {self.embed_dim}]",
                              fix="load SigLIP so400m patch14 384 in 'Load CLIP Vision'")
        p = self.image_proj.norm.weight
        return self.image_proj(pooled.to(p.device, p.dtype))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], head: Optional[SiglipPoolingHead] = None) -> "InstantXFluxIPAdapter":
        if not is_instantx_flux(state):
            raise WeightError("this file has no 'image_proj.proj.{0,2}' MLP and 'ip_adapter.N.to_k_ip' tensors at Flux widths, "
                              "so it is not InstantX's Flux IP-Adapter",
                              fix="pick ip-adapter.bin from InstantX/FLUX.1-dev-IP-Adapter (models/ipadapter)")
        need = [PROJ_PREFIX + k for k in ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias")]
        missing = [k for k in need if k not in state]
        if missing:
            raise WeightError(f"InstantX's Flux IP-Adapter file lacks {missing}", fix=FIX_DOWNLOAD)
        w0, w2, norm_w = (state[PROJ_PREFIX + k] for k in ("proj.0.weight", "proj.2.weight", "norm.weight"))
        context = int(norm_w.shape[0])
        if w2.shape[1] != w0.shape[0]:
            raise WeightError(f"the image projection's layers {tuple(w0.shape)} and {tuple(w2.shape)} do not chain", fix=FIX_DOWNLOAD)
        image_proj = MLPImageProjection(int(w0.shape[1]), int(w0.shape[0]), context, int(w2.shape[0]) // context)
        image_proj.load_state_dict({k[len(PROJ_PREFIX):]: state[k] for k in need})
        found = {}
        for key in state:
            m = BLOCK_KEY.match(key)
            if m:
                found.setdefault(int(m.group(1)), {})[f"to_{m.group(2)}_ip.weight"] = state[key]
        indices = sorted(found)
        if indices != list(range(len(indices))) or len(indices) > MAX_BLOCKS:
            raise WeightError("the block projections are not numbered 0..N-1", fix=FIX_DOWNLOAD)
        blocks = []
        for j in indices:
            part = found[j]
            if len(part) != 2 or part["to_k_ip.weight"].shape != part["to_v_ip.weight"].shape or part["to_k_ip.weight"].shape[1] != context:
                raise WeightError(f"block {j}'s to_k_ip / to_v_ip are incomplete or do not read width {context}", fix=FIX_DOWNLOAD)
            kv = ImageKeyValue(context, int(part["to_k_ip.weight"].shape[0]))
            kv.load_state_dict(part)
            blocks.append(kv)
        return cls(image_proj.to(w0.dtype), nn.ModuleList(blocks).to(w0.dtype), head)
