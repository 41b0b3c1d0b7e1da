"""Implementations of the same three ops (select, write_masks, update); see ``base`` for the contract."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("eager", "cpu", "cuda", "triton")


def load(name: str) -> ModuleType:
    """The backend module called ``name`` (one of ``BACKENDS``)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return importlib.import_module(f"pecker_kernels.backends.{name}")


def available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device`` in this process."""
    try:
        module = load(name)
    except ImportError:
        return False
    return bool(module.is_available(torch.device(device)))
