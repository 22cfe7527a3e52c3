"""Maps recorded during sampling for inspect nodes placed after the sampler.

Patch nodes run before sampling, so anything a stage sees while the sampler
runs (CA² scores, the STFG boundary) is kept here and turned into pictures by
a node that takes the sampled LATENT. Recording must not slow sampling down:
tensors stay on their device (no GPU->CPU copy, no sync) and are only read
after sampling.

Steps are told apart by sigma (the Python float the dispatcher already reads
once per model call): a new sigma starts a new step, a sigma *higher* than the
last one starts a new sampling run and drops the previous run's maps (samplers
only lower sigma within a run; a restart sampler's jumps back up would split
its run). Memory is bounded by an element budget: once full, further maps are
dropped and :attr:`dropped` says how many.
"""

from __future__ import annotations

import threading
from typing import Dict, Hashable, List, Optional, Tuple

import torch

DEFAULT_BUDGET = 32 * 1024 * 1024
"""Elements kept per recorder (fp16: 64 MiB). SD1.5 512 px, 50 steps, all 16 layers: about 1.4 M per image."""


class StepRecorder:
    """``steps``: list of ``(sigma, {key: tensor})`` in sampling order."""

    def __init__(self, budget: int = DEFAULT_BUDGET, dtype: torch.dtype = torch.float16):
        self.budget = budget
        self.dtype = dtype
        self.steps: List[Tuple[float, Dict[Hashable, torch.Tensor]]] = []
        self.dropped = 0
        self._used = 0
        self._lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def clear(self) -> None:
        with self._lock:
            self.steps = []
            self.dropped = 0
            self._used = 0

    def record(self, sigma: Optional[float], key: Hashable, tensor: torch.Tensor) -> None:
        """Keep ``tensor`` (detached, in the recorder's dtype) under ``key`` for the step at ``sigma``."""
        if sigma is None:
            return
        with self._lock:
            if not self.steps or sigma != self.steps[-1][0]:
                if self.steps and sigma > self.steps[-1][0]:
                    self.steps, self.dropped, self._used = [], 0, 0
                self.steps.append((sigma, {}))
            entries = self.steps[-1][1]
            previous = entries.get(key)
            size = tensor.numel()
            freed = previous.numel() if previous is not None else 0
            if self._used - freed + size > self.budget:
                self.dropped += 1
                return
            entries[key] = tensor.detach().to(self.dtype)
            self._used += size - freed

    @property
    def sigmas(self) -> List[float]:
        return [sigma for sigma, _ in self.steps]
