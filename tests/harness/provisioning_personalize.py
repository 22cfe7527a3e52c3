"""Provisioner for PVA's personalization workflow (see tiny_swap.py).

``IdentityAttentionPersonalizeIdentity`` needs no file (it trains the adapter it is given), but
its work is shrunk as ``for_tiny_models`` shrinks samplers: PVA's 40 steps at 512 px take minutes
on the tiny models on a CPU (40 steps at 64 px: about 13 s), so a test or demo run trains
``TINY_STEPS`` steps at ``TINY_RESOLUTION`` px. ``save_name`` is cleared: the node writes the
learned word to the first ``embeddings`` folder, which on a test host is the shared host copy's
(``.cache/hosts/...``), not the instance's; saving and reloading are tested in
tests/test_train_host.py, which cleans up after itself. Everything else (the face masks, the
learned word, the adapter wired on to parallel attention and Identity prompt) runs as in the
workflow.
"""

from __future__ import annotations

from .host import Instance
from .tiny_swap import register

TINY_STEPS = 2
TINY_RESOLUTION = 64


@register("IdentityAttentionPersonalizeIdentity")
def _personalize(node: dict, instance: Instance, context: dict) -> dict:
    inputs = node["inputs"]
    if isinstance(inputs.get("steps"), int):
        inputs["steps"] = min(inputs["steps"], TINY_STEPS)
    if isinstance(inputs.get("resolution"), int):
        inputs["resolution"] = min(inputs["resolution"], TINY_RESOLUTION)
    if "save_name" in inputs:
        inputs["save_name"] = ""
    return node
