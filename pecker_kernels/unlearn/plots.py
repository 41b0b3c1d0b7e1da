"""PNG figures: sample grids (one row per class), training curves, and the pecker-vs-sfd comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from . import atomic


def _save(fig, path: Path, **kwargs: Any) -> None:
    """``fig`` as a PNG at ``path``, written atomically; the figure is closed."""
    try:
        atomic.write_file(Path(path), lambda tmp: fig.savefig(tmp, format="png", **kwargs))
    finally:
        plt.close(fig)


def sample_grid(
    path: Path, images: Tensor, labels: Tensor, class_names: tuple[str, ...], title: str, columns: int = 10
) -> None:
    """One row per class, the first ``columns`` samples generated for it (one mosaic image: fast)."""
    rows, size, pad = len(class_names), images.shape[-1], 1
    channels = 3 if images.shape[1] == 3 else 1  # RGB, or the first channel in gray
    cell = size + pad
    mosaic = torch.ones(channels, rows * cell + pad, columns * cell + pad)
    for r in range(rows):
        picks = images[labels == r][:columns, :channels]
        for c in range(len(picks)):
            top, left = pad + r * cell, pad + c * cell
            mosaic[:, top : top + size, left : left + size] = (picks[c].float().clamp(-1, 1) + 1) / 2
    fig, ax = plt.subplots(figsize=(columns * 0.45 + 0.8, rows * 0.45 + 0.5))
    shown = mosaic[0].numpy() if channels == 1 else mosaic.permute(1, 2, 0).numpy()
    ax.imshow(shown, cmap="gray" if channels == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * cell + size / 2 - 0.5 for r in range(rows)], class_names)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    _save(fig, path, dpi=100, bbox_inches="tight")


def _smooth(values: list[float], window: int = 10) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    out = [float(t[max(0, i - window + 1) : i + 1].mean()) for i in range(len(t))]
    return out


def curves(path: Path, result: dict[str, Any], title: str) -> None:
    """Losses per step and forgetting / retain accuracy per evaluation."""
    history, evals, target = result["history"], result["evals"], result["metrics"]["target"]
    has_acc = bool(evals["step"])
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 3.5), squeeze=False)
    ax_l = axes[0][0]
    ax_l.plot(history["step"], _smooth(history["loss_pseudo"]), label="pseudo-score loss")
    ax_l.plot(history["step"], _smooth(history["loss_generator"]), label="generator SiD loss")
    ax_l.set_xlabel("step")
    ax_l.set_title("losses (10-step mean)")
    ax_l.legend()
    if has_acc:
        _accuracy_axes(axes[0][1], [(result["metrics"]["method"], evals)], target)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, dpi=100)


def _accuracy_axes(ax, runs: list[tuple[str, dict[str, list]]], target: float, x: str = "step") -> None:
    for name, evals in runs:
        (line,) = ax.plot(evals[x], evals["forget_accuracy"], label=f"{name}: forget acc")
        ax.plot(evals[x], evals["retain_accuracy"], "--", color=line.get_color(), label=f"{name}: retain acc")
    ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target:.0%}")
    ax.set_xlabel("step" if x == "step" else "training seconds (setup included, evaluation excluded)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("accuracy of the classifier on generated samples")
    ax.legend(fontsize=7)


def comparison(path: Path, results: dict[str, dict[str, Any]], title: str) -> None:
    """Forgetting / retain accuracy of every method against steps and against seconds."""
    target = next(iter(results.values()))["metrics"]["target"]
    runs = [(name, r["evals"]) for name, r in results.items()]
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 3.8))
    _accuracy_axes(ax_s, runs, target, "step")
    _accuracy_axes(ax_t, runs, target, "train_seconds")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, dpi=100)


def pareto(path: Path, result: dict[str, Any]) -> None:
    """Seeded comparison: retained-class Frechet distance against time (left) and steps (right) to
    forget; a small point per seed, a large one with sample-std error bars per variant (runs that never
    forgot are left out and counted in the legend)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, s) in enumerate(result["summary"].items()):
        color = colors[i % len(colors)]
        rows = [r for r in result["rows"] if r["variant"] == variant and r["steps_to_forget"] is not None]
        missed = s["seeds"] - len(rows)
        label = f"{variant} (lr {s['lr']:g})" + (f", {missed} never forgot" if missed else "")
        for ax, key in zip(axes, ("time_to_forget_seconds", "steps_to_forget"), strict=True):
            ax.scatter(
                [r[key] for r in rows], [r["frechet_retain"] for r in rows], s=12, alpha=0.45, color=color
            )
            mx, my = s[key], s["frechet_retain"]
            if mx["mean"] is not None and my["mean"] is not None:
                ax.errorbar(
                    mx["mean"], my["mean"], xerr=mx["std"], yerr=my["std"], fmt="o", ms=7, color=color,
                    capsize=3, label=label,
                )  # fmt: skip
    start = [r["frechet_retain_start"] for r in result["rows"] if r["frechet_retain_start"] is not None]
    for ax, xlabel in zip(
        axes,
        ("seconds to forget (mask set-up included, evaluation excluded)", "steps to forget"),
        strict=True,
    ):
        if start:
            ax.axhline(
                sum(start) / len(start), color="gray", lw=0.8, ls=":", label="start (before unlearning)"
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Frechet distance, retained classes (lower is better)")
    axes[1].legend(fontsize=7)
    n = len(result["seeds"])
    fig.suptitle(f"{result['dataset']}: forget {result['base']['forget']}, {n} seeds (mean ± std)")
    fig.tight_layout()
    _save(fig, path, dpi=100)
