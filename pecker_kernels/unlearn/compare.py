"""Seeded comparisons (``unlearn --compare --seeds N``): every variant (sfd, and pecker with its ratio,
refresh schedule and saliency score) gets its own learning rate, chosen from a small grid by one rule
that is the same for every variant, then runs on N seeds; ``compare.json`` holds a row per variant and
seed, the tuning runs, and each variant's mean and spread; ``pareto.png`` plots time to forget against
the retained classes' Frechet distance.

The lr rule (``choose_lr``): every lr of the grid runs once on the tuning seed (not one of the N
evaluation seeds). Among the lrs whose run forgot (forget accuracy under the target) with a final
retained-class Frechet distance within ``tolerance`` (10 %) of the starting generator's, the one with
the fewest steps to forget wins (ties: the lower Frechet distance, then the smaller lr). If none
qualifies, the lowest Frechet distance among the lrs that forgot; if none forgot, the lowest Frechet
distance.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .trainer import UnlearnConfig

DEFAULT_VARIANTS = ("sfd", "pecker")
RULE = (
    "lr per variant from the grid, by one run on the tuning seed: among the lrs that forgot with a final "
    "retained-class Frechet within {tol:.0%} of the starting generator's, the fewest steps to forget "
    "(ties: lower Frechet, then smaller lr); if none qualifies, the lowest Frechet among the lrs that "
    "forgot; if none forgot, the lowest Frechet"
)


def parse_variant(name: str) -> dict[str, Any]:
    """A variant name as config fields: ``sfd``; ``pecker`` followed by any of ``-r<ratio>``,
    ``-k<refresh_every>`` (0: one-shot), ``-gw`` (score grad_weight) or ``-g`` (score grad), e.g.
    ``pecker-r0.3-k10-gw``. Unnamed pecker options keep the command line's values."""
    parts = name.strip().split("-")
    if parts[0] == "sfd" and len(parts) == 1:
        return {"method": "sfd"}
    if parts[0] != "pecker":
        raise ValueError(f"unknown variant {name!r}: expected sfd or pecker[-r<ratio>][-k<refresh>][-gw]")
    fields: dict[str, Any] = {"method": "pecker"}
    for token in parts[1:]:
        try:
            if token.startswith("r"):
                fields["ratio"] = float(token[1:])
            elif token.startswith("k"):
                fields["refresh_every"] = int(token[1:])
            elif token in ("gw", "g"):
                fields["score"] = "grad_weight" if token == "gw" else "grad"
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"variant {name!r}: cannot read {token!r} (r<ratio>, k<refresh_every>, gw or g)"
            ) from None
    return fields


def parse_variants(text: str | Sequence[str] | None) -> list[str]:
    names = list(DEFAULT_VARIANTS) if not text else [n for n in _split(text) if n]
    if len(set(names)) != len(names):
        raise ValueError(f"--variants names a variant twice: {', '.join(names)}")
    for n in names:
        parse_variant(n)
    return names


def parse_grid(text: str | Sequence[float] | None, default: float) -> list[float]:
    if not text:
        return [default]
    try:
        grid = [float(v) for v in _split(text)]
    except ValueError:
        raise ValueError(f"--lr-grid must be numbers separated by commas, got {text!r}") from None
    if not grid or any(not math.isfinite(v) or v <= 0 for v in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"--lr-grid needs distinct finite learning rates > 0, got {text!r}")
    return sorted(grid)


def _split(text: str | Sequence[Any]) -> list[Any]:
    return [
        v.strip() if isinstance(v, str) else v for v in (text.split(",") if isinstance(text, str) else text)
    ]


def variant_config(base: UnlearnConfig, name: str, lr: float, seed: int) -> UnlearnConfig:
    config = dataclasses.replace(base, **parse_variant(name), lr_generator=lr, seed=seed)
    config.extra = {}
    return config


def row(variant: str, metrics: dict[str, Any], folder: str) -> dict[str, Any]:
    """One run's line in compare.json."""
    c = metrics["config"]
    frechet = metrics.get("frechet") or {}
    initial = (metrics.get("initial") or {}).get("frechet") or {}
    steps = max(1, metrics["steps"])
    return {
        "variant": variant,
        "method": c["method"],
        "ratio": c["ratio"] if c["method"] == "pecker" else 1.0,
        "refresh_every": c["refresh_every"] if c["method"] == "pecker" else None,
        "score": c["score"] if c["method"] == "pecker" else None,
        "lr": c["lr_generator"],
        "seed": c["seed"],
        "steps_to_forget": metrics["steps_to_forget"],
        "time_to_forget_seconds": metrics["time_to_forget_seconds"],
        "forget_accuracy": metrics["forget_accuracy"],
        "retain_accuracy": metrics["retain_accuracy"],
        "frechet_retain": frechet.get("retain"),
        "frechet_forgotten": (frechet.get("per_class") or {}).get(str(c["forget"])),
        "frechet_retain_start": initial.get("retain"),
        "setup_seconds": metrics["setup_seconds"],
        "train_seconds": metrics["train_seconds"],
        "ms_per_step": 1000 * (metrics["train_seconds"] - metrics["setup_seconds"]) / steps,
        "updated_fraction": metrics["updated_fraction"],
        "steps": metrics["steps"],
        "folder": folder,
    }


