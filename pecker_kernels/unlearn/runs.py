"""Run folders: refuse to reuse one, build results in a staging folder and move it into place only when
everything is written (a failed or interrupted run leaves nothing behind); the files of one run; the
comparison table."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import plots
from .metrics import evaluate
from .train import teacher_samples
from .trainer import Context, UnlearnConfig


def check_out(out: Path) -> None:
    """ValueError when ``out`` exists and is not an empty folder (it holds another run or anything else)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"output folder {out} already exists and is not empty (another run?); "
            "choose a new --out or remove it first"
        )


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``out``; rename it to ``out`` on success, delete it on error."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        check_out(out)  # someone may have written there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def reference(
    ctx: Context, config: UnlearnConfig, ddim_steps: int = 50
) -> tuple[dict[str, Any], torch.Tensor]:
    """The teacher's own metrics (DDIM samples, the same per-class count as the final evaluation)."""
    images, labels = teacher_samples(ctx.teacher, ctx.data, config.final_samples, ddim_steps, config.seed + 2)
    metrics = evaluate(ctx.classifier, images, labels, ctx.real_features, config.forget, ctx.data.num_classes)
    metrics["ddim_steps"] = ddim_steps
    return metrics, images


def write_run(folder: Path, result: dict[str, Any], ctx: Context, teacher: dict[str, Any] | None) -> None:
    """metrics.json, history.json, samples_before.png, samples_after.png, curves.png."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = dict(result["metrics"])
    if teacher is not None:
        metrics["teacher"] = teacher
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "history.json", {"train": result["history"], "evals": result["evals"]})
    labels = torch.arange(ctx.data.num_classes).repeat_interleave(metrics["config"]["final_samples"])
    names = ctx.data.class_names
    m = metrics["method"]
    forget = metrics["forget_class"]
    plots.sample_grid(
        folder / "samples_before.png", result["before"], labels, names, "generator before unlearning"
    )
    plots.sample_grid(
        folder / "samples_after.png",
        result["after"],
        labels,
        names,
        f"{m} after {metrics['steps']} steps (forgot {forget})",
    )
    plots.curves(
        folder / "curves.png", result, f"{m}: forget class {forget}, override {metrics['override_class']}"
    )


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(results: dict[str, dict[str, Any]], teacher: dict[str, Any] | None) -> str:
    """Markdown table: teacher, the generator before unlearning, then each method."""
    first = next(iter(results.values()))["metrics"]
    forget = str(first["forget_class"])
    head = (
        "| model | forget acc | retain acc | Frechet retained | Frechet forgotten | Frechet overall "
        "| steps to forget | s to forget | mask set-up s | steps | wall s | ms/step fwd+bwd | ms/step mask "
        "| ms/step update |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(name: str, m: dict[str, Any], run: dict[str, Any] | None) -> str:
        fd = m["frechet"]
        cells = [
            name,
            _pct(m["forget_accuracy"]),
            _pct(m["retain_accuracy"]),
            _num(fd["retain"]),
            _num(fd["per_class"].get(forget)),
            _num(fd["overall"]),
        ]
        if run is None:
            cells += ["-"] * 8
        else:
            per = run["per_step_seconds"]
            cells += [
                _num(run["steps_to_forget"], "{}"),
                _num(run["time_to_forget_seconds"]),
                _num(run["setup_seconds"], "{:.2f}"),
                str(run["steps"]),
                _num(run["wall_seconds"]),
                _num(1000 * per.get("forward_backward", 0.0)),
                _num(1000 * per.get("mask", 0.0), "{:.2f}"),
                _num(1000 * per.get("update", 0.0), "{:.2f}"),
            ]
        return "| " + " | ".join(cells) + " |"

    if teacher is not None:
        lines.append(row(f"teacher (DDIM {teacher['ddim_steps']})", teacher, None))
    lines.append(row("generator before unlearning", first["initial"], None))
    for name, r in results.items():
        m = r["metrics"]
        label = (
            name
            if m["method"] == "sfd"
            else f"{name} (ratio {m['config']['ratio']}, refresh {m['config']['refresh_every']})"
        )
        lines.append(row(label, m, m))
    target = first["target"]
    lines.append("")
    lines.append(
        f"Forget class {forget}, override {first['override_class']}, {first['config']['dataset']}, seed "
        f"{first['config']['seed']}; accuracies and Frechet distances (classifier features) from "
        f"{first['config']['final_samples']} samples per class; 'to forget' = first evaluation (every "
        f"{first['config']['eval_every']} steps) with forget acc < {target:.0%}; seconds include the mask "
        "set-up (pecker's one-shot saliency pass) and exclude evaluation; Frechet forgotten = samples "
        "generated for the forgotten class against its real images (large once it is forgotten)."
    )
    return "\n".join(lines) + "\n"
