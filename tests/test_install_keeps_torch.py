"""Installing the pack (requirements.txt, then install.py) next to a user's CUDA torch leaves that torch alone.

ComfyUI-Manager and comfy-cli install a pack into ComfyUI's own Python: ``pip install -r
requirements.txt`` from the pack folder, then ``python install.py``. If any line pulled in
torch (directly, or through a package that requires it), pip could replace the user's CUDA
build with PyPI's default one and pull several GB of ``nvidia-*`` packages. A fresh venv gets a
stand-in ``torch`` (a CUDA build by its version and ``torch.version.cuda``, with a fake CUDA
library) and a stand-in ``onnxruntime-gpu``; after the install the stand-in's files, version and
dist are unchanged and no other torch, torchvision, torchaudio or nvidia package appeared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from test_identity_requirements import FAKE_ONNXRUNTIME, build_wheel, run, venv_python

REPO = Path(__file__).resolve().parents[1]
# An older CUDA build many ComfyUI installs still run: a requirement that asks for a newer torch
# (a lower bound, the usual kind) would make pip replace it, and this test would see it.
TORCH_VERSION = "2.1.2+cu121"

FAKE_TORCH = {
    "torch/__init__.py": f'"""Stand-in for a user\'s CUDA build of torch (test fake)."""\n__version__ = "{TORCH_VERSION}"\nfrom . import version\n',
    "torch/version.py": f'__version__ = "{TORCH_VERSION}"\ncuda = "12.1"\ngit_version = "stand-in"\n',
    "torch/lib/libtorch_cuda.so": b"\x7fELF fake CUDA torch " * 256,
}

INSPECT = r'''
import importlib.metadata as m, json
dists = sorted((d.metadata["Name"].lower(), d.version) for d in m.distributions())
import torch
print(json.dumps({"dists": dists, "torch": torch.__version__, "cuda": torch.version.cuda, "torch_file": torch.__file__}))
'''


@pytest.mark.slow
def test_requirements_and_install_py_keep_an_existing_cuda_torch(tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv_python(venv)
    torch_wheel = build_wheel(tmp_path, "torch", TORCH_VERSION, FAKE_TORCH)
    ort_wheel = build_wheel(tmp_path, "onnxruntime-gpu", "1.99.0", {"onnxruntime/__init__.py": FAKE_ONNXRUNTIME})
    outer_pip = [sys.executable, "-m", "pip", "--python", py, "install", "--no-compile", "--disable-pip-version-check"]
    run(outer_pip + ["pip"])  # the venv's own pip, as ComfyUI's Python has
    run(outer_pip + ["--no-deps", "--no-index", torch_wheel, ort_wheel])
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    before_files = {p: ((site / p).read_bytes(), (site / p).stat().st_mtime_ns) for p in FAKE_TORCH}
    before = json.loads(run([py, "-c", INSPECT]))
    assert before["torch"] == TORCH_VERSION and before["cuda"] == "12.1"

    # first ask pip what it would do (a failure here costs no multi-GB download), then do it
    plan = tmp_path / "plan.json"
    run([py, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check", "--report", plan, "-r", REPO / "requirements.txt"], cwd=REPO)
    planned = sorted(item["metadata"]["name"].lower() for item in json.loads(plan.read_text())["install"])
    assert not [n for n in planned if n in ("torch", "torchvision", "torchaudio", "triton") or n.startswith("nvidia-")], planned
    run([py, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check", "-r", REPO / "requirements.txt"], cwd=REPO)
    report = run([py, REPO / "install.py"], cwd=REPO)
    assert "onnxruntime: onnxruntime-gpu" in report  # install.py saw the CUDA torch and kept the GPU runtime

    after = json.loads(run([py, "-c", INSPECT]))
    assert (after["torch"], after["cuda"], after["torch_file"]) == (before["torch"], before["cuda"], before["torch_file"])
    for path, (data, mtime) in before_files.items():
        assert (site / path).read_bytes() == data and (site / path).stat().st_mtime_ns == mtime, f"{path} was replaced"
    names = [name for name, _ in after["dists"]]
    assert names.count("torch") == 1 and dict(after["dists"])["torch"] == TORCH_VERSION
    pulled = sorted(n for n in names if n in ("torchvision", "torchaudio", "triton") or n.startswith("nvidia-"))
    assert not pulled, f"the install pulled {pulled}"
    assert "insightface" in names and "onnxruntime" not in names  # the pack's own runtime arrived, the CPU onnxruntime did not
    # pip's own view: nothing installed asks for another torch. Its only complaints are the ones the scheme
    # accepts on purpose: insightface names the CPU onnxruntime / opencv-python, their GPU / headless builds stand in.
    import subprocess

    check = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if line.strip()]
    assert all(line.startswith("insightface ") and ("onnxruntime" in line or "opencv-python" in line) for line in problems), problems