def choose_lr(rows: list[dict[str, Any]], tolerance: float) -> tuple[float, str]:
    """The rule of the module docstring over one variant's tuning rows: (lr, why)."""
    if not rows:
        raise ValueError("no tuning runs to choose a learning rate from")

    def frechet(r: dict[str, Any]) -> float:
        v = r["frechet_retain"]
        return math.inf if v is None or not math.isfinite(v) else v

    forgot = [r for r in rows if r["steps_to_forget"] is not None]
    ok = [
        r
        for r in forgot
        if r["frechet_retain_start"] is not None and frechet(r) <= (1 + tolerance) * r["frechet_retain_start"]
    ]
    if ok:
        best = min(ok, key=lambda r: (r["steps_to_forget"], frechet(r), r["lr"]))
        steps = best["steps_to_forget"]
        why = f"fewest steps to forget ({steps}) within {tolerance:.0%} of the start's Frechet"
    elif forgot:
        best = min(forgot, key=lambda r: (frechet(r), r["lr"]))
        why = f"no lr kept Frechet within {tolerance:.0%}: lowest Frechet among the lrs that forgot"
    else:
        best = min(rows, key=lambda r: (frechet(r), r["lr"]))
        why = "no lr forgot: lowest Frechet"
    return best["lr"], why


def _stats(values: list[float]) -> dict[str, Any]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": mean, "std": std, "min": min(v), "max": max(v)}


