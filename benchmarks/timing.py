"""Wall-clock timing of a step: CUDA events with the L2 flushed on the GPU, perf_counter on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

Step = Callable[[], None]


class Timed(Protocol):
    step: Step
    prepare: Step | None  # untimed, before every call of step


def measure(step: Step, device: str, *, reps: int, prepare: Step | None = None) -> list[float]:
    """Seconds per call of ``step``, one sample per repetition; ``prepare`` runs untimed before each."""
    samples = []
    if device.startswith("cuda"):
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # > any L2
        for _ in range(reps):
            if prepare is not None:
                prepare()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            if prepare is not None:
                prepare()
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
    return samples


def warm_up(contender: Timed, device: str, *, calls: int, seconds: float) -> list[float]:
    """Up to ``calls`` untimed calls, stopping early once ``seconds`` have passed (always at least one:
    the first call of a compiled step is its compilation). Returns their durations."""
    deadline = time.perf_counter() + seconds
    durations = []
    for _ in range(calls):
        durations += measure(contender.step, device, reps=1, prepare=contender.prepare)
        if time.perf_counter() > deadline:
            break
    return durations


def interleaved(
    contenders: Sequence[Timed], device: str, *, reps: int, budget_s: float, rounds: int = 3
) -> list[list[float]]:
    """Samples of every contender, timed in interleaved rounds, so that a slow spell of a shared machine
    spreads over all of them instead of landing on one.

    A contender gets ``reps // rounds`` calls a round, or fewer (at least one) when its calls would take
    more than ``budget_s`` in all, judged by its fastest call in the first round (one stalled call on a
    shared machine must not cut a fast contender's share). Fast steps are warmed up again at the start
    of each round, since the other contenders evicted them from cache.
    """
    samples: list[list[float]] = [[] for _ in contenders]
    per_round = [max(1, reps // rounds)] * len(contenders)
    for round_index in range(rounds):
        for i, contender in enumerate(contenders):
            if round_index == 0:
                warm = warm_up(contender, device, calls=3, seconds=0.5)
                first = measure(contender.step, device, reps=1, prepare=contender.prepare)
                fastest = min(warm + first)
                per_round[i] = max(1, min(per_round[i], int(budget_s / rounds / fastest)))
                samples[i] += first
                todo = per_round[i] - 1
            else:
                if statistics.median(samples[i]) < 0.05:
                    warm_up(contender, device, calls=1, seconds=0.0)
                todo = per_round[i]
            samples[i] += measure(contender.step, device, reps=todo, prepare=contender.prepare)
    return samples


def alone(
    contenders: Sequence[Timed], device: str, *, reps: list[int], fastest: list[float]
) -> list[list[float]]:
    """Samples of every contender timed on its own: a warm-up, then ``reps[i]`` calls in a row. Beside
    the interleaved rounds this shows a contender whose speed depends on what ran just before it (the
    caches and the thread pool it inherits, the other contenders' page faults); ``fastest`` (seconds of
    its fastest interleaved call) sets the warm-up's length."""
    samples = []
    for contender, count, best in zip(contenders, reps, fastest, strict=True):
        warm_up(contender, device, calls=3, seconds=max(0.05, 3 * best))
        samples.append(measure(contender.step, device, reps=count, prepare=contender.prepare))
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    """Median and the spread between the fastest and the 90th-percentile sample."""
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "p90_s": p90,
        "samples": len(ordered),
    }
