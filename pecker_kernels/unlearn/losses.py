"""The losses of one distillation iteration (docs/RECIPE.md): the pseudo-score's denoising loss and the
score-identity distillation (SiD) loss of the generator, with SFD's forgetting term."""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHTINGS = ("sfd", "pooled")


def denoising_loss(eps_pred: Tensor, eps: Tensor, reduce: str = "mean") -> Tensor:
    """Per-sample noise-prediction squared error, shape (B,): the mean over pixels (``"mean"``) or, as in
    SFD's code, the sum (``"sum"``)."""
    sq = (eps_pred - eps).square().flatten(1)
    if reduce == "sum":
        return sq.sum(1)
    if reduce == "mean":
        return sq.mean(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sid_loss(x0: Tensor, f_teacher: Tensor, f_pseudo: Tensor, alpha: float = 1.2) -> Tensor:
    """Per-sample SiD loss, shape (B,):

        sum_pixels (f_T - f_P) * ((f_T - x0) - alpha * (f_T - f_P)) / w,   w = max(mean|f_T - x0|, 1e-5)

    ``w`` carries no gradient; gradients reach ``x0`` directly and through whatever produced f_T, f_P.
    """
    diff = f_teacher - f_pseudo
    w = (f_teacher - x0).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
    return (diff * ((f_teacher - x0) - alpha * diff)).flatten(1).sum(1) / w


def weighted_mean(per_sample: Tensor, weights: Tensor) -> Tensor:
    """Mean over the batch of ``weights * per_sample`` (1.0 for retained classes, 0.01 for the forgotten)."""
    return (per_sample * weights).mean()


def class_weights(labels_forget_mask: Tensor, forget_weight: float) -> Tensor:
    """Per-sample weights: ``forget_weight`` where the mask is set, 1.0 elsewhere."""
    return torch.where(labels_forget_mask, forget_weight, 1.0)


def row_coefficients(is_forget: Tensor, forget_weight: float, weighting: str = "sfd") -> Tensor:
    """Per-row coefficients ``a`` such that a loss is ``sum_b a_b * loss_b`` over one batch holding the
    remaining-class rows and the forget-class rows:

    - ``"sfd"`` (SFD's code): mean over the remaining rows + ``forget_weight`` x mean over the forget
      rows, each term over its own batch: a_b = 1 / n_remaining, or forget_weight / n_forget.
    - ``"pooled"`` (this project's first weighting): one mean over the pooled batch with the forget rows
      weighted ``forget_weight``: a_b = class_weights / n.
    """
    n = len(is_forget)
    if weighting == "pooled":
        return class_weights(is_forget, forget_weight) / n
    if weighting != "sfd":
        raise ValueError(f"unknown weighting {weighting!r}; expected one of: {', '.join(WEIGHTINGS)}")
    n_forget = int(is_forget.sum())
    n_remaining = n - n_forget
    remaining = 1.0 / n_remaining if n_remaining else 0.0
    forget = forget_weight / n_forget if n_forget else 0.0
    return torch.where(is_forget, forget, remaining)


def pixel_reduction(weighting: str) -> str:
    """How the pseudo-score's squared error is reduced over pixels: SFD sums, ``pooled`` averages."""
    return "sum" if weighting == "sfd" else "mean"
