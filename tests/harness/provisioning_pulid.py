"""Provisioners for PuLID's image-side models (see tiny_swap.py).

- ``IdentityAttentionLoadEvaClip``: an EVA02-CLIP checkpoint under the name the workflow asks for
  (``clip_vision/<file>`` or ``pulid/<file>``), with the release's key names (``visual.*`` plus
  text-tower stand-ins and the RoPE tables) and output width (768), 6 blocks of width 32 on 42-px
  images (PuLID's five hidden taps exist; 32 is the EVA width the tiny PuLID adapters of
  provisioning.py read), saved with ``torch.save`` so the node reads it through
  ``torch.load(weights_only=True)`` (tests/weight_fixtures.py ``tiny_eva_state``).
- ``IdentityAttentionLoadFaceParsing``: facexlib's ``parsing_bisenet.pth`` at its real size
  (BiSeNet has no width to shrink; 13 M parameters), random weights (``bisenet_state``).
"""

from __future__ import annotations

import zlib

from .host import Instance
from .tiny_swap import register

EVA_WIDTH = 32  # weight_fixtures.pulid_state: the tiny PuLID encoders read EVA width 32


def _seed_of(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _target(instance: Instance, choice: str):
    folder, _, name = choice.replace("\\", "/").partition("/")
    path = instance.models / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@register("IdentityAttentionLoadEvaClip")
def _eva_clip(node: dict, instance: Instance, context: dict) -> dict:
    import torch

    import weight_fixtures as wf

    choice = node["inputs"].get("eva_clip_name")
    if isinstance(choice, str) and "/" in choice:
        path = _target(instance, choice)
        if not path.is_file():
            torch.save(wf.tiny_eva_state(seed=_seed_of(choice), width=EVA_WIDTH, mlp_hidden=48, embed_dim=768), path)
    return node


@register("IdentityAttentionLoadFaceParsing")
def _face_parsing(node: dict, instance: Instance, context: dict) -> dict:
    import torch

    import weight_fixtures as wf

    choice = node["inputs"].get("parsing_name")
    if isinstance(choice, str) and "/" in choice:
        path = _target(instance, choice)
        if not path.is_file():
            torch.save(wf.bisenet_state(seed=_seed_of(choice)), path)
    return node
