"""Per-stage K/V identity tokens (SeFi-IDE, "Beyond Inserting", Li et al., arXiv 2402.00631).

One identity is represented by S (five in the paper) pairs of token embeddings
``(P_i^K, P_i^V)``, one pair per *denoising-timestep stage* (ProSpect-style:
stage i covers t in [1000 - 200 i, 1000 - 200 (i - 1)) for T = 1000). The prompt
("a photo of V*") is encoded twice by the frozen text encoder, once with V*'s
embedding set to ``P_i^K`` and once with ``P_i^V``; every cross-attention then
takes its keys from the first encoding and its values from the second::

    Attn = softmax(Q (W_k c_i^K)^T / sqrt(d)) (W_v c_i^V)      (same W_k, W_v as the model)

The paper finds early stages control layout, later ones identity details, and
that P^V carries most of the identity, P^K texture and lighting.

Data (ID_TOKENS, :class:`StageTokens`): plain tensors so a trainer can optimise
them directly: ``keys[encoder]`` and ``values[encoder]`` ``[S, n, width]`` per
text encoder of the base model (``"l"`` 768 for SD1.5; ``"l"`` 768 and ``"g"``
1280 for SDXL; ``"h"`` 1024 for SD2), ``n`` vectors per token (1 in the paper).

Stages are given by S-1 boundaries as fractions of the timestep range
(``p`` -> t = 999 (1 - p), which is what ComfyUI's ``percent_to_sigma`` uses):
(0.2, 0.4, 0.6, 0.8) reproduces the paper's five equal timestep bands. A sigma
exactly on a boundary belongs to the earlier stage (t in [800, 1000) is stage 1
in the paper's half-open bands).

File format (native safetensors): tensors ``"<encoder>.keys"`` /
``"<encoder>.values"`` ``[S, n, width]`` and a metadata header with
``format = "identity_attention_tokens"``, ``version``, ``base``, ``count``
(S, the number of stage pairs), ``vectors`` (n), ``encoders`` (comma list),
plus free-form strings (``init``, ``placeholder``...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

TOKENS_FORMAT = "identity_attention_tokens"
TOKENS_VERSION = "1"
ENCODER_WIDTHS: Dict[str, Dict[str, int]] = {"sd15": {"l": 768}, "sd2": {"h": 1024}, "sdxl": {"l": 768, "g": 1280}}
DEFAULT_STAGES = 5
DEFAULT_BOUNDARIES = (0.2, 0.4, 0.6, 0.8)
SEED_INIT_STD = 0.02  # CLIP's token-embedding init std; the scale of a fresh, untrained token


@dataclass
class StageTokens:
    """The ID_TOKENS socket type (see module docstring)."""

    base: str
    keys: Dict[str, torch.Tensor]
    values: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> Optional[str]:
        if self.base not in ENCODER_WIDTHS:
            return f"unknown base model {self.base!r}; known: {', '.join(ENCODER_WIDTHS)}"
        if set(self.keys) != set(self.values) or not self.keys:
            return "keys and values must cover the same text encoders"
        shape = None
        for encoder in self.keys:
            k, v = self.keys[encoder], self.values[encoder]
            if k.dim() != 3 or k.shape != v.shape:
                return f"encoder {encoder!r}: keys {list(k.shape)} and values {list(v.shape)} must both be [stages, vectors, width]"
            if shape is not None and k.shape[:2] != shape:
                return "every text encoder needs the same number of stages and vectors"
            shape = k.shape[:2]
            width = ENCODER_WIDTHS[self.base].get(encoder)
            if width is not None and k.shape[-1] != width:
                return f"encoder {encoder!r} tokens are {k.shape[-1]} wide, {self.base} needs {width}"
        return None

    @property
    def stages(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    @property
    def vectors(self) -> int:
        return next(iter(self.keys.values())).shape[1]

    @property
    def encoders(self) -> Tuple[str, ...]:
        return tuple(sorted(self.keys))

    def pair(self, stage: int, which: str) -> Dict[str, torch.Tensor]:
        """``{encoder: [n, width]}`` of stage ``stage``'s ``"keys"`` or ``"values"`` token."""
        table = self.keys if which == "keys" else self.values
        return {encoder: t[stage] for encoder, t in table.items()}

    # --- files ---------------------------------------------------------------------------------
    def to_file_dict(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        tensors = {}
        for encoder in self.encoders:
            tensors[f"{encoder}.keys"] = self.keys[encoder].detach().float().cpu().contiguous()
            tensors[f"{encoder}.values"] = self.values[encoder].detach().float().cpu().contiguous()
        metadata = {k: str(v) for k, v in self.metadata.items()}
        metadata.update(
            format=TOKENS_FORMAT,
            version=TOKENS_VERSION,
            base=self.base,
            count=str(self.stages),
            vectors=str(self.vectors),
            encoders=",".join(self.encoders),
        )
        return tensors, metadata

    @classmethod
    def from_file_dict(cls, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]]) -> "StageTokens":
        """Raises ``ValueError`` naming what is wrong with the file."""
        metadata = dict(metadata or {})
        if metadata.get("format") != TOKENS_FORMAT:
            raise ValueError(f"not an identity-token file (metadata format is {metadata.get('format')!r}, expected {TOKENS_FORMAT!r})")
        if metadata.get("version") != TOKENS_VERSION:
            raise ValueError(f"identity-token file version {metadata.get('version')!r} is not supported (this pack reads {TOKENS_VERSION})")
        base = metadata.get("base", "")
        encoders = [e for e in metadata.get("encoders", "").split(",") if e]
        keys, values = {}, {}
        for encoder in encoders:
            if f"{encoder}.keys" not in tensors or f"{encoder}.values" not in tensors:
                raise ValueError(f"the file lists text encoder {encoder!r} but has no '{encoder}.keys' / '{encoder}.values'")
            keys[encoder] = tensors[f"{encoder}.keys"].float()
            values[encoder] = tensors[f"{encoder}.values"].float()
        tokens = cls(base=base, keys=keys, values=values, metadata={k: v for k, v in metadata.items() if k not in ("format", "version")})
        if str(tokens.stages) != metadata.get("count", str(tokens.stages)):
            raise ValueError(f"the header says {metadata.get('count')} stages, the tensors have {tokens.stages}")
        return tokens


