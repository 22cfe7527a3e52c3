"""The main job: a headless ComfyUI with this pack runs every example workflow on tiny models.

    python scripts/demo.py --out demo_out        (what `make demo` runs)

Starts the host (the ComfyUI vendored by this venv's wheel — `make demo` uses ComfyUI 0.3.75 — or COMFYUI_PATH) on loopback with
this pack and the test kit, makes each workflow in example_workflows/ runnable
on the built-in tiny random-weight models (tests/harness/tiny_swap.py), runs it
through /prompt and copies the images it saves to OUT/<workflow name>/.
Flux workflows are skipped, with the reason, on a host without Flux (the early-2024 ComfyUI).
Exits non-zero if any workflow fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness.host import CACHE, host_label, import_host_in_process, prepare_instance  # noqa: E402
from harness.server import ComfyServer, PromptFailed  # noqa: E402
from harness import tiny_swap, workflow  # noqa: E402
from harness.provisioning_flux import host_skip_reason  # noqa: E402
import harness.provisioning  # noqa: E402,F401  (registers provisioners for the pack's loaders)

import_host_in_process(cpu=True)  # provisioners that build tiny weights with the host's classes (the ControlNets) import comfy here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="folder for the images (default: demo_out)")
    parser.add_argument("--only", default=None, help="run only workflows whose file name contains this")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    instance = prepare_instance(CACHE / "demo-instance")
    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    if args.only:
        workflows = [w for w in workflows if args.only in w.name]
    if not workflows:
        print("no example workflows found", file=sys.stderr)
        return 1
    print(f"== starting {host_label()} headless on CPU")
    failures, skipped = [], []
    with ComfyServer(instance) as server:
        info = server.object_info()
        for path in workflows:
            t0 = time.time()
            ui = workflow.load_workflow(path)
            reason = host_skip_reason(ui)  # a Flux workflow on the early-2024 host
            if reason:
                skipped.append(path.name)
                print(f"skip   {path.name}: {reason}")
                continue
            try:
                prompt = tiny_swap.for_tiny_models(workflow.ui_to_api(ui, info), instance)
                entry = server.run(prompt)
            except (workflow.WorkflowError, PromptFailed) as err:
                failures.append(path.name)
                print(f"FAILED {path.name}: {err}")
                continue
            target = out / path.stem
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            images = server.output_files(entry, "images")
            for image in images:
                shutil.copy2(image, target / image.name)
            print(f"ok     {path.name}: {len(images)} image(s) in {time.time() - t0:.1f} s -> {target}")
            texts = [t for out in entry.get("outputs", {}).values() for t in out.get("text", []) or []]
            for text in texts:  # what Show text nodes show on the page
                (target / "text.txt").open("a").write(str(text) + "\n\n")
                print("       | " + str(text).replace("\n", "\n       | "))
    ran = len(workflows) - len(failures) - len(skipped)
    print(f"== {ran} of {len(workflows)} workflows ran" + (f", {len(skipped)} skipped on this host" if skipped else "") + f"; images in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
