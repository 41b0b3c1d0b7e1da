"""The PECKER recipe on a class-conditional diffusers DDPM: score-forgetting distillation into a one-step
generator whose updates go only to its most salient weights (the loop: ``trainer``; the recipe in full:
docs/RECIPE.md). Models are read from local folders only: the Hugging Face hub is never contacted."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers (and huggingface_hub) are imported

from .data import DatasetUnavailableError, load_dataset
from .losses import sid_loss
from .trainer import METHODS, Distiller, UnlearnConfig, prepare

__all__ = [
    "METHODS",
    "DatasetUnavailableError",
    "Distiller",
    "UnlearnConfig",
    "load_dataset",
    "prepare",
    "sid_loss",
]
