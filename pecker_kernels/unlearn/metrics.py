"""Stand-ins for FID / forgetting accuracy: a project-trained classifier labels generated samples, and
Frechet distances are taken on its penultimate features."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


@torch.no_grad()
def classify(classifier: nn.Module, images: Tensor, batch: int = 1024) -> tuple[Tensor, Tensor]:
    """(predicted labels, penultimate features) for ``images``."""
    preds, feats = [], []
    for chunk in images.split(batch):
        f = classifier.features(chunk.clamp(-1, 1))
        feats.append(f)
        preds.append(classifier.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least two samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(s_a)
    # tr sqrt(S_a^1/2 S_b S_a^1/2) = tr sqrt(S_a S_b); the symmetric form keeps eigh applicable.
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def evaluate(
    classifier: nn.Module,
    samples: Tensor,
    labels: Tensor,
    real_features: dict[int, Tensor],
    forget: int,
    num_classes: int,
) -> dict[str, Any]:
    """Forgetting / retain accuracy, per-class accuracy and Frechet distances of generated ``samples``
    (``labels`` are the classes they were generated for) against real features per class."""
    preds, feats = classify(classifier, samples)
    hit = preds == labels
    per_class = {c: float(hit[labels == c].float().mean()) for c in range(num_classes) if (labels == c).any()}
    retain = labels != forget
    fd_class = {c: frechet_distance(feats[labels == c], real_features[c]) for c in per_class}
    # Overall: generated retained classes against real retained classes (the forgotten class is meant to
    # look different now); the forgotten class's own distance is reported per class.
    real_retain = torch.cat([real_features[c] for c in range(num_classes) if c != forget])
    real_all = torch.cat([real_features[c] for c in range(num_classes)])
    return {
        "forget_accuracy": per_class.get(forget, float("nan")),
        "retain_accuracy": float(hit[retain].float().mean()),
        "per_class_accuracy": {str(c): v for c, v in per_class.items()},
        "frechet": {
            "overall": frechet_distance(feats, real_all),
            "retain": frechet_distance(feats[retain], real_retain),
            "per_class": {str(c): v for c, v in fd_class.items()},
        },
    }


@torch.no_grad()
def forget_accuracy(classifier: nn.Module, samples: Tensor, forget: int) -> float:
    """Fraction of ``samples`` (generated for the forget class) that the classifier labels as it."""
    return float((classifier(samples.clamp(-1, 1)).argmax(1) == forget).float().mean())
