"""Identity Attention: identity-preserving attention mechanisms as ComfyUI nodes.

@author: Identity Attention contributors
@title: Identity Attention
@nickname: Identity Attention
@description: Keep a person's identity in generated images: face encoding, identity adapters (IP-Adapter, FaceID, InstantID, PuLID, FACT, PVA) and attention mechanisms from identity-personalization papers, as stackable nodes.

ComfyUI imports this package from ``custom_nodes/`` and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. Nothing heavy runs
at import: optional dependencies (insightface, onnxruntime) are imported only
when a node that needs them runs. Outside ComfyUI (the command-line tools,
``adapters/`` as a library) the mappings are empty.
"""

import importlib.util

IDENTITY_ATTENTION_PACK = True
__version__ = "0.1.0"

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # used as a library or CLI without a ComfyUI host
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
