"""Optimizer-step benchmark: our SalientAdamW against torch's AdamW and the eager masked pipelines.

    python -m benchmarks.bench_step --out benchmarks/results/cpu    # the full CPU plan (make bench)
    python -m benchmarks.bench_step --demo                           # one size, a short run (make demo)
    python -m benchmarks.bench_step --device cuda --out DIR          # the GPU plan, sizes up to 1e9
    python -m benchmarks.bench_step --sizes 1e6 --dtypes fp32 --more-ratios --layouts   # one configuration

A plan is a list of configurations: flat tensors of every size in --sizes at every dtype in --dtypes (ratio
--ratio), each of them also split into every count of equal tensors in --split, a flat tensor of --ratio-size
at each of --more-ratios (first dtype), and every model layout in --layouts at every dtype. The contenders of
a configuration are all built first and then timed in interleaved rounds, then each alone (calls in a row), so
that a result that depends on its neighbours shows. Each row: median time, spread, GB/s from the bytes model
(docs/DESIGN.md), percent of the bandwidth of an in-place scale measured in the same configuration, the ratio
to torch's fused AdamW measured in the same configuration, and the median and ratio of the calls timed alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

import pecker_kernels as pk

from . import contenders as c
from . import layouts
from .timing import alone, interleaved, summary

# Largest problem (parameters) each costly contender is timed at, by device type. Past it a row costs
# minutes per configuration on a 2-core CPU, or memory an 80 GB GPU lacks beside the fused rows (1e9
# fp32 parameters and gradients take 8 GB, each fused optimizer's state 4-8 GB, a 1e9 argsort tens of GB).
# "unfused": torch's foreach and single-tensor AdamW, the kthvalue and topk pipelines, torch.compile.
LIMITS = {
    "cpu": {"unfused": 4e7, "salun": 1e7, "eager backend": 1e6},
    "cuda": {"unfused": 1e8, "salun": 1e8, "eager backend": 1e8},
}
FUSED_ADAMW = "torch AdamW (fused)"
REFERENCE = "in-place scale (bandwidth reference)"


def contenders_for(
    config: c.Config, problem: c.Problem, with_compile: bool, fused_only: bool
) -> list[Callable[[], c.Contender]]:
    """Makers of every contender that fits this configuration, in table order."""
    limits = LIMITS["cuda" if config.device.startswith("cuda") else "cpu"]
    unfused = not fused_only and config.numel <= limits["unfused"]
    rows = [lambda: c.bandwidth_reference(config), lambda: c.torch_adamw(config, problem, "fused")]
    if unfused:
        rows += [lambda i=impl: c.torch_adamw(config, problem, i) for impl in ("foreach", "single-tensor")]
    for backend in pk.available_backends(config.device):
        if backend == "triton" and not config.device.startswith("cuda"):
            continue  # the Triton interpreter checks correctness; its speed means nothing
        if backend == "eager" and (fused_only or config.numel > limits["eager backend"]):
            continue
        rows += [
            lambda b=backend: c.salient_adamw(config, problem, b, stored_mask=True),
            lambda b=backend: c.salient_adamw(config, problem, b, stored_mask=False),
            lambda b=backend: c.salient_adamw(config, problem, b, stored_mask=False, beta1=0.0),
        ]
        if config.dtype != "fp32":  # moments in the parameters' dtype, as torch's fused AdamW
            rows.append(
                lambda b=backend: c.salient_adamw(config, problem, b, stored_mask=True, low_state=True)
            )
    if unfused:
        rows += [lambda p=pipeline: c.eager_masked(config, problem, p) for pipeline in ("kthvalue", "topk")]
    if not fused_only and config.numel <= limits["salun"]:
        rows.append(lambda: c.eager_masked(config, problem, "salun"))
    # Compiling the step over a model's hundreds of tensors took minutes on the CPU: one tensor only.
    if with_compile and unfused and len(config.shapes) == 1:
        rows.append(lambda: c.compiled_kthvalue(config, problem))
    return rows


def time_configuration(
    config: c.Config, reps: int, budget_s: float, with_compile: bool, fused_only: bool
) -> list[dict]:
    problem = c.make_problem(config)
    contenders = []
    for make in contenders_for(config, problem, with_compile, fused_only):
        try:
            contenders.append(make())
        except torch.cuda.OutOfMemoryError:
            print(f"  skipped a contender of {config.describe()}: out of memory", flush=True)
            free_memory()
    samples = interleaved(contenders, config.device, reps=reps, budget_s=budget_s)
    by_itself = alone(
        contenders, config.device, reps=[len(s) for s in samples], fastest=[min(s) for s in samples]
    )
    rows = [
        {
            "layout": config.layout,
            "size": config.numel,
            "tensors": len(config.shapes),
            "dtype": config.dtype,
            "ratio": config.ratio,
            "name": contender.name,
            "bytes_per_param": contender.bytes_per_param,
            **summary(collected),
            "alone": summary(collected_alone),
        }
        for contender, collected, collected_alone in zip(contenders, samples, by_itself, strict=True)
    ]
    add_ratios(rows, config.numel)
    return rows


def add_ratios(rows: list[dict], n: int) -> None:
    """GB/s from the bytes model, % of the reference's bandwidth, and time over fused AdamW's
    (interleaved, and each timed alone)."""
    floor = next(r["median_s"] for r in rows if r["name"] == FUSED_ADAMW)
    floor_alone = next(r["alone"]["median_s"] for r in rows if r["name"] == FUSED_ADAMW)
    reference = next(r for r in rows if r["name"] == REFERENCE)
    bandwidth = reference["bytes_per_param"] * n / reference["median_s"] / 1e9
    for r in rows:
        r["gb_per_s"] = r["bytes_per_param"] * n / r["median_s"] / 1e9
        r["percent_of_bandwidth"] = 100.0 * r["gb_per_s"] / bandwidth
        r["vs_fused_adamw"] = r["median_s"] / floor
        r["alone"]["vs_fused_adamw"] = r["alone"]["median_s"] / floor_alone


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the plan -------------------------------------------------------------------------------------

DEFAULTS = {
    "cpu": dict(sizes=[1e5, 1e6, 1e7, 3e7], ratio_size=1e7, reps=15, budget=2.0),
    "cuda": dict(sizes=[1e6, 1e7, 1e8, 1e9], ratio_size=1e8, reps=30, budget=2.0),
}


def plan(args: argparse.Namespace) -> list[c.Config]:
    def config(layout: str, shapes: layouts.Shapes, dtype: str, ratio: float) -> c.Config:
        return c.Config(layout, tuple(shapes), dtype, ratio, args.device)

    configs = [config("flat", layouts.flat(n), d, args.ratio) for d in args.dtypes for n in args.sizes]
    configs += [
        config(f"split {k}", layouts.split(n, k), d, args.ratio)
        for k in args.split
        for d in args.dtypes
        for n in args.sizes
    ]
    configs += [config("flat", layouts.flat(args.ratio_size), args.dtypes[0], r) for r in args.more_ratios]
    configs += [config(m, layouts.MODELS[m](), d, args.ratio) for m in args.layouts for d in args.dtypes]
    # Smallest first: running out of memory at the largest sizes on a GPU keeps everything before it.
    return sorted(configs, key=lambda config: config.numel)


# ---- reporting ------------------------------------------------------------------------------------


def configurations_of(results: list[dict]) -> list[list[dict]]:
    """The rows grouped by configuration, in run order."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["layout"], r["size"], r["dtype"], r["ratio"]), []).append(r)
    return list(groups.values())


