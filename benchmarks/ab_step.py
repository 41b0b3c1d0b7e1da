"""Two builds of the package compared on one machine: our step against torch's fused AdamW in each,
in alternating processes, so that a change is judged against the machine's minute-to-minute bandwidth
rather than against numbers from another day.

    python -m benchmarks.ab_step --builds ../old-checkout . --configs unet flat ddpm-cifar10 --rounds 2

A build is a checkout with its compiled modules in place (``python setup.py build_ext --inplace``).
Every process imports ``pecker_kernels`` from its build and the contenders (``benchmarks.contenders``)
from this checkout, so both builds run the same benchmark. Each prints one row: fused AdamW's median
step and the ratios to it of ours with a stored mask, reselecting every step, reselecting with
beta1 = 0, and the reselecting step's select by itself (ratio 0.5; the median of ``--reps`` calls
each, in bench_step's interleaved rounds). ``--dtype bf16`` runs bf16 parameters (torch's moments in
bf16, ours in fp32) and adds our stored-mask step with bf16 moments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the checkout whose contenders every build runs
NAMES = ("stored", "reselect", "beta1=0", "select alone")
LOW_STATE = "stored, bf16 moments"  # the extra column of --dtype bf16


def names(dtype: str) -> tuple[str, ...]:
    return NAMES + ((LOW_STATE,) if dtype != "fp32" else ())


def measure(build: Path, config: str, size: int, reps: int, dtype: str = "fp32") -> dict:
    """One process's row (runs in the child: ``pecker_kernels`` from ``build``)."""
    sys.path.insert(0, str(build))
    import pecker_kernels

    if not Path(pecker_kernels.__file__).resolve().is_relative_to(build):
        raise RuntimeError(f"pecker_kernels came from {pecker_kernels.__file__}, not from {build}")
    sys.path.insert(0, str(HERE))
    from benchmarks import contenders as c
    from benchmarks import layouts, timing

    shapes = ((size,),) if config == "flat" else tuple(layouts.MODELS[config]())
    cfg = c.Config(config, shapes, dtype, 0.5, "cpu")
    problem = c.make_problem(cfg)
    contenders = [
        c.torch_adamw(cfg, problem, "fused"),
        c.salient_adamw(cfg, problem, "cpu", stored_mask=True),
        c.salient_adamw(cfg, problem, "cpu", stored_mask=False),
        c.salient_adamw(cfg, problem, "cpu", stored_mask=False, beta1=0.0),
        _select_alone(problem.grads),
    ]
    if dtype != "fp32":
        contenders.append(c.salient_adamw(cfg, problem, "cpu", stored_mask=True, low_state=True))
    samples = timing.interleaved(contenders, "cpu", reps=reps, budget_s=3600.0)  # every call: no budget cut
    fused, *ours = (statistics.median(t) for t in samples)
    return {"fused_ms": fused * 1e3, **{n: t / fused for n, t in zip(names(dtype), ours, strict=True)}}


def _select_alone(grads: list) -> object:
    """The reselecting step's select by itself: the CPU backend's exact global top half of |g|."""
    from benchmarks import contenders as c
    from pecker_kernels.backends import load
    from pecker_kernels.backends.base import budget

    cpu, segments = load("cpu"), [0] * len(grads)
    k = [budget(0.5, sum(g.numel() for g in grads))]
    return c.Contender("select alone", lambda: cpu.select(grads, None, "grad", segments, k), 4.0)


def run_child(build: Path, config: str, size: int, reps: int, dtype: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(build), "--configs", config]
    cmd += ["--size", str(size), "--reps", str(reps), "--dtype", dtype]
    env = {**os.environ, "PYTHONPATH": str(build)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=build, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {build} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--builds", nargs="+", type=Path, default=[HERE], help="checkouts to compare")
    p.add_argument("--configs", nargs="+", default=["flat"], help="flat, unet, ddpm-cifar10")
    p.add_argument("--size", type=float, default=1e7, help="elements of the flat configuration")
    p.add_argument("--rounds", type=int, default=2, help="processes per build and configuration")
    p.add_argument("--reps", type=int, default=12, help="timed calls per contender and process")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter dtype")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(
            json.dumps(measure(args.child.resolve(), args.configs[0], int(args.size), args.reps, args.dtype))
        )
        return []
    builds = [b.resolve() for b in args.builds]
    columns = names(args.dtype)
    rows = []
    print(
        "| configuration | build | round | fused AdamW ms | "
        + " | ".join(f"x fused, {n}" for n in columns)
        + " |"
    )
    print("|---|---|---:|---:|" + "---:|" * len(columns))
    for config in args.configs:
        for round_ in range(1, args.rounds + 1):
            for build in builds:  # alternating: each round runs every build once, in turn
                row = {"config": config, "dtype": args.dtype, "build": str(build), "round": round_}
                row |= run_child(build, config, int(args.size), args.reps, args.dtype)
                rows.append(row)
                ratios = " | ".join(f"{row[n]:.2f}" for n in columns)
                print(
                    f"| {config} | {build.name} | {round_} | {row['fused_ms']:.2f} | {ratios} |", flush=True
                )
    return rows


if __name__ == "__main__":
    main()
