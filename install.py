"""Install the face-analysis runtime without replacing what ComfyUI's Python already has.

ComfyUI-Manager (and comfy-cli, which drives it) runs ``pip install`` for every line
of ``requirements.txt`` and then this script, with ComfyUI's Python, from this
folder. Run it by hand the same way::

    <ComfyUI's python> custom_nodes/comfyui-identity-attention/install.py [--dry-run]

Why a script and not a line in requirements.txt: ``insightface`` (2.1) declares
``Requires-Dist: onnxruntime``. pip matches requirements by distribution name, so an
installed ``onnxruntime-gpu`` (or -directml, -openvino...) does not satisfy it and pip
installs the CPU ``onnxruntime`` on top: both ship the same ``onnxruntime`` module, the
CPU build's files overwrite the CUDA build's, and the CUDA provider is gone. A
requirements file cannot say ``--no-deps`` for one line (pip rejects it; the Manager
also installs each line on its own), and environment markers cannot ask what is
installed. ``opencv`` has the same problem (opencv-python / -headless / -contrib all
ship ``cv2``). So requirements.txt lists every plain dependency, and this script adds:

1. an onnxruntime build, only if no distribution provides the ``onnxruntime`` module:
   ``onnxruntime-gpu`` where a CUDA build of torch runs on Linux x86_64 or Windows,
   ``onnxruntime`` (CPU; CoreML on macOS) everywhere else;
2. ``opencv-python-headless``, only if no distribution provides ``cv2``;
3. ``insightface>=2.1`` with ``--no-deps``, only if insightface is not installed (its other
   dependencies are in requirements.txt). 2.1 is a pure-Python wheel: no C++ build.

Only the standard library is used; torch is imported (if present) just to see whether it
is a CUDA build. ``plan()`` is pure, so tests (and the pack's error messages) use it too.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

ONNXRUNTIME_MIN = "1.17"
INSIGHTFACE_REQUIREMENT = "insightface>=2.1"
OPENCV_REQUIREMENT = "opencv-python-headless>=4.8"


@dataclass(frozen=True)
class Environment:
    """What the plan depends on: the platform, torch's CUDA, and which dists provide a module."""

    system: str  # platform.system(): Linux, Windows, Darwin
    machine: str  # platform.machine(): x86_64, AMD64, arm64, aarch64
    torch_cuda: bool  # a CUDA build of torch is installed
    providers: Dict[str, List[str]] = field(default_factory=dict)  # module -> distributions shipping it

    def has(self, module: str) -> bool:
        return bool(self.providers.get(module))


def onnxruntime_distribution(env: Environment) -> str:
    """The onnxruntime build to install when none is present."""
    cuda_platform = (env.system == "Linux" and env.machine.lower() in ("x86_64", "amd64")) or (
        env.system == "Windows" and env.machine.lower() in ("amd64", "x86_64")
    )
    return "onnxruntime-gpu" if env.torch_cuda and cuda_platform else "onnxruntime"


def plan(env: Environment) -> List[List[str]]:
    """The pip argument lists (after ``pip``) that complete the face-analysis runtime; may be empty."""
    with_deps = []
    if not env.has("onnxruntime"):
        with_deps.append(f"{onnxruntime_distribution(env)}>={ONNXRUNTIME_MIN}")
    if not env.has("cv2"):
        with_deps.append(OPENCV_REQUIREMENT)
    steps = []
    if with_deps:
        steps.append(["install", *with_deps])
    if not env.has("insightface"):
        steps.append(["install", "--no-deps", INSIGHTFACE_REQUIREMENT])
    return steps


def module_providers(modules: Sequence[str] = ("onnxruntime", "cv2", "insightface")) -> Dict[str, List[str]]:
    """Installed distributions per top-level module (a module importable without metadata counts too)."""
    try:
        mapping = metadata.packages_distributions()
    except Exception:  # broken metadata somewhere in site-packages
        mapping = {}
    found = {}
    for module in modules:
        dists = sorted(set(mapping.get(module, [])))
        if not dists and importlib.util.find_spec(module) is not None:
            dists = ["(unknown distribution)"]
        found[module] = dists
    return found


def torch_is_cuda_build() -> bool:
    try:
        import torch  # noqa: PLC0415

        return getattr(torch.version, "cuda", None) is not None
    except Exception:
        return False


def current_environment() -> Environment:
    return Environment(platform.system(), platform.machine(), torch_is_cuda_build(), module_providers())


def pip_prefix(python: str = sys.executable) -> List[str]:
    """``python -m pip``, or ``uv pip ... --python`` in environments made by uv (they have no pip)."""
    if importlib.util.find_spec("pip") is not None:
        return [python, "-m", "pip"]
    uv = shutil.which("uv")
    if uv:
        return [uv, "pip", "--python", python]
    return [python, "-m", "pip"]


_WINDOWS_SPECIAL = set(' \t"&|<>^()%!=,;')


def shell_line(argv: Sequence[str], windows: bool = os.name == "nt") -> str:
    """One command line that pastes safely into the user's shell: ``shlex.quote`` for POSIX shells
    (``insightface>=2.1`` becomes ``'insightface>=2.1'``, never a redirection to a file ``=2.1``),
    double quotes for cmd.exe / PowerShell on Windows (which do not understand single quotes)."""
    if not windows:
        return " ".join(shlex.quote(str(a)) for a in argv)
    return " ".join(f'"{a}"' if (not a or set(str(a)) & _WINDOWS_SPECIAL) else str(a) for a in argv)


def command_lines(steps: List[List[str]], python: str = sys.executable, windows: bool = os.name == "nt") -> List[str]:
    """Shell-ready command lines for ``steps`` (``--dry-run`` prints them; error messages quote them)."""
    prefix = pip_prefix(python)
    return [shell_line(prefix + step, windows) for step in steps]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(list(argv))
    env = current_environment()
    steps = plan(env)
    print(f"[identity-attention] onnxruntime: {', '.join(env.providers.get('onnxruntime') or ['missing'])}; "
          f"cv2: {', '.join(env.providers.get('cv2') or ['missing'])}; "
          f"insightface: {', '.join(env.providers.get('insightface') or ['missing'])}")
    if not steps:
        print("[identity-attention] face-analysis runtime complete; nothing to install")
        return 0
    if args.dry_run:  # the commands alone, one per line, so the block can be pasted into a shell as it is
        print("[identity-attention] would run:")
        for line in command_lines(steps):
            print(line)
        return 0
    for step in steps:
        cmd = pip_prefix() + step
        print("[identity-attention] running: " + shell_line(cmd))
        done = subprocess.run(cmd)
        if done.returncode != 0:
            print(f"[identity-attention] pip failed ({done.returncode}); the face nodes will say what is missing")
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