def heading(rows: list[dict]) -> str:
    r = rows[0]
    tensors = f" ({r['tensors']} tensors)" if r["tensors"] > 1 else ""
    bandwidth = next(x["gb_per_s"] for x in rows if x["name"] == REFERENCE)
    return (
        f"{r['layout']} {r['size']:.3g}{tensors}, {r['dtype']}, ratio {r['ratio']} "
        f"(bandwidth reference {bandwidth:.1f} GB/s)"
    )


def table(rows: list[dict]) -> str:
    lines = [
        "| contender | median ms | min-p90 ms | n | GB/s | % bandwidth | x fused AdamW | alone: median ms "
        "| alone: x fused AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {1e3 * r['median_s']:.3f} | {1e3 * r['min_s']:.3f}-{1e3 * r['p90_s']:.3f} | "
            f"{r['samples']} | {r['gb_per_s']:.1f} | {r['percent_of_bandwidth']:.0f} | "
            f"{r['vs_fused_adamw']:.2f} | {1e3 * r['alone']['median_s']:.3f} | "
            f"{r['alone']['vs_fused_adamw']:.2f} |"
        )
    return "\n".join(lines)


def _ours(mode: str) -> Callable[[str], bool]:
    """Rows of our optimizer in ``mode`` on a compiled backend (the eager backend is a reference)."""
    return lambda name: (
        name.startswith("SalientAdamW ") and name.endswith(f"({mode})") and " eager " not in name
    )


# Summary columns: a title and which rows it takes the fastest of.
SUMMARY: list[tuple[str, Callable[[str], bool]]] = [
    ("ours, stored mask", _ours("stored mask")),
    ("ours, reselect", _ours("reselect")),
    ("ours, reselect, beta1=0", _ours("reselect, beta1=0")),
    ("ours, stored mask, bf16 moments", _ours("stored mask, bf16 moments")),
    ("kthvalue", lambda name: name.startswith("eager kthvalue")),
    ("topk", lambda name: name.startswith("eager topk")),
    ("SalUn", lambda name: name.startswith("eager SalUn")),
    ("compile", lambda name: name.startswith("torch.compile")),
]


