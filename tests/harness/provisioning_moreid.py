"""Provisioners for FaceChain-FACT's face encoder and SeFi-IDE's identity-token files (see tiny_swap.py).

- ``IdentityAttentionLoadFaceEncoder``: a TransFace-S checkpoint under the name the workflow asks
  for in ``models/identity_attention/``: the released key names and widths (512 wide, 9x9 patches,
  144 tokens: what FACT's face resampler reads), two blocks instead of twelve and without the
  unused embedding head, saved with ``torch.save`` so the real node reads it through
  ``torch.load(weights_only=True)`` (tests/weight_fixtures.py ``transface_state_dict``).
- ``IdentityAttentionLoadIdentityTokens``: a per-stage identity-token file in the pack's own format
  (safetensors ``<encoder>.keys`` / ``<encoder>.values`` ``[S, 1, width]`` and the
  ``identity_attention_tokens`` header of adapters/attention/stage_tokens.py, as Save identity tokens and the
  trainer write it), for the base of the workflow's checkpoint; the tiny models keep the real text
  widths (768 for SD1.5; 768 + 1280 for SDXL). Written here, not through the pack, so the file
  format itself is checked by the real loader.

The FACT adapter file is provisioned by ``IdentityAttentionLoadIdentityAdapter`` (provisioning.py:
format ``fact`` from the manifest).
"""

from __future__ import annotations

import zlib

from .host import Instance
from .tiny_swap import register

TRANSFACE_DEPTH = 2
TOKEN_WIDTHS = {"sd15": {"l": 768}, "sd2": {"h": 1024}, "sdxl": {"g": 1280, "l": 768}}  # adapters/attention/stage_tokens.py ENCODER_WIDTHS
TOKEN_STAGES = 5


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _target(instance: Instance, name: str):
    path = instance.models / "identity_attention" / name.replace("\\", "/")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@register("IdentityAttentionLoadFaceEncoder")
def _face_encoder(node: dict, instance: Instance, context: dict) -> dict:
    import torch

    import weight_fixtures as wf

    name = node["inputs"].get("encoder_name")
    if isinstance(name, str) and name:
        path = _target(instance, name)
        if not path.is_file():
            torch.save(wf.transface_state_dict(depth=TRANSFACE_DEPTH, heads=False, seed=_seed_of(name)), path)
    return node


def token_file(base: str, seed: int, stages: int = TOKEN_STAGES):
    """``(tensors, header)`` of a trained-looking identity-token file for ``base``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    widths = TOKEN_WIDTHS[base]
    tensors = {}
    for encoder, width in sorted(widths.items()):
        for kind in ("keys", "values"):
            tensors[f"{encoder}.{kind}"] = torch.randn(stages, 1, width, generator=gen) * 0.02
    header = {
        "format": "identity_attention_tokens",
        "version": "1",
        "base": base,
        "count": str(stages),
        "vectors": "1",
        "encoders": ",".join(sorted(widths)),
        "init": "trained",
        "placeholder": "<new1>",
    }
    return tensors, header


@register("IdentityAttentionLoadIdentityTokens")
def _identity_tokens(node: dict, instance: Instance, context: dict) -> dict:
    from safetensors.torch import save_file

    name = node["inputs"].get("tokens_name")
    if isinstance(name, str) and name:
        path = _target(instance, name)
        if not path.is_file():
            tensors, header = token_file(context.get("arch", "sd15"), _seed_of(name))
            save_file(tensors, str(path), metadata=header)
    return node
