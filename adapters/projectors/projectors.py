"""The identity-token projectors, by name: what turns an IDENTITY into tokens.

| class | released as | input (IdentityFeatures field) | output |
| --- | --- | --- | --- |
| ImageProjection | IP-Adapter base / light / vit-G | clip_embeds ``[N, De]`` | ``[N, 4, C]`` |
| PerceiverResampler | IP-Adapter plus / plus-face | clip_hidden ``[N, 257, 1280]`` | ``[N, 16, C]`` |
| PerceiverResampler | InstantID | arcface (raw) ``[N, 512]`` | ``[N, 16, 2048]`` |
| PerceiverResampler | FaceChain-FACT | face_tokens ``[N, 144, 512]`` | ``[N, 16, 768]`` |
| FullFaceProjection | IP-Adapter full-face | clip_hidden ``[N, 257, 1280]`` | ``[N, 257, C]`` |
| FaceIDProjection | IP-Adapter-FaceID / portrait | arcface_normed ``[N, 512]`` | ``[N, T, C]`` |
| FaceIDPlusProjection | FaceID-Plus / PlusV2 | arcface_normed + clip_hidden | ``[N, 4, C]`` |
| PVATransformNetwork | PVA | arcface (raw) ``[R, 512]``, all refs | ``[1, 10, 1024]`` |
| PuLIDIDEncoder / PuLIDIDFormer | PuLID v1 / v1.1 | arcface (raw) + EVA02-CLIP features | ``[N, 10 / 32, 2048]`` |
| KVMixedEncoder | trained here (``kv_mixed``) | arcface_normed ``[N, 512]`` | ``[N, 2T, C]`` (T keys, T values) |
| QueryFormer | trained here (``nested``; ``omni_id`` as a set encoder) | any one kind (default arcface_normed) | ``[N, T, C]``; set: ``[1, T, C]`` from all photos |

Which one an adapter uses is decided by the weight file (``weight_formats``),
never by the user. :func:`build_projector` rebuilds one from its class name,
config and state dict (the native format stores exactly these three).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .id_adapter import TokenProjector
from .projector_mlp import FaceIDPlusProjection, FaceIDProjection, FullFaceProjection, ImageProjection
from .kv_mixed_encoders import KVMixedEncoder
from .query_former import QueryFormer
from .projector_perceiver import PerceiverResampler
from .projector_pulid import PuLIDIDEncoder, PuLIDIDFormer
from .projector_pva import PVATransformNetwork
from ..weights.weight_errors import WeightError

PROJECTORS: Dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ImageProjection,
        PerceiverResampler,
        FullFaceProjection,
        FaceIDProjection,
        FaceIDPlusProjection,
        PVATransformNetwork,
        PuLIDIDEncoder,
        PuLIDIDFormer,
        KVMixedEncoder,
        QueryFormer,
    )
}


def projector_name(projector: TokenProjector) -> str:
    name = type(projector).__name__
    if name not in PROJECTORS or not hasattr(projector, "config"):
        raise WeightError(f"the token projector {name} cannot be saved: it is not one of {', '.join(PROJECTORS)}")
    return name


def build_projector(name: str, config: Mapping, state: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> TokenProjector:
    """A projector of class ``name`` with ``config``, its parameters loaded from ``state`` (strict).

    The module is built on the meta device and then takes the stored tensors
    themselves (no copy), so a half-precision file stays half precision and a
    1.7 GB adapter is not held twice; ``dtype`` converts them first.
    """
    cls = PROJECTORS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise WeightError(f"unknown token projector {name!r}; known: {', '.join(PROJECTORS)}")
    _check_config(name, config)
    try:
        with torch.device("meta"):  # no memory and no random init: the parameters come from ``state``
            module = cls(**dict(config))
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AssertionError) as err:
        raise WeightError(f"the settings stored for the {name} token projector are not valid ({err})") from None
    missing, unexpected = _compare(module, state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        raise WeightError(f"the {name} token projector's weights do not fit ({'; '.join(parts)})", fix="the file is incomplete or of another model; download it again")
    integer = [k for k, v in state.items() if not v.is_floating_point()]
    if integer:
        raise WeightError(f"the {name} token projector's weights hold integers ({', '.join(integer[:3])})", fix="the file is damaged; download it again")
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    try:
        module.load_state_dict(tensors, strict=True, assign=True)  # the module uses the file's tensors: no copy, file dtype kept
    except RuntimeError as err:
        raise WeightError(f"the {name} token projector's weights do not fit ({str(err).splitlines()[-1].strip()[:200]})", fix="the file is damaged; download it again") from None
    module.eval()
    module.requires_grad_(False)
    return module


MAX_WIDTH = 1 << 16  # the widest projector of a released file is 12288 (FaceID's 4 x 3072 SDXL tokens)
MAX_DEPTH = 64  # layers; released projectors have at most 10
DEPTH_KEYS = ("depth", "num_layer")


def _check_config(name: str, config) -> None:
    """Bound a stored config before building from it: a native file's header is untrusted text, and
    ``depth = 10**7`` would make building the (empty, meta-device) module take minutes."""
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise WeightError(f"the settings stored for the {name} token projector are not a table of named values")
    for key, value in config.items():
        if isinstance(value, bool) or isinstance(value, str):
            continue
        limit = MAX_DEPTH if key in DEPTH_KEYS else MAX_WIDTH
        if not isinstance(value, (int, float)) or not (0 <= value <= limit) or value != value:
            raise WeightError(f"the {name} token projector setting {key}={value!r} is out of range (0 to {limit})", fix="the file is damaged; download it again")


def _compare(module: torch.nn.Module, state: Mapping[str, torch.Tensor]):
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing + wrong, unexpected
