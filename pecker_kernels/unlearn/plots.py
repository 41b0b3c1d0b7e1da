"""PNG figures: sample grids (one row per class), training curves, and the pecker-vs-sfd comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import torch
from torch import Tensor


def sample_grid(
    path: Path, images: Tensor, labels: Tensor, class_names: tuple[str, ...], title: str, columns: int = 10
) -> None:
    """One row per class, the first ``columns`` samples generated for it (one mosaic image: fast)."""
    rows, size, pad = len(class_names), images.shape[-1], 1
    cell = size + pad
    mosaic = torch.ones(rows * cell + pad, columns * cell + pad)
    for r in range(rows):
        picks = images[labels == r][:columns, 0]
        for c in range(len(picks)):
            top, left = pad + r * cell, pad + c * cell
            mosaic[top : top + size, left : left + size] = (picks[c].clamp(-1, 1) + 1) / 2
    fig, ax = plt.subplots(figsize=(columns * 0.45 + 0.8, rows * 0.45 + 0.5))
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([pad + r * cell + size / 2 - 0.5 for r in range(rows)], class_names)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    out = [float(t[max(0, i - window + 1) : i + 1].mean()) for i in range(len(t))]
    return out


def curves(path: Path, result: dict[str, Any], title: str) -> None:
    """Losses per step and forgetting / retain accuracy per evaluation."""
    history, evals, target = result["history"], result["evals"], result["metrics"]["target"]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_l.plot(history["step"], _smooth(history["loss_pseudo"]), label="pseudo-score loss")
    ax_l.plot(history["step"], _smooth(history["loss_generator"]), label="generator SiD loss")
    ax_l.set_xlabel("step")
    ax_l.set_title("losses (10-step mean)")
    ax_l.legend()
    _accuracy_axes(ax_a, [(result["metrics"]["method"], evals)], target)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
