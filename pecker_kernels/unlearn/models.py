"""The evaluation classifier: a small CNN whose penultimate layer gives the features for Frechet
distances. (The diffusion networks are diffusers UNets: ``nets``.)"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Classifier(nn.Module):
    """Small CNN; ``features`` is the penultimate layer used for Frechet distances."""

    def __init__(
        self, image_size: int = 8, channels: int = 1, num_classes: int = 10, width: int = 32
    ) -> None:
        super().__init__()
        self.config = dict(image_size=image_size, channels=channels, num_classes=num_classes, width=width)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(8 * w, w),
            nn.ReLU(),
        )
        self.head = nn.Linear(w, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"classifier": Classifier}


def build(kind: str, config: dict[str, Any]) -> nn.Module:
    """A network of ``kind`` ("classifier") from its recorded config."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of: {', '.join(MODELS)}")
    return MODELS[kind](**config)