def summary_table(results: list[dict]) -> str:
    """One line per configuration: fused AdamW's time, then each column's fastest row as x fused AdamW
    (on a GPU, the backend that was fastest in brackets)."""
    titles = " | ".join(title for title, _ in SUMMARY)
    lines = [f"| configuration | fused AdamW ms | {titles} |", "|---|---:|" + "---:|" * len(SUMMARY)]
    for rows in configurations_of(results):
        cells = []
        for _, matches in SUMMARY:
            found = [r for r in rows if matches(r["name"])]
            if not found:
                cells.append("-")
                continue
            best = min(found, key=lambda r: r["vs_fused_adamw"])
            backend = f" ({best['name'].split()[1]})" if best["name"].startswith("SalientAdamW") else ""
            cells.append(f"{best['vs_fused_adamw']:.2f}{backend if len(found) > 1 else ''}")
        r = rows[0]
        floor = next(x["median_s"] for x in rows if x["name"] == FUSED_ADAMW)
        config = f"{r['layout']} {r['size']:.3g} {r['dtype']} r={r['ratio']}"
        lines.append(f"| {config} | {1e3 * floor:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: list[dict]) -> str:
    sections = [f"### {heading(rows)}\n\n{table(rows)}" for rows in configurations_of(results)]
    sections.append("### Summary: x torch fused AdamW (lower is better)\n\n" + summary_table(results))
    return "\n\n".join(sections)


def plot(results: list[dict], out: Path, ratio: float) -> list[Path]:
    """Time per parameter against size, one line per contender, one figure per dtype (flat layouts at
    ``ratio``)."""
    try:
        import matplotlib
    except ImportError:  # the GPU machine's own Python may lack it; the tables are written already
        print("matplotlib is not installed: no plots")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        sweep = [r for r in results if r["layout"] == "flat" and r["dtype"] == dtype and r["ratio"] == ratio]
        if len({r["size"] for r in sweep}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(10, 5))
        for index, name in enumerate(dict.fromkeys(r["name"] for r in sweep)):
            rows = [r for r in sweep if r["name"] == name]
            ax.plot(
                [r["size"] for r in rows],
                [1e9 * r["median_s"] / r["size"] for r in rows],
                marker="o",
                color=plt.cm.tab20(index % 20),
                linestyle="-" if name.startswith("SalientAdamW") else "--",  # ours solid
                label=name,
            )
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ns per parameter (median)")
        ax.set_title(f"one optimizer step, one {dtype} tensor, ratio {ratio}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out / f"time_per_parameter_{dtype}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


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


def write(results: list[dict], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    arguments = {key: value for key, value in vars(args).items() if key != "out"}
    payload = {"environment": environment(args.device), "arguments": arguments, "limits": LIMITS}
    payload["results"] = results
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))
    (args.out / "results.md").write_text(report(results) + "\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", type=float, help="flat sizes (cpu: 1e5-3e7, cuda: 1e6-1e9)")
    parser.add_argument("--dtypes", nargs="+", choices=list(c.DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction kept in the sweep and layouts")
    parser.add_argument("--more-ratios", nargs="*", type=float, default=[0.1, 0.9])
    parser.add_argument("--ratio-size", type=float, help="flat size of the --more-ratios rows")
    parser.add_argument(
        "--split", nargs="*", type=int, default=[], help="each flat size also as this many equal tensors"
    )
    parser.add_argument("--layouts", nargs="*", choices=list(layouts.MODELS), default=list(layouts.MODELS))
    parser.add_argument("--reps", type=int, help="timed calls per contender (cpu: 15, cuda: 30)")
    parser.add_argument("--budget", type=float, help="seconds of timed calls per slow contender")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--fused-only", action="store_true", help="only the reference, fused AdamW, ours")
    parser.add_argument("--demo", action="store_true", help="one size, few repetitions (make demo)")
    parser.add_argument("--out", type=Path, help="folder for results.json, results.md and the plots")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    for key in ("sizes", "ratio_size", "reps", "budget"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.demo:
        args.sizes, args.dtypes, args.more_ratios, args.layouts = [4e6], ["fp32"], [], []
        args.reps, args.no_compile = 7, True
    args.sizes = [int(s) for s in args.sizes]
    args.ratio_size = int(args.ratio_size)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    configs = plan(args)
    print(f"configurations: {len(configs)}; {environment(args.device)}", flush=True)
    results: list[dict] = []
    for config in configs:
        try:
            rows = time_configuration(config, args.reps, args.budget, not args.no_compile, args.fused_only)
        except torch.cuda.OutOfMemoryError:
            print(f"\n### {config.describe()}: skipped, out of memory", flush=True)
            continue
        finally:
            free_memory()
        results += rows
        print(f"\n### {heading(rows)}\n\n{table(rows)}", flush=True)
        if args.out:
            write(results, args)  # after every configuration: a later failure keeps what ran
    print("\n### Summary: x torch fused AdamW (lower is better)\n\n" + summary_table(results))
    if args.out and results:
        write(results, args)
        plot(results, args.out, args.ratio)


if __name__ == "__main__":
    main()
