"""What users get installed: requirements.txt + install.py never replace an existing onnxruntime build.

Why the scheme (install.py's docstring has the details): insightface 2.1 declares
``Requires-Dist: onnxruntime``; pip matches requirements by distribution name, so with
insightface in requirements.txt pip installs the CPU ``onnxruntime`` over an installed
``onnxruntime-gpu`` (both ship the module ``onnxruntime``). Requirements files cannot say
``--no-deps`` per line, so insightface (and the onnxruntime / opencv builds, only where
none is installed) come from install.py, which ComfyUI-Manager runs after requirements.txt.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def install_module():
    spec = importlib.util.spec_from_file_location("identity_attention_install_under_test", REPO / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


inst = install_module()


def env(system="Linux", machine="x86_64", cuda=False, **providers):
    modules = {"onnxruntime": [], "cv2": [], "insightface": []}
    modules.update({k: list(v) for k, v in providers.items()})
    return inst.Environment(system, machine, cuda, modules)


# --------------------------------------------------------------------------------------------- the plan


def test_fresh_comfyui_gets_the_right_onnxruntime_build():
    assert inst.plan(env(cuda=True)) == [
        ["install", "onnxruntime-gpu>=1.17", "opencv-python-headless>=4.8"], ["install", "--no-deps", "insightface>=2.1"]]
    assert inst.plan(env(system="Windows", machine="AMD64", cuda=True))[0][1] == "onnxruntime-gpu>=1.17"
    for no_cuda in (env(), env(system="Darwin", machine="arm64"), env(machine="aarch64", cuda=True), env(system="Windows", machine="AMD64")):
        assert inst.plan(no_cuda)[0][1] == "onnxruntime>=1.17"


@pytest.mark.parametrize("existing", ["onnxruntime-gpu", "onnxruntime", "onnxruntime-directml", "onnxruntime-openvino"])
def test_an_installed_onnxruntime_build_is_kept(existing):
    steps = inst.plan(env(cuda=True, onnxruntime=[existing], cv2=["opencv-contrib-python"]))
    assert steps == [["install", "--no-deps", "insightface>=2.1"]]
    assert inst.plan(env(onnxruntime=[existing], cv2=["opencv-python"], insightface=["insightface"])) == []


def test_command_lines_paste_safely_into_a_shell(tmp_path):
    """`pip install onnxruntime-gpu>=1.17` pasted unquoted would write a file named '=1.17'."""
    import shlex
    import shutil
    import subprocess

    step = ["install", "--no-deps", "onnxruntime-gpu>=1.17", "insightface>=2.1"]
    python = str(tmp_path / "my python" / "bin" / "python")  # a space in the path, as on Windows user folders
    (line,) = inst.command_lines([step], python=python, windows=False)
    assert shlex.split(line)[-4:] == step and shlex.split(line)[0] in (python, shutil.which("uv"))
    assert "'onnxruntime-gpu>=1.17'" in line
    sh = shutil.which("sh")
    if sh:  # the line parses as one simple command: no redirection, nothing else runs
        assert subprocess.run([sh, "-n", "-c", line]).returncode == 0
        echoed = subprocess.run([sh, "-c", "printf '%s\\n' " + line], cwd=tmp_path, capture_output=True, text=True)
        assert echoed.stdout.split("\n")[-5:-1] == step and list(tmp_path.iterdir()) == []  # no file '=1.17' appeared
    (windows,) = inst.command_lines([step], python="C:\\Comfy UI\\python_embeded\\python.exe", windows=True)
    assert windows.startswith('"C:\\Comfy UI\\python_embeded\\python.exe"') and windows.endswith('"onnxruntime-gpu>=1.17" "insightface>=2.1"')


def test_dry_run_prints_what_it_would_do(capsys, monkeypatch):
    assert inst.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime:" in out and ("nothing to install" in out or "would run:" in out)
    monkeypatch.setattr(inst, "current_environment", lambda: env(cuda=True))  # nothing installed: every step
    assert inst.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = lines[lines.index("[identity-attention] would run:") + 1:]
    assert commands == inst.command_lines(inst.plan(env(cuda=True)))  # bare lines: the block pastes as it is


# --------------------------------------------------------------------------------------------- the files


def requirement_lines():
    lines = []
    for raw in (REPO / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_requirements_and_pyproject_list_the_same_packages():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines()
    names = {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in requirement_lines()}
    assert not names & {"torch", "torchvision", "torchaudio"}  # never replace the user's CUDA torch
    # nothing that drags in (or is) a competing build of a shared module
    assert not names & {"insightface", "onnxruntime", "onnxruntime-gpu", "opencv-python", "opencv-python-headless", "opencv-contrib-python"}


# --------------------------------------------------------------------------------------------- a fresh venv

FAKE_ONNXRUNTIME = '''"""Stand-in for an installed onnxruntime-gpu (test fake)."""
__version__ = "1.99.0"
FAKE_MARKER = "onnxruntime-gpu stand-in"


class SessionOptions:
    pass


class InferenceSession:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("fake onnxruntime")


def get_available_providers():
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def set_default_logger_severity(level):
    pass
'''


def build_wheel(folder: Path, name: str, version: str, files: dict) -> Path:
    """A minimal valid wheel (py3-none-any) holding ``files`` {path: text or bytes}."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    contents = {path: (data.encode() if isinstance(data, str) else data) for path, data in files.items()}
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test stand-in\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: identity-attention-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    contents[f"{info}/top_level.txt"] = "\n".join(sorted({p.split("/")[0] for p in files})).encode() + b"\n"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([path, f"sha256={digest}", len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    contents[f"{info}/RECORD"] = record.getvalue().encode()
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return wheel


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


INSPECT = r'''
import importlib.metadata as m, json, sys
dists = {d.metadata["Name"].lower(): d.version for d in m.distributions()}
print(json.dumps({"dists": dists, "providers": {k: v for k, v in m.packages_distributions().items() if k in ("onnxruntime", "cv2", "insightface")}}))
'''


@pytest.mark.slow
def test_fresh_venv_keeps_an_existing_onnxruntime_gpu(tmp_path):
    """A plain venv (no system site-packages) with a user's onnxruntime-gpu: requirements.txt + install.py."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv_python(venv)
    cuda_lib = b"\x7fELF fake CUDA execution provider " * 64
    wheel = build_wheel(tmp_path, "onnxruntime-gpu", "1.99.0", {
        "onnxruntime/__init__.py": FAKE_ONNXRUNTIME,
        "onnxruntime/capi/libonnxruntime_providers_cuda.so": cuda_lib,
    })
    outer_pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-compile", "--disable-pip-version-check"]
    run(outer_pip + ["pip"])  # the venv's own pip, as ComfyUI's Python has
    run(outer_pip + ["--no-deps", "--no-index", wheel])
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    fake_files = {p: (site / p).read_bytes() for p in ("onnxruntime/__init__.py", "onnxruntime/capi/libonnxruntime_providers_cuda.so")}

    # what ComfyUI-Manager does: requirements.txt, then install.py, from the pack folder, with ComfyUI's Python
    run([py, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check", "-r", REPO / "requirements.txt"], cwd=REPO)
    first = run([py, REPO / "install.py"], cwd=REPO)
    assert "onnxruntime: onnxruntime-gpu" in first and "insightface>=2.1" in first and "onnxruntime>=" not in first

    state = json.loads(run([py, "-c", INSPECT]))
    assert "onnxruntime" not in state["dists"]  # the CPU build was not installed over the GPU one
    assert state["dists"]["onnxruntime-gpu"] == "1.99.0" and state["providers"]["onnxruntime"] == ["onnxruntime-gpu"]
    for path, data in fake_files.items():
        assert (site / path).read_bytes() == data, f"{path} was overwritten"
    assert state["providers"]["cv2"] == ["opencv-python-headless"] and state["providers"]["insightface"] == ["insightface"]
    assert tuple(int(x) for x in state["dists"]["insightface"].split(".")[:2]) >= (2, 1)
    for name in ("onnx", "scikit-image", "scipy", "numpy", "safetensors", "einops"):
        assert name in state["dists"], f"{name} missing"
    # everything the face nodes import loads (with the stand-in runtime)
    out = run([py, "-c", "import onnxruntime, insightface, cv2, skimage, onnx; from insightface.model_zoo import model_zoo; "
                         "from insightface.utils import face_align; print(onnxruntime.FAKE_MARKER, insightface.__version__)"])
    assert out.startswith("onnxruntime-gpu stand-in")
    # a second run changes nothing
    assert "nothing to install" in run([py, REPO / "install.py"], cwd=REPO)
