"""Write node_list.json: the nodes of this pack, for ComfyUI-Manager.

    python scripts/node_list.py [--check]

The Manager's scanner finds a pack's nodes by reading ``NODE_CLASS_MAPPINGS = {...}``
literals in its Python files; this pack builds its mappings at import time (every
``nodes/*_nodes.py`` lists its classes), so the scanner would find none. A
``node_list.json`` at the pack root (``{"NodeId": "description", ...}``) is what the Manager
reads instead, to offer this pack when a workflow has nodes nobody installed. It is written
from the registered classes; tests/test_pack_index.py fails when it is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_nodes import REPO, first_sentence, registered_nodes  # noqa: E402

TARGET = REPO / "node_list.json"


def node_list(mappings: dict) -> dict:
    return {node_id: f"{cls.DISPLAY_NAME}: {first_sentence(cls.DESCRIPTION)}" for node_id, cls in sorted(mappings.items())}


def render(mappings: dict) -> str:
    return json.dumps(node_list(mappings), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if node_list.json is out of date, write nothing")
    args = parser.parse_args()
    text = render(registered_nodes())
    current = TARGET.read_text() if TARGET.is_file() else ""
    if args.check:
        if current != text:
            print("node_list.json is out of date: run python scripts/node_list.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)} ({len(json.loads(text))} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
