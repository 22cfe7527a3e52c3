"""A cross-attention layer's q/k/v projection weights *as loaded*, before LoRAs and other weight patches.

MoA's prior branch is the base model's attention ("fixing its attention layers in the prior
branch"), so with ``prior: base`` the routing stage needs ``to_q`` / ``to_k`` / ``to_v`` without
the weight patches a LoRA loader (or any pack's ``ModelPatcher.add_patches``) put on the model.
ComfyUI keeps those weights, in places that differ per host and per loading mode, all
feature-detected here at sampling time (never assumed):

- patched in place (normal loading): the original is in ``ModelPatcher.backup[key]``, a tensor on
  the early-2024 host, a ``(weight, inplace_update)`` named tuple on 0.3.x; ``backup`` is one dict
  shared by every clone of a ModelPatcher, so the one seen when the node ran is the one sampling fills;
- patched at cast time (low-VRAM loading, and 0.3.x weight wrappers): the module keeps its loaded
  weight and ``weight_function`` (a callable on the early-2024 host, a list on 0.3.x) applies the
  patches when the layer runs;
- hook patches (0.3.x ``hook_backup[key] = (weight, device)``) applied in place;
- otherwise the module's weight *is* the loaded one.

``key`` is ComfyUI's state-dict name, ``diffusion_model.<layer path>.attn2.to_q.weight``.
Nothing here reads a tensor's values, so it adds no host sync; :meth:`patched` is a few dict
lookups per layer call.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..common.host import LayerInfo, LayerKey

PROJECTIONS = ("to_q", "to_k", "to_v")


def _has_weight_function(module, name: str) -> bool:
    fn = getattr(module, name, None)
    if fn is None:
        return False
    return len(fn) > 0 if isinstance(fn, (list, tuple)) else True


def _backup_tensor(entry) -> torch.Tensor:
    """A ``ModelPatcher.backup`` entry: a tensor (early 2024) or a named tuple with ``.weight`` (0.3.x)."""
    return entry if torch.is_tensor(entry) else entry.weight


class BaseProjections:
    """The loaded (unpatched) q/k/v projections of every cross-attention layer of one MODEL.

    ``model_patcher``: any clone of the MODEL (they share the module tree and ``backup``);
    ``layers``: its cross-attention layers. Holds references, copies nothing.
    """

    def __init__(self, model_patcher, layers: List[LayerInfo]):
        self._diffusion_model = model_patcher.model.diffusion_model
        self._backup = getattr(model_patcher, "backup", None)
        if self._backup is None:
            self._backup = {}
        self._hook_backup = getattr(model_patcher, "hook_backup", None) or {}
        self._paths = {info.key: info.module_path for info in layers}
        self._modules: Dict[LayerKey, Tuple[object, ...]] = {}
        self._key_cache: Dict[Tuple[LayerKey, str], Tuple[str, str]] = {}

    def __deepcopy__(self, memo):
        return self

    def _linears(self, layer: LayerKey):
        found = self._modules.get(layer)
        if found is None:
            attn2 = self._diffusion_model.get_submodule(self._paths[layer]).attn2
            found = tuple(getattr(attn2, name) for name in PROJECTIONS)
            self._modules[layer] = found
        return found

    def _keys(self, layer: LayerKey, name: str) -> Tuple[str, str]:
        found = self._key_cache.get((layer, name))
        if found is None:
            prefix = f"diffusion_model.{self._paths[layer]}.attn2.{name}"
            found = self._key_cache[(layer, name)] = (prefix + ".weight", prefix + ".bias")
        return found

    def knows(self, layer: LayerKey) -> bool:
        return layer in self._paths

    def patched(self, layer: LayerKey) -> bool:
        """Whether any of the layer's q/k/v weights differ from the loaded ones right now."""
        hook_backup = self._hook_backup
        for name, module in zip(PROJECTIONS, self._linears(layer)):
            for key in self._keys(layer, name):
                if key in self._backup or key in hook_backup:
                    return True
            if _has_weight_function(module, "weight_function") or _has_weight_function(module, "bias_function"):
                return True
        return False

    def _loaded(self, layer: LayerKey, name: str, module, suffix: int) -> Optional[torch.Tensor]:
        key = self._keys(layer, name)[suffix]
        if key in self._backup:
            return _backup_tensor(self._backup[key])
        if key in self._hook_backup:
            return self._hook_backup[key][0]
        return module.weight if suffix == 0 else module.bias

    def weights(self, layer: LayerKey) -> Tuple[Tuple[torch.Tensor, Optional[torch.Tensor]], ...]:
        """``((W_q, b_q), (W_k, b_k), (W_v, b_v))`` as loaded; ``W`` ``[C, C_in]``, ``b`` ``[C]`` or None."""
        out = []
        for name, module in zip(PROJECTIONS, self._linears(layer)):
            out.append((self._loaded(layer, name, module, 0).detach(), None if module.bias is None else self._loaded(layer, name, module, 1).detach()))
        return tuple(out)
