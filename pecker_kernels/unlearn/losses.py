"""The losses of one distillation iteration (docs/RECIPE.md): the pseudo-score's denoising loss and the
score-identity distillation (SiD) loss of the generator, with SFD's forgetting term."""

from __future__ import annotations

import torch
from torch import Tensor


def denoising_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """Per-sample noise-prediction MSE (mean over pixels), shape (B,)."""
    return (eps_pred - eps).square().flatten(1).mean(1)


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