SUMMARY_KEYS = (
    "steps_to_forget",
    "time_to_forget_seconds",
    "frechet_retain",
    "frechet_forgotten",
    "retain_accuracy",
    "forget_accuracy",
    "ms_per_step",
    "setup_seconds",
)


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per variant: mean, sample standard deviation, min and max over seeds of each SUMMARY_KEYS (steps
    and seconds to forget over the seeds that forgot; ``forgot`` counts them), and, when sfd ran, the
    per-seed differences to sfd on the same seed (same noise, labels and times)."""
    by = {v: [r for r in rows if r["variant"] == v] for v in variants}
    sfd = {r["seed"]: r for r in by.get("sfd", [])}
    out: dict[str, Any] = {}
    for v, rs in by.items():
        s: dict[str, Any] = {
            "lr": rs[0]["lr"] if rs else None,
            "seeds": len(rs),
            "forgot": sum(r["steps_to_forget"] is not None for r in rs),
        }
        s.update({k: _stats([r[k] for r in rs]) for k in SUMMARY_KEYS})
        if sfd and v != "sfd":
            pairs = [(r, sfd[r["seed"]]) for r in rs if r["seed"] in sfd]
            both = [
                (a, b)
                for a, b in pairs
                if a["steps_to_forget"] is not None and b["steps_to_forget"] is not None
            ]
            s["minus_sfd"] = {
                "steps_to_forget": _stats([a["steps_to_forget"] - b["steps_to_forget"] for a, b in both]),
                "time_to_forget_seconds": _stats(
                    [a["time_to_forget_seconds"] - b["time_to_forget_seconds"] for a, b in both]
                ),
                "frechet_retain": _stats(
                    [
                        a["frechet_retain"] - b["frechet_retain"]
                        for a, b in pairs
                        if a["frechet_retain"] is not None
                    ]
                ),
                "seeds_faster": sum(a["steps_to_forget"] < b["steps_to_forget"] for a, b in both),
                "seeds_slower": sum(a["steps_to_forget"] > b["steps_to_forget"] for a, b in both),
            }
        out[v] = s
    return out


def _pm(s: dict[str, Any], fmt: str = "{:.1f}") -> str:
    if not s or s.get("mean") is None:
        return "-"
    return (fmt + " ± " + fmt).format(s["mean"], s["std"])


def table(result: dict[str, Any]) -> str:
    """compare.md: the rule, then a line per variant (mean ± sample std over seeds)."""
    head = (
        "| variant | lr | forgot | steps to forget | s to forget | Frechet retained | retain acc | "
        "forget acc | steps - sfd | s - sfd | Frechet - sfd | ms/step | mask set-up s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v, s in result["summary"].items():
        d = s.get("minus_sfd") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    v,
                    f"{s['lr']:g}",
                    f"{s['forgot']}/{s['seeds']}",
                    _pm(s["steps_to_forget"]),
                    _pm(s["time_to_forget_seconds"]),
                    _pm(s["frechet_retain"]),
                    _pm({k: 100 * x if x is not None else None for k, x in s["retain_accuracy"].items()}),
                    _pm({k: 100 * x if x is not None else None for k, x in s["forget_accuracy"].items()}),
                    _pm(d.get("steps_to_forget", {})),
                    _pm(d.get("time_to_forget_seconds", {}), "{:.2f}"),
                    _pm(d.get("frechet_retain", {})),
                    _pm(s["ms_per_step"], "{:.0f}"),
                    _pm(s["setup_seconds"], "{:.2f}"),
                ]
            )
            + " |"
        )
    b = result["base"]
    start = _stats([r["frechet_retain_start"] for r in result["rows"]])
    lines += [
        "",
        f"{result['dataset']}: forget {b['forget']}, override {b['override']}, start {b['init']}, weighting "
        f"{b['weighting']} (forget coefficient {b['forget_weight']}), {b['steps']} steps, batch "
        f"{b['batch']} + {b['forget_batch']}, seeds {', '.join(map(str, result['seeds']))}; mean ± sample "
        "std over seeds "
        f"(steps and seconds to forget over the seeds that forgot: forget acc < {b['target']:.0%} at an "
        f"evaluation every {b['eval_every']} steps; seconds include the mask set-up, exclude evaluation). "
        f"'- sfd': the per-seed difference to sfd on the same seed. Retained-class Frechet of the starting "
        f"generator: {_pm(start)}.",
        "",
        "Learning rate: " + result["rule"] + f"; grid {', '.join(f'{x:g}' for x in result['lr_grid'])}, "
        f"tuning seed {result['tune_seed']}.",
        "",
        "| variant | " + " | ".join(f"lr {x:g}: steps, Frechet" for x in result["lr_grid"]) + " | chosen |",
        "|" + "---|" * (len(result["lr_grid"]) + 2),
    ]
    for v, choice in result["chosen_lr"].items():
        cells = []
        for lr in result["lr_grid"]:
            t = [r for r in result["tuning"] if r["variant"] == v and r["lr"] == lr]
            if not t:
                cells.append("-")
                continue
            r = t[0]
            steps = "-" if r["steps_to_forget"] is None else str(r["steps_to_forget"])
            fd = "-" if r["frechet_retain"] is None else f"{r['frechet_retain']:.1f}"
            cells.append(f"{steps}, {fd}")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {choice['lr']:g} ({choice['reason']}) |")
    return "\n".join(lines) + "\n"


# ---- running the sub-runs ----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(base: dict[str, Any], threads: int) -> None:
    import torch

    from .trainer import prepare

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(threads)
    _WORKER["ctx"] = prepare(UnlearnConfig(**base))


def run_task(config: UnlearnConfig, folder: Path, teacher: dict[str, Any] | None, ctx: Any = None) -> dict:
    """One sub-run into ``folder`` (its metrics when already finished; from its checkpoint when one is
    there); returns its metrics, or ``{"interrupted": (signum, step)}``."""
    from .. import cli
    from . import runs

    folder = Path(folder)
    if (folder / "metrics.json").is_file() and (folder / "run.json").is_file():
        return runs.load_result(folder)["metrics"]
    ctx = ctx if ctx is not None else _WORKER["ctx"]
    folder.mkdir(parents=True, exist_ok=True)
    with cli._StopFlag() as stop:
        try:
            result = cli._run_one(config, ctx, folder, teacher, False, stop)
        except cli.Interrupted as e:
            return {"interrupted": (e.signum, e.step)}
    runs.write_json(
        folder / "run.json",
        {"status": "done", "method": config.method, "generator": runs.generator_record(ctx, config)},
    )
    runs.remove_checkpoint(folder)
    return result["metrics"]


def run_all(
    tasks: list[tuple[UnlearnConfig, Path]],
    ctx: Any,
    teacher: dict[str, Any] | None,
    jobs: int,
    base: UnlearnConfig,
    on_done: Callable[[int, dict[str, Any]], None],
) -> None:
    """Every task, ``jobs`` at a time (1: in this process; more: worker processes with one torch thread
    each, each loading the model once). ``on_done(i, metrics)`` as each finishes."""
    from ..cli import Interrupted

    if jobs <= 1 or len(tasks) <= 1:
        for i, (config, folder) in enumerate(tasks):
            m = run_task(config, folder, teacher, ctx)
            if "interrupted" in m:
                raise Interrupted(*m["interrupted"])
            on_done(i, m)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending_interrupt = None
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(dataclasses.asdict(base), 1),
    ) as pool:
        futures = {pool.submit(run_task, c, f, teacher): i for i, (c, f) in enumerate(tasks)}
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for fut in done:
                m = fut.result()
                if "interrupted" in m:
                    pending_interrupt = pending_interrupt or m["interrupted"]
                    for other in remaining:
                        other.cancel()
                    continue
                on_done(futures[fut], m)
    if pending_interrupt is not None:
        raise Interrupted(*pending_interrupt)


def seeded_compare(
    base: UnlearnConfig,
    ctx: Any,
    out: Path,
    teacher: dict[str, Any] | None,
    variants: list[str],
    lr_grid: list[float],
    seeds: int,
    tune_seed: int | None = None,
    tolerance: float = 0.1,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune each variant's lr on ``tune_seed`` (default: the first seed after the evaluated ones), run it
    on seeds ``base.seed .. base.seed + seeds - 1``, and write ``compare.json``, ``compare.md`` and
    ``pareto.png`` into ``out``. Finished sub-runs are read back, not run again."""
    from . import atomic, plots, runs

    out = Path(out)
    seed_list = [base.seed + i for i in range(seeds)]
    tune_seed = base.seed + seeds if tune_seed is None else tune_seed
    if tune_seed in seed_list:
        raise ValueError(f"--tune-seed {tune_seed} is one of the evaluated seeds {seed_list}")
    tuning: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    if len(lr_grid) > 1:
        tasks = [
            (variant_config(base, v, lr, tune_seed), out / "tune" / v / f"lr{lr:g}")
            for v in variants
            for lr in lr_grid
        ]
        names = [v for v in variants for _ in lr_grid]

        def tuned(i: int, m: dict[str, Any]) -> None:
            tuning.append(row(names[i], m, str(tasks[i][1].relative_to(out))))
            log(f"tune {names[i]} lr {m['config']['lr_generator']:g}: steps to forget {m['steps_to_forget']}")

        run_all(tasks, ctx, teacher, jobs, base, tuned)
        for v in variants:
            lr, why = choose_lr([r for r in tuning if r["variant"] == v], tolerance)
            chosen[v] = {"lr": lr, "reason": why}
    else:
        chosen = {v: {"lr": lr_grid[0], "reason": "a single lr given"} for v in variants}
    tasks = [
        (variant_config(base, v, chosen[v]["lr"], s), out / v / f"seed{s}")
        for v in variants
        for s in seed_list
    ]
    names = [v for v in variants for _ in seed_list]
    rows: list[dict[str, Any] | None] = [None] * len(tasks)

    def evaluated(i: int, m: dict[str, Any]) -> None:
        rows[i] = row(names[i], m, str(tasks[i][1].relative_to(out)))
        log(f"{names[i]} seed {m['config']['seed']}: steps to forget {m['steps_to_forget']}")

    run_all(tasks, ctx, teacher, jobs, base, evaluated)
    done_rows = [r for r in rows if r is not None]
    tuning.sort(key=lambda r: (variants.index(r["variant"]), r["lr"]))
    base_record = {
        k: getattr(base, k)
        for k in (
            "forget", "override", "init", "weighting", "forget_weight", "steps", "batch", "forget_batch",
            "lr_pseudo", "ema", "eval_every", "eval_samples", "final_samples", "target", "mask_batches",
            "model", "dataset",
        )
    }  # fmt: skip
    result = {
        "dataset": base.dataset if base.model is None else f"{base.dataset} ({Path(base.model).name})",
        "rule": RULE.format(tol=tolerance),
        "frechet_tolerance": tolerance,
        "lr_grid": lr_grid,
        "tune_seed": tune_seed,
        "seeds": seed_list,
        "variants": {v: parse_variant(v) for v in variants},
        "base": base_record,
        "chosen_lr": chosen,
        "rows": done_rows,
        "summary": summarise(done_rows, variants),
        "tuning": tuning,
        "teacher": teacher,
    }
    runs.write_json(out / "compare.json", result)
    atomic.write_text(out / "compare.md", table(result))
    plots.pareto(out / "pareto.png", result)
    return result
