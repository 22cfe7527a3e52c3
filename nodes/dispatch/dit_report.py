"""The *Show attention patches* report's lines for a DiT MODEL (Flux): blocks, our effects, what does not apply."""

from __future__ import annotations

from typing import List

from .dit_dispatcher import installed_dit_dispatcher
from ..common.dit_layout import DIT_NODES, FAMILY_NAMES, YES, dit_blocks, dit_family


def dit_report_lines(model) -> List[str]:
    """Empty for UNets; for Flux: family, block counts, effects in order, and the nodes that do not work here."""
    family = dit_family(model)
    if family is None:
        return []
    blocks = dit_blocks(model)
    double = sum(1 for b in blocks if b.kind == "double_block")
    lines = [f"model family: {FAMILY_NAMES[family]} (DiT): {double} double blocks, {len(blocks) - double} single blocks, joint text+image attention"]
    dispatcher = installed_dit_dispatcher(model)
    if dispatcher is None or not dispatcher.stages:
        lines.append("joint-attention effects: none")
    else:
        lines.append("joint-attention effects, in the order they run:")
        for i, stage in enumerate(dispatcher.stages, 1):
            s = stage.schedule
            window = "all steps" if s.full_window else f"sigma {s.sigma_start:.3g} to {s.sigma_end:.3g}"
            lines.append(f"  {i}. {stage.label}: weight {s.weight:g}, {window}, {s.apply_to}, {'masked' if s.mask is not None else 'everywhere'}")
        if dispatcher.fallbacks:
            lines.append(f"block patches from other packs kept underneath ours: {len(dispatcher.fallbacks)} blocks")
    refused = [f"{node_id.replace('IdentityAttention', '')} ({entry[family]})" for node_id, entry in DIT_NODES.items() if entry.get(family, YES) != YES]
    lines.append("not on this model family: " + "; ".join(refused) if refused else "every node works on this model family")
    return lines
