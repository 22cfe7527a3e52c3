"""Which tensor dtypes a weight file may hold, and what the pack does with each.

A file's tensors arrive in their stored dtype (``safe_load``). Before any converter,
``load_state_dict`` or matmul sees them, :func:`usable_weights` applies one rule:

- float16, bfloat16, float32, float64: kept as they are.
- float8, every kind (``float8_e4m3fn``, ``float8_e5m2`` and the ``fnuz`` / ``e8m0`` variants):
  converted to float32. Exact: float32 holds every float8 value (its exponent range and
  mantissa contain each float8 format's), including NaN, which the NaN check then reports.
  Few kernels accept float8 on the CPU, so it is never kept.
- complex: refused. A weight has no imaginary part; casting would silently drop it.
- bool: refused (true/false flags, not weights).
- integers (int8 ... int64, uint8 ... uint64): refused, except for names in
  ``allow_integer`` (index buffers such as ``position_ids`` that some checkpoints carry).
- anything else (packed float4, quantized types): refused.

Each refusal is a :class:`WeightError` naming the tensor and its dtype.

Magnitudes: every float weight must satisfy ``|w| <= MAX_WEIGHT_MAGNITUDE`` (65504, the
largest float16 value). A finite but absurd weight (1e30 in a projection) passes a NaN
check yet overflows to inf in the first attention product (q @ k^T sums C products,
and samplers often run attention in float16), giving a black or noise image with no
error. Released weights are far below this (they are published in float16, or trained
in float32 with values of order 1); the bound is checked on load and refused with the
file and tensor named. NaN and inf are refused the same way.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

import torch

from .weight_errors import WeightError

KEPT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n))
INTEGER_BUFFERS = ("position_ids", "num_batches_tracked")
MAX_WEIGHT_MAGNITUDE = 65504.0  # float16's largest finite value, see the module docstring


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_kind(dtype: torch.dtype) -> str:
    """"float", "float8", "complex", "bool", "integer" or "other"."""
    if dtype in KEPT:
        return "float"
    if dtype in FLOAT8:
        return "float8"
    if dtype.is_complex:
        return "complex"
    if dtype == torch.bool:
        return "bool"
    if not dtype.is_floating_point and dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + tuple(
        getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n)
    ):
        return "integer"
    return "other"


_WHAT = {
    "complex": "complex numbers (a weight has no imaginary part, and dropping it would change the weights)",
    "bool": "true/false values, not weights",
    "integer": "integers, not weights",
    "other": "a packed or quantized type the pack cannot convert exactly",
}


def usable_weights(tensors: Mapping[str, torch.Tensor], allow_integer: Optional[Callable[[str], bool]] = None, what: str = "the file") -> Dict[str, torch.Tensor]:
    """``tensors`` with float8 turned into float32; :class:`WeightError` for any other non-float dtype (see module docstring)."""
    allow_integer = allow_integer or (lambda name: name.endswith(INTEGER_BUFFERS))
    out: Dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
            continue
        kind = dtype_kind(t.dtype)
        if kind == "float":
            out[name] = t
        elif kind == "float8":
            out[name] = t.to(torch.float32)
        elif kind == "integer" and allow_integer(name):
            out[name] = t
        else:
            raise WeightError(
                f"{what}'s tensor '{name}' holds {dtype_name(t.dtype)} values: {_WHAT[kind]}",
                fix="use the published float16 / bfloat16 / float32 (or float8) file; this one is damaged or is not a weight file",
            )
    for name, t in out.items():
        if isinstance(t, torch.Tensor):
            check_magnitude(name, t, what)
    return out


def check_magnitude(name: str, t: torch.Tensor, what: str = "the file", limit: float = MAX_WEIGHT_MAGNITUDE) -> None:
    """:class:`WeightError` when a float tensor holds NaN, inf or a value beyond ``+-limit``."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    low, high = torch.aminmax(t.detach().reshape(-1))
    low, high = float(low), float(high)
    if low >= -limit and high <= limit:
        return
    if low != low or high != high or not torch.isfinite(t).all():
        problem = "NaN or infinite values"
    else:
        problem = f"the value {high if abs(high) > abs(low) else low:.4g}, beyond +-{limit:g} (the float16 range), which overflows to inf inside attention"
    raise WeightError(
        f"{what}'s tensor '{name}' holds {problem}",
        fix="use the published file (download it again); if it came from a training run, take an earlier checkpoint",
    )
