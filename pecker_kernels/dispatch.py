"""Picks the backend for a device: the fastest one available, or the one the user forced."""

from __future__ import annotations

from types import ModuleType

import torch

from .backends import BACKENDS, available, load

# Preference order per device type for backend="auto".
_AUTO = {"cuda": ("cuda", "triton", "eager"), "cpu": ("cpu", "eager")}


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``device``. ``backend`` is "auto" or one of ``BACKENDS``."""
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO.get(device.type, ("eager",)):
            if available(name, device):
                return load(name)
        return load("eager")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if not available(backend, device):
        usable = [name for name in BACKENDS if available(name, device)]
        raise ValueError(
            f"backend {backend!r} is not available for tensors on {device}; "
            f"available there: {', '.join(usable)}"
        )
    return load(backend)


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device`` in this process."""
    return [name for name in BACKENDS if available(name, torch.device(device))]
