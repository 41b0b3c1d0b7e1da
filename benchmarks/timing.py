"""Wall-clock timing of a step: CUDA events with the L2 flushed on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure(step: Callable[[], None], device: str, *, warmup: int = 3, reps: int = 15) -> list[float]:
    """Seconds per call of ``step``, one sample per repetition."""
    for _ in range(warmup):
        step()
    samples = []
    if device.startswith("cuda"):
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # > any L2
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median and the spread between the fastest and the 90th-percentile sample."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "p90_s": p90}
