"""The parameters the pack trains, as ``torch.nn.Module``s with the native weight names (pure torch).

Each module holds one mechanism's trainable tensors, keyed by cross-attention layer
(ComfyUI's ``(block, id, index)``, stored as ``"<block>_<id>_<index>"`` because PyTorch names
cannot contain dots), and exports them as ``{layer key: {native name: tensor}}``, the
``IdAdapter.layers`` layout the native file writes (``adapters/formats/native_format.py``) and the
mechanism nodes read:

| module | per-layer names | read by |
| --- | --- | --- |
| :class:`VisualProjections` | ``to_q`` ``[C, C]``, ``to_k`` / ``to_v`` ``[C, D]`` (PVA's to_visual_*) | Apply parallel visual attention (joint, adapter projections) |
| :class:`RouterMLPs` | ``router.0.weight`` ``[Hr, C]``, ``router.0.bias``, ``router.2.weight`` ``[2, Hr]``, ``router.2.bias`` | Apply mixture-of-attention (learned router) |
| :class:`ScorePredictors` | ``score.0.weight`` ``[Hs, C + Ct]``, ``score.0.bias``, ``score.2.weight`` ``[2, Hs]``, ``score.2.bias`` | CA² gate (native score) |
| :class:`FaceAdapterLayers` | FACT's 17 processor names (``linear.weight`` ... ``alpha_dense``) | the face adapter node (FACT) |
| :class:`KeyValueProjections` | ``to_k`` / ``to_v`` ``[C, D]`` (or ``nested.to_k`` / ``nested.to_v``) | Apply KV-mixed attention (trained), Apply nested attention (native nested weights) |

and two that are not per layer: :class:`PromptTokenVectors` (PVA's ``modifier_vec``, one vector
per text encoder) and :class:`StageTokenTable` (SeFi-IDE's per-stage ``(P^K, P^V)`` pairs).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LayerKey = Tuple[str, int, int]


def layer_name(key: LayerKey) -> str:
    """``("input", 1, 0)`` -> ``"input_1_0"`` (a PyTorch-safe module name)."""
    return f"{key[0]}_{int(key[1])}_{int(key[2])}"


def layer_key(name: str) -> LayerKey:
    block, block_id, index = name.rsplit("_", 2)
    return (block, int(block_id), int(index))


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


class PerLayer(nn.Module):
    """Base: a ``ModuleDict`` of per-layer submodules; :meth:`export` names their tensors natively."""

    prefix = ""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()

    def keys(self) -> Iterable[LayerKey]:
        return [layer_key(n) for n in self.layers]

    def of(self, key: LayerKey) -> nn.Module:
        return self.layers[layer_name(key)]

    def export(self) -> Dict[LayerKey, Dict[str, torch.Tensor]]:
        out = {}
        for name, module in self.layers.items():
            out[layer_key(name)] = {f"{self.prefix}{k}": _detached(v) for k, v in module.state_dict().items()}
        return out


# --- PVA ------------------------------------------------------------------------------------------


class _Projections(nn.Module):
    def __init__(self, to_q: torch.Tensor, to_k: torch.Tensor, to_v: torch.Tensor):
        super().__init__()
        self.to_q = nn.Parameter(to_q.detach().float().clone())
        self.to_k = nn.Parameter(to_k.detach().float().clone())
        self.to_v = nn.Parameter(to_v.detach().float().clone())


class VisualProjections(PerLayer):
    """PVA's ``to_visual_{q,k,v}`` per layer (float32 master copies).

    ``initial``: ``{key: {"to_q": [C, C], "to_k": [C, D], "to_v": [C, D]}}``, e.g. an adapter's
    weights or copies of the layers' own ``to_q / to_k / to_v`` (PVA's initialisation).
    """

    def __init__(self, initial: Mapping[LayerKey, Mapping[str, torch.Tensor]]):
        super().__init__()
        for key, w in initial.items():
            self.layers[layer_name(key)] = _Projections(w["to_q"], w["to_k"], w["to_v"])

    def weights(self, key: LayerKey) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.of(key)
        return m.to_q, m.to_k, m.to_v


class _KeyValue(nn.Module):
    def __init__(self, to_k: torch.Tensor, to_v: torch.Tensor):
        super().__init__()
        self.to_k = nn.Parameter(to_k.detach().float().clone())
        self.to_v = nn.Parameter(to_v.detach().float().clone())


class KeyValueProjections(PerLayer):
    """Identity key / value projections per layer, ``to_k`` / ``to_v`` ``[C, D]`` (KV-mixed's W_k / W_v;
    with ``prefix="nested."`` Nested Attention's W_Kn / W_Vn). ``initial``: ``{key: {"to_k", "to_v"}}``."""

    def __init__(self, initial: Mapping[LayerKey, Mapping[str, torch.Tensor]], prefix: str = ""):
        super().__init__()
        self.prefix = prefix
        for key, w in initial.items():
            self.layers[layer_name(key)] = _KeyValue(w["to_k"], w["to_v"])

    def has(self, key: LayerKey) -> bool:
        return layer_name(key) in self.layers

    def weights(self, key: LayerKey) -> Tuple[torch.Tensor, torch.Tensor]:
        m = self.of(key)
        return m.to_k, m.to_v


class PromptTokenVectors(nn.Module):
    """One learned token embedding per text encoder (PVA's ``modifier_vec``): ``{encoder: [width]}``."""

    def __init__(self, initial: Mapping[str, torch.Tensor]):
        super().__init__()
        self.vectors = nn.ParameterDict({name: nn.Parameter(t.detach().float().reshape(-1).clone()) for name, t in initial.items()})

    def export(self) -> Dict[str, torch.Tensor]:
        return {name: _detached(p) for name, p in self.vectors.items()}


# --- MoA router -----------------------------------------------------------------------------------


def _mlp(d_in: int, hidden: int, d_out: int, zero_last: bool, seed: int) -> nn.Sequential:
    """``Linear(d_in, hidden), GELU, Linear(hidden, d_out)``, deterministic init (Kaiming-uniform-like)."""
    gen = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    with torch.no_grad():
        for i, lin in ((0, mlp[0]), (2, mlp[2])):
            bound = 1.0 / math.sqrt(lin.in_features)
            if i == 2 and zero_last:
                lin.weight.zero_()
                lin.bias.zero_()
            else:
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * bound)
                lin.bias.copy_((torch.rand(lin.bias.shape, generator=gen) * 2 - 1) * bound)
    return mlp


