"""Loads the compiled modules built from csrc/ and python/ (``_C`` for the CPU, ``_C_cuda``)."""

from __future__ import annotations

import importlib
from types import ModuleType


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"pecker_kernels.{name}")
    except ImportError:
        return None


cpu_module: ModuleType | None = _load("_C")
cuda_module: ModuleType | None = _load("_C_cuda")
