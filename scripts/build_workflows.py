"""Write the example workflows (example_workflows/*.json) from their specs.

    python scripts/build_workflows.py [--only NAME]

Starts the host to read the node definitions (/object_info) so widget order and
defaults are the host's, then runs every spec: ``SPECS`` of scripts/workflow_specs.py and of
every ``scripts/workflow_specs_<topic>.py`` (one module per group of mechanisms).
Every workflow then gets ComfyUI's model metadata from weights_manifest.json
(scripts/workflow_models.py: the page's missing-models dialog offers those
downloads) for whatever loader nodes it has. A spec with ``requires_nodes`` (the Flux ones) is skipped, with
the reason, on a host without those nodes. The JSON files are committed; the workflow tests check them against the host
and run them on the tiny models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from harness.host import CACHE, prepare_instance  # noqa: E402
from harness.server import ComfyServer  # noqa: E402
from harness.workflow import WorkflowBuilder  # noqa: E402
from workflow_models import add_model_metadata, manifest_entries  # noqa: E402
import importlib  # noqa: E402


def all_specs() -> dict:
    """name -> spec function, from workflow_specs.py and every workflow_specs_<topic>.py."""
    specs = {}
    for path in sorted(REPO.joinpath("scripts").glob("workflow_specs*.py")):
        module = importlib.import_module(path.stem)
        clash = set(specs) & set(module.SPECS)
        if clash:
            raise SystemExit(f"{path.name}: workflow names defined twice: {sorted(clash)}")
        specs.update(module.SPECS)
    return specs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    instance = prepare_instance(CACHE / "build-instance", with_testkit=False)
    with ComfyServer(instance) as server:
        info = server.object_info()
    target = REPO / "example_workflows"
    target.mkdir(exist_ok=True)
    for name, spec in all_specs().items():
        if args.only and args.only not in name:
            continue
        missing = [n for n in getattr(spec, "requires_nodes", ()) if n not in info]
        if missing:  # e.g. a Flux workflow on the early-2024 host: build it with .venv/current
            print(f"skipped {name}: this host has no {', '.join(missing)} (build it with a ComfyUI that has them)")
            continue
        builder = WorkflowBuilder(info)
        description = spec(builder)
        path = target / f"{name}.json"
        data = add_model_metadata(builder.build(description), manifest_entries())
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