class RouterMLPs(PerLayer):
    """MoA routers: per layer ``Linear(C, Hr) -> GELU -> Linear(Hr, 2)`` (logits prior, personalized).

    The last layer starts at zero, so every router starts at ``R = (0.5, 0.5)``.
    """

    prefix = "router."

    def __init__(self, channels: Mapping[LayerKey, int], hidden: int = 128, seed: int = 0):
        super().__init__()
        for i, (key, c) in enumerate(sorted(channels.items())):
            self.layers[layer_name(key)] = _mlp(int(c), hidden, 2, zero_last=True, seed=seed * 1000 + i)

    @classmethod
    def from_weights(cls, weights: Mapping[LayerKey, Mapping[str, torch.Tensor]]) -> "RouterMLPs":
        hidden = int(next(iter(weights.values()))["router.0.weight"].shape[0])
        out = cls({k: int(w["router.0.weight"].shape[1]) for k, w in weights.items()}, hidden=hidden)
        for key, w in weights.items():
            out.of(key).load_state_dict({n[len("router."):]: t.float() for n, t in w.items() if n.startswith("router.")})
        return out

    def logits(self, key: LayerKey, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[b, N, C] -> [b, N, 2]`` in the hidden states' dtype."""
        mlp = self.of(key)
        dt = hidden_states.dtype
        h = F.linear(hidden_states, mlp[0].weight.to(dt), mlp[0].bias.to(dt))
        return F.linear(F.gelu(h), mlp[2].weight.to(dt), mlp[2].bias.to(dt))


# --- CA² score predictor --------------------------------------------------------------------------


class ScorePredictors(PerLayer):
    """CA²'s score MLP per layer on ``concat(Z, pooled text)``: ``Linear(C + Ct, Hs) -> GELU -> Linear(Hs, 2)``.

    ``Score = softmax(logits)[0]`` (the text-importance channel), the reading the CA² node
    documents (``adapters/attention/ca2_gate.py`` on the CA² branch: ``native_score``).
    """

    prefix = "score."

    def __init__(self, channels: Mapping[LayerKey, int], context_dim: int, hidden: int = 128, seed: int = 0):
        super().__init__()
        self.context_dim = int(context_dim)
        for i, (key, c) in enumerate(sorted(channels.items())):
            self.layers[layer_name(key)] = _mlp(int(c) + self.context_dim, hidden, 2, zero_last=False, seed=seed * 1000 + i)

    def weights(self, key: LayerKey, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The layer's tensors under their native names (``score.0.weight``...), in ``dtype`` (differentiable)."""
        return {f"score.{k}": v.to(dtype) for k, v in self.of(key).named_parameters()}

    def score(self, key: LayerKey, hidden_states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``[b, N, C]``, ``[b, 1, Ct]`` -> ``[b, N]`` in [0, 1] (float32)."""
        mlp = self.of(key)
        dt = hidden_states.dtype
        c = hidden_states.shape[-1]
        w0 = mlp[0].weight.to(dt)
        per_row = F.linear(pooled.to(dt), w0[:, c:], mlp[0].bias.to(dt))
        h = F.gelu(F.linear(hidden_states, w0[:, :c]) + per_row)
        logits = F.linear(h, mlp[2].weight.to(dt), mlp[2].bias.to(dt)).float()
        return logits.softmax(dim=-1)[..., 0]


# --- SeFi-IDE per-stage tokens --------------------------------------------------------------------


class StageTokenTable(nn.Module):
    """Per text encoder ``keys`` / ``values`` ``[S, n, width]`` (SeFi-IDE's ``(P_i^K, P_i^V)``)."""

    def __init__(self, keys: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.keys = nn.ParameterDict({e: nn.Parameter(t.detach().float().clone()) for e, t in keys.items()})
        self.values = nn.ParameterDict({e: nn.Parameter(t.detach().float().clone()) for e, t in values.items()})

    @property
    def stages(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    def pair(self, stage: int, which: str) -> Dict[str, torch.Tensor]:
        table = self.keys if which == "keys" else self.values
        return {e: t[stage] for e, t in table.items()}


# --- FACT gated self-attention --------------------------------------------------------------------


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class GatedSelfAttention(nn.Module):
    """One FACT adapter layer (GLIGEN-style), parameter names as FACT's processor."""

    def __init__(self, dim: int, token_dim: int, heads: int):
        super().__init__()
        self.linear = nn.Linear(token_dim, dim)
        self.attn = _SelfAttention(dim, heads)
        self.ff = _FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_dense = nn.Parameter(torch.zeros(()))

    def weights(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """The tensors under FACT's names, in ``dtype`` (differentiable: views of the parameters)."""
        return {k: v.to(dtype) for k, v in self.named_parameters()}

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, gate: float = 1.0) -> torch.Tensor:
        """``x`` ``[B, N, C]``, face tokens ``[B, T, Dt]`` -> new ``x`` ``[B, N, C]`` (a plain-PyTorch reference).

        ``x1 = x + g tanh(a_attn) SA(norm1([x; linear(t)]))[:, :N]``, ``x2 = x1 + g tanh(a_ff) FF(norm2(x1))``.
        """
        dt = x.dtype
        f = self.linear(tokens.to(dt))
        h = self.norm1(torch.cat([x, f], dim=1))
        n = x.shape[1]
        q = self.attn.to_q(h[:, :n])
        k, v = self.attn.to_k(h), self.attn.to_v(h)
        heads = self.attn.heads
        qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        sa = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(x.shape[0], n, -1)
        sa = self.attn.to_out[0](sa)
        x1 = x + gate * torch.tanh(self.alpha_attn).to(dt) * sa
        return x1 + gate * torch.tanh(self.alpha_dense).to(dt) * self.ff(self.norm2(x1))


class FaceAdapterLayers(PerLayer):
    """FACT's adapter per cross-attention layer (SD1.5): ``{key: GatedSelfAttention}``."""

    def __init__(self, shapes: Mapping[LayerKey, Tuple[int, int]], token_dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for key, (channels, heads) in sorted(shapes.items()):
            layer = GatedSelfAttention(int(channels), int(token_dim), int(heads))
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    if name.startswith("alpha"):
                        continue
                    if name.startswith("norm") and name.endswith("weight"):
                        p.fill_(1.0)
                    elif p.dim() == 1:
                        p.zero_()
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            self.layers[layer_name(key)] = layer


def copy_layer_weights(tensors: Optional[Mapping[str, torch.Tensor]], fallback: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each of ``to_q``, ``to_k``, ``to_v`` from ``tensors`` when present, else from ``fallback``."""
    tensors = tensors or {}
    return {name: (tensors.get(name) if tensors.get(name) is not None else fallback[name]) for name in ("to_q", "to_k", "to_v")}