def make_tokens(
    base: str,
    stages: int = DEFAULT_STAGES,
    vectors: int = 1,
    seed: int = 0,
    init: Optional[Dict[str, torch.Tensor]] = None,
    noise: float = 0.0,
    metadata: Optional[Dict[str, str]] = None,
) -> StageTokens:
    """Fresh tokens for ``base``.

    init:  optional ``{encoder: [width]}`` (a word's token embedding): every
           P^K / P^V starts as that vector, plus ``noise`` times its std of
           Gaussian noise (seeded). Without ``init``: N(0, SEED_INIT_STD^2).
    """
    widths = ENCODER_WIDTHS[base]
    gen = torch.Generator().manual_seed(seed)
    keys, values = {}, {}
    for encoder in sorted(widths):
        width = widths[encoder]
        shape = (stages, vectors, width)
        if init is not None:
            start = init[encoder].float().reshape(1, 1, width)
            scale = noise * float(start.std())
            keys[encoder] = start.expand(shape).clone() + scale * torch.randn(shape, generator=gen)
            values[encoder] = start.expand(shape).clone() + scale * torch.randn(shape, generator=gen)
        else:
            keys[encoder] = SEED_INIT_STD * torch.randn(shape, generator=gen)
            values[encoder] = SEED_INIT_STD * torch.randn(shape, generator=gen)
    return StageTokens(base=base, keys=keys, values=values, metadata=dict(metadata or {}))


# --- encoded prompts and their use in cross-attention ------------------------------------------


@dataclass
class StageContexts:
    """A prompt encoded once per stage: ``keys`` / ``values`` ``[S, L, D]`` (context for to_k / to_v)."""

    keys: torch.Tensor
    values: torch.Tensor
    base: str = "unknown"
    placeholder: str = ""

    def __post_init__(self):
        if self.keys.dim() != 3 or self.keys.shape != self.values.shape:
            raise ValueError(f"keys {list(self.keys.shape)} and values {list(self.values.shape)} must both be [stages, tokens, dim]")

    def __deepcopy__(self, memo):
        return self

    @property
    def stages(self) -> int:
        return self.keys.shape[0]


def boundary_sigmas(boundaries: Sequence[float], percent_to_sigma) -> List[float]:
    """Stage boundaries (fractions, increasing) -> sigmas (decreasing) through the model's schedule."""
    return [float(percent_to_sigma(p)) for p in boundaries]


def parse_boundaries(text: str, stages: int) -> Tuple[float, ...]:
    """``"0.2, 0.4, 0.6, 0.8"`` -> a strictly increasing tuple of ``stages - 1`` fractions in (0, 1)."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"stage boundaries must be numbers separated by commas, got {text!r}") from None
    if len(values) != stages - 1:
        raise ValueError(f"{stages} stages need {stages - 1} boundaries, got {len(values)}")
    if any(not 0.0 < v < 1.0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"stage boundaries must increase strictly between 0 and 1, got {text!r}")
    return values


def even_boundaries(stages: int) -> Tuple[float, ...]:
    return tuple(round(i / stages, 6) for i in range(1, stages))


def stage_at(sigma: float, sigmas: Sequence[float]) -> int:
    """Which stage a sigma is in: the number of boundary sigmas it has fallen below.

    ``sigmas`` decrease (stage 0 = the noisiest steps). A sigma equal to a
    boundary stays in the earlier stage.
    """
    return sum(1 for b in sigmas if sigma < b)


def _repeat_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


def common_length(a: int, b: int) -> int:
    """Token counts of two contexts -> the length both repeat to (ComfyUI batches conds the same way)."""
    return a * b // math.gcd(a, b)


def swap_rows(context: torch.Tensor, stage_context: torch.Tensor, row_weights: Sequence[float], rows_per_chunk: int) -> torch.Tensor:
    """Per batch chunk, blend the context toward ``stage_context`` ``[1, Ls, D]``.

    context: ``[B, L, D]``, B = len(row_weights) * rows_per_chunk. A chunk with
    weight 0 keeps its rows exactly; weight 1 takes the stage context; between,
    ``context + w (stage - context)``. When ``L != Ls`` both are repeated to
    their least common multiple (repeating every key and value the same number
    of times leaves attention unchanged). Returns ``[B, L', D]``.
    """
    length = common_length(context.shape[1], stage_context.shape[1])
    context = _repeat_to(context, length)
    stage = _repeat_to(stage_context.to(dtype=context.dtype, device=context.device), length)
    parts = []
    for i, w in enumerate(row_weights):
        rows = context[i * rows_per_chunk : (i + 1) * rows_per_chunk]
        if w == 0.0:
            parts.append(rows)
        elif w == 1.0:
            parts.append(stage.expand(rows.shape[0], -1, -1))
        else:
            parts.append(torch.lerp(rows, stage.expand(rows.shape[0], -1, -1), w))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
