"""Optimizer-step benchmark: our fused masked AdamW against torch's fused AdamW and eager pipelines.

    python -m benchmarks.bench_step                  # CPU sizes, every available contender
    python -m benchmarks.bench_step --demo           # one size, a short run (what `make demo` shows)
    python -m benchmarks.bench_step --device cuda --sizes 1e7 1e8 --out benchmarks/results/gpu

Each row: median time, spread, GB/s from the bytes model (DESIGN.md), percent of the bandwidth of an in-place
scale measured in the same run, and the ratio to torch's fused AdamW measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
from pathlib import Path

import torch

import pecker_kernels as pk

from . import contenders as c
from .timing import measure, summary


def contenders_for(n: int, device: str, ratio: float, with_compile: bool, with_slow: bool) -> list:
    rows = [lambda: c.bandwidth_reference(n, device), lambda: c.torch_adamw(n, device, "fused")]
    if with_slow:
        rows += [
            lambda: c.torch_adamw(n, device, "foreach"),
            lambda: c.torch_adamw(n, device, "single-tensor"),
        ]
    for backend in pk.available_backends(device):
        if backend == "eager" or (backend == "triton" and not device.startswith("cuda")):
            continue  # the oracle and the Triton interpreter are references, not contenders
        rows += [
            lambda b=backend: c.ours(n, device, ratio, b, stored_mask=True),
            lambda b=backend: c.ours(n, device, ratio, b, stored_mask=False),
            lambda b=backend: c.ours(n, device, ratio, b, stored_mask=False, beta1=0.0),
        ]
    rows += [lambda: c.eager_kthvalue(n, device, ratio), lambda: c.eager_topk(n, device, ratio)]
    if with_slow:
        rows.append(lambda: c.eager_salun(n, device, ratio))
    if with_compile:
        rows.append(lambda: c.compiled_kthvalue(n, device, ratio))
    return rows


def run(
    sizes: list[int], device: str, ratio: float, reps: int, with_compile: bool, with_slow: bool
) -> list[dict]:
    """Every contender of a size is built first and then timed in interleaved rounds, so a slow
    spell of a shared machine spreads over all of them instead of landing on one."""
    rounds = 3
    results = []
    for n in sizes:
        contenders = [make() for make in contenders_for(n, device, ratio, with_compile, with_slow)]
        samples: list[list[float]] = [[] for _ in contenders]
        for round_index in range(rounds):
            for contender, collected in zip(contenders, samples, strict=True):
                per_round = max(1, reps // rounds)
                collected += measure(
                    contender.step, device, warmup=3 if round_index == 0 else 1, reps=per_round
                )
        rows = [
            {"size": n, "name": c.name, "bytes_per_param": c.bytes_per_param, **summary(collected)}
            for c, collected in zip(contenders, samples, strict=True)
        ]
        del contenders
        gc.collect()
        floor = next(r["median_s"] for r in rows if r["name"] == "torch AdamW (fused)")
        reference = next(r for r in rows if "bandwidth reference" in r["name"])
        bandwidth = reference["bytes_per_param"] * n / reference["median_s"] / 1e9
        for r in rows:
            r["gb_per_s"] = r["bytes_per_param"] * n / r["median_s"] / 1e9
            r["percent_of_bandwidth"] = 100.0 * r["gb_per_s"] / bandwidth
            r["vs_fused_adamw"] = r["median_s"] / floor
        results += rows
    return results


def table(results: list[dict]) -> str:
    lines = [
        "| size | contender | median ms | min-p90 ms | GB/s | % bandwidth | x fused AdamW |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['size']:.0e} | {r['name']} | {1e3 * r['median_s']:.2f} | "
            f"{1e3 * r['min_s']:.2f}-{1e3 * r['p90_s']:.2f} | {r['gb_per_s']:.1f} | "
            f"{r['percent_of_bandwidth']:.0f} | {r['vs_fused_adamw']:.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Time per parameter against size, one line per contender (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for name in dict.fromkeys(r["name"] for r in results):
        rows = [r for r in results if r["name"] == name]
        ax.plot(
            [r["size"] for r in rows], [1e9 * r["median_s"] / r["size"] for r in rows], marker="o", label=name
        )
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ns per parameter (median)")
    ax.set_title("one optimizer step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager step")
    parser.add_argument("--slow", action="store_true", help="also time SalUn's pipeline and unfused AdamW")
    parser.add_argument("--demo", action="store_true", help="one size, few repetitions")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes]
    if args.demo:
        sizes, args.reps, args.slow = [4_000_000], 7, True

    results = run(sizes, args.device, args.ratio, args.reps, args.compile, args.slow)
    text = table(results)
    print(f"ratio {args.ratio}, {environment(args.device)}")
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(args.device), "ratio": args.ratio, "results": results}
        (args.out / "results.json").write_text(json.dumps(payload, indent=2))
        (args.out / "results.md").write_text(text + "\n")
        plot(results, args.out / "time_per_parameter.png")


if __name__ == "__main__":
    main()
