"""Benchmarks that are not a sampling step: identity encoding throughput, personalization time.

Each task is registered like a scenario (one place, lazy imports, "not
available" rows) and returns one :class:`TaskResult`. The helpers
:func:`throughput` and :func:`once` do the timing, so a task body is only the
setup of the callable.

For the identity engineer (#3): expose a function that encodes a batch of
reference images into an IDENTITY without the node graph (e.g.
``adapters.face_analysis.encode_images(images, analyzer)``), then fill
``_identity_encoding``: build synthetic 1024x1024 RGB images (random, never
zeros) and an analyzer on ``device``, and return ``throughput(lambda:
encode(images), items=len(images))``. Note the detector/recognizer provider
(CUDA or CPU) in ``detail``.

For the training engineer: fill ``_personalization`` with the 40-step per-identity
fine-tune (PVA's FT40 recipe) on the synthetic identity and the benchmark UNet,
returning ``once(lambda: train(...))``.
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


@task(
    "identity_encoding",
    "#3",
    "reference photos (1024² RGB) -> IDENTITY: detect, align, ArcFace embed",
    needs=("adapters.face_analysis",),
)
def _identity_encoding(device: torch.device) -> TaskResult:
    raise TaskUnavailable("benchmark body not written yet (benchmarks/tasks.py: identity_encoding)")


@task(
    "personalization_40_steps",
    "training",
    "per-identity fine-tune, 40 optimizer steps (PVA FT40)",
    needs=("adapters.personalization",),
)
def _personalization(device: torch.device) -> TaskResult:
    raise TaskUnavailable("benchmark body not written yet (benchmarks/tasks.py: personalization_40_steps)")


def run_task(t: Task, device: torch.device) -> Tuple[Optional[TaskResult], str]:
    """(result, status): status is "ok" or why the task did not run."""
    missing = t.missing()
    if missing:
        return None, "not available: not in this branch: " + ", ".join(missing)
    try:
        return t.run(device), "ok"
    except TaskUnavailable as exc:
        return None, f"not available: {exc}"
