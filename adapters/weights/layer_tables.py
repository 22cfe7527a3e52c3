"""Where a released checkpoint's per-layer weights go in ComfyUI's UNet.

ComfyUI names a cross-attention layer ``(block, block id, transformer index)``,
e.g. ``("input", 4, 1)``; the middle block is ``("middle", 0, i)`` (ComfyUI sets
``transformer_options["block"] = ("middle", 0)``; the tests check this table
against the host's layer list). Checkpoints name layers two ways:

1. diffusers module paths (PVA, FACT): ``down_blocks.B.attentions.A.transformer_blocks.T``
   -> ``("input", 1 + 3B + A, T)``, ``up_blocks.B.attentions.A...`` -> ``("output", 3B + A, T)``,
   ``mid_block.attentions.0...`` -> ``("middle", 0, T)`` (SD1.5, SD2 and SDXL all have
   2 attention blocks per down level and 3 per up level);
2. an index into diffusers' ``unet.attn_processors`` (IP-Adapter, InstantID,
   FaceID, PuLID): processors come in module-registration order (down blocks,
   then up blocks, then the middle block, since ``up_blocks`` is registered
   before ``mid_block``), attn1 before attn2 in each transformer block, so the
   k-th cross-attention layer in that order has index ``2k + 1``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

LayerKey = Tuple[str, int, int]

BASE_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}
CONTEXT_DIMS = {"sd15": 768, "sd2": 1024, "sdxl": 2048}
BASE_BY_CONTEXT = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def _sd15_order() -> List[LayerKey]:
    down = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)]
    up = [("output", i, 0) for i in range(3, 12)]
    return down + up + [("middle", 0, 0)]


def _sdxl_order() -> List[LayerKey]:
    down = [("input", block, t) for block, depth in ((4, 2), (5, 2), (7, 10), (8, 10)) for t in range(depth)]
    up = [("output", block, t) for block, depth in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for t in range(depth)]
    return down + up + [("middle", 0, t) for t in range(10)]


DIFFUSERS_ORDER: Dict[str, List[LayerKey]] = {"sd15": _sd15_order(), "sd2": _sd15_order(), "sdxl": _sdxl_order()}
"""Cross-attention layers in diffusers' processor order: 16 (SD1.5 / SD2), 70 (SDXL)."""


def processor_table(base: str) -> Dict[int, LayerKey]:
    """``{attn_processors index of the attn2 processor: ComfyUI key}`` (odd indices)."""
    return {2 * k + 1: key for k, key in enumerate(DIFFUSERS_ORDER[base])}


_DIFFUSERS_PATH = re.compile(
    r"(?:^|\.)(?:(down_blocks|up_blocks)\.(\d+)|(mid_block))\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2\.(.+)$"
)


def parse_diffusers_attn2(name: str) -> Optional[Tuple[LayerKey, str]]:
    """``"...down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_visual_q.weight"``
    -> ``(("input", 4, 0), "to_visual_q.weight")``; None for other keys."""
    m = _DIFFUSERS_PATH.search(name)
    if m is None:
        return None
    kind, level, mid, attention, transformer, rest = m.groups()
    attention, transformer = int(attention), int(transformer)
    if mid:
        return ("middle", 0, transformer), rest
    level = int(level)
    if kind == "down_blocks":
        return ("input", 1 + 3 * level + attention, transformer), rest
    return ("output", 3 * level + attention, transformer), rest


def describe(key: LayerKey) -> str:
    return f"{key[0]} block {key[1]}, transformer {key[2]}"
