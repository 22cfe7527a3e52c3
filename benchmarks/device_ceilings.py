"""The two ceilings the floors are divided by, measured on this machine (not datasheet numbers).

- matrix rate: a large square matrix product in the benchmark dtype, FLOP/s;
- memory bandwidth: a large device-to-device copy, counting bytes read plus written.

Random inputs (never zeros), warm-up first, median of repeats. On a GPU the
sizes fill the chip (8192^3 products, a 1 GiB copy); on the CPU they are small
enough to take well under a second.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    flops: float  # FLOP/s of a matrix product in the benchmark dtype
    bandwidth: float  # bytes/s, read + write

    def describe(self) -> str:
        rate = f"{self.flops / 1e12:.1f} TFLOP/s" if self.flops >= 1e12 else f"{self.flops / 1e9:.1f} GFLOP/s"
        return f"matmul {rate}, copy {self.bandwidth / 1e9:.1f} GB/s (measured)"


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, process CPU time on the CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.process_time()  # CPU time: not inflated by other processes on shared cores
            fn()
            times.append(time.process_time() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure(device: torch.device, dtype: torch.dtype) -> Ceilings:
    gpu = device.type == "cuda"
    n = 8192 if gpu else 768
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    matmul = _time(lambda: torch.mm(a, b, out=out), device, 10 if gpu else 3)
    del a, b, out
    elems = (2**30 if gpu else 2**25) // torch.finfo(dtype).bits * 8
    src = torch.randn(elems, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy = _time(lambda: dst.copy_(src), device, 10 if gpu else 3)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if gpu:
        torch.cuda.empty_cache()
    return Ceilings(flops=2.0 * n**3 / matmul, bandwidth=moved / copy)
