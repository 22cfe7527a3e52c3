"""Provisioner for InstantID's ControlNet (IdentityNet) file (see tiny_swap.py).

- ``ControlNetLoader`` (ComfyUI's Load ControlNet Model): a tiny SDXL ControlNet of the micro SDXL
  UNet's layout (tests/testkit/tiny_controlnet.py) under the name the workflow asks for in
  ``models/controlnet/``, in ComfyUI's ldm key layout, so the host's own loader detects and loads it.
  Its cross-attention takes 2048-wide context: what InstantID's identity tokens are, as on the real
  IdentityNet. The only ControlNet the example workflows load is InstantID's, an SDXL one.
"""

from __future__ import annotations

import zlib

from .host import Instance
from .tiny_swap import register


@register("ControlNetLoader")
def _controlnet(node: dict, instance: Instance, context: dict) -> dict:
    from testkit.tiny_controlnet import write_tiny_controlnet

    name = node["inputs"].get("control_net_name")
    if isinstance(name, str) and name:
        path = instance.models / "controlnet" / name.replace("\\", "/")
        write_tiny_controlnet(str(path), arch="sdxl", seed=zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return node
