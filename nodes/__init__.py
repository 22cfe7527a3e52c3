"""ComfyUI glue: node classes, the attention dispatcher, folders, errors.

Every module named ``*_nodes.py`` here lists its node classes in ``NODES``;
each class carries ``NODE_ID`` (the global ComfyUI class name, prefixed with
``IdentityAttention``) and ``DISPLAY_NAME``. This module collects them into
the two mappings ComfyUI reads, passing each through :func:`.input_guard.guard_node_class`
(every node checks its FLOAT, IMAGE, MASK, LATENT, IDENTITY and ID_TOKENS inputs
before its own code runs; a node added here gets that by being listed).
"""

from __future__ import annotations

import importlib
import pkgutil

from .folders import register_model_folders
from .input_guard import guard_node_class

NODE_ID_PREFIX = "IdentityAttention"


def _collect():
    classes, names = {}, {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.endswith("_nodes"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
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
