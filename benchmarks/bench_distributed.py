"""What one global selection over sharded parameters costs: time and bytes on the wire per reselection.

    torchrun --nproc_per_node 2 -m benchmarks.bench_distributed --sizes 1e5 1e6 1e7

Each rank holds an even shard of a global vector of ``size`` fp32 gradients and runs the sharded
selection (``pecker_kernels.distributed.select``); rank 0 also times the single-process selection of
its shard alone (what each rank would pay with no agreement across ranks) and prints a markdown table.
From ``distributed.BRACKET_MIN_SCORES`` scores on, the CPU backend's sharded select takes the sampled
bracket (one read of the scores); the radix column forces the three-pass radix select for comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from pecker_kernels import distributed
from pecker_kernels.backends import load

DIGIT_BINS = [1 << width for _, width in distributed._DIGITS]


def wire_bytes(num_segments: int, world: int) -> int:
    """int64 counts all-reduced per selection and segment: each digit's histogram, the segment's size
    (with the first digit) and every rank's tie count."""
    return 8 * num_segments * (sum(DIGIT_BINS) + 1 + world)


def median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = load("cpu")
    group = dist.group.WORLD
    rows = []
    for size in map(int, args.sizes):
        shard = torch.randn(size // world, generator=torch.Generator().manual_seed(rank))
        sharded = median_seconds(
            lambda s=shard: distributed.select([s], None, "grad", [0], 1, args.ratio, group, cpu), args.reps
        )
        k = max(1, int(args.ratio * shard.numel()))
        local = median_seconds(lambda s=shard, k=k: cpu.select([s], None, "grad", [0], [k]), args.reps)
        os.environ["PECKER_SHARDED_SELECT"] = "radix"
        radix = median_seconds(
            lambda s=shard: distributed.select([s], None, "grad", [0], 1, args.ratio, group, cpu), args.reps
        )
        del os.environ["PECKER_SHARDED_SELECT"]
        rows.append((size, sharded, radix, local))
    if rank == 0:
        print(f"world size {world}, gloo, ratio {args.ratio}, {torch.get_num_threads()} threads per rank")
        print(
            "| global size | sharded select ms | sharded radix select ms | local select of the shard ms "
            "| radix bytes all-reduced |"
        )
        print("|---:|---:|---:|---:|---:|")
        for size, sharded, radix, local in rows:
            print(
                f"| {size:.0e} | {sharded * 1e3:.2f} | {radix * 1e3:.2f} | {local * 1e3:.2f} "
                f"| {wire_bytes(1, world)} |"
            )
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
