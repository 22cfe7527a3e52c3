"""The pack's registered nodes, loaded the way the tests load them (for scripts that describe the pack).

``registered_nodes()`` imports the test host's ComfyUI in-process (CPU), registers the pack as
the package ``identity_attention`` without running its ``__init__`` and returns
``NODE_CLASS_MAPPINGS`` of ``nodes/``: exactly what ComfyUI registers. Used by
scripts/node_list.py and scripts/readme_tables.py (and their sync tests).
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "identity_attention"


def registered_nodes() -> dict:
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    from harness.host import import_host_in_process

    import_host_in_process(cpu=True)
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(REPO)]
        pkg.__file__ = str(REPO / "__init__.py")
        pkg.IDENTITY_ATTENTION_PACK = True
        sys.modules[PACKAGE] = pkg
    return dict(importlib.import_module(f"{PACKAGE}.nodes").NODE_CLASS_MAPPINGS)


def first_sentence(text: str) -> str:
    """The first sentence of a description (it ends at . ! ? and a space, except after e.g. / i.e. / Fig. / Eq.)."""
    text = " ".join(str(text).split())
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<!Fig\.)(?<!Eq\.)(?<=[.!?])\s+", text, maxsplit=1)[0]
