"""ComfyUI glue, one package per concern: common, dispatch (the attention dispatcher), identity, one per
mechanism family (pva, kv_mixed, ca2, moa, nested, fact, stage_tokens, stfg), flux, training.

Every module named ``*_nodes.py`` in this package's subpackages lists its node classes in ``NODES``;
each class carries ``NODE_ID`` (the global ComfyUI class name, prefixed with
``IdentityAttention``) and ``DISPLAY_NAME``. This module collects them into
the two mappings ComfyUI reads, passing each through :func:`.common.input_guard.guard_node_class`
(every node checks its FLOAT, IMAGE, MASK, LATENT, IDENTITY and ID_TOKENS inputs
before its own code runs; a node added here gets that by being listed).
"""

from __future__ import annotations

import importlib
import pkgutil

from .common.folders import register_model_folders
from .common.input_guard import guard_node_class

NODE_ID_PREFIX = "IdentityAttention"


def _node_modules():
    """``[(leaf name, dotted name)]`` of every ``*_nodes`` module one package down, sorted by leaf name."""
    found = []
    for package in pkgutil.iter_modules(__path__):
        if not package.ispkg:
            continue
        sub = importlib.import_module(f"{__name__}.{package.name}")
        found += [(info.name, f"{sub.__name__}.{info.name}") for info in pkgutil.iter_modules(sub.__path__) if info.name.endswith("_nodes")]
    return sorted(found)  # by module name: the order ComfyUI lists the nodes in, as before the packages


def _collect():
    classes, names = {}, {}
    for _, dotted in _node_modules():
        module = importlib.import_module(dotted)
        for cls in getattr(module, "NODES", ()):
            node_id = cls.NODE_ID
            if not node_id.startswith(NODE_ID_PREFIX):
                raise RuntimeError(f"{cls.__name__}.NODE_ID must start with {NODE_ID_PREFIX!r}")
            if node_id in classes:
                raise RuntimeError(f"two nodes share the id {node_id!r}")
            classes[node_id] = guard_node_class(cls)
            names[node_id] = cls.DISPLAY_NAME
    return classes, names


register_model_folders()
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _collect()
