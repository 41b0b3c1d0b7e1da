"""NVTX ranges around the package's ops, in one domain so Nsight Systems groups them.

Ranges (domain ``pecker_kernels``): ``select``, ``write_masks``, ``update``. A range costs about a
microsecond of Python when no profiler is attached (nvtx returns at once). Without the ``nvtx`` package,
a CUDA build of torch marks the same ranges through ``torch.cuda.nvtx`` (no domain: named
``pecker_kernels/select`` and so on); a CPU-only torch marks none and the ``with`` costs nothing more.
"""

from __future__ import annotations

from typing import ClassVar

DOMAIN = "pecker_kernels"

try:
    import nvtx as _nvtx

    _domain = _nvtx.get_domain(DOMAIN)
except ImportError:  # profiling is optional
    _domain = None

_torch_nvtx: object | None = None  # torch.cuda.nvtx, once known to work (False: it does not)


def _fallback():
    """torch.cuda.nvtx where torch was built with CUDA and a device is present, else False."""
    global _torch_nvtx
    if _torch_nvtx is None:
        import torch

        _torch_nvtx = torch.cuda.nvtx if torch.version.cuda and torch.cuda.is_available() else False
    return _torch_nvtx


class nvtx_range:
    """Marks the enclosed work as a range called ``name`` in Nsight Systems."""

    _attributes: ClassVar[dict[str, object]] = {}  # built once per name: building them is the costly part

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __enter__(self) -> None:
        if _domain is None:
            fallback = _fallback()
            if fallback:
                fallback.range_push(f"{DOMAIN}/{self._name}")
            return
        attributes = self._attributes.get(self._name)
        if attributes is None:
            attributes = self._attributes[self._name] = _domain.get_event_attributes(message=self._name)
        _domain.push_range(attributes)

    def __exit__(self, *exc: object) -> None:
        if _domain is not None:
            _domain.pop_range()
        elif _torch_nvtx:
            _torch_nvtx.range_pop()
