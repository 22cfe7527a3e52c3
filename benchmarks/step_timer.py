"""Time one CFG sampling step exactly as ComfyUI's sampler runs it.

A round is one ``comfy.sample.sample_custom`` call with a *timing sampler*: a
``comfy.samplers.KSAMPLER`` whose function, instead of integrating, calls the
denoiser it is given (``KSamplerX0Inpaint`` -> CFG -> ``calc_cond_uncond_batch``
-> ``apply_model``) repeatedly at one sigma. So each timed call is one sampler
step with cond and uncond batched into one UNet call (batch 2), every
``model_options`` hook (attn2 replaces, ``model_function_wrapper``,
``sampler_post_cfg_function``...) and the inpainting mask blend included, and
ComfyUI's setup (cond processing, model loading) outside the timing.

Per round: ``warmup`` untimed calls, then ``steps`` timed calls with no host
synchronisation between them (CUDA events around each call on a GPU; on the
CPU the process's CPU time, ``time.process_time``, which other processes on
shared cores do not inflate: run.py sets one torch thread there). Memory on a GPU: the scenario's persistent
allocations (made during its first round, e.g. cached identity K/V) and the
transient peak of a step (``max_memory_allocated`` over the timed calls minus
what was allocated before them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

import comfy.sample
import comfy.samplers


@dataclass
class StepInputs:
    """What every round samples: one latent (batch 1, so CFG makes batch 2) at one sigma."""

    latent: torch.Tensor  # [1, 4, h, w]
    noise: torch.Tensor  # [1, 4, h, w], random
    positive: list  # CONDITIONING
    negative: list
    sigma: float
    cfg: float = 7.0


@dataclass
class RoundResult:
    times: List[float]  # seconds per timed step
    allocated_before: Optional[int] = None  # bytes allocated when the round's sampling began (GPU)
    allocated_after: Optional[int] = None  # ... and when it ended (persistent growth = after - before)
    transient_peak: Optional[int] = None  # max allocated during the timed steps minus allocated before them
    finite: bool = True
    flops: Optional[float] = None  # one step, counted by torch's FlopCounterMode (when asked)


def run_round(model, inputs: StepInputs, warmup: int, steps: int, noise_mask=None, count_flops: bool = False, latent=None) -> RoundResult:
    """One round on ``model`` (a ModelPatcher): ``warmup`` + ``steps`` sampler steps, the latter timed.

    ``noise_mask`` / ``latent``: an inpainting edit's mask and original latent (default: none / ``inputs.latent``).
    """
    device = model.load_device
    cuda = torch.device(device).type == "cuda"
    result = RoundResult(times=[])

    def timing_sampler(denoiser, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        # a FRESH sigma tensor per call, as every sampler step makes one (sigmas[i] * s_in): a cache
        # keyed on the sigma tensor, or a per-call host read of it, is then paid as in real sampling
        fresh = lambda: sigmas[0] * s_in  # noqa: E731
        out = None
        for _ in range(warmup):
            out = denoiser(x, fresh(), **extra_args)
        if cuda:
            torch.cuda.synchronize(device)
            start_alloc = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
            for start, end in events:
                start.record()
                out = denoiser(x, fresh(), **extra_args)
                end.record()
            torch.cuda.synchronize(device)
            result.times = [start.elapsed_time(end) / 1e3 for start, end in events]
            result.transient_peak = torch.cuda.max_memory_allocated(device) - start_alloc
        else:
            for _ in range(steps):
                t0 = time.process_time()
                out = denoiser(x, fresh(), **extra_args)
                result.times.append(time.process_time() - t0)
        if out is not None:
            result.finite = bool(torch.isfinite(out).all())
        if count_flops:
            result.flops = _count_flops(lambda: denoiser(x, fresh(), **extra_args))
        return x

    # the schedule goes on after the timed sigma: the sampling (and its per-sampling constants) is not over
    sigmas = torch.tensor([inputs.sigma, inputs.sigma / 2, 0.0])
    if cuda:
        torch.cuda.synchronize(device)
        result.allocated_before = torch.cuda.memory_allocated(device)
    with torch.inference_mode():  # as ComfyUI's executor runs every prompt
        comfy.sample.sample_custom(
            model,
            inputs.noise,
            inputs.cfg,
            comfy.samplers.KSAMPLER(timing_sampler),
            sigmas,
            inputs.positive,
            inputs.negative,
            inputs.latent if latent is None else latent,
            noise_mask=noise_mask,
            disable_pbar=True,
            seed=0,
        )
    if cuda:
        torch.cuda.synchronize(device)
        result.allocated_after = torch.cuda.memory_allocated(device)
    return result


def _count_flops(fn) -> Optional[float]:
    """FLOPs of one call by torch's FlopCounterMode; None where the counter cannot run (never fatal)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception as exc:  # a context column only: the timing must not fail over it
        print(f"FLOPs not counted: {type(exc).__name__}: {exc}", flush=True)
        return None
